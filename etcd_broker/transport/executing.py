"""Which tasks this process is executing now: what a connection reset must not hand to another worker.

When Celery's consumer loses its broker connection, kombu closes the channel and its QoS gives
back every message it held. A task that is already running keeps running on this live worker and
acks when it ends, so giving its message back makes another worker run it too. The transport asks
:func:`executing` for each message it would give back and keeps the ones that are running under
the process's consumer lease (their ack or their SUCCESS write still deletes them; if the process
dies, the lease lapses and they come back). Messages not started yet go back to the queue, as
Celery expects: its consumer forgets them at a reset (``Consumer.on_close``) and the prefork pool
discards the ones no child accepted (``AsynPool.flush``).

Kept messages still count against the prefetch limit of the channel that replaced theirs
(:func:`kept`): otherwise the new channel claims a full prefetch more, and with ``-P threads``
those extra tasks wait inside the pool behind the running ones, where a second reset would
give them back although the pool will still run them.

A kept message whose task stops running without an ack or a reject (for instance a task Celery
cancels on connection loss, ``worker_cancel_long_running_tasks_on_connection_loss``) is given
back ORPHAN_GRACE_SECONDS later, through the lease's sweeper: held for ever by a live process,
it would be lost.

Celery's worker keeps the requests that have started in ``celery.worker.state.active_requests``
(public module state, documented in Celery's API reference); a plain kombu consumer has no such
set, and nothing is kept for it.

A prefork child can start a task before the main process hears of it: the main process reads the
child's acceptance from a pipe in its event loop, and while it waits on etcd (a leader change) it
reads nothing. If that wait ends in a connection reset, Celery's pool forgets every job it has no
acceptance for (``AsynPool.flush``), although the child runs it to the end. So pool children report
on a pipe of their own, made in the main process before the pool forks (Celery's public
``worker_init``, ``task_prerun`` and ``task_postrun`` signals): which task (id and retry) a child
started and finished. A started one counts as running here; a kept message whose task a child
finished and Celery no longer knows (nobody will ack it) is settled as its ack would have.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from time import monotonic
from typing import Any

from etcd_broker.core import forking

logger = logging.getLogger(__name__)

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
_lock = forking.ChildLock()  # a new one in a forked child
_checked_at = 0.0
_stopping = False
#: The pool children's report pipe (read end, write end) and the main process that reads it.
_reports: tuple[int, int] | None = None
_reports_reader = 0
_unread = b""  # a report line not complete yet
_in_children: dict[tuple[str, int], int] = {}  # (task id, retries) -> pid of the child running it
_finished_in_children: OrderedDict[tuple[str, int], None] = OrderedDict()


@forking.on_child
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


def executing(task_id: str | None) -> bool:
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


def take(channel: Any, delivery_tag: Any) -> Any | None:
    """The kept message of ``channel`` with ``delivery_tag`` (now being acked or rejected), or None."""
    with _lock:
        entry = _kept.pop((id(channel), delivery_tag), None)
    return None if entry is None else entry.message


def kept_keys() -> list[str]:
    """The unacked keys of the messages kept across a reset (reconcile.py counts them as held)."""
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
