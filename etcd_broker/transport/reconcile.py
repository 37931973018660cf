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
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from time import monotonic
from typing import Any

from etcd_broker.core import ops
from etcd_broker.core.keys import KeySpace

logger = logging.getLogger(__name__)

#: Default seconds between passes, and the least time a key stays unheld before it is given back.
RECONCILE_SECONDS = 30.0


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

    def soon(self) -> None:
        """Run a pass at the sweeper's next turn (etcd answers again after an outage)."""
        self._soon = True

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
        found = {key: revision for queue in sorted(queues)
                 for key, revision in unacked_keys(self.client, self.keys, queue, lease_id)}
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
