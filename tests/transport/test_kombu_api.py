"""The transport through kombu's public API against a real etcd."""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections import Counter

import pytest
from etcd3 import exceptions as etcd_exceptions
from kombu import Connection, Consumer, Exchange, Producer, Queue
from kombu.exceptions import OperationalError

import etcd_broker  # noqa: F401
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.exceptions import MessageTooLarge
from etcd_broker.transport import channel as channel_module
from etcd_broker.transport.channel import RECONNECT_GAP_SECONDS
from tests.helpers import wait_until


@pytest.fixture
def connect(etcd_url, etcd_prefix):
    opened = []

    def connect(**options):
        conn = Connection(etcd_url, transport_options={"prefix": etcd_prefix, **options})
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


def drain(queue, count, timeout=5.0):
    out = []
    for _ in range(count):
        message = queue.get(timeout=timeout)
        out.append(message.payload)
        message.ack()
    return out


def test_it_delivers_fifo_within_a_priority_and_most_urgent_first(connect):
    queue = connect().SimpleQueue("orders")
    sent = [(i, p) for i, p in enumerate([0, 9, 5, 9, 0, 5, 1, None, 9])]
    for i, priority in sent:
        queue.put({"i": i}, priority=priority)
    got = [payload["i"] for payload in drain(queue, len(sent))]
    # 9s first in sending order, then 5s, then 1, then the 0s and the default (None -> 0) in order.
    assert got == [1, 3, 8, 2, 5, 6, 0, 4, 7]


def test_it_treats_priority_none_as_the_configured_default(connect):
    queue = connect(default_priority=5).SimpleQueue("defaults")
    queue.put({"name": "low"}, priority=1)
    queue.put({"name": "default"})
    queue.put({"name": "high"}, priority=9)
    assert [p["name"] for p in drain(queue, 3)] == ["high", "default", "low"]


