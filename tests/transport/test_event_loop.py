"""The transport inside kombu's event loop (the hub a Celery worker runs), and its outage signal."""
from __future__ import annotations

import time

import pytest
from kombu import Connection, Consumer, Exchange, Queue
from kombu.asynchronous import Hub

from tests.helpers import wait_until


def test_messages_reach_a_hub_consumer_without_drain_events(etcd_url, etcd_prefix):
    """Registered with a hub, a put wakes the hub's poll through the transport's pipe."""
    received: list[int] = []
    queue = Queue("hub-q", Exchange("hub-x", type="direct"), routing_key="hub-q")
    hub = Hub()
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        conn.connect()
        conn.transport.register_with_event_loop(conn.connection, hub)
        consumer = Consumer(conn.channel(), [queue], accept=["json"],
                            callbacks=[lambda body, message: (received.append(body["n"]), message.ack())])
        consumer.consume()
        with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as producer_conn:
            producer = producer_conn.Producer(serializer="json")
            for n in range(5):
                producer.publish({"n": n}, exchange=queue.exchange, routing_key="hub-q", declare=[queue])
        loop = hub.create_loop()
        deadline = time.monotonic() + 20
        while len(received) < 5 and time.monotonic() < deadline:
            next(loop)
        consumer.cancel()
        hub.close()
    assert received == [0, 1, 2, 3, 4]


@pytest.mark.reliability
def test_drain_events_raises_a_connection_error_while_etcd_is_down(private_etcd, etcd_prefix):
    """kombu's ConsumerMixin reconnects on a connection error; a silent wait would hide the outage."""
    with Connection(private_etcd.url, transport_options={"prefix": etcd_prefix, "lease_ttl": 3}) as conn:
        queue = conn.SimpleQueue("outage")
        queue.put({"n": 1})
        assert queue.get(timeout=10).payload == {"n": 1}
        private_etcd.stop()

        def drain_until_error():
            try:
                conn.drain_events(timeout=0.5)
            except TimeoutError:
                return None
            except conn.connection_errors as exc:
                return exc
            return None

        wait_until(drain_until_error, timeout=30, interval=0, message="a connection error from drain_events")
        private_etcd.start()
