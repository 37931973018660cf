"""Task state changes as a stream of :class:`TaskEvent`, for the web tier (SSE, polling views).

Each event carries the etcd revision of the write that made it; revisions are the
event ids: resume with ``after_revision`` and nothing is missed or repeated. The public
entry points are :func:`etcd_broker.backend.result_backend.watch_task` (an iterator) and
:func:`etcd_broker.backend.result_backend.follow_task` (a :class:`TaskStream`, for loops that also keep a clock).
"""
from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from celery import states

from etcd_broker.backend.result_store import ResultStore, Stored, status_of
from etcd_broker.core.watch import EVENT_PUT, Watch

logger = logging.getLogger(__name__)

FINAL_STATES = frozenset({states.SUCCESS, states.FAILURE, states.REVOKED})
#: Inbox marker for a deleted key (forget() or expiry): the task reads as PENDING again.
DELETED = b""
#: Our subscriptions' label in the hub's event counts.
HUB_LABEL = "task-events"


@dataclass(frozen=True)
class TaskEvent:
    """One state of one task, JSON-safe (``to_dict()``), ordered by ``revision``."""

    task_id: str
    state: str
    result: Any
    progress: int | None
    revision: int
    date_done: str | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def pending(cls, task_id: str, revision: int = 0) -> TaskEvent:
        return cls(task_id=task_id, state=states.PENDING, result=None, progress=None, revision=revision)

    @classmethod
    def from_meta(cls, task_id: str, meta: dict[str, Any], revision: int) -> TaskEvent:
        """Build from Celery's stored meta as decoded from JSON (exceptions still as dicts)."""
        state = meta.get("status", states.PENDING)
        result = meta.get("result")
        if state in states.EXCEPTION_STATES:
            result = _exception_dict(result)
        return cls(task_id=task_id, state=state, result=result, progress=_progress(state, result),
                   revision=revision, date_done=meta.get("date_done"))


def _exception_dict(result: Any) -> dict[str, str]:
    if not isinstance(result, dict):
        return {"exc_type": "Exception", "exc_message": str(result)}
    args = result.get("exc_message", ())
    if isinstance(args, (list, tuple)):
        message = "" if not args else str(args[0]) if len(args) == 1 else str(tuple(args))
    else:
        message = str(args)
    return {"exc_type": str(result.get("exc_type", "Exception")), "exc_message": message}


def _progress(state: str, result: Any) -> int | None:
    if state == states.SUCCESS:
        return 100
    value = result.get("progress") if isinstance(result, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return max(0, min(100, int(round(value))))


class TaskStream:
    """One task's states as :class:`TaskEvent`, from one subscription on the watch hub.

    Subscribes from now and reads the current state once etcd confirmed it; a resuming
    caller's subscription starts at ``after_revision + 1`` instead, replaying what it missed. :meth:`next` returns each new
    state once, in revision order, or None when nothing changed within ``timeout``: the
    subscription stays open across quiet periods. ``finished`` turns True after a final
    state (or at once if the caller has seen the final state already). Close it (or use
    ``with``) to unsubscribe.
    """

    def __init__(self, store: ResultStore, task_id: str, after_revision: int | None,
                 decode: Callable[[bytes], dict]) -> None:
        self.store = store
        self.task_id = task_id
        self.after = after_revision
        self.decode = decode
        self.finished = False
        self._last = -1 if after_revision is None else after_revision
        self._inbox: queue.SimpleQueue[Stored] = queue.SimpleQueue()
        self._watch: Watch | None = None

    def open(self) -> TaskStream:
        if self.after is None:
            return self._open_now()
        stored, header = self.store.read(self.task_id)
        start = header + 1
        if stored is not None and stored.mod_revision > self.after:
            start = max(self.after + 1, stored.create_revision)  # replay what the caller missed
        elif stored is not None and status_of(stored.value) in FINAL_STATES:
            self.finished = True  # the caller has seen the final state already
            return self
        self._watch = self._subscribe(start)
        return self

    def _open_now(self) -> TaskStream:
        """Subscribe from now, then read the current state once etcd confirmed the subscription.

        (A subscription from the read's revision would be served by etcd's catch-up loop,
        up to 100 ms late, whenever anything was written in between.)
        """
        self._watch = self._subscribe(None)
        if not self.store.hub.wait_created(self._watch, self.store.client.timeout):
            self.close()
            raise TimeoutError(f"etcd did not confirm the watch of task {self.task_id} "
                               f"within {self.store.client.timeout}s")
        stored, _ = self.store.read(self.task_id)
        self._inbox.put(stored or Stored(DELETED, 0))
        return self

    def _subscribe(self, start: int | None) -> Watch:
        return self.store.hub.subscribe(self.store.keys.result(self.task_id), self._on_events,
                                        start_revision=start, on_resync=self._on_resync, label=HUB_LABEL)

    def next(self, timeout: float | None) -> TaskEvent | None:
        """The next new state, or None if none came within ``timeout`` seconds (None: wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                stored = self._inbox.get(timeout=wait)
            except queue.Empty:
                return None
            if stored.mod_revision <= self._last:
                continue  # replayed after a reconnect, or both read and watched
            self._last = stored.mod_revision
            event = _to_event(self.task_id, stored, self.decode)
            self.finished = event.final
            return event
        return None

    def close(self) -> None:
        if self._watch is not None:
            self.store.hub.unsubscribe(self._watch)
            self._watch = None

    def __enter__(self) -> TaskStream:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- the hub's thread only fills the inbox --------------------------------------------
    def _on_events(self, events: Any) -> None:
        for event in events:
            value = event.kv.value if event.type == EVENT_PUT else DELETED
            self._inbox.put(Stored(value, event.kv.mod_revision))

    def _on_resync(self) -> int:
        stored, header = self.store.read(self.task_id)
        logger.info("task %s: history compacted; resuming from its current state", self.task_id)
        self._inbox.put(stored or Stored(DELETED, header))
        return header


def iter_events(stream: TaskStream, timeout: float | None) -> Iterator[TaskEvent]:
    """Yield the stream's events until a final state; TimeoutError after ``timeout`` s of quiet."""
    with stream:
        stream.open()
        while not stream.finished:
            event = stream.next(timeout)
            if event is None:
                raise TimeoutError(f"no state change of task {stream.task_id} within {timeout}s")
            yield event


def _to_event(task_id: str, stored: Stored, decode: Callable[[bytes], dict]) -> TaskEvent:
    if stored.value == DELETED:
        return TaskEvent.pending(task_id, stored.mod_revision)
    return TaskEvent.from_meta(task_id, decode(stored.value), stored.mod_revision)
