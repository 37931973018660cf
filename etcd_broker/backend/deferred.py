"""STARTED written only for tasks still running after a short delay (``started_delay``).

Celery's ``task_track_started`` writes STARTED before every task body: for a job of a few
milliseconds that is one etcd proposal (a Raft entry and a disk sync) that nobody sees, since
SUCCESS replaces it at once. Here the running task's STARTED is held back; a timer thread writes
it once the task has run ``delay`` seconds, and any later state of the task (PROGRESS, SUCCESS,
FAILURE...) drops it first. A per-task lock keeps the order: a held STARTED that is being written
finishes before that later state is written, so STARTED never lands after it.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable

from etcd_broker.core import forking

logger = logging.getLogger(__name__)


class _Held:
    """One held STARTED: the write to run, and a lock that orders it before the task's next state."""

    __slots__ = ("write", "lock", "dropped")

    def __init__(self, write: Callable[[], object]) -> None:
        self.write = write
        self.lock = threading.Lock()
        self.dropped = False


class DeferredStarted:
    """Per-process timer of held STARTED writes (a fork starts its own thread on first use)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._held: dict[str, _Held] = {}
        self._heap: list[tuple[float, int, str, _Held]] = []
        self._order = itertools.count()
        # its lock is unlocked again in a forked child (a thread holding it did not follow)
        self._wake = threading.Condition(forking.ChildLock())
        self._pid = 0
        forking.reset_in_child(self, DeferredStarted._forget)

    def _forget(self) -> None:
        """In a forked child: the parent's held writes (and their locks) are not ours; the timer
        thread starts again on first use."""
        self._held = {}
        self._heap = []
        self._pid = 0

    def hold(self, task_id: str, write: Callable[[], object]) -> None:
        """Run ``write`` after :attr:`delay` unless :meth:`drop` comes first."""
        held = _Held(write)
        with self._wake:
            self._start_if_needed()
            self._held[task_id] = held
            heapq.heappush(self._heap, (time.monotonic() + self.delay, next(self._order), task_id, held))
            self._wake.notify()

    def drop(self, task_id: str) -> None:
        """The task writes another state: its held STARTED is dropped (or finishes writing first)."""
        with self._wake:
            held = self._held.pop(task_id, None)
        if held is not None:
            with held.lock:
                held.dropped = True

    def _start_if_needed(self) -> None:
        if self._pid != os.getpid():  # new process (or a fork): the parent's thread is not ours
            self._pid = os.getpid()
            self._held.clear()
            self._heap.clear()
            threading.Thread(target=self._loop, name="etcd-started", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, task_id, held = heapq.heappop(self._heap)
            self._write(task_id, held)  # still in _held while writing: a drop() waits for it

    def _write(self, task_id: str, held: _Held) -> None:
        with held.lock:
            if not held.dropped:
                held.dropped = True
                try:
                    held.write()
                except Exception:  # noqa: BLE001 - a lost STARTED must not kill the timer; the task goes on
                    logger.warning("STARTED of task %s not written", task_id, exc_info=True)
        with self._wake:
            if self._held.get(task_id) is held:
                del self._held[task_id]
