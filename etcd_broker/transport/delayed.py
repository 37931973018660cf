"""Native delayed delivery: ETA tasks wait in etcd in due-time order, not in a worker's memory.

Celery sends ``countdown``/``eta`` as the ``eta`` header and a worker that receives such a task
holds it in memory until it is due (about 10 KB each; a restart gives them all back and takes
them again). Here a publish of a task due at least ``MIN_DELAY_SECONDS`` ahead is stored under
``q/<queue>/delayed/<due ms>/<band>/<seq>`` instead of ``ready/``, and offered to consumers only
when due: every process that consumes the queue follows its ``delayed/`` keys (one prefix watch,
puts only) and keeps the earliest due time; one thread per transport sleeps until then and moves
what is due to ``ready/<band>/<seq>`` (its place among ready messages: priority, then age), up to
``MOVE_BATCH`` messages per transaction, each guarded by its key's mod revision, so whichever
process moves a message moves it once. The ready put wakes the consumers as any publish does,
and the worker runs the task at once (its ``eta`` is past). No timer re-reads a followed queue:
the watch and the transport's safety re-check stand for it (delivery.py: if the stream did not
answer a progress request up to etcd's revision, ``look_again_all``), so an idle mover costs etcd
nothing. A message's TTL goes with it: the
delayed key hangs on the same lease and keeps its deadline, and so does the ready key.

Revoking a waiting task: Celery's ``revoke`` reaches the live workers, which keep the id and
discard the task when it arrives (as for any revoked id; ``--statedb`` keeps the ids across a
restart); the transport does not index delayed messages by task id.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any

from etcd_broker.core import ops
from etcd_broker.core.ops import KeySpace, range_end
from etcd_broker.core.watch import Watch, WatchHub

logger = logging.getLogger(__name__)

#: Shortest delay worth the detour through delayed/: a task due sooner goes to ready/ (the worker waits).
MIN_DELAY_SECONDS = 1.0
#: Most messages moved in one transaction (a delete and a put each; etcd allows 128 operations).
MOVE_BATCH = 64
#: Most message bytes moved in one transaction (etcd refuses requests over 1.5 MiB).
MOVE_BATCH_BYTES = 1_048_576
#: Longest sleep of the mover thread, and longest wait after repeated errors (seconds). No timer
#: re-reads a queue: a put the watch stream missed is caught by the transport's safety re-check
#: (delivery.py: one read and a progress request for the whole stream), which calls look_again_all.
MAX_WAIT_SECONDS = 30.0
#: Least time between two moves of one queue (seconds): messages due within it move in one transaction
#: instead of one each (at 400 due per second: 10 transactions, not 400), well inside the 1 s precision.
MOVE_INTERVAL = 0.1
#: First wait after an unexpected error in the mover (seconds); doubled up to MAX_WAIT_SECONDS.
ERROR_BACKOFF = 1.0
#: The next due time is looked for within these many seconds ahead first, then without bound: etcd
#: visits every key of a range to count it, so a read bounded by a due time visits the keys due
#: before it, not the whole backlog (with 200k tasks waiting, each move's unbounded read visited
#: all 200k keys).
LOOK_AHEAD = (1.0, 60.0, None)


def due_time(message: dict, now: float) -> float | None:
    """The epoch second a Celery task message is due (its ``eta`` header), if far enough ahead.

    None for a message without an ``eta``, one due within ``MIN_DELAY_SECONDS``, or a naive
    ``eta`` (in the app's timezone, unknown here: the worker holds that one, as before).
    """
    eta = (message.get("headers") or {}).get("eta")
    if not isinstance(eta, str):
        return None
    try:
        when = datetime.fromisoformat(eta)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    due = when.timestamp()
    return due if due - now >= MIN_DELAY_SECONDS else None


def put(client: Any, leases: Any, key: str, value: bytes, deadline: float | None, guard: Any = None) -> bool:
    """Publish an ETA task under ``delayed/`` (``key``), on its TTL lease if it expires (``leases``:
    core.ops.LeasePool); concurrent publishers share a transaction, as ready puts do. ``guard``
    (channel.py's ``Guard``): written once; False if an earlier attempt of this publish stored it."""
    for attempt in range(2):
        lease = leases.lease_for(deadline) if deadline is not None else 0
        compare, success = [], [ops.put(key, value, lease)]
        if guard is not None:
            compare, success = [guard.compare()], [*success, guard.put()]
        try:
            return ops.shared(client).txn(compare, success).succeeded
        except ops.LeaseNotFound:
            if attempt or not lease:
                raise
            leases.forget(lease)
    raise AssertionError("unreachable")


class DelayedMover:
    """One transport's mover: follows the ``delayed/`` keys of its consumed queues, moves what is due."""

    def __init__(self, client: Any, keys: KeySpace, hub: Callable[[], WatchHub]) -> None:
        self.client, self.keys, self._hub = client, keys, hub
        self._next: dict[str, float | None] = {}  # queue -> earliest due time known (None: nothing waits)
        self._watches: dict[str, Watch] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._moving = False  # the thread took due queues and has not looked for more since

    def follow(self, queue: str) -> None:
        """Move ``queue``'s delayed messages when due (idempotent)."""
        with self._lock:
            if queue in self._watches:
                return
            self._next[queue] = 0.0  # look at once: some may be due already
            self._watches[queue] = self._hub().subscribe(
                self.keys.delayed(queue), partial(self._on_puts, queue), prefix=True, puts_only=True,
                on_created=partial(self._look_now, queue), label="delayed")
            if self._thread is None:
                self._closed = threading.Event()
                self._thread = threading.Thread(target=self._loop, args=(self._closed,), name="etcd-delayed",
                                                daemon=True)
                self._thread.start()
        self._wake.set()

    def unfollow(self, queue: str) -> None:
        with self._lock:
            watch = self._watches.pop(queue, None)
            self._next.pop(queue, None)
        if watch is not None:
            self._hub().unsubscribe(watch)

    def close(self) -> None:
        """Stop following every queue and end the thread (a later follow starts again)."""
        for queue in list(self._watches):
            self.unfollow(queue)
        with self._lock:
            self._closed.set()
            self._thread = None
        self._wake.set()

    def settled(self) -> bool:
        """True if nothing is due or being moved now (tests: an idle mover)."""
        with self._lock:
            now = time.time()
            return not self._moving and all(when is None or when > now for when in self._next.values())

    def next_due(self, queue: str) -> float | None:
        """The earliest due time this mover knows for ``queue`` (None: nothing waits, or not followed)."""
        with self._lock:
            return self._next.get(queue)

    # -- watch callbacks (the hub's thread: no etcd calls here) -----------------------------
    def _on_puts(self, queue: str, events) -> None:
        dues = []
        for event in events:
            try:
                dues.append(self.keys.due_of(event.kv.key))
            except ValueError:  # not ours to move; raising here would restart every watch of the stream
                logger.warning("ignoring %r under queue %r's delayed messages: no due time in it", event.kv.key, queue)
        if not dues:
            return
        due = min(dues)
        with self._lock:
            if queue in self._next:
                known = self._next[queue]
                self._next[queue] = due if known is None else min(known, due)
        self._wake.set()

    def _look_now(self, queue: str) -> None:
        """The watch was (re)created: puts before it were not seen; read the queue's earliest again."""
        with self._lock:
            if queue in self._next:
                self._next[queue] = 0.0
        self._wake.set()

    # -- the mover thread -------------------------------------------------------------------
    def _loop(self, closed: threading.Event) -> None:
        backoff = ERROR_BACKOFF
        while not closed.is_set():
            due, wait = self._due_queues(time.time())
            if not due:
                self._wake.wait(wait)
                self._wake.clear()
                continue
            for queue in due:
                try:
                    following = self._move(queue, closed)
                except Exception:  # noqa: BLE001 - the mover must outlive anything one move meets
                    logger.exception("delayed messages of queue %r not moved; retrying in %.0fs", queue, backoff)
                    following = time.time() + backoff
                    backoff = min(backoff * 2, MAX_WAIT_SECONDS)
                else:
                    backoff = ERROR_BACKOFF
                self._learn(queue, following)

    def _due_queues(self, now: float) -> tuple[list[str], float]:
        """Queues with messages due now (their earliest is forgotten until the move reads it again),
        and how long to sleep otherwise."""
        with self._lock:
            due = [queue for queue, when in self._next.items() if when is not None and when <= now]
            for queue in due:
                self._next[queue] = None  # a put seen while we move sets it again
            self._moving = bool(due)
            soonest = min((when for when in self._next.values() if when is not None), default=None)
        wait = MAX_WAIT_SECONDS if soonest is None else min(MAX_WAIT_SECONDS, max(soonest - now, 0.0))
        return due, wait

    def _learn(self, queue: str, following: float | None) -> None:
        if following is None:
            return
        following = max(following, time.time() + MOVE_INTERVAL)  # what falls due meanwhile moves together
        with self._lock:
            if queue in self._next:
                known = self._next[queue]
                self._next[queue] = following if known is None else min(known, following)

    def look_again_all(self) -> None:
        """Read every followed queue's earliest due time again (the watch stream may have missed a put:
        the transport's safety re-check found it did not answer, delivery.py)."""
        with self._lock:
            for queue in self._next:
                self._next[queue] = 0.0
        self._wake.set()

    def _move(self, queue: str, closed: threading.Event) -> float | None:
        """Move every message of ``queue`` due now to ready/; return when the next one is due (None: none)."""
        prefix, until = self.keys.delayed(queue), time.time()
        while not closed.is_set():
            until = time.time()
            page = next(ops.pages(self.client, prefix, range_end=self.keys.delayed_until(queue, until),
                                  limit=MOVE_BATCH), [])
            if not page:
                break
            moved = move_batch(self.client, self.keys, queue, page)
            logger.debug("moved %d due message(s) of queue %r to ready", moved, queue)
        return self._next_due(queue, until)

    def _next_due(self, queue: str, after: float) -> float | None:
        """When ``queue``'s next delayed message due after ``after`` is due (None: none waits), read in
        widening windows. Nothing due by ``after`` waits: ``_move`` just read that range empty (a put
        landing there later is seen by the watch)."""
        start = self.keys.delayed_until(queue, after)
        for ahead in LOOK_AHEAD:
            end = self.keys.delayed_until(queue, after + ahead) if ahead is not None else range_end(
                self.keys.delayed(queue))
            first = ops.get(self.client, start, range_end=end, keys_only=True, limit=1)
            if first.kvs:
                return self.keys.due_of(first.kvs[0].key)
        return None


def move_batch(client: Any, keys: KeySpace, queue: str, page: list) -> int:
    """One transaction: each delayed key still as read -> deleted, and put in ready/ at its place (same lease).

    Returns how many it moved: 0 when another process moved (or a revoke deleted) one of them
    first; the caller reads again.
    """
    compare, success, size = [], [], 0
    for kv in page:
        if compare and size + len(kv.value) > MOVE_BATCH_BYTES:
            break
        size += len(kv.value)
        key = kv.key.decode()
        compare.append(ops.compare(key, "mod_revision", kv.mod_revision))
        success += [ops.delete(key), ops.put(keys.ready_message(queue, keys.position_of(key)), kv.value, kv.lease)]
    try:
        response = ops.txn(client, compare, success)
    except ops.LeaseNotFound:  # a TTL lease ended meanwhile: etcd deleted that key; read again
        return 0
    return len(compare) if response.succeeded else 0
