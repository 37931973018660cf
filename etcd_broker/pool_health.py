"""Does a Celery worker's pool have the processes it should? If not, the worker says so.

A prefork child that never tells billiard it is up (it hangs while starting) is killed after
4 s and replaced. If every replacement hangs too, the worker still answers ``inspect ping``
and shows online and idle, while it runs fewer tasks at once than configured, or none
(issue 18: a child waiting on a lock inherited from its parent). So once the worker is ready
its main process reads the pool every CHECK_SECONDS (:func:`read_pool`): processes up against
the processes wanted (``-c``, or the autoscaler's current size). Fewer for GRACE_SECONDS in a
row is logged as an ERROR, once per episode, and its end at INFO; every reading goes to the
:data:`OBSERVERS` (the site's worker /metrics exports it, jobs/worker_metrics.py).

Settings (Celery configuration, optional): ``pool_health_check_seconds``,
``pool_health_grace_seconds``. Started by importing :mod:`etcd_broker` (a worker on etcdv3://).
A prefork worker also freezes its start-up objects for the garbage collector then, which halves
the cost of replacing a child (:func:`_freeze_startup_objects`).
"""
from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import signals

from etcd_broker import compat

logger = logging.getLogger(__name__)

#: How often the worker's main process reads its pool (seconds).
CHECK_SECONDS = 5.0
#: Fewer processes up than wanted for this long is an ERROR (billiard gives a new child 4 s to come up).
GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class PoolReading:
    """Pool processes ready for tasks now, and how many the pool wants."""

    up: int
    wanted: int


#: Called with each reading in the worker's main process (metrics exporters).
OBSERVERS: list[Callable[[PoolReading], None]] = []


def read_pool(pool: Any) -> PoolReading:
    """``pool`` is the worker's (``WorkController.pool``). A prefork child counts once it has sent
    billiard its UP message and until it exits; other pools (threads, solo) are always full."""
    wanted = int(pool.num_processes)
    processes = compat.pool_processes(pool)
    if processes is None:
        return PoolReading(up=wanted, wanted=wanted)
    children, starting = processes
    up = sum(1 for pid in children if pid not in starting and _running(pid))
    return PoolReading(up=up, wanted=wanted)


def _running(pid: int) -> bool:
    """False once child ``pid`` has exited (gone, or a zombie billiard has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc (not Linux): billiard drops exited children from its list
        return True


class PoolWatch:
    """Reads a worker's pool on the worker's timer; logs an ERROR while it stays short."""

    def __init__(self, pool: Any, grace: float = GRACE_SECONDS) -> None:
        self.pool = pool
        self.grace = grace
        self._short_since: float | None = None
        self._reported = False

    def check(self) -> PoolReading:
        reading = read_pool(self.pool)
        now = time.monotonic()
        if reading.up >= reading.wanted:
            if self._reported:
                logger.info("worker pool: %d of %d processes up again", reading.up, reading.wanted)
            self._short_since, self._reported = None, False
        else:
            self._short_since = now if self._short_since is None else self._short_since
            if not self._reported and now - self._short_since >= self.grace:
                self._reported = True
                logger.error("worker pool: only %d of %d processes up for %.0f s: new pool processes do not "
                             "start (billiard kills each one that does not report within 4 s: see its UP timeouts); this worker runs at "
                             "most %d task(s) at once", reading.up, reading.wanted, now - self._short_since,
                             reading.up)
        for observe in OBSERVERS:
            observe(reading)
        return reading


@signals.worker_ready.connect
def _watch_pool(sender: Any = None, **kwargs: Any) -> None:
    """In the worker's main process once it is ready: check the pool on the consumer's timer."""
    consumer = sender
    pool = getattr(getattr(consumer, "controller", None), "pool", None) or getattr(consumer, "pool", None)
    timer = getattr(consumer, "timer", None)
    if pool is None or timer is None:
        return
    conf = consumer.app.conf
    watch = PoolWatch(pool, grace=float(conf.get("pool_health_grace_seconds", GRACE_SECONDS)))
    consumer.pool_watch = watch
    if compat.pool_processes(pool) is not None:
        _freeze_startup_objects()
    watch.check()
    timer.call_repeatedly(float(conf.get("pool_health_check_seconds", CHECK_SECONDS)), _checked(watch))


def _freeze_startup_objects() -> None:
    """Celery runs a full ``gc.collect()`` before it forks each pool child (celery issue 2927): with
    everything the worker holds since start-up scanned each time, that was 80% of the main process's
    time while children were replaced (py-spy, 200 terminates). Frozen objects (``gc.freeze``, what
    Python documents for processes that fork) are skipped by those collections, and children keep
    sharing their pages. Objects made later are collected as before; a frozen object is still freed
    when its last reference goes (only a reference cycle among start-up objects would stay)."""
    gc.collect()
    gc.freeze()


def _checked(watch: PoolWatch) -> Callable[[], None]:
    def check() -> None:
        try:
            watch.check()
        except Exception:  # noqa: BLE001 - a failed reading must not stop the worker's timer
            logger.exception("worker pool: could not read the pool")
    return check
