"""One watch on ``<prefix>/results/`` per process, routing each task's writes to whoever waits on it.

A per-task watch is confirmed by etcd asynchronously (through gRPC's request thread),
and we measured it confirmed *after* the task's result in some round trips, so every
get() had to read as well. A subscription here is a dict entry, in place before the
task is published; while the prefix watch is live nothing written after that is missed.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from etcd_broker.result_store import ResultStore, Stored
from etcd_broker.watch import Watch

logger = logging.getLogger(__name__)

#: With nobody subscribed for this long, the prefix watch stops (at the next event it
#: brings), so an idle process stops receiving every task's results.
IDLE_STOP_SECONDS = 60.0

#: ``sink(task_id, stored)``; ``stored`` None means "read the key again".
Sink = Callable[[str, "Stored | None"], None]


class ResultRouter:
    """Routes puts under the results prefix to subscribed sinks; re-reads after a reconnect."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._routes: dict[str, tuple[Sink, ...]] = {}
        self._watch: Watch | None = None
        self._idle_since = time.monotonic()

    def subscribe(self, task_id: str, sink: Sink) -> bool:
        """Route ``task_id``'s writes to ``sink``. True if the watch was live already:
        then every write from now on arrives (for a task not yet published: all of them).
        """
        with self._lock:
            self._routes[task_id] = self._routes.get(task_id, ()) + (sink,)
            if self._watch is None:
                self._watch = self._start()
            return self._watch.created.is_set()

    def unsubscribe(self, task_id: str, sink: Sink) -> None:
        with self._lock:
            sinks = tuple(s for s in self._routes.get(task_id, ()) if s != sink)
            if sinks:
                self._routes[task_id] = sinks
            else:
                self._routes.pop(task_id, None)
                if not self._routes:
                    self._idle_since = time.monotonic()

    @property
    def live(self) -> bool:
        watch = self._watch
        return watch is not None and watch.created.is_set()

    def _start(self) -> Watch:
        return self.store.stream.watch(self.store.keys.results(), self._on_events, prefix=True,
                                       puts_only=True, on_created=self._on_created,
                                       on_resync=self._on_resync)

    # -- stream thread callbacks --------------------------------------------------------
    def _on_events(self, events: Sequence[Any]) -> None:
        self.store.saw_revision(events[-1].kv.mod_revision)
        routes, keys = self._routes, self.store.keys
        for event in events:
            task_id = keys.task_id_of_result(event.kv.key)
            for sink in routes.get(task_id, ()):
                sink(task_id, Stored.from_kv(event.kv))
        if not routes and time.monotonic() - self._idle_since > IDLE_STOP_SECONDS:
            self._stop_if_idle()

    def _on_created(self) -> None:
        # First create: keys subscribed before it was live may have been written already.
        # A re-create after a reconnect: the watch resumes by revision, and we read anyway.
        for task_id, sinks in self._snapshot():
            for sink in sinks:
                sink(task_id, None)

    def _on_resync(self) -> int:
        snapshot = self._snapshot()
        found, revision = self.store.read_many(task_id for task_id, _ in snapshot)
        for task_id, sinks in snapshot:
            if task_id in found:
                for sink in sinks:
                    sink(task_id, found[task_id])
        return revision

    def _snapshot(self) -> list[tuple[str, tuple[Sink, ...]]]:
        with self._lock:
            return list(self._routes.items())

    def _stop_if_idle(self) -> None:
        with self._lock:
            watch = self._watch if not self._routes else None
            self._watch = None if watch is not None else self._watch
        if watch is not None:
            logger.debug("no task results awaited for %.0fs: stopping the results watch", IDLE_STOP_SECONDS)
            self.store.stream.cancel(watch)
