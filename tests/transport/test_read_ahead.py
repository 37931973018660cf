"""A claim reads the queue's next head in its own transaction (issue 19, "Stop 20: read-ahead claims").

While a backlog lasts, each claim transaction also reads the ready keys after what it claims
(channel.py ``_claim``); the next get claims those without a range read: one etcd request per
claim, where there were two. A put that lands below them meanwhile (a more urgent message, a
requeue) lowers the queue's head cursor (delivery.py), and the next get reads the head again.
These tests count the consumer's KV requests on a real etcd and publish an urgent message mid-drain.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from etcd3 import etcdrpc
from kombu import Connection, Consumer, Exchange, Queue

from etcd_broker.core.ops import KeySpace, Sequence

#: Messages in the backlogs the tests drain.
BACKLOG = 120
#: The plain kombu consumer's prefetch (bench_growth's: Celery's default for one process slot x4).
PREFETCH = 4
#: Seconds a test waits for what a loaded machine may take long to do.
SLOW = 30
#: Range reads of ``ready/`` a drain may make whatever its size: the first read of the whole queue, the
#: three windows and the read to the end that find it drained, one more read if a safety re-check came.
FIXED_READS = 8


class DenseSequence(Sequence):
    """Publish ids 1 µs apart whatever the clock: the backlog lies within one head window even when a
    loaded machine deschedules the publisher for longer than a window (10 ms of publish time)."""

    def next(self) -> str:
        with self._lock:
            self._last = self._last + 1000 if self._last else time.time_ns()
            return f"{self._last:020d}-{self._suffix}"


class CountingStub:
    """Wraps the client's KV stub: each Range's key and each Txn's request and answer, whoever sends them."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.calls: Counter[str] = Counter()
        self.ranges: list[bytes] = []
        self.txns: list[tuple[etcdrpc.TxnRequest, bool]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def counted(request, *args, **kwargs):
            self.calls[name] += 1
            response = method(request, *args, **kwargs)
            if name == "Range":
                self.ranges.append(request.key)
            elif name == "Txn":
                self.txns.append((request, response.succeeded))
            return response
        return counted

    def claims(self, ready: str) -> list[tuple[etcdrpc.TxnRequest, bool]]:
        """The claim transactions of the queue at ``ready``: they compare ready keys."""
        return [(request, ok) for request, ok in self.txns
                if any(compare.key.startswith(ready.encode()) for compare in request.compare)]


def count_kv_requests(client: Any) -> CountingStub:
    """From now on, count the KV requests ``client`` sends (its threads' too)."""
    counter = CountingStub(client.kvstub)
    client._rpc_stubs[etcdrpc.KVStub] = (client.channel, counter)  # EtcdClient._stub's cache (core/client.py)
    return counter


def publish_backlog(conn: Connection, queue: Queue, count: int, priority: int = 0) -> None:
    conn.transport.sequence = DenseSequence()
    producer = conn.Producer(serializer="json")
    producer.maybe_declare(queue)
    with producer.batch():
        for n in range(count):
            producer.publish({"n": n}, routing_key=queue.routing_key, priority=priority)


def drain(conn: Connection, queue: Queue, count: int, on_message=None) -> list:
    """Consume ``count`` messages with a plain kombu consumer (prefetch PREFETCH, acking each)."""
    got = []

    def received(body, message):
        got.append(body["n"])
        if on_message is not None:
            on_message(body, message)
        message.ack()

    with Consumer(conn, [queue], callbacks=[received], prefetch_count=PREFETCH, accept=["json"]):
        deadline = time.monotonic() + SLOW * 4
        while len(got) < count and time.monotonic() < deadline:
            conn.drain_events(timeout=SLOW)
    return got


def test_a_backlog_drains_with_one_request_per_claim(etcd_url, etcd_prefix):
    queue = Queue("ahead", Exchange("ahead"), routing_key="ahead")
    ready = KeySpace(etcd_prefix).ready("ahead")
    options = {"prefix": etcd_prefix, "reconcile_seconds": 3600}
    with Connection(etcd_url, transport_options=options) as producer, \
            Connection(etcd_url, transport_options=options) as consumer:
        publish_backlog(producer, queue, BACKLOG)
        counter = count_kv_requests(consumer.transport.etcd)
        got = drain(consumer, queue, BACKLOG)
    assert got == list(range(BACKLOG))
    claims = counter.claims(ready)
    reads = [key for key in counter.ranges if key.startswith(ready.encode())]
    assert all(ok for _, ok in claims), "a lone consumer lost a claim"
    assert len(claims) >= BACKLOG // PREFETCH
    # before read-ahead claims: one read per claim (120 messages: 30 to 120 reads)
    assert len(reads) <= FIXED_READS, f"{len(reads)} range reads of ready/ for {len(claims)} claims"


def test_a_more_urgent_message_published_mid_drain_comes_before_the_rest_of_the_read_ahead(etcd_url, etcd_prefix):
    queue = Queue("urgent", Exchange("urgent"), routing_key="urgent")
    options = {"prefix": etcd_prefix, "reconcile_seconds": 3600}
    with Connection(etcd_url, transport_options=options) as producer, \
            Connection(etcd_url, transport_options=options) as consumer:
        publish_backlog(producer, queue, BACKLOG, priority=0)
        transport, seen, state = consumer.transport, threading.Event(), {}
        original = transport.offer_news

        def watched(name, rows):
            original(name, rows)  # the cursor is lowered before we are told
            if any(b"/ready/0/" in row[0] for row in rows):  # band 0: priority 9
                seen.set()

        transport.offer_news = watched

        def publish_urgent(body, message):
            if body["n"] != 5:
                return
            channel = message.channel
            state["ahead"] = list(channel._ahead.get("urgent", ()))  # read by the last claim, not claimed
            state["buffered"] = len(channel._buffer.get("urgent", ()))  # claimed, delivered before anything
            producer.Producer(serializer="json").publish({"n": "urgent"}, routing_key="urgent", priority=9)
            assert seen.wait(SLOW), "the watch never saw the urgent message's put"

        got = drain(consumer, queue, BACKLOG + 1, on_message=publish_urgent)
    assert state["ahead"], "no read-ahead to overtake: the test checks nothing"
    position = got.index("urgent")
    assert position == got.index(5) + 1 + state["buffered"], got[:20]  # next after what was already claimed
    assert [n for n in got if n != "urgent"] == list(range(BACKLOG))  # FIFO within a priority


def test_a_message_requeued_by_its_consumer_comes_next_though_the_watch_has_not_told_yet(etcd_url, etcd_prefix):
    # the read ahead lies above the claimed message; its requeue (back to its place) must not wait for the
    # watch event to be read first (test_kombu_api's requeue test failed 3 runs in 6 that way)
    options = {"prefix": etcd_prefix, "reconcile_seconds": 3600}
    with Connection(etcd_url, transport_options=options) as conn:
        conn.transport.sequence = DenseSequence()  # the first window after the first message holds the next ones
        queue = conn.SimpleQueue("requeue-ahead")
        for n in range(10):
            queue.put({"n": n})
        transport = queue.consumer.channel.connection
        first = queue.get(timeout=SLOW)
        assert queue.consumer.channel._ahead.get("requeue-ahead"), "the claim read nothing ahead"
        late, original = [], transport.offer_news
        transport.offer_news = lambda name, rows: late.append((name, rows))  # a watch that has not told yet
        try:
            first.requeue()
            again = queue.get(timeout=SLOW)
        finally:
            transport.offer_news = original
            for name, rows in late:
                original(name, rows)
        assert (again.payload["n"], again.delivery_info.get("redelivered")) == (0, True)
        again.ack()
        assert [queue.get(timeout=SLOW).payload["n"] for _ in range(9)] == list(range(1, 10))
        queue.close()
