"""kombu's own generic integration tests (t/integration/common.py) run against etcdv3.

This mirrors kombu's t/integration/test_redis.py: one subclass per generic class, plus
the fixtures the classes ask for. Where an expectation differs for etcd, the override
says why (docs/transport.md lists them all).
"""
from __future__ import annotations

import kombu
import pytest

import etcd_broker  # noqa: F401 - registers etcdv3://
from scripts.etcd_server import free_port
from tests.kombu_integration.common import (
    BaseEventLoop,
    BaseExchangeTypes,
    BaseFailover,
    BaseMessage,
    BasePriority,
    BaseTimeToLive,
    BasicFunctionality,
)


@pytest.fixture
def connection(etcd_url, etcd_prefix):
    conn = kombu.Connection(etcd_url, transport_options={"prefix": etcd_prefix})
    yield conn
    conn.close()


@pytest.fixture
def invalid_connection():
    """Nothing listens there: every operation must raise."""
    return kombu.Connection(f"etcdv3://127.0.0.1:{free_port()}", connect_timeout=2)


@pytest.fixture
def failover_connection(etcd_url, etcd_prefix):
    dead = f"etcdv3://127.0.0.1:{free_port()}"
    conn = kombu.Connection(f"{dead};{etcd_url}", transport_options={"prefix": etcd_prefix},
                            connect_timeout=2)
    yield conn
    conn.close()


class TestEtcdBasicFunctionality(BasicFunctionality):
    pass


class TestEtcdBaseExchangeTypes(BaseExchangeTypes):
    pass


class TestEtcdEventLoop(BaseEventLoop):
    pass


class TestEtcdTimeToLive(BaseTimeToLive):
    pass


class TestEtcdPriority(BasePriority):
    """Priorities as AMQP means them (9 most urgent), so kombu's ``asc`` order applies.

    Changed expectation (as in kombu's test_redis.py): a virtual transport's
    ``drain_events()`` delivers one message per call, so the consumer drains once per message.
    """

    PRIORITY_ORDER = "asc"

    def _publish(self, producer, queue, body, priority):
        producer.publish(body, retry=True, exchange=queue.exchange, routing_key=queue.routing_key,
                         declare=[queue], serializer="pickle", priority=priority)

    def test_publish_consume(self, connection):
        queue = kombu.Queue("priority_test", routing_key="priority_test", max_priority=10)
        received = []
        with connection as conn, conn.channel() as channel:
            producer = kombu.Producer(channel)
            for body, priority in [({"msg": "first"}, 3), ({"msg": "second"}, 6), ({"msg": "third"}, 3)]:
                self._publish(producer, queue, body, priority)
            consumer = kombu.Consumer(conn, [queue], accept=["pickle"],
                                      callbacks=[lambda body, message: (received.append(body), message.ack())])
            with consumer:
                for _ in range(3):
                    conn.drain_events(timeout=1)
        assert received == [{"msg": "second"}, {"msg": "first"}, {"msg": "third"}]

    def test_publish_requeue_consume(self, connection):
        queue = kombu.Queue("priority_requeue_test", routing_key="priority_requeue_test", max_priority=10)
        messages, bodies = [], []

        def callback(body, message):  # no ack: requeued below
            messages.append(message)
            bodies.append(body)

        with connection as conn, conn.channel() as channel:
            producer = kombu.Producer(channel)
            for body, priority in [({"msg": "first"}, 3), ({"msg": "second"}, 6), ({"msg": "third"}, 3)]:
                self._publish(producer, queue, body, priority)
            consumer = kombu.Consumer(conn, [queue], accept=["pickle"], callbacks=[callback])
            with consumer:
                for _ in range(3):
                    conn.drain_events(timeout=1)
            for message in messages:
                message.requeue()
            messages.clear()
            bodies.clear()
            self._publish(producer, queue, {"msg": "fourth"}, 9)
            with consumer:
                for _ in range(4):
                    conn.drain_events(timeout=1)
        assert bodies == [{"msg": "fourth"}, {"msg": "second"}, {"msg": "first"}, {"msg": "third"}]


class TestEtcdMessage(BaseMessage):
    pass


class TestEtcdFailover(BaseFailover):
    def test_failover_switches_to_alternate_url(self, failover_connection):
        """Changed expectation: the etcd client itself fails over between the endpoints of
        kombu's failover list (one gRPC client knows every member), so ``connect()`` succeeds
        without kombu switching URLs and ``conn.port`` stays the first one. What a user
        notices is kept: with the first URL dead, the connection works and messages flow.
        """
        conn = failover_connection
        assert len(conn.alt) > 1
        assert conn.connect()
        assert conn.connected
        with conn.SimpleQueue("failover_roundtrip") as queue:
            queue.put({"hello": "world"})
            message = queue.get(timeout=5)
            assert message.payload == {"hello": "world"}
            message.ack()
        conn.close()
