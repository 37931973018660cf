"""Read-only views of the broker's state for operators: queue lengths and live consumers.

Everything here is a count-only or keys-only read (no message bodies); Django-free, so a
Prometheus collector, ``manage.py queues`` and the admin can all call it.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

from etcd_broker.core import ops
from etcd_broker.core.client import EtcdClient
from etcd_broker.core.ops import MAX_PRIORITY, KeySpace
from etcd_broker.transport.consumer import declared_queues


def _count(client: EtcdClient, prefix: str) -> int:
    return ops.get(client, prefix, prefix=True, count_only=True).count


def queue_stats(client: EtcdClient, keys: KeySpace) -> list[dict[str, Any]]:
    """Per declared (or consumed) queue: ready messages by priority (only priorities with
    messages), unacknowledged count, delayed messages (ETA tasks not due yet) and the epoch second
    the next one is due (None: none), live consumers."""
    consumers = consumers_by_queue(client, keys)
    rows = []
    for queue in sorted(set(declared_queues(client, keys)) | set(consumers)):
        by_priority = {}
        for priority in range(MAX_PRIORITY, -1, -1):
            count = _count(client, keys.ready_band(queue, keys.band(priority)))
            if count:
                by_priority[priority] = count
        rows.append({
            "queue": queue,
            "ready": sum(by_priority.values()),
            "ready_by_priority": by_priority,
            "unacked": _count(client, keys.unacked(queue)),
            "delayed": _count(client, keys.delayed(queue)),
            "next_due": next_due(client, keys, queue),
            "consumers": consumers.get(queue, 0),
        })
    return rows


def next_due(client: EtcdClient, keys: KeySpace, queue: str) -> float | None:
    """When the first delayed message of ``queue`` is due (epoch seconds); None if none waits."""
    first = ops.get(client, keys.delayed(queue), prefix=True, keys_only=True, limit=1)
    return keys.due_of(first.kvs[0].key) if first.kvs else None


def consumers_by_queue(client: EtcdClient, keys: KeySpace) -> dict[str, int]:
    """Live consumers per queue: a consumer's key lives exactly as long as its lease."""
    counts: Counter[str] = Counter()
    for kv in ops.scan(client, keys.consumers(), prefix=True):
        counts.update(json.loads(kv.value).get("queues") or [])
    return dict(counts)


def live_consumers(client: EtcdClient, keys: KeySpace) -> list[dict[str, Any]]:
    """Every consumer whose lease is alive: lease id, host, pid, queues, remaining TTL."""
    consumers = []
    for kv in ops.scan(client, keys.consumers(), prefix=True):
        info = json.loads(kv.value)
        ttl = ops.lease_ttl(client, kv.lease) if kv.lease else None
        consumers.append({"lease": f"{kv.lease:016x}", "ttl": ttl, **info})
    return consumers


def stats_for_connection(connection) -> tuple[EtcdClient, KeySpace]:
    """The client and key space behind a ``kombu.Connection`` on this transport."""
    transport = connection.transport
    return transport.etcd, transport.keys
