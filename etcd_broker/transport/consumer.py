"""What a consuming process holds and how it lets go: its lease, its unacked messages, its acks.

A consumer claims messages under its own etcd lease; everything that follows a claim lives here:
the ack (kombu's QoS), an ``acks_late`` SUCCESS that deletes its message in the result's own
transaction, messages of tasks still running across a connection reset, reconciliation of what the
lease owns against what the process holds, and the sweep that requeues a dead consumer's messages.
Sections, in import order:

- *settle*: claimed messages by task id (``hold_for_result``, ``take_for_result``, ``release_held``).
- *executing*: tasks running in this process or its pool children; messages kept across a reset.
- *qos*: :class:`QoS`: ack deletes the claimed key, reject/requeue, prefetch room.
- *reconcile*: :class:`Reconciler`: what a live lease owns in etcd and nothing here holds goes back.
- *membership*: :class:`ConsumerLease` (keepalive, batched acks, the dead-consumer sweep).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from time import monotonic
from typing import Any

from kombu.transport import virtual

from etcd_broker.core import ops
from etcd_broker.core.client import CONNECTION_ERRORS, ChildLock, EtcdClient, PerProcess, on_child
from etcd_broker.core.ops import KeySpace, range_end
from etcd_broker.core.watch import EVENT_DELETE, Watch, WatchHub, hub_for
from etcd_broker.transport import offers
from etcd_broker.transport.delivery import withdraw

# -------------------- settle: Acks that ride on the result write: an ``acks_late`` task's SUCCESS and its
#   message's delete in one transaction.
#
# In a process that both consumes and stores results (a worker with ``-P threads`` or ``solo``),
# the transport records each claimed message's unacked key by task id (:func:`hold_for_result`); the result
# backend's SUCCESS write takes it (:func:`take_for_result`) and deletes the key in the same etcd transaction,
# so a stored result and a pending message never coexist (no re-run after a crash once SUCCESS is
# stored) and the ack that follows has nothing left to write (:func:`release_held` says so). A prefork
# child never sees its parent's table: it writes SUCCESS alone and the parent acks as before.

logger = logging.getLogger(__name__)

#: Most messages remembered per process (a bound for messages that never reach ack or requeue,
#: e.g. a buffered prefetch given back at close); the oldest are forgotten first.
MAX_HELD = 65536


@dataclass
class Held:
    """One claimed message: its unacked key as written, how to find it now, and whether it is gone."""

    key: str
    client: Any  # the transport's etcd client: a result store on another client cannot delete it
    current_key: Callable[[str], str]  # the key under the consumer's lease now (a lease adopt moves it)
    settled: bool = False


_held: OrderedDict[str, Held] = OrderedDict()
_held_lock = ChildLock()  # a new one in a forked child


@on_child
def _forget_held_in_child() -> None:
    """A forked child holds none of its parent's messages (the parent acks them)."""
    _held.clear()


def hold_for_result(task_id: str, key: str, client: Any, current_key: Callable[[str], str]) -> None:
    """The transport claimed ``task_id``'s message under ``key`` (not acked yet)."""
    with _held_lock:
        _held[task_id] = Held(key, client, current_key)
        while len(_held) > MAX_HELD:
            _held.popitem(last=False)


def take_for_result(task_id: str, client: Any) -> str | None:
    """The unacked key to delete with ``task_id``'s SUCCESS, if this process holds it on ``client``."""
    with _held_lock:
        held = _held.get(task_id)
    if held is None or held.settled or held.client is not client:
        return None
    return held.current_key(held.key)


def settled_by_result(task_id: str) -> None:
    """The SUCCESS write deleted the message: its ack has nothing to write."""
    with _held_lock:
        held = _held.get(task_id)
        if held is not None:
            held.settled = True


def release_held(task_id: str | None, key: str) -> bool:
    """Forget ``task_id``'s message ``key`` (acked, rejected or requeued); True if it is deleted already."""
    with _held_lock:
        held = _held.get(task_id) if task_id is not None else None
        if held is None or held.key != key:
            return False
        del _held[task_id]
    return held.settled


