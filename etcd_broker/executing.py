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

Celery's worker keeps the requests that have started in ``celery.worker.state.active_requests``
(public module state, documented in Celery's API reference); a plain kombu consumer has no such
set, and nothing is kept for it.
"""
from __future__ import annotations

import sys
import threading
from typing import Any

from etcd_broker import forking

#: (id of the closed channel, delivery tag) -> message kept across a reset, until its task acks it
_kept: dict[tuple[int, Any], Any] = {}
_lock = forking.reinit_in_child(threading.Lock())  # unlocked again in a forked child


def executing(task_id: str | None) -> bool:
    """True if a Celery worker in this process has started ``task_id`` and not finished it."""
    state = sys.modules.get("celery.worker.state")  # imported only in a worker: never import it here
    if state is None or not task_id:
        return False
    return any(request.id == task_id for request in tuple(state.active_requests))


def keep(channel: Any, message: Any) -> None:
    """``message`` stays with this process after ``channel`` closed: its running task settles it."""
    with _lock:
        _kept[(id(channel), message.delivery_tag)] = message


def take(channel: Any, delivery_tag: Any) -> Any | None:
    """The kept message of ``channel`` with ``delivery_tag`` (now being acked or rejected), or None."""
    with _lock:
        return _kept.pop((id(channel), delivery_tag), None)


def kept() -> int:
    """How many messages this process holds for tasks that ran across a reset and have not acked yet."""
    return len(_kept)
