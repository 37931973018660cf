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
"""
from __future__ import annotations

import logging
import sys
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


class _Kept:
    """A message kept across a reset, how to give it back, and since when its task is not running."""

    __slots__ = ("message", "give_back", "idle_since")

    def __init__(self, message: Any, give_back: Callable[[Any], None]) -> None:
        self.message, self.give_back, self.idle_since = message, give_back, None


#: (id of the closed channel, delivery tag) -> message kept across a reset, until its task acks it
_kept: dict[tuple[int, Any], _Kept] = {}
_lock = forking.ChildLock()  # a new one in a forked child
_checked_at = 0.0
_stopping = False


@forking.on_child
def _forget_the_parents() -> None:
    """The messages kept for the parent's running tasks are the parent's to settle; its stop is its own."""
    global _stopping
    _kept.clear()
    _stopping = False


def _worker_told_to_stop(**kwargs: Any) -> None:
    global _stopping
    _stopping = True


if "celery" in sys.modules:  # every worker loaded Celery before us; kombu-only users import no Celery
    from celery import signals

    signals.worker_shutting_down.connect(_worker_told_to_stop)


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
    return set() if state is None else {request.id for request in tuple(state.active_requests)}


def keep(channel: Any, message: Any, give_back: Callable[[Any], None]) -> None:
    """``message`` stays with this process after ``channel`` closed: its running task settles it.

    ``give_back(message)`` requeues it if the task stops running without settling it.
    """
    with _lock:
        _kept[(id(channel), message.delivery_tag)] = _Kept(message, give_back)


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
    running, orphans = _running_ids(), []
    with _lock:
        for key, entry in list(_kept.items()):
            if entry.message.headers.get("id") in running:
                entry.idle_since = None
            elif entry.idle_since is None:
                entry.idle_since = now
            elif now - entry.idle_since >= ORPHAN_GRACE_SECONDS:
                orphans.append(_kept.pop(key))
    for entry in orphans:
        logger.warning("task %s stopped without acking the message kept for it across a reset; requeued",
                       entry.message.headers.get("id"))
        entry.give_back(entry.message)
