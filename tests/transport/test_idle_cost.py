"""What an idle consumer costs etcd: the safety re-check is one read whatever the number of queues,
and a put the watch stream never delivered is still found by it; the delayed mover reads nothing
while idle, and a delayed put the stream never delivered is moved after the re-check (issue 19,
docs/transport.md "Growth")."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from etcd3 import etcdrpc
from kombu import Connection, Consumer, Exchange, Queue

from etcd_broker.core import ops
from etcd_broker.core.ops import KeySpace, range_end
from etcd_broker.core.watch import EVENT_DELETE
from etcd_broker.exceptions import EtcdUnreachable
from etcd_broker.transport import delayed, delivery
from etcd_broker.transport.consumer import restore_message
from tests.helpers import wait_until

#: Transport options of these tests: no reconciliation pass within a test (it reads every queue).
OPTIONS = {"reconcile_seconds": 3600}


class CountingStub:
    """Wraps the client's KV stub: counts each RPC (Range, Txn, Put, ...) whoever makes it, and keeps
    each Range's key and ``count_only`` so a test can tell its own mechanism's reads from others'
    (this process's etcd client is shared: a sweep or a lease's work may read within any window)."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.calls: Counter[str] = Counter()
        self.ranges: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            if name == "Range" and args:
                self.ranges.append((args[0].key.decode(), bool(args[0].count_only)))
            return method(*args, **kwargs)
        return counted

    def reads_under(self, prefixes: list[str]) -> list[str]:
        """The keys of the Range reads that started under any of ``prefixes``."""
        return [key for key, _ in self.ranges if key.startswith(tuple(prefixes))]

    def count_only_reads(self) -> int:
        return sum(count_only for _, count_only in self.ranges)


def count_kv_requests(client: Any) -> CountingStub:
    """From now on, count the KV requests ``client`` sends (its threads' too)."""
    counter = CountingStub(client.kvstub)
    client._rpc_stubs[etcdrpc.KVStub] = (client.channel, counter)  # EtcdClient._stub's cache (core/client.py)
    return counter


def idle_consumer(conn: Connection, name: str, count: int) -> list[Queue]:
    """A consumer of ``count`` empty queues that has read each once and swept once."""
    queues = [Queue(f"{name}-{n}", Exchange(name, type="direct"), routing_key=f"{name}-{n}") for n in range(count)]
    Consumer(conn.channel(), queues, accept=["json"], callbacks=[lambda body, message: message.ack()]).consume()

    def all_read() -> bool:
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.2)
        return all(conn.transport.known_empty(queue.name) for queue in queues)
    wait_until(all_read, timeout=60, interval=0, message="every queue read once (known empty)")
    wait_until(lambda: conn.transport.lease.full_sweeps >= 1, timeout=30, message="the first full sweep")
    mover = conn.transport.delayed
    wait_until(lambda: mover.settled() and all(mover.next_due(queue.name) is None for queue in queues),
               timeout=60, message="the delayed mover read each queue once (nothing waits)")
    return queues


@contextmanager
def consumer_and_producer(url: str, prefix: str, queue: Queue, received: list[int]) -> Iterator[tuple]:
    """A consumer of ``queue`` that appends each body's ``n`` to ``received`` and acks, and a producer on a
    connection of its own: (consumer's connection, producer)."""
    options = {"prefix": prefix, **OPTIONS}
    with Connection(url, transport_options=options) as conn, Connection(url, transport_options=options) as other:
        Consumer(conn.channel(), [queue], accept=["json"],
                 callbacks=[lambda body, message: (received.append(body["n"]), message.ack())]).consume()
        yield conn, other.Producer(serializer="json")


def queue_prefixes(conn: Connection, queues: list[Queue]) -> list[str]:
    """Every key of ``queues`` (ready, unacked, delayed) starts with one of these."""
    return [conn.transport.keys.queue(queue.name) for queue in queues]


