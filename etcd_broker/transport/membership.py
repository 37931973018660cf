"""A consumer's etcd lease, and the sweep that gives a dead consumer's messages back.

Each consuming process holds one lease (TTL ``lease_ttl``, kept alive by a
thread) and a ``consumer/<lease>`` key attached to it. A claimed message lives
under ``unacked/<lease>/`` *without* a lease, so it survives anything; when a
consumer's lease expires (SIGKILL, OOM, lost network) its consumer key vanishes
and any live consumer moves those messages back to ``ready/`` in one
transaction per message, at their original place in line.

The sweep reads only the dead consumer's queues (its key's last value lists them; a claim's
transaction requires the key, so nothing is claimed under a lease after it is gone). A full
pass over every declared queue runs at start, when the consumer watch's history was compacted
away (deletes may have gone unseen) and every FULL_SWEEP_SECONDS as a safety net, so the
idle cost does not grow with the number of queues.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable
from typing import Any

from etcd_broker.core import forking, ops
from etcd_broker.core.client import CONNECTION_ERRORS, EtcdClient
from etcd_broker.core.keys import KeySpace, range_end
from etcd_broker.core.watch import EVENT_DELETE, Watch, WatchHub, hub_for
from etcd_broker.transport import handoff, offers
from etcd_broker.transport.reconcile import RECONCILE_SECONDS, Reconciler

logger = logging.getLogger(__name__)

#: Default lease TTL (seconds): a killed consumer's messages are back within this time.
DEFAULT_LEASE_TTL = 10
#: Most acks deleted in one transaction (etcd allows 128 operations per transaction).
ACK_BATCH = 100
#: The sweeper thread wakes at least this often (reconciliation, a full pass falling due).
SAFETY_SWEEP_SECONDS = 30.0
#: Full sweep of every declared queue this often: the last net for a lease expiry the consumer watch did
#: not show us although its stream answered the safety re-checks (a stream that did not answer asks for
#: a full sweep at once, event_loop.py).
FULL_SWEEP_SECONDS = 300.0
#: A lease keepalive unanswered this long means etcd is unreachable now (the RPC deadline is longer):
#: closing then skips every etcd call and leaves the lease to expire, which hands our messages back.
PROBE_SECONDS = 1.0
#: First wait (seconds) of a background loop after an unexpected error; doubled each time it fails again.
FAILED_LOOP_BACKOFF = 1.0


def claimed_queues_of(value: bytes) -> frozenset[str]:
    """Every queue a ``consumer/`` key's value says it claimed from: its consumed queues
    (offers.queues_of) and its ``basic_get`` queues ("gets", which offers never use)."""
    try:
        return offers.queues_of(value) | frozenset(json.loads(value).get("gets", ()))
    except (ValueError, AttributeError):
        return frozenset()


class ConsumerLease:
    """The lease a process claims messages under; one per client and key space."""

    def __init__(self, client: EtcdClient, keys: KeySpace, ttl: int = DEFAULT_LEASE_TTL,
                 reconcile_seconds: float = RECONCILE_SECONDS) -> None:
        self.client = client
        self.keys = keys
        self.ttl = ttl
        self.queues: set[str] = set()
        #: queues claimed from without a consumer (``basic_get``): listed apart ("gets"), for the sweep
        #: only (offers.py offers puts to the consumers in "queues")
        self.get_queues: set[str] = set()
        self.lease_id: int | None = None
        self._lock = threading.RLock()
        self._pending_deletes: list[str] = []
        self._pending_requeues: list[str] = []
        self._pending_withdraws: list[tuple[str, int]] = []  # parks to delete (handoff.py)
        self._dead_queues: set[str] = set()
        self._unlisted = False  # queues were added that our consumer key does not list yet (ensure writes them)
        self._sweep_queues: set[str] = set()  # a dead consumer's queues, to sweep at the next turn
        self._full_sweep_wanted = True  # a full pass at the next turn (start, watch re-created or compacted)
        self._full_swept_at = 0.0  # monotonic time of the last full pass
        self.full_sweeps = 0  # full passes made (tests)
        self._sweep_now = threading.Event()
        self._acks_waiting = threading.Event()
        self._closed = threading.Event()
        self._consumers_watch: Watch | None = None
        self.members = offers.Members()  # which live leases consume which queues (offers.py)
        self._hub: WatchHub | None = None
        self._threads: list[threading.Thread] = []
        self._answered_at = 0.0  # monotonic time of the last keepalive etcd answered
        self._failing = False  # the last keepalive (or probe) failed or went unanswered
        #: what claims under this lease (transports: ``held_keys()``, ``arriving(key)``), for reconcile.py
        self._holders: weakref.WeakSet = weakref.WeakSet()
        self.reconciler = Reconciler(client, keys, self._held, self._arriving, self.current_key, self._restore,
                                     reconcile_seconds)

    # -- lifecycle ------------------------------------------------------------
    def ensure(self, queue: str | None = None) -> int:
        """Grant the lease and register the consumer key if not done yet, or write the queues added
        since (every claim and park comes after this call, naming its ``queue``: a dead consumer's key
        lists every queue it claimed from, which its sweep relies on); return the lease id."""
        if queue is not None:
            self.reconciler.touch(queue)  # a claim or park may follow: reconciliation reads the queue
        with self._lock:
            if queue is not None and queue not in self.queues and queue not in self.get_queues:
                self.get_queues.add(queue)
                self._unlisted = True
            if self.lease_id is None:
                self._register()
                self._start_threads()
            elif self._unlisted:
                ops.run(self.client, ops.put(self.keys.consumer(self.lease_id), self._describe(), self.lease_id))
                self._unlisted = False
            return self.lease_id  # type: ignore[return-value]

    def _register(self) -> None:
        lease_id = ops.grant(self.client, self.ttl)
        ops.run(self.client, ops.put(self.keys.consumer(lease_id), self._describe(), lease_id))
        logger.info("consumer lease %016x granted (ttl %ss)", lease_id, self.ttl)
        self.lease_id = lease_id
        self._unlisted = False
        self._answered_at = time.monotonic()  # the grant is an answer: the lease is alive now

    def _describe(self) -> str:
        described = {"hostname": socket.gethostname(), "pid": os.getpid(), "queues": sorted(self.queues),
                     "since": time.time()}
        if self.get_queues - self.queues:
            described["gets"] = sorted(self.get_queues - self.queues)
        return json.dumps(described)

    def add_queue(self, queue: str) -> None:
        """Consume ``queue`` too. The first one grants the lease (its key lists the queue); later ones are
        listed by the next :meth:`ensure` (the first get), so a consumer of Q queues writes its key
        twice, not Q times (O(Q) bytes of history, not O(Q^2))."""
        with self._lock:
            if queue in self.queues:
                return
            self.queues.add(queue)
            if self.lease_id is None:  # the first: the lease, its key (listing it) and the sweeper start now
                self._register()
                self._start_threads()
            else:
                self._unlisted = True

    def _start_threads(self) -> None:
        if self._threads:
            return
        self._hub = hub_for(self.client.config)
        self._consumers_watch = self._hub.subscribe(self.keys.consumers(), self._on_consumer_events, prefix=True,
                                                    prev_kv=True, on_created=self._read_members,
                                                    on_resync=self._resync_members)
        for target, name in ((self._keepalive_loop, "etcd-lease-keepalive"), (self._sweep_loop, "etcd-sweeper"),
                             (self._ack_loop, "etcd-acks")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._sweep_now.set()

    def close(self, revoke: bool = True, ack_timeout: float = 10.0) -> None:
        """Write pending acks, stop the threads; revoking the lease hands the rest back at once.

        With etcd unreachable nothing is tried (each call would wait out its deadline): the
        lease expires within its TTL and live consumers put what we held back in line.
        """
        reachable = self.reachable()
        if reachable:
            self.flush_acks(ack_timeout)
        self._closed.set()
        self._sweep_now.set()
        if self._consumers_watch is not None:
            self._hub.unsubscribe(self._consumers_watch)
            self._consumers_watch = None
        with self._lock:
            if self.lease_id is not None and (self._pending_deletes or not reachable):
                logger.warning("etcd unreachable at close: %d ack(s) not written; lease %016x expires within %ss "
                               "and what it holds goes back to the queue", len(self._pending_deletes),
                               self.lease_id, self.ttl)
            elif revoke and self.lease_id is not None:
                try:
                    ops.revoke(self.client, self.lease_id)
                except ops.LeaseNotFound:  # it expired already: what it held is back in line
                    logger.info("lease %016x had expired before close", self.lease_id)
                except CONNECTION_ERRORS:
                    logger.info("could not revoke lease %016x; it expires in %ss", self.lease_id, self.ttl)
            self.lease_id = None

    def reachable(self) -> bool:
        """Does etcd answer now? A recent keepalive says so; else a keepalive gets PROBE_SECONDS."""
        if self._failing:
            return False
        if time.monotonic() - self._answered_at < PROBE_SECONDS:
            return True
        answered = threading.Event()
        threading.Thread(target=self._probe, args=(answered,), name="etcd-lease-probe", daemon=True).start()
        if answered.wait(PROBE_SECONDS):
            return True
        self._failing = True  # until a keepalive is answered again
        return False

    def failing(self) -> bool:
        """True while our keepalives fail (no probe: cheap enough for every drain_events wait)."""
        return self._failing

    def in_doubt(self) -> bool:
        """True while we cannot tell that our lease is alive: the last keepalive failed, or none was
        answered for half the TTL (they run every TTL/3), so etcd may have expired it meanwhile."""
        return self._failing or time.monotonic() - self._answered_at > self.ttl / 2

    def _probe(self, answered: threading.Event) -> None:
        try:
            self._refresh()
        except CONNECTION_ERRORS:
            self._failing = True
        else:
            answered.set()

    # -- keepalive ------------------------------------------------------------
    def _keepalive_loop(self) -> None:
        interval = max(self.ttl / 3.0, 0.5)
        while not self._closed.wait(interval):
            try:
                self._refresh()
            except CONNECTION_ERRORS as exc:
                log = logger.debug if self._failing else logger.warning  # once per outage
                log("lease keepalive failed (%s); retrying every 0.5s", type(exc).__name__)
                self._failing = True
                interval = 0.5
            except Exception:  # noqa: BLE001 - the keepalive must outlive anything one refresh meets
                logger.exception("lease keepalive failed; retrying in %.1fs", FAILED_LOOP_BACKOFF)
                interval = FAILED_LOOP_BACKOFF
            else:
                if self._failing:
                    logger.info("lease keepalive answered again")
                    self._failing = False
                    self.reconciler.soon()  # a claim answered by nobody during the outage comes back
                    self._sweep_now.set()
                interval = max(self.ttl / 3.0, 0.5)

    def _refresh(self) -> None:
        with self._lock:
            lease_id = self.lease_id
        if lease_id is None:
            return
        ttl = ops.keep_alive(self.client, lease_id)
        self._answered_at = time.monotonic()
        if ttl > 0:
            return
        self.lost(lease_id)

    def lost(self, lease_id: int) -> None:
        """Our lease expired while we were alive: take a new one and keep what we still hold."""
        with self._lock:
            if lease_id != self.lease_id:
                return
            logger.error("consumer lease %016x expired while we were alive; re-registering", lease_id)
            self._register()
            self._adopt(lease_id, self.lease_id)
            self.reconciler.read_all()  # our keys moved to the new lease, on any queue

    def _adopt(self, old: int, new: int | None) -> None:
        """Move what our expired lease still owns to the new one, unless a sweeper got there first."""
        for queue in list(self.queues):
            for kv in ops.scan(self.client, self.keys.unacked(queue, old), prefix=True):
                key = kv.key.decode()
                position = self.keys.position_of(key)
                ops.txn(self.client, compare=[ops.compare(key, "mod_revision", kv.mod_revision)],
                        success=[ops.delete(key), ops.put(self.keys.unacked_message(queue, new, position), kv.value)])

    def current_key(self, key: str) -> str:
        """An unacked key under our current lease (it changes only after an adopt)."""
        lease_id = self.lease_id
        if lease_id is not None and self.keys.lease_of_unacked(key) != lease_id:
            return self.keys.unacked_message(self.keys.queue_of(key), lease_id, self.keys.position_of(key))
        return key

    # -- acks: deleted in batches by one thread ---------------------------------------
    def delete_later(self, key: str) -> None:
        """Ack: the key goes in the next delete transaction (acks in flight batch together)."""
        with self._lock:
            self._pending_deletes.append(key)
        self._acks_waiting.set()

    def flush_acks(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self._pending_deletes and time.monotonic() < deadline:
            try:
                self._write_acks()
            except CONNECTION_ERRORS:
                time.sleep(0.2)

    def _ack_loop(self) -> None:
        failing = False
        while not self._closed.is_set():
            self._acks_waiting.wait(1.0)
            self._acks_waiting.clear()
            try:
                while self._pending_deletes:
                    self._write_acks()
                failing = False
            except CONNECTION_ERRORS as exc:
                (logger.debug if failing else logger.warning)(  # once per outage
                    "acks not written (%s); retrying every 0.2s", type(exc).__name__)
                failing = True
                self._closed.wait(0.2)
                self._acks_waiting.set()
            except Exception:  # noqa: BLE001 - the ack writer must outlive anything one batch meets
                logger.exception("acks not written; retrying in %.0fs", FAILED_LOOP_BACKOFF)
                self._closed.wait(FAILED_LOOP_BACKOFF)
                self._acks_waiting.set()

    def _write_acks(self) -> None:
        with self._lock:
            batch = self._pending_deletes[:ACK_BATCH]
        if not batch:
            return
        ops.txn(self.client, success=[ops.delete(self.current_key(k)) for k in batch])
        with self._lock:
            del self._pending_deletes[:len(batch)]

    # -- messages we hold but could not give back yet ---------------------------
    def requeue_later(self, key: str) -> None:
        """A message a closing channel could not requeue (etcd unreachable); the sweeper retries.

        Waiting for our lease to lapse is no answer: a live process keeps it alive.
        """
        with self._lock:
            self._pending_requeues.append(key)
        self._sweep_now.set()

    def withdraw_later(self, key: str, seen: int) -> None:
        """A park of a connection that stopped consuming: delete it, and put back a hand-off that
        came after ``seen`` (never taken); by the sweeper, so a closing channel never waits on etcd."""
        with self._lock:
            self._pending_withdraws.append((key, seen))
        self._sweep_now.set()

    def _withdraw_pending(self) -> None:
        with self._lock:
            parks, self._pending_withdraws = self._pending_withdraws, []
        for index, (key, seen) in enumerate(parks):
            try:
                handoff.withdraw(self.client, key, seen, self.requeue_later)
            except CONNECTION_ERRORS:
                with self._lock:
                    self._pending_withdraws[:0] = parks[index:]
                raise

    def _requeue_pending(self) -> int:
        self._withdraw_pending()  # first: a hand-off it finds untaken is requeued below
        with self._lock:
            keys, self._pending_requeues = self._pending_requeues, []
        restored = 0
        for index, key in enumerate(keys):
            try:
                key = self.current_key(key)
                kv = ops.first_kv_of(ops.get(self.client, key))
                if kv is not None:  # None: acked or swept meanwhile
                    restored += restore_message(self.client, self.keys, self.keys.queue_of(key), key, kv.value,
                                                kv.mod_revision)
            except CONNECTION_ERRORS:
                with self._lock:
                    self._pending_requeues[:0] = keys[index:]
                raise
        return restored

    # -- reconciliation: what our live lease owns is what we hold (reconcile.py) ----
    def hold_for(self, holder: Any) -> None:
        """``holder`` (a transport) claims under this lease: its ``held_keys()`` count as held."""
        self._holders.add(holder)

    def _held(self) -> set[str]:
        held: set[str] = set()
        for holder in list(self._holders):
            held.update(holder.held_keys())
        with self._lock:
            held.update(self._pending_deletes)
            held.update(self._pending_requeues)
        return held

    def _arriving(self, key: str) -> bool:
        return any(holder.arriving(key) for holder in list(self._holders))

    def _restore(self, key: str, value: bytes, mod_revision: int) -> int:
        return restore_message(self.client, self.keys, self.keys.queue_of(key), key, value, mod_revision)

    def _reconcile(self) -> int:
        """A reconciliation pass when one is due and etcd answers; how many messages it gave back."""
        with self._lock:
            lease_id, queues = self.lease_id, set(self.queues)
        if self.reconciler.due() > 0:
            return 0
        if lease_id is None or self._failing:  # no pass now; the keepalive's recovery asks for one
            self.reconciler.postpone()
            return 0
        return self.reconciler.run(lease_id, queues)  # what it raises, the sweep loop logs and retries

    # -- sweeping dead consumers' messages back ---------------------------------
    def _read_members(self) -> int:
        """Each time the consumer watch is (re)created: the live consumers now (on the watch thread;
        one read). Unread, offers are not made (every consumer claims at once, offers.py)."""
        prefix = self.keys.consumers()
        try:
            response = ops.get(self.client, prefix, range_end=range_end(prefix))
        except CONNECTION_ERRORS as exc:
            logger.debug("live consumers not read: %s", exc)
            return 0
        self.members.reset(response.kvs, response.header.revision)
        return response.header.revision

    def _resync_members(self) -> int:
        """The watch's history was compacted away: read the members again; deletes missed meanwhile
        are the full sweep's to find (a reconnect resumes where the watch was: it misses none)."""
        self.sweep_everything()
        return self._read_members()

    def sweep_everything(self) -> None:
        """A full sweep at the next turn: the consumer watch may have missed a delete (its history
        compacted, or its stream did not answer the transport's safety re-check, event_loop.py)."""
        with self._lock:
            self._full_sweep_wanted = True
        self._sweep_now.set()

    def _on_consumer_events(self, events: Iterable) -> None:
        self.members.apply(events)
        for event in events:
            if event.type != EVENT_DELETE:
                continue
            queues = claimed_queues_of(event.prev_kv.value) if event.prev_kv.value else frozenset()
            with self._lock:
                self._dead_queues.update(queues)
                self._sweep_queues.update(queues)
                if not event.prev_kv.value:  # its queues unknown: every queue
                    self._full_sweep_wanted = True
            self._sweep_now.set()

    def _sweep_loop(self) -> None:
        backoff = FAILED_LOOP_BACKOFF
        while not self._closed.is_set():
            self._sweep_now.wait(min(SAFETY_SWEEP_SECONDS, max(self.reconciler.due(), 0.1)))
            self._sweep_now.clear()
            if self._closed.is_set():
                return
            try:
                restored = self._requeue_pending() + self._sweep_due() + self._reconcile()
                if restored:
                    logger.warning("restored %d message(s) from dead consumers, closed channels or reconciliation",
                                   restored)
                    # our consumers read their queues again rather than wait for the restores' watch events:
                    # one lost around an etcd restart left a restored message unclaimed (no 30 s forget now)
                    for holder in list(self._holders):
                        holder.forget_reads()
                self._drop_orphaned_queues()
            except CONNECTION_ERRORS as exc:
                logger.info("sweep postponed: etcd unreachable (%s)", type(exc).__name__)
                self._retry_sweep(1.0)
            except Exception:  # noqa: BLE001 - the sweeper must outlive anything one sweep meets
                logger.exception("sweep failed; retrying in %.0fs", backoff)
                self._retry_sweep(backoff)
                backoff = min(backoff * 2, SAFETY_SWEEP_SECONDS)
            else:
                backoff = FAILED_LOOP_BACKOFF

    def _retry_sweep(self, delay: float) -> None:
        self._closed.wait(delay)
        self._sweep_now.set()

    def _drop_orphaned_queues(self) -> None:
        """A dead consumer's auto-delete queues (events, replies) vanish with its lease: drop their messages."""
        with self._lock:
            queues, self._dead_queues = self._dead_queues, set()
        for queue in queues:
            if ops.first_kv_of(ops.get(self.client, self.keys.declared(queue))) is None:
                deleted = ops.run(self.client, ops.delete(self.keys.queue(queue), prefix=True)).deleted
                if deleted:
                    logger.info("dropped %d message(s) left in auto-delete queue %r", deleted, queue)

    def _sweep_due(self) -> int:
        """A full pass if one is wanted or due, else the dead consumers' queues; how many came back."""
        with self._lock:
            full = self._full_sweep_wanted or time.monotonic() - self._full_swept_at >= FULL_SWEEP_SECONDS
            queues, self._sweep_queues = self._sweep_queues, set()
            self._full_sweep_wanted = False
        if not full and not queues:
            return 0
        try:
            restored = self.sweep(None if full else sorted(queues))
        except BaseException:
            with self._lock:  # not done: again at the next turn
                self._sweep_queues |= queues
                self._full_sweep_wanted |= full
            raise
        if full:
            self._full_swept_at = time.monotonic()
            self.full_sweeps += 1
        return restored

    def sweep(self, queues: Iterable[str] | None = None) -> int:
        """Give back every unacked message on ``queues`` (None: every declared queue) whose consumer
        lease is gone; return how many."""
        live = {self.keys.lease_of_consumer(kv.key)
                for kv in ops.scan(self.client, self.keys.consumers(), prefix=True, keys_only=True)}
        restored, own = 0, self.lease_id
        for queue in declared_queues(self.client, self.keys) if queues is None else queues:
            # keys only, in pages: a busy worker holds thousands (one unbounded read of 19k failed, issue 20)
            for kv in ops.scan(self.client, self.keys.unacked(queue), prefix=True, keys_only=True):
                key = kv.key.decode()
                lease = self.keys.lease_of_unacked(key)
                if lease == own:  # ours: reconciliation reads the queue (its net for a claim no touch announced)
                    self.reconciler.touch(queue)
                if lease in live:
                    continue
                held = ops.first_kv_of(ops.get(self.client, key))
                if held is not None:  # else acked meanwhile
                    restored += restore_message(self.client, self.keys, queue, key, held.value, held.mod_revision,
                                                dead_lease=lease)
        return restored