# -------------------- executing: Which tasks this process is executing now: what a connection reset must
#   not hand to another worker.
#
# When Celery's consumer loses its broker connection, kombu closes the channel and its QoS gives
# back every message it held. A task that is already running keeps running on this live worker and
# acks when it ends, so giving its message back makes another worker run it too. The transport asks
# :func:`is_executing` for each message it would give back and keeps the ones that are running under
# the process's consumer lease (their ack or their SUCCESS write still deletes them; if the process
# dies, the lease lapses and they come back). Messages not started yet go back to the queue, as
# Celery expects: its consumer forgets them at a reset (``Consumer.on_close``) and the prefork pool
# discards the ones no child accepted (``AsynPool.flush``).
#
# Kept messages still count against the prefetch limit of the channel that replaced theirs
# (:func:`kept`): otherwise the new channel claims a full prefetch more, and with ``-P threads``
# those extra tasks wait inside the pool behind the running ones, where a second reset would
# give them back although the pool will still run them.
#
# A kept message whose task stops running without an ack or a reject (for instance a task Celery
# cancels on connection loss, ``worker_cancel_long_running_tasks_on_connection_loss``) is given
# back ORPHAN_GRACE_SECONDS later, through the lease's sweeper: held for ever by a live process,
# it would be lost.
#
# Celery's worker keeps the requests that have started in ``celery.worker.state.active_requests``
# (public module state, documented in Celery's API reference); a plain kombu consumer has no such
# set, and nothing is kept for it.
#
# A prefork child can start a task before the main process hears of it: the main process reads the
# child's acceptance from a pipe in its event loop, and while it waits on etcd (a leader change) it
# reads nothing. If that wait ends in a connection reset, Celery's pool forgets every job it has no
# acceptance for (``AsynPool.flush``), although the child runs it to the end. So pool children report
# on a pipe of their own, made in the main process before the pool forks (Celery's public
# ``worker_init``, ``task_prerun`` and ``task_postrun`` signals): which task (id and retry) a child
# started and finished. A started one counts as running here; a kept message whose task a child
# finished and Celery no longer knows (nobody will ack it) is settled as its ack would have.


#: Seconds a kept message may outlive its task unacked (Celery marks a task ready, then acks) before
#: it is given back.
ORPHAN_GRACE_SECONDS = 2.0
#: Kept messages are checked against the running tasks at most this often (seconds).
ORPHAN_CHECK_SECONDS = 1.0


#: Tasks a pool child finished that are remembered (a kept message is settled within seconds of it).
MAX_FINISHED_REPORTS = 4096


class _Kept:
    """A message kept across a reset, how to give it back or settle it, and since when its task is not running."""

    __slots__ = ("message", "give_back", "settle", "idle_since")

    def __init__(self, message: Any, give_back: Callable[[Any], None], settle: Callable[[Any], None]) -> None:
        self.message, self.give_back, self.settle, self.idle_since = message, give_back, settle, None


#: (id of the closed channel, delivery tag) -> message kept across a reset, until its task acks it
_kept: dict[tuple[int, Any], _Kept] = {}
_lock = ChildLock()  # a new one in a forked child
_checked_at = 0.0
_stopping = False
#: The pool children's report pipe (read end, write end) and the main process that reads it.
_reports: tuple[int, int] | None = None
_reports_reader = 0
_unread = b""  # a report line not complete yet
_in_children: dict[tuple[str, int], int] = {}  # (task id, retries) -> pid of the child running it
_finished_in_children: OrderedDict[tuple[str, int], None] = OrderedDict()


@on_child
def _forget_the_parents() -> None:
    """The messages kept for the parent's running tasks are the parent's to settle; its stop is its own.
    A child keeps the report pipe's write end (it reports on it) and never reads it."""
    global _stopping, _unread
    _kept.clear()
    _stopping = False
    _in_children.clear()
    _finished_in_children.clear()
    _unread = b""


def _worker_told_to_stop(**kwargs: Any) -> None:
    global _stopping
    _stopping = True


def open_reports(**kwargs: Any) -> None:
    """In the worker's main process, before the pool forks: the pipe its children report on."""
    global _reports, _reports_reader
    if _reports is not None and _reports_reader == os.getpid():
        return
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)  # a child never waits on a full pipe: that report is dropped
    _reports, _reports_reader = (read_end, write_end), os.getpid()