def recheck_requests(conn: Connection, queues: list[Queue]) -> tuple[int, int, int]:
    """One safety re-check and the idle wait after it: (re-checks started, their count-only reads,
    reads of ``queues``' keys)."""
    transport = conn.transport
    started = []
    safety_recheck = transport.safety_recheck
    transport.safety_recheck = lambda: (started.append(1), safety_recheck())[1]  # also the hub's timer
    counter = count_kv_requests(transport.etcd)
    try:
        transport.safety_recheck()
        revision = transport._recheck_pending[0]
        wait_until(lambda: transport.watch_hub.progress_revision >= revision, timeout=30,
                   message="the watch stream's progress answer")
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.5)  # verifies the re-check; reads a queue only if it failed
    finally:
        del transport.safety_recheck
    return len(started), counter.count_only_reads(), len(counter.reads_under(queue_prefixes(conn, queues)))


def test_safety_recheck_is_one_request_whatever_the_number_of_queues(etcd_url, etcd_prefix):
    """1 or 40 idle queues: one count-only read per re-check and no queue read (before: every queue
    read again). Reads by other mechanisms within the window (a sweep, another test's lease) are
    told apart by key."""
    options = {"prefix": etcd_prefix, **OPTIONS}
    for count in (1, 40):
        with Connection(etcd_url, transport_options=options) as conn:
            queues = idle_consumer(conn, f"idle{count}", count)
            progress_before = conn.transport.watch_hub.progress_requests
            rechecks, count_only_reads, queue_reads = recheck_requests(conn, queues)
            assert (count_only_reads, queue_reads) == (rechecks, 0), f"{count} queues"
            assert conn.transport.watch_hub.progress_requests == progress_before + rechecks
            # the counter sees queue reads: forgetting them costs a read per queue
            counter = count_kv_requests(conn.transport.etcd)
            conn.transport.forget_reads()
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.5)
            assert len(counter.reads_under(queue_prefixes(conn, queues))) >= count


def test_a_put_the_watch_stream_never_delivers_is_found_by_the_recheck(private_etcd, etcd_prefix, monkeypatch):
    """A stream that stops answering (stuck, half-open) misses a put; the re-check's progress
    request goes unanswered too, so the queues are read again and the message is delivered."""
    monkeypatch.setattr(delivery, "PROGRESS_WAIT_SECONDS", 1.0)
    received: list[int] = []
    queue = Queue("missed", Exchange("missed", type="direct"), routing_key="missed")
    with consumer_and_producer(private_etcd.url, etcd_prefix, queue, received) as (conn, producer):
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key="missed", declare=[queue])
        conn.drain_events(timeout=30)
        assert received == [1]

        def known_empty() -> bool:
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.2)
            return conn.transport.known_empty("missed")
        wait_until(known_empty, timeout=30, interval=0, message="the queue known empty (no read before a put)")
        stream = conn.transport.watch_hub._stream  # this etcd's hub: no other test's
        stuck = threading.Event()
        handle = stream._handle
        monkeypatch.setattr(stream, "_handle", lambda response: None if stuck.is_set() else handle(response))
        stuck.set()
        producer.publish({"n": 2}, exchange=queue.exchange, routing_key="missed")
        conn.transport._rechecked_at = time.monotonic()  # no re-check in this wait
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=1.0)  # the watch missed it: nothing wakes us
        assert received == [1]

        conn.transport.safety_recheck()  # the periodic one, run now
        conn.drain_events(timeout=30)
        assert received == [1, 2]


def test_an_idle_delayed_mover_reads_nothing(etcd_url, etcd_prefix, monkeypatch):
    """The mover's thread wakes every MAX_WAIT_SECONDS (made 0.1 s here) and reads no queue: no
    timer re-reads the followed queues' due times (before: 4 reads per queue every 30 s)."""
    monkeypatch.setattr(delayed, "MAX_WAIT_SECONDS", 0.1)
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix, **OPTIONS}) as conn:
        queues = idle_consumer(conn, "nodue", 20)
        conn.transport._rechecked_at = time.monotonic()  # no re-check in this wait
        counter = count_kv_requests(conn.transport.etcd)
        time.sleep(2.0)  # 20 of the mover's wake-ups: what they cost is what is counted
        assert counter.reads_under(queue_prefixes(conn, queues)) == []