def declared_queues(client: EtcdClient, keys: KeySpace) -> list[str]:
    return [keys.queue_of_declared(kv.key) for kv in ops.scan(client, keys.declared_queues(), prefix=True, keys_only=True)]


def mark_redelivered(value: bytes) -> bytes:
    message = json.loads(value)
    message["redelivered"] = True
    message.setdefault("properties", {}).setdefault("delivery_info", {})["redelivered"] = True
    return json.dumps(message).encode()


def restore_message(client: EtcdClient, keys: KeySpace, queue: str, key: str, value: bytes,
                    mod_revision: int, dead_lease: int | None = None) -> int:
    """Move one unacked message back to ready at its original position; 1 if we did it."""
    try:
        value = mark_redelivered(value)
    except ValueError:
        pass  # an undecodable message goes back as it was; the consumer dead-letters it
    compare = [ops.compare(key, "mod_revision", mod_revision)]
    if dead_lease is not None:
        compare.append(ops.compare(keys.consumer(dead_lease), "version", 0))
    response = ops.txn(client, compare=compare,
                       success=[ops.delete(key), ops.put(keys.ready_message(queue, keys.position_of(key)), value)])
    return int(response.succeeded)


_leases = forking.PerProcess()


def consumer_lease(client: EtcdClient, keys: KeySpace, ttl: int,
                   reconcile_seconds: float = RECONCILE_SECONDS) -> ConsumerLease:
    """The process's lease for this client and key space (shared by every channel)."""
    return _leases.get((id(client), keys.root), lambda: ConsumerLease(client, keys, ttl, reconcile_seconds),
                       usable=lambda lease: not lease._closed.is_set())


def close_all_leases(ack_timeout: float = 10.0) -> None:
    """Close every lease of this process (at exit, and in tests before an etcd goes away); a forked
    child never closes (revokes) its parent's lease."""
    _leases.clear(each=lambda lease: lease.close(ack_timeout=ack_timeout))


@atexit.register
def _close_at_exit() -> None:
    logging.getLogger("etcd_broker").setLevel(logging.ERROR)  # ours only: handlers may be gone; an unrevoked lease just expires
    close_all_leases(ack_timeout=2.0)