def test_it_gives_each_message_to_exactly_one_of_many_competing_consumers(connect):
    total, consumers = 300, 6
    producer_queue = connect().SimpleQueue("contended")
    for i in range(total):
        producer_queue.put({"i": i})
    received: list[int] = []
    lock = threading.Lock()

    def consume():
        queue = connect().SimpleQueue("contended")
        while True:
            try:
                message = queue.get(timeout=1.5)
            except queue.Empty:
                return
            with lock:
                received.append(message.payload["i"])
            message.ack()

    threads = [threading.Thread(target=consume) for _ in range(consumers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    counts = Counter(received)
    assert sorted(counts) == list(range(total))
    assert max(counts.values()) == 1


def test_it_requeues_a_rejected_message_and_drops_one_rejected_without_requeue(connect):
    queue = connect().SimpleQueue("rejects")
    queue.consumer.qos(prefetch_count=1)  # nothing prefetched: a requeued message is next again
    queue.put({"n": 1})
    queue.put({"n": 2})
    first = queue.get(timeout=2)
    first.requeue()
    again = queue.get(timeout=2)
    assert again.payload == {"n": 1}
    assert again.delivery_info.get("redelivered") is True
    again.reject()
    second = queue.get(timeout=2)
    assert second.payload == {"n": 2}
    second.ack()
    assert queue.qsize() == 0
    with pytest.raises(queue.Empty):
        queue.get(timeout=0.3)


def test_it_requeues_unacked_messages_when_the_channel_closes(connect):
    conn = connect()
    queue = conn.SimpleQueue("closing")
    for i in range(3):
        queue.put({"i": i})
    held = [queue.get(timeout=2) for _ in range(2)]
    assert [m.payload["i"] for m in held] == [0, 1]
    queue.close()
    conn.close()
    assert [p["i"] for p in drain(connect().SimpleQueue("closing"), 3)] == [0, 1, 2]


def test_it_reports_size_purges_and_deletes_queues(connect):
    conn = connect()
    queue = conn.SimpleQueue("sized")
    for i in range(7):
        queue.put({"i": i})
    assert queue.qsize() == 7
    assert queue.clear() == 7
    assert queue.qsize() == 0
    queue.put({"i": 99})
    channel = conn.default_channel
    channel.queue_delete("sized")
    assert channel._size("sized") == 0
    assert not channel._has_queue("sized")


def test_it_refuses_a_message_over_the_limit_and_writes_nothing(connect, etcd_url, etcd_prefix):
    conn = connect(max_message_bytes=10_000)
    queue = conn.SimpleQueue("big")
    with pytest.raises(MessageTooLarge) as info:
        queue.put({"blob": "x" * 20_000})
    assert "10000 bytes" in str(info.value) and "'big'" in str(info.value)
    assert queue.qsize() == 0
    queue.put({"blob": "x" * 1_000})
    assert queue.qsize() == 1


def test_it_refuses_a_message_etcd_itself_would_refuse(connect):
    queue = connect().SimpleQueue("huge")
    with pytest.raises(MessageTooLarge) as info:
        queue.put({"blob": "x" * 2_000_000})
    assert "limit is" in str(info.value)
    assert queue.qsize() == 0


def test_it_moves_an_undecodable_message_to_dead_letters_and_keeps_consuming(connect, etcd_url, etcd_prefix):
    conn = connect()
    queue = conn.SimpleQueue("poisoned")
    keys = KeySpace(etcd_prefix, "/")
    client = get_client(etcd_url)
    client.put(keys.ready_message("poisoned", keys.position(9, "00000000000000000001-zz")), b"{not json")
    queue.put({"ok": True})
    assert queue.get(timeout=2).payload == {"ok": True}
    dead = list(client.get_prefix(keys.dead("poisoned")))
    assert [value for value, _ in dead] == [b"{not json"]


def test_it_routes_through_topic_and_fanout_exchanges_declared_by_another_connection(connect):
    topic = Exchange("events", type="topic")
    fanout = Exchange("broadcast", type="fanout")
    consumer_conn, producer_conn = connect(), connect()
    q_images = Queue("images", topic, routing_key="image.*")
    q_all = Queue("all-events", topic, routing_key="#")
    q_a = Queue("bcast-a", fanout)
    q_b = Queue("bcast-b", fanout)
    channel = consumer_conn.channel()
    for queue in (q_images, q_all, q_a, q_b):
        queue(channel).declare()
    producer = Producer(producer_conn.channel())
    producer.publish({"e": 1}, exchange=topic, routing_key="image.resized", declare=[topic])
    producer.publish({"e": 2}, exchange=topic, routing_key="text.done", declare=[topic])
    producer.publish({"e": 3}, exchange=fanout, routing_key="", declare=[fanout])
    got: dict[str, list] = {}

    def on_message(body, message):
        got.setdefault(message.delivery_info["routing_key"] or "fanout", []).append(body["e"])
        message.ack()

    for queue, expected in ((q_images, [1]), (q_all, [1, 2]), (q_a, [3]), (q_b, [3])):
        got.clear()
        with Consumer(channel, [queue], callbacks=[on_message]):
            for _ in expected:
                consumer_conn.drain_events(timeout=3)
        assert sorted(e for values in got.values() for e in values) == expected, queue.name


def test_an_idle_consumer_does_not_poll_etcd(private_etcd, etcd_prefix):
    # An etcd of its own: other tests' background work must not show in its range counter.
    conn = Connection(private_etcd.url, transport_options={"prefix": etcd_prefix})
    queue = conn.SimpleQueue("idle")
    with pytest.raises(queue.Empty):
        queue.get(timeout=0.5)  # warm up: consumer registered, watch created
    before = _range_requests(private_etcd)
    assert before > 0, "etcd's range counter is not being read"
    with pytest.raises(queue.Empty):
        queue.get(timeout=3.0)
    after = _range_requests(private_etcd)
    queue.close()
    conn.close()
    # A poller at kombu's default 1 s interval would make 3+ reads here; a watch makes none.
    assert after - before <= 1, f"{after - before} range reads while idle"


def test_an_idle_consumer_on_many_queues_does_not_read_them_again(private_etcd, etcd_prefix, monkeypatch):
    # The queue-expiry keeper used to re-read each consumed queue's declaration whenever its cached
    # limits aged (every LIMITS_CACHE_SECONDS): idle reads grew with the queues. With the cache made
    # short here, that would be dozens of reads a second; queues without x-expires must cost none.
    monkeypatch.setattr(channel_module, "LIMITS_CACHE_SECONDS", 0.2)
    conn = Connection(private_etcd.url, transport_options={"prefix": etcd_prefix})
    queues = [Queue(f"idle-{n}", routing_key=f"idle-{n}") for n in range(30)]
    with Consumer(conn, queues, callbacks=[lambda body, message: message.ack()]):
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=1.0)  # warm up: declared, consumer registered, watches created
        before = _range_requests(private_etcd)
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=2.0)
        after = _range_requests(private_etcd)
    conn.close()
    assert after - before <= 1, f"{after - before} range reads while idle on {len(queues)} queues"