def test_a_delayed_put_the_watch_stream_never_delivers_is_moved_after_the_recheck(private_etcd, etcd_prefix,
                                                                                   monkeypatch):
    """An ETA task published while the stream is stuck: the mover never hears of it and nothing reads
    its queue's delayed/ on a timer; the failed re-check makes the mover read every followed queue
    again, so it is moved (then delivered by the next failed re-check, the stream still stuck)."""
    monkeypatch.setattr(delivery, "PROGRESS_WAIT_SECONDS", 1.0)
    keys = KeySpace(etcd_prefix)
    received: list[int] = []
    queue = Queue("late", Exchange("late", type="direct"), routing_key="late")
    with consumer_and_producer(private_etcd.url, etcd_prefix, queue, received) as (conn, producer):
        # one message first: the producer's watches (delivery.py's parked view) exist before the stream sticks
        producer.publish({"n": 0}, exchange=queue.exchange, routing_key="late", declare=[queue])
        conn.drain_events(timeout=30)
        transport = conn.transport
        wait_until(lambda: transport.delayed.next_due("late") is None, timeout=30,
                   message="the mover read the queue once (nothing waits)")
        stream = transport.watch_hub._stream  # this etcd's hub: no other test's
        stuck = threading.Event()
        handle = stream._handle
        monkeypatch.setattr(stream, "_handle", lambda response: None if stuck.is_set() else handle(response))
        stuck.set()
        due = time.time() + 2.0
        eta = datetime.fromtimestamp(due, UTC).isoformat()
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key="late", declare=[queue], headers={"eta": eta})

        def waiting(prefix: str) -> int:
            return transport.etcd.get_range_response(prefix, range_end(prefix), count_only=True).count
        assert waiting(keys.delayed("late")) == 1
        transport._rechecked_at = time.monotonic()  # no re-check in this wait
        time.sleep(max(0.0, due + 1.0 - time.time()))  # a second past due: not moved, the mover never heard of it
        assert (waiting(keys.delayed("late")), waiting(keys.ready("late")), received) == (1, 0, [0])

        for _ in range(2):  # moved after the first failed re-check, read after the first or the second
            transport.safety_recheck()
            deadline = time.monotonic() + 30
            while received == [0] and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=1.0)
                except (TimeoutError, EtcdUnreachable):  # unreachable: a keepalive answered late (a loaded machine)
                    if transport._recheck_pending is None:  # verified (failed): the next one may read it
                        break
            wait_until(lambda: waiting(keys.delayed("late")) == 0, timeout=30, message="the task moved to ready/")
        assert received == [0, 1]


def test_a_consumer_death_the_watch_stream_never_delivers_is_swept_after_the_recheck(private_etcd, etcd_prefix,
                                                                                      monkeypatch):
    """A consumer dies (its lease revoked) while our stream is stuck: the consumer watch misses the
    delete, so no sweep of its queues starts; the failed re-check asks for a full sweep, which gives
    its claimed message back at once (not at the next periodic full sweep, FULL_SWEEP_SECONDS away)."""
    monkeypatch.setattr(delivery, "PROGRESS_WAIT_SECONDS", 1.0)
    with Connection(private_etcd.url, transport_options={"prefix": etcd_prefix, **OPTIONS}) as conn:
        idle_consumer(conn, "orphan", 1)
        transport = conn.transport
        client, keys = transport.etcd, transport.keys
        dead = client.lease(60).id  # another consumer: its key lists the queue, it claimed one message
        client.put(keys.consumer(dead), json.dumps({"queues": ["orphan-0"]}), lease=dead)
        claimed = keys.unacked_message("orphan-0", dead, keys.position(0, "01796538084622073551-00000000"))
        client.put(claimed, json.dumps({"body": "{}", "properties": {"delivery_info": {}}}))
        sweeps = transport.lease.full_sweeps
        stream = transport.watch_hub._stream  # this etcd's hub: no other test's
        dropped: list[Any] = []  # what the stuck stream received and never handled
        monkeypatch.setattr(stream, "_handle", lambda response: dropped.append(response))
        transport._rechecked_at = time.monotonic()  # no re-check until the test runs one
        client.revoke_lease(dead)
        consumer_key = keys.consumer(dead).encode()
        wait_until(lambda: any(event.type == EVENT_DELETE and event.kv.key == consumer_key
                               for response in list(dropped) for event in response.events),
                   timeout=30, message="the consumer's delete reached the stuck stream (never the watch)")
        assert client.get(claimed)[0] is not None  # nobody swept it

        transport.safety_recheck()
        wait_until(lambda: transport._recheck_due_in() > 0 and transport._recheck_pending is None, timeout=30,
                   message="the re-check verified (and failed: no progress answer)")
        wait_until(lambda: client.get(claimed)[0] is None, timeout=30, message="the dead consumer's message swept")
        assert transport.lease.full_sweeps > sweeps
        ready = keys.ready_message("orphan-0", keys.position_of(claimed))
        assert client.get(ready)[0] is not None


