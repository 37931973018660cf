"""Shared leases: keys that may expire together hang on one etcd lease (the one lease pool).

A lease per key would leave one lease per message or result in etcd. Instead each process
keeps one lease per *slot*: the deadlines ``(slot-1)*g < d <= slot*g`` for a granularity
``g`` share the lease granted to end at ``slot*g``, never before a deadline, at most ``g`` after.

- Message TTLs (transport/queue_limits.py, delayed.py): ``lease_for(deadline)``, ``g`` = 1 s
  (one grant per second; the deadline in the key makes delivery exact to the millisecond).
- Results (backend/result_store.py): ``lease_for_ttl(ttl)``, ``g`` = a tenth of the TTL
  between 1 s and 1 h (:func:`bucket_seconds`): a result lives between ``ttl`` and ``ttl + g``.

A lease etcd no longer knows (it ended early, a restore) is :meth:`LeasePool.forget`-ten and the
caller writes again with a fresh one. :func:`pool_for` is the process's pool per etcd
configuration (a forked child gets its own).
"""
from __future__ import annotations

import logging
import math
import threading
import time

from etcd_broker.core import forking, ops
from etcd_broker.core.client import EtcdConfig, get_client

logger = logging.getLogger(__name__)

#: Slot width for results as a fraction of their TTL (so at most TTL/width + 1 live leases per TTL).
BUCKET_FRACTION = 0.1
#: Narrowest slot for results (seconds): also the granularity of message-TTL leases.
MIN_BUCKET_SECONDS = 1.0
#: Widest slot for results (seconds): a 1-day result lives at most 1 h longer.
MAX_BUCKET_SECONDS = 3600.0


def bucket_seconds(ttl: float) -> float:
    """Width of the slot whose writes share one lease when they live ``ttl`` seconds."""
    return min(max(ttl * BUCKET_FRACTION, MIN_BUCKET_SECONDS), MAX_BUCKET_SECONDS)


class LeasePool:
    """Leases by (granularity, slot), each granted once and shared by every key in its slot."""

    def __init__(self, client) -> None:
        self.client = client
        self._leases: dict[tuple[float, int], int] = {}
        self._lock = threading.Lock()

    def lease_for(self, deadline: float, granularity: float = MIN_BUCKET_SECONDS) -> int:
        """A lease that ends at or after ``deadline`` (epoch seconds), at most ``granularity`` later."""
        slot = math.ceil(deadline / granularity)
        ends = slot * granularity
        with self._lock:
            now = time.time()
            for stale in [key for key in self._leases if key[1] * key[0] < now]:
                del self._leases[stale]
            lease = self._leases.get((granularity, slot))
            if lease is None:
                ttl = max(1, math.ceil(ends - now))
                lease = self._leases[(granularity, slot)] = ops.grant(self.client, ttl)
                logger.debug("granted shared lease %x (ttl %ss) for slot %s of %ss", lease, ttl, slot, granularity)
            return lease

    def lease_for_ttl(self, ttl: float | None) -> int:
        """A lease for a key written now that lives ``ttl`` seconds (up to a bucket longer); 0: no lease."""
        if not ttl:
            return 0
        return self.lease_for(time.time() + ttl, bucket_seconds(ttl))

    def forget(self, lease: int) -> None:
        """etcd no longer knows ``lease``: the next key of its slot gets a new one."""
        with self._lock:
            self._leases = {key: value for key, value in self._leases.items() if value != lease}


_pools = forking.PerProcess()


def pool_for(config: EtcdConfig) -> LeasePool:
    """This process's :class:`LeasePool` for an etcd configuration (on its shared client)."""
    return _pools.get((config,), lambda: LeasePool(get_client(config)))


def forget_pools() -> None:
    """Forget every pool of this process (tests, shutdown): the next key gets a new lease."""
    _pools.clear()
