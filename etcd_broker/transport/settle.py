"""Acks that ride on the result write: an ``acks_late`` task's SUCCESS and its message's delete in one transaction.

In a process that both consumes and stores results (a worker with ``-P threads`` or ``solo``),
the transport records each claimed message's unacked key by task id (:func:`hold`); the result
backend's SUCCESS write takes it (:func:`take`) and deletes the key in the same etcd transaction,
so a stored result and a pending message never coexist (no re-run after a crash once SUCCESS is
stored) and the ack that follows has nothing left to write (:func:`release` says so). A prefork
child never sees its parent's table: it writes SUCCESS alone and the parent acks as before.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from etcd_broker.core import forking

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
_lock = forking.ChildLock()  # a new one in a forked child


@forking.on_child
def _forget_the_parents() -> None:
    """A forked child holds none of its parent's messages (the parent acks them)."""
    _held.clear()


def hold(task_id: str, key: str, client: Any, current_key: Callable[[str], str]) -> None:
    """The transport claimed ``task_id``'s message under ``key`` (not acked yet)."""
    with _lock:
        _held[task_id] = Held(key, client, current_key)
        while len(_held) > MAX_HELD:
            _held.popitem(last=False)


def take(task_id: str, client: Any) -> str | None:
    """The unacked key to delete with ``task_id``'s SUCCESS, if this process holds it on ``client``."""
    with _lock:
        held = _held.get(task_id)
    if held is None or held.settled or held.client is not client:
        return None
    return held.current_key(held.key)


def settled(task_id: str) -> None:
    """The SUCCESS write deleted the message: its ack has nothing to write."""
    with _lock:
        held = _held.get(task_id)
        if held is not None:
            held.settled = True


def release(task_id: str | None, key: str) -> bool:
    """Forget ``task_id``'s message ``key`` (acked, rejected or requeued); True if it is deleted already."""
    with _lock:
        held = _held.get(task_id) if task_id is not None else None
        if held is None or held.key != key:
            return False
        del _held[task_id]
    return held.settled