def test_a_dead_consumer_s_message_restored_below_the_cursor_is_delivered_next_without_forgetting_reads(
        etcd_url, etcd_prefix):
    """No timer forgets the head cursors now (the re-check forgets them only if the stream did not
    answer): a message a dead consumer held, swept back by another process to its original place
    below our cursor, lowers the cursor by its put event and is the next one delivered, with no
    forget_reads."""
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix, **OPTIONS}) as conn:
        queue = conn.SimpleQueue("cursor")
        for n in range(6):
            queue.put({"n": n})
        transport = conn.transport
        client, keys = transport.etcd, transport.keys
        first = client.get_range_response(keys.ready("cursor"), range_end(keys.ready("cursor")), limit=1).kvs[0]
        dead = client.lease(60).id  # another consumer claimed the first message, then dies below
        client.put(keys.consumer(dead), json.dumps({"queues": ["cursor"]}), lease=dead)
        claimed = keys.unacked_message("cursor", dead, keys.position_of(first.key))
        ops.txn(client, [ops.compare(first.key.decode(), "mod_revision", first.mod_revision)],
                [ops.delete(first.key.decode()), ops.put(claimed, first.value)])
        got = []
        for _ in range(3):  # our cursor moves past the first message's place
            message = queue.get(timeout=30)
            got.append(message.payload["n"])
            message.ack()
        assert got == [1, 2, 3]
        generation = transport._reads_generation
        # another process's sweeper gives it back, below our cursor (ours would also forget our reads)
        value, meta = client.get(claimed)
        assert restore_message(client, keys, "cursor", claimed, value, meta.mod_revision) == 1
        wait_until(lambda: (transport._cursors.get("cursor") or b"") <= first.key, timeout=30,
                   message="the put event lowered the cursor")
        assert queue.get(timeout=30).payload["n"] == 0
        assert transport._reads_generation == generation  # found by the cursor, not by forgetting reads
        queue.close()
        client.revoke_lease(dead)


def test_a_consumer_of_many_queues_writes_its_key_twice(etcd_url, etcd_prefix):
    """Consuming Q queues writes ``consumer/<lease>`` twice (granted, then listing all of them before the first
    claim), not Q times (a growing list: O(Q^2) bytes of history)."""
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix, **OPTIONS}) as conn:
        queues = idle_consumer(conn, "listed", 40)
        lease = conn.transport.lease
        response = conn.transport.etcd.get_response(conn.transport.keys.consumer(lease.lease_id))
        kv = response.kvs[0]
        assert kv.version == 2  # the lease with the first queue, then all of them at the first get
        assert set(json.loads(kv.value)["queues"]) == {queue.name for queue in queues}
        wait_until(lambda: all(lease.lease_id in (lease.members.of(queue.name) or []) for queue in queues),
                   timeout=30, message="offers.py's view of the members lists every queue")