def _report(kind: bytes, task_id: str | None, task: Any) -> None:
    """In a pool child: one line, written atomically (shorter than the pipe's atomic size)."""
    if _reports is None or os.getpid() == _reports_reader or not task_id:
        return  # not a worker, or a task run in the main process (threads, solo): Celery sees it
    retries = int(getattr(getattr(task, "request", None), "retries", 0) or 0)
    try:
        os.write(_reports[1], b"%s %s %d %d\n" % (kind, task_id.encode(), retries, os.getpid()))
    except OSError:  # full (the main process is not reading): this task falls back to what Celery knows
        pass


def _started_in_child(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    _report(b"S", task_id, task)


def _finished_in_child(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    _report(b"F", task_id, task)


def _read_reports() -> None:
    """In the main process: take what the children reported since the last read."""
    global _unread
    if _reports is None or os.getpid() != _reports_reader:
        return
    with _lock:
        while True:
            try:
                chunk = os.read(_reports[0], 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            _unread += chunk
        *lines, _unread = _unread.split(b"\n")
        for line in lines:
            kind, task_id, retries, pid = line.split(b" ")
            key = (task_id.decode(), int(retries))
            if kind == b"S":
                _in_children[key] = int(pid)
                continue
            _in_children.pop(key, None)
            _finished_in_children[key] = None
            while len(_finished_in_children) > MAX_FINISHED_REPORTS:
                _finished_in_children.popitem(last=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_in_children() -> set[str]:
    """Task ids a pool child of this process reported started and not finished (and still lives)."""
    _read_reports()
    with _lock:
        for key, pid in list(_in_children.items()):
            if not _alive(pid):  # killed mid-task (a terminate, the OOM killer): not running any more
                del _in_children[key]
        return {task_id for task_id, _ in _in_children}


def finished_in_child(task_id: str, retries: int) -> bool:
    """Did a pool child of this process report it finished this run (``retries``) of ``task_id``?"""
    _read_reports()
    with _lock:
        return (task_id, retries) in _finished_in_children


if "celery" in sys.modules:  # every worker loaded Celery before us; kombu-only users import no Celery
    from celery import signals

    signals.worker_shutting_down.connect(_worker_told_to_stop)
    signals.worker_init.connect(open_reports)
    signals.task_prerun.connect(_started_in_child)
    signals.task_postrun.connect(_finished_in_child)


def worker_stopping() -> bool:
    """True once a Celery worker in this process was told to stop (warm or cold shutdown).

    A stopping worker makes no etcd call on its shutdown path that its lease settles anyway
    (requeues, auto-delete queues): with etcd unreachable each would wait out an RPC deadline,
    after a reachability check that was true a moment before (docs/operators.md).
    """
    return _stopping


def is_executing(task_id: str | None) -> bool:
    """True if a Celery worker in this process has started ``task_id`` and not finished it."""
    return bool(task_id) and task_id in _running_ids()


def _running_ids() -> set[str]:
    state = sys.modules.get("celery.worker.state")  # imported only in a worker: never import it here
    active = set() if state is None else {request.id for request in tuple(state.active_requests)}
    return active | running_in_children()


def _known_to_celery(task_id: str | None) -> bool:
    state = sys.modules.get("celery.worker.state")
    return state is not None and task_id in state.requests


def keep(channel: Any, message: Any, give_back: Callable[[Any], None], settle: Callable[[Any], None]) -> None:
    """``message`` stays with this process after ``channel`` closed: its running task settles it.

    ``give_back(message)`` requeues it if the task stops running without settling it;
    ``settle(message)`` acks it if a pool child finished the task Celery forgot at the reset.
    """
    with _lock:
        _kept[(id(channel), message.delivery_tag)] = _Kept(message, give_back, settle)


def take_kept(channel: Any, delivery_tag: Any) -> Any | None:
    """The kept message of ``channel`` with ``delivery_tag`` (now being acked or rejected), or None."""
    with _lock:
        entry = _kept.pop((id(channel), delivery_tag), None)
    return None if entry is None else entry.message


def kept_keys() -> list[str]:
    """The unacked keys of the messages kept across a reset (the reconciler counts them as held)."""
    with _lock:
        entries = list(_kept.values())
    return [key for entry in entries if (key := entry.message.delivery_info.get("etcd_key"))]


def kept() -> int:
    """How many messages this process holds for tasks that ran across a reset and have not acked yet."""
    _read_reports()  # often enough that the children's pipe never fills
    if _kept:
        _give_back_orphans()
    return len(_kept)


def _give_back_orphans() -> None:
    """Requeue kept messages whose task stopped running ORPHAN_GRACE_SECONDS ago and never settled them."""
    global _checked_at
    now = monotonic()
    if now - _checked_at < ORPHAN_CHECK_SECONDS:
        return
    _checked_at = now
    running, orphans, done = _running_ids(), [], []
    for key, entry in list(_kept.items()):
        task_id = entry.message.headers.get("id")
        if task_id in running:
            entry.idle_since = None
        elif finished_in_child(task_id, int(entry.message.headers.get("retries") or 0)) \
                and not _known_to_celery(task_id):
            done.append(key)  # Celery forgot the job at the reset; its child ran it to the end
        elif entry.idle_since is None:
            entry.idle_since = now
        elif now - entry.idle_since >= ORPHAN_GRACE_SECONDS:
            orphans.append(key)
    with _lock:
        done_entries = [entry for key in done if (entry := _kept.pop(key, None)) is not None]
        orphan_entries = [entry for key in orphans if (entry := _kept.pop(key, None)) is not None]
    for entry in done_entries:
        logger.warning("task %s ran to the end in a pool child although Celery forgot it at a reset; "
                       "its message is settled, not run again", entry.message.headers.get("id"))
        entry.settle(entry.message)
    for entry in orphan_entries:
        logger.warning("task %s stopped without acking the message kept for it across a reset; requeued",
                       entry.message.headers.get("id"))
        entry.give_back(entry.message)


# -------------------- qos: The transport's QoS: an ack deletes the claimed key, a requeue puts it back in
#   its place.
#
# kombu's prefetch accounting, less the messages kept across a connection reset (above),
# and a wake-up of the transport whenever a slot frees.



class QoS(virtual.QoS):
    """Acks delete the claimed key; requeue moves it back to its place in line.

    Only kombu's public QoS API is used (``get``, ``ack``, ``reject``); a requeue
    goes through :meth:`Channel._restore`, the hook kombu's ``restore_unacked`` calls.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held: dict = {}  # delivery tag -> unacked key, from delivery until ack, reject or give-back

    def append(self, message, delivery_tag):
        super().append(message, delivery_tag)
        key = message.delivery_info.get("etcd_key")
        if key:
            self._held[delivery_tag] = key

    def held_keys(self) -> list[str]:
        """Unacked keys of the messages delivered through this QoS and not settled."""
        return list(self._held.values())

    def ack(self, delivery_tag):
        self._forget(delivery_tag)
        super().ack(delivery_tag)
        self._held.pop(delivery_tag, None)  # after _forget queued its delete: held all the way
        self._wake()

    def restore_unacked(self):
        """At close: each message goes back or stays with its running task (Channel._restore)."""
        try:
            return super().restore_unacked()
        finally:
            self._held.clear()

    def can_consume(self):
        room = self.can_consume_max_estimate()
        return room is None or room > 0

    def can_consume_max_estimate(self):
        """kombu's room under the prefetch limit, less the messages kept across a reset."""
        room = super().can_consume_max_estimate()
        return None if room is None else max(room - kept(), 0)

    def reject(self, delivery_tag, requeue=False):
        running = take_kept(self.channel, delivery_tag)
        if running is not None:  # kept across a reset (above): its channel's QoS forgot it
            if requeue:
                self.channel._requeue_or_later(running)
            else:
                self.channel._forget(running)
            return
        if not requeue:
            self._forget(delivery_tag)
        super().reject(delivery_tag, requeue=requeue)  # requeue=True -> Channel._restore
        self._held.pop(delivery_tag, None)
        self._wake()

    def _forget(self, delivery_tag) -> None:
        try:
            message = self.get(delivery_tag)
        except KeyError:  # acked twice, given back by a reset, or still running across one
            message = take_kept(self.channel, delivery_tag)
            if message is None:
                return
        self.channel._forget(message)

    def _wake(self) -> None:
        """A slot may have freed: let the event loop (or drain_events) claim again."""
        connection = self.channel.connection
        if connection is not None:  # None once the channel is closed (a reset requeued what it held)
            connection.wake()


# -------------------- reconcile: Reconciliation: what a live consumer's lease owns in etcd is exactly what
#   the process holds.
#
# A claimed message lives under ``q/<queue>/unacked/<lease>/`` until its ack deletes it, and only
# the lease's expiry (the sweep, below) gives it back. So a message that this live process
# claimed but holds nowhere (a claim etcd applied whose answer was lost and not recorded, a batch
# that broke off, any bug on the way from the claim to the pool) would wait for as long as the
# process lives. A reconciliation pass compares the two, per consumed queue:
#
# * **etcd**: the keys under our lease, read in bounded pages (keys only, ``ops.scan``);
# * **held** (read after etcd, so a key claimed in between is held): every channel's delivered and
#   not settled messages (kombu's QoS: executing, prefetched, a batch waiting, an ETA task) and
#   claimed-not-delivered buffer, hand-offs received and not taken (delivery.py), messages kept
#   across a connection reset (above), and acks and give-backs queued for the lease's threads.
#
# A key under our lease that nothing holds is a *suspect*. It goes back to ``ready/`` at its place in
# line (marked redelivered) only if the next pass, at least ``interval`` seconds later, finds it
# still unheld with the same mod_revision (a claim or hand-off in flight is held within
# milliseconds), it is not a hand-off whose watch event is still on its way to us (our parked key
# still names it), and the give-back transaction's compare on that mod_revision holds: so it is
# never given back twice, nor after an ack deleted it. Passes run on the lease's sweeper thread
# every ``interval`` (transport option ``reconcile_seconds``, default RECONCILE_SECONDS) and once
# after etcd answers again following an outage, and never while etcd is unreachable.
#
# A pass reads only the queues where a key under our lease may be (issue 19: an idle consumer of Q
# queues read Q keys every pass): those :meth:`Reconciler.touch` named since shortly before the
# previous pass began (``ConsumerLease.ensure(queue)`` touches a queue before every claim from it
# and every park on it; a hand-off on a park wakes a get, which touches it again), those where the
# previous pass found keys of ours, and every queue in a full pass: after an outage (``soon``),
# after our lease was lost and its keys adopted (``read_all``). A new lease holds nothing that no
# touch announced, so the first pass is not a full one. The lease's full sweep
# (every 300 s, ConsumerLease.sweep) sees our keys too and touches their queues, so a key no touch
# announced is still found within that sweep's period plus a pass.


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
    """Suspects of one consumer lease and the passes that settle them (the reconcile section's comment above).

    ``held()``: the unacked keys the process holds (under any lease of ours: mapped to the current
    one by ``current_key``); ``arriving(key)``: True if ``key`` is a hand-off not received yet;
    ``restore(key, value, mod_revision)``: back to ready if unchanged, 1 if done (restore_message).
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


# -------------------- membership: A consumer's etcd lease, and the sweep that gives a dead consumer's
#   messages back.
#
# Each consuming process holds one lease (TTL ``lease_ttl``, kept alive by a
# thread) and a ``consumer/<lease>`` key attached to it. A claimed message lives
# under ``unacked/<lease>/`` *without* a lease, so it survives anything; when a
# consumer's lease expires (SIGKILL, OOM, lost network) its consumer key vanishes
# and any live consumer moves those messages back to ``ready/`` in one
# transaction per message, at their original place in line.
#
# The sweep reads only the dead consumer's queues (its key's last value lists them; a claim's
# transaction requires the key, so nothing is claimed under a lease after it is gone). A full
# pass over every declared queue runs at start, when the consumer watch's history was compacted
# away (deletes may have gone unseen) and every FULL_SWEEP_SECONDS as a safety net, so the
# idle cost does not grow with the number of queues.


#: Default lease TTL (seconds): a killed consumer's messages are back within this time.
DEFAULT_LEASE_TTL = 10
#: Most acks deleted in one transaction (etcd allows 128 operations per transaction).
ACK_BATCH = 100
#: The sweeper thread wakes at least this often (reconciliation, a full pass falling due).
SAFETY_SWEEP_SECONDS = 30.0
#: Full sweep of every declared queue this often: the last net for a lease expiry the consumer watch did
#: not show us although its stream answered the safety re-checks (a stream that did not answer asks for
#: a full sweep at once, delivery.py).
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
        self._pending_withdraws: list[tuple[str, int]] = []  # parks to delete (delivery.py)
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
        #: what claims under this lease (transports: ``held_keys()``, ``arriving(key)``), for the reconciler
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
                withdraw(self.client, key, seen, self.requeue_later)
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

    # -- reconciliation: what our live lease owns is what we hold (Reconciler above) ----
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
        compacted, or its stream did not answer the transport's safety re-check, delivery.py)."""
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


_leases = PerProcess()


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