def _range_requests(server) -> int:
    body = urllib.request.urlopen(f"{server.client_url}/metrics", timeout=5).read().decode()
    total = 0
    for line in body.splitlines():
        if line.startswith("etcd_debugging_mvcc_range_total") or (
                line.startswith("grpc_server_handled_total") and 'grpc_method="Range"' in line):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def test_it_keeps_every_key_under_the_configured_prefix(connect, etcd_url, etcd_prefix):
    queue = connect().SimpleQueue("prefixed")
    queue.put({"x": 1})
    client = get_client(etcd_url)
    keys = [meta.key.decode() for _, meta in client.get_prefix(etcd_prefix + "/", keys_only=True)]
    assert keys and all(key.startswith(etcd_prefix + "/") for key in keys)
    message = queue.get(timeout=2)
    assert json.loads(json.dumps(message.payload)) == {"x": 1}
    message.ack()


@pytest.mark.reliability
def test_a_killed_consumers_messages_come_back_in_their_original_order(connect, etcd_url, etcd_prefix):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import REPO_ROOT

    queue = connect().SimpleQueue("orphans")
    queue.consumer.consume()  # a live consumer (not draining yet): it sees the other one's lease expire
    for i in range(5):
        queue.put({"i": i})
    consumer = subprocess.Popen(
        [sys.executable, "-m", "tests.transport.consumer_proc", etcd_url, etcd_prefix, "orphans", "3", "3"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = [consumer.stdout.readline() for _ in range(4)]
        assert lines[-1].strip() == "holding", lines
        assert queue.qsize() == 2
        os.killpg(consumer.pid, signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        consumer.kill()
        consumer.wait()
    from tests.helpers import wait_until

    wait_until(lambda: queue.qsize() == 5, timeout=20, message="the 3 claimed messages back on the queue")
    back_after = time.monotonic() - killed_at
    got = [queue.get(timeout=5) for _ in range(5)]
    for message in got:
        message.ack()
    assert [m.payload["i"] for m in got] == [0, 1, 2, 3, 4]
    assert [bool(m.delivery_info.get("redelivered")) for m in got] == [True, True, True, False, False]
    assert back_after < 3 + 5, f"back {back_after:.1f}s after the kill with a 3 s lease"


def test_a_consumer_never_holds_more_than_its_prefetch_count(connect, etcd_url, etcd_prefix):
    conn = connect()
    queue = conn.SimpleQueue("prefetched")
    queue.consumer.qos(prefetch_count=3)
    for i in range(10):
        queue.put({"i": i})
    held = [queue.get(timeout=2) for _ in range(3)]
    with pytest.raises(queue.Empty):
        queue.get(timeout=0.5)  # three unacked: the limit
    keys = KeySpace(etcd_prefix, "/")
    client = get_client(etcd_url)

    def claimed() -> int:
        prefix = keys.unacked("prefetched")
        return len(list(client.get_prefix(prefix, keys_only=True)))

    assert claimed() == 3 and queue.qsize() == 7
    held[0].ack()
    nxt = queue.get(timeout=2)
    assert nxt.payload == {"i": 3}
    from tests.helpers import wait_until

    wait_until(lambda: claimed() == 3, timeout=5, message="the ack written")
    assert queue.qsize() == 6


def test_an_auto_delete_queue_declared_after_our_lease_lapsed_unnoticed_gets_a_new_lease(connect, etcd_url,
                                                                                        etcd_prefix):
    """A worker cut off longer than its lease redeclares its pidbox queue (auto-delete: on the consumer
    lease) before its keepalive learns that the lease is gone. The declare re-registers; it raised
    "lease not found", which ended the worker (chaos test)."""
    channel = connect(lease_ttl=30).default_channel  # the keepalive looks only every 10 s
    Queue("before", auto_delete=True, channel=channel).declare()
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    lapsed = client.get(keys.declared("before"))[1].lease_id
    client.revoke_lease(lapsed)  # as etcd expires the lease of a worker it cannot hear
    Queue("after", auto_delete=True, channel=channel).declare()
    value, meta = client.get(keys.declared("after"))
    assert value is not None and meta.lease_id not in (0, lapsed)
    assert client.get(keys.consumer(meta.lease_id))[0] is not None  # registered again under the new lease


class StartedRequest:
    """What Celery's worker records in ``celery.worker.state.active_requests`` while a task runs (its id)."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id


def test_a_running_tasks_message_acked_after_its_channel_was_closed_is_deleted(connect, etcd_url, etcd_prefix):
    """A task still running at a connection reset keeps its message (consumer.py) and acks it through the
    closed channel, whose connection kombu set to None: reading the lease through it raised AttributeError,
    a Celery 'Unrecoverable error' that ended the worker (chaos test, 10-minute threads run)."""
    from celery.worker import state

    conn = connect()
    channel = conn.channel()
    queue = conn.SimpleQueue("late-ack", channel=channel)
    queue.put({"n": 1}, headers={"id": "running-task"})
    message = queue.get(timeout=5)
    started = StartedRequest("running-task")
    state.active_requests.add(started)
    try:
        channel.close()  # the reset: the message stays with its running task
        assert channel.connection is None
        message.ack()
    finally:
        state.active_requests.discard(started)
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    wait_until(lambda: not list(client.get_prefix(keys.queue("late-ack"))), timeout=10, message="the ack written")


def fail_writes(monkeypatch, client, count: int) -> list[str]:
    """The next ``count`` transactions of ``client`` fail as a write dropped by a leader change does
    (``raft proposal dropped``, mapped to a connection error by client.classify); returns their log."""
    real, failed = client.call, []

    def call(method, request, **kwargs):
        if method == "Txn" and len(failed) < count:
            failed.append(method)
            raise etcd_exceptions.ConnectionFailedError()
        return real(method, request, **kwargs)

    monkeypatch.setattr(client, "call", call)
    return failed


@pytest.mark.parametrize("max_retries, published", [(8, True), (3, False)])
def test_a_publish_rides_out_consecutive_connection_errors_as_its_retry_policy_says(connect, etcd_url, monkeypatch,
                                                                                     max_retries, published):
    """During leader moves a publish can fail again right after a reconnect that worked; kombu's ensure()
    gave up on that second error whatever max_retries said (the transport declared no recoverable errors),
    and retries at once after each reconnect (spaced by the transport, RECONNECT_GAP_SECONDS)."""
    conn = connect()
    queue = Queue("rides-out", Exchange("rides-out"), "rides-out")
    started = time.monotonic()
    queue(conn.default_channel).declare()
    failed = fail_writes(monkeypatch, get_client(etcd_url), 5)
    policy = {"max_retries": max_retries, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.1}

    def publish():
        conn.Producer().publish({"n": 1}, exchange=queue.exchange, routing_key="rides-out", retry=True,
                                retry_policy=policy)

    if not published:
        with pytest.raises(OperationalError):
            publish()
        assert len(failed) == max_retries + 1
        # no reconnect after the last try; the others are spaced, so max_retries is not spent in milliseconds
        assert time.monotonic() - started >= max_retries * RECONNECT_GAP_SECONDS
        return
    publish()
    assert len(failed) == 5
    assert time.monotonic() - started >= 5 * RECONNECT_GAP_SECONDS
    monkeypatch.undo()
    assert drain(connect().SimpleQueue("rides-out"), 1) == [{"n": 1}]
    assert connect().SimpleQueue("rides-out").qsize() == 0


def test_an_idle_consumer_whose_lease_lapsed_unnoticed_re_registers_instead_of_parking(connect, etcd_url):
    """An idle worker cut off longer than its lease parks (delivery.py) with the lapsed lease before its
    keepalive knows: etcd's "lease not found" ended the worker (chaos test); it now re-registers."""
    from queue import Empty

    from kombu.asynchronous import Hub

    conn = connect(lease_ttl=30)  # the keepalive looks only every 10 s
    channel = conn.default_channel
    hub = Hub()
    conn.transport.register_with_event_loop(conn.connection, hub)  # parking is for event-loop consumers
    try:
        queue = Queue("park-lapsed", channel=channel)
        Consumer(channel, [queue], callbacks=[lambda body, message: None]).consume()
        lapsed = channel.lease.ensure()
        get_client(etcd_url).revoke_lease(lapsed)  # as etcd expires the lease of a worker it cannot hear
        with pytest.raises(Empty):
            channel._get("park-lapsed")  # empty: it would park
        assert channel.lease.ensure() != lapsed
    finally:
        conn.transport.unregister_from_event_loop(conn.connection, hub)
        hub.close()


def test_a_consumer_lease_etcd_expired_closes_without_error(connect, etcd_url, caplog):
    """Closing (at exit: consumer.close_all_leases) revokes the process's consumer lease; one etcd
    expired already is what the revoke wanted, not an error (etcd answers "lease not found")."""
    conn = connect(lease_ttl=30)
    channel = conn.default_channel
    Consumer(channel, [Queue("close-lapsed", channel=channel)], callbacks=[lambda body, message: None]).consume()
    lapsed = channel.lease.ensure()
    get_client(etcd_url).revoke_lease(lapsed)  # as etcd expires the lease of a worker it cannot hear
    with caplog.at_level(logging.INFO, logger="etcd_broker"):
        channel.lease.close()
    assert f"lease {lapsed:016x} had expired before close" in caplog.text
