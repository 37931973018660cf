"""Reconciliation: what a live consumer's lease owns in etcd is exactly what the process holds.

A claimed message lives under ``q/<queue>/unacked/<lease>/`` until its ack deletes it, and only
the lease's expiry (the sweep, membership.py) gives it back. So a message that this live process
claimed but holds nowhere (a claim etcd applied whose answer was lost and not recorded, a batch
that broke off, any bug on the way from the claim to the pool) would wait for as long as the
process lives. A reconciliation pass compares the two, per consumed queue:

* **etcd**: the keys under our lease, read in bounded pages (keys only, ``ops.scan``);
* **held** (read after etcd, so a key claimed in between is held): every channel's delivered and
  not settled messages (kombu's QoS: executing, prefetched, a batch waiting, an ETA task) and
  claimed-not-delivered buffer, hand-offs received and not taken (handoff.py), messages kept
  across a connection reset (executing.py), and acks and give-backs queued for the lease's threads.

A key under our lease that nothing holds is a *suspect*. It goes back to ``ready/`` at its place in
line (marked redelivered) only if the next pass, at least ``interval`` seconds later, finds it
still unheld with the same mod_revision (a claim or hand-off in flight is held within
milliseconds), it is not a hand-off whose watch event is still on its way to us (our parked key
still names it), and the give-back transaction's compare on that mod_revision holds: so it is
never given back twice, nor after an ack deleted it. Passes run on the lease's sweeper thread
every ``interval`` (transport option ``reconcile_seconds``, default RECONCILE_SECONDS) and once
after etcd answers again following an outage, and never while etcd is unreachable.

A pass reads only the queues where a key under our lease may be (issue 19: an idle consumer of Q
queues read Q keys every pass): those :meth:`Reconciler.touch` named since shortly before the
previous pass began (``ConsumerLease.ensure(queue)`` touches a queue before every claim from it
and every park on it; a hand-off on a park wakes a get, which touches it again), those where the
previous pass found keys of ours, and every queue in a full pass: after an outage (``soon``),
after our lease was lost and its keys adopted (``read_all``). A new lease holds nothing that no
touch announced, so the first pass is not a full one. The lease's full sweep
(every 300 s, membership.py) sees our keys too and touches their queues, so a key no touch
announced is still found within that sweep's period plus a pass.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from time import monotonic
from typing import Any

from etcd_broker.core import ops
from etcd_broker.core.keys import KeySpace

logger = logging.getLogger(__name__)

#: Default seconds between passes, and the least time a key stays unheld before it is given back.
RECONCILE_SECONDS = 30.0
#: A touch this long before the previous pass began still makes a pass read the queue: it bounds the
#: time from a touch to the claim or park after it (a get's reads and claim, each under the call deadline).
TOUCH_MARGIN_SECONDS = 60.0


def unacked_keys(client: Any, keys: KeySpace, queue: str, lease_id: int) -> Iterator[tuple[str, int]]:
    """(key, mod_revision) of every message under ``lease_id`` on ``queue``, a page per read (ops.pages)."""
    for kv in ops.scan(client, keys.unacked(queue, lease_id), prefix=True, keys_only=True):
        yield kv.key.decode(), kv.mod_revision


class Reconciler:
    """Suspects of one consumer lease and the passes that settle them (see the module).

    ``held()``: the unacked keys the process holds (under any lease of ours: mapped to the current
    one by ``current_key``); ``arriving(key)``: True if ``key`` is a hand-off not received yet;
    ``restore(key, value, mod_revision)``: back to ready if unchanged, 1 if done (membership.py).
    """

    def __init__(self, client: Any, keys: KeySpace, held: Callable[[], set[str]],
                 arriving: Callable[[str], bool], current_key: Callable[[str], str],
                 restore: Callable[[str, bytes, int], int], interval: float = RECONCILE_SECONDS) -> None:
        self.client, self.keys, self.interval = client, keys, interval
        self._held, self._arriving, self._current_key, self._restore = held, arriving, current_key, restore
        self._suspects: dict[str, tuple[int, float]] = {}  # key -> (mod_revision, first seen unheld)
        self._last = monotonic()  # the first pass waits one interval: a consumer starting up holds nothing yet
        self._soon = False
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}  # queue -> monotonic time of its last touch
        self._full = False  # the next pass reads every queue (not the first: a new lease holds nothing untouched)
        self._previous_start = monotonic()  # when the last pass that completed began
        self._holding: set[str] = set()  # queues where the last pass found keys of ours
        self.queues_read = 0  # queues read by passes so far (tests)

    def touch(self, queue: str) -> None:
        """A claim or park on ``queue`` may follow: the next passes read it."""
        with self._lock:
            self._touched[queue] = monotonic()

    def read_all(self) -> None:
        """The next pass reads every queue (our keys moved: a lost lease's adopted)."""
        with self._lock:
            self._full = True

    def soon(self) -> None:
        """Run a full pass at the sweeper's next turn (etcd answers again after an outage: a claim
        sent before it may have been applied however long ago it was touched)."""
        self._soon = True
        self.read_all()

    def postpone(self) -> None:
        """No pass now (etcd unreachable, no lease): the next one is an interval away."""
        self._soon, self._last = False, monotonic()

    def due(self) -> float:
        """Seconds until the next pass (0: now)."""
        return 0.0 if self._soon else max(0.0, self._last + self.interval - monotonic())

    def run(self, lease_id: int, queues: Iterable[str]) -> int:
        """One pass over our lease's keys on ``queues``; returns how many were given back."""
        self._soon, now = False, monotonic()
        self._last = now
        to_read = self._to_read(queues)
        try:
            found = {key: revision for queue in to_read
                     for key, revision in unacked_keys(self.client, self.keys, queue, lease_id)}
        except BaseException:
            self.read_all()  # not done: the next pass reads every queue
            raise
        self._previous_start, self.queues_read = now, self.queues_read + len(to_read)
        self._holding = {self.keys.queue_of(key) for key in found}
        held = self._held_now()
        stray = {key: revision for key, revision in found.items() if key not in held}
        suspects, given_back = {}, 0
        for key, revision in stray.items():
            seen = self._suspects.get(key)
            if seen is None or seen[0] != revision:
                suspects[key] = (revision, now)
            elif now - seen[1] < self.interval:
                suspects[key] = seen
            else:
                outcome = self._give_back(key, revision, now - seen[1])
                if outcome is None:
                    suspects[key] = seen
                given_back += outcome or 0
        self._suspects = suspects
        return given_back

    def _to_read(self, queues: Iterable[str]) -> list[str]:
        """The queues this pass reads: every one in a full pass; else those touched since shortly
        before the previous pass began, and those where it found keys of ours."""
        with self._lock:
            full, self._full = self._full, False
            since = self._previous_start - TOUCH_MARGIN_SECONDS
            self._touched = {queue: at for queue, at in self._touched.items() if at > since}
            touched = set(self._touched)
        return sorted(queue for queue in queues if full or queue in touched or queue in self._holding)

    def _held_now(self) -> set[str]:
        return {self._current_key(key) for key in self._held()}

    def _give_back(self, key: str, revision: int, unheld_for: float) -> int | None:
        """Back to ready if still unheld and unchanged: 1 if given back, 0 if acked or moved meanwhile,
        None if it turned out held (still watched)."""
        if key in self._held_now() or self._arriving(key):
            return None
        kv = ops.first_kv_of(ops.get(self.client, key))
        if kv is None or kv.mod_revision != revision or not self._restore(key, kv.value, revision):
            return 0  # acked or moved meanwhile (the restore's compare too): nothing to give back
        logger.warning("message %s was under our live lease for %.0fs with nobody here holding it: "
                       "given back to the queue", key, unheld_for)
        return 1
