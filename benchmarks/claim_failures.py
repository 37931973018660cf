"""Why claim transactions fail: N plain kombu consumers on one etcd queue, each failed claim counted by cause.

bench_growth's consumers (growth_clients: prefetch 4, acking, 16 threads per spawned process) with the
transport's claim path instrumented in each consumer process (wrapped, not changed). A failed claim
is counted once, by its first row that another consumer took:

* ``read: put not yet seen by feed``: the rows came from a range read, and the process's feed
  (offers.QueueFeed) had not placed that put when the read began;
* ``read: seen (stale row)``: from a range read, the put placed before the read (claimed by
  another between the read and the claim);
* ``hint via owner`` / ``hint via grace``: from watch hints, offered to this consumer at once (it
  owned the put) or after an offer's grace;
* ``read ahead by the last claim, taken meanwhile``: the rows its previous claim read after itself
  (channel.py ``_claim``), claimed by another before this claim.

    python -m benchmarks.claim_failures [consumers] [messages] [rate]     (default 64 1500 150)
"""
from __future__ import annotations

import collections
import sys
import threading
import time

from benchmarks import growth_clients
from benchmarks.growth_clients import ConsumerGroup, Publisher

#: This consumer process's counts, by cause.
COUNTS: collections.Counter = collections.Counter()
_local = threading.local()
_placed: dict[bytes, float] = {}  # key -> when this process's feed first had its put event
_offered_how: dict[tuple[int, bytes], str | None] = {}  # (transport id, key) -> "owner" or "grace"


def instrument() -> None:
    """Wrap ops.txn, the feed's callbacks, offer_news, the head read, take_hints and _claim (this process)."""
    from etcd_broker.core import ops
    from etcd_broker.core.watch import EVENT_DELETE
    from etcd_broker.transport import offers
    from etcd_broker.transport.channel import Channel
    from etcd_broker.transport.delivery import QueueWatchMixin

    def wrap(owner, name, around):
        original = getattr(owner, name)
        setattr(owner, name, lambda *args, **kwargs: around(original, *args, **kwargs))

    def txn(original, *args, **kwargs):
        response = original(*args, **kwargs)
        _local.failed = not response.succeeded
        return response

    def on_events(original, feed, events):
        now = time.monotonic()
        for event in events:
            if event.type != EVENT_DELETE:
                _placed.setdefault(event.kv.key, now)
        return _via("owner", original, feed, events)

    def _via(how, original, *args):
        _local.via = how
        try:
            return original(*args)
        finally:
            _local.via = None

    def offer_news(original, transport, queue, rows):
        for row in rows:
            _offered_how[(id(transport), row[0])] = getattr(_local, "via", None)
        return original(transport, queue, rows)

    def read_ready(original, channel_, queue):
        _local.read_at = time.monotonic()
        rows = original(channel_, queue)
        _local.read_keys, _local.ahead_keys = {row[0] for row in rows}, set()
        return rows

    def take_read_ahead(original, channel_, queue):
        rows = original(channel_, queue)
        _local.ahead_keys = {row[0] for row in rows or ()}
        return rows

    def take_hints(original, transport, queue):
        _local.read_keys = set()
        return original(transport, queue)

    def claim(original, channel_, queue, rows, lease_id, *rest):
        _local.failed = False
        messages, left = original(channel_, queue, rows, lease_id, *rest)
        if _local.failed:
            key = ([row for row in rows if row not in left] or rows)[0][0]
            if key in getattr(_local, "ahead_keys", ()):
                COUNTS["read ahead by the last claim, taken meanwhile"] += 1
            elif key in getattr(_local, "read_keys", ()):
                placed = _placed.get(key)
                stale = placed is not None and placed <= _local.read_at
                COUNTS["read: seen (stale row)" if stale else "read: put not yet seen by feed"] += 1
            else:
                COUNTS[f"hint via {_offered_how.get((id(channel_.connection), key))}"] += 1
        return messages, left

    wrap(ops, "txn", txn)
    wrap(offers.QueueFeed, "on_events", on_events)
    wrap(offers.QueueFeed, "_grace_over", lambda original, feed: _via("grace", original, feed))
    wrap(QueueWatchMixin, "offer_news", offer_news)
    wrap(Channel, "_read_ready", read_ready)
    wrap(Channel, "_take_read_ahead", take_read_ahead)
    wrap(QueueWatchMixin, "take_hints", take_hints)
    wrap(Channel, "_claim", claim)


def consumer_process(url, queues, threads, consumed, ready, stop, results) -> None:
    """growth_clients.consumer_process, instrumented; reports its counts in place of the failed total."""
    instrument()
    growth_clients._count_failed_txns = lambda failed: None

    class Report:
        def put(self, item) -> None:
            results.put((item[0], dict(COUNTS)))

    growth_clients.consumer_process(url, queues, threads, consumed, ready, stop, Report())


def main(argv: list[str] | None = None) -> None:
    from scripts.etcd_server import EtcdServer

    given = list(sys.argv[1:] if argv is None else argv)
    count, messages, rate = (given + ["64", "1500", "150"][len(given):])[:3]
    count, messages, rate = int(count), int(messages), float(rate)
    with EtcdServer() as server:
        group = ConsumerGroup(server.url, ["claims"], count)
        original, growth_clients.consumer_process = growth_clients.consumer_process, consumer_process
        try:
            group.start()
        finally:
            growth_clients.consumer_process = original
        publisher = Publisher(server.url, "claims")
        publisher.at_rate(messages, rate)
        group.wait_consumed(messages, timeout=300)
        group.stop.set()
        total: collections.Counter = collections.Counter()
        for _ in group.processes:
            total.update(group.results.get(timeout=60)[1])
        for process in group.processes:
            process.join(30)
        publisher.close()
    failed = sum(total.values())
    print(f"{count} consumers, {messages} msgs at {rate:g}/s: {failed / messages:.3f} failed claims per msg")
    for cause, n in total.most_common():
        print(f"  {cause}: {n / messages:.3f} per msg")


if __name__ == "__main__":
    main()
