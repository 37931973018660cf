"""A publish to a direct exchange is routed by a binding made a moment ago by another process (bindings.py).

Each transport mirrors the bindings in memory through a watch, which lags behind etcd (more while
the stream is resumed, as around every fork of a prefork pool). Celery's control replies hit that:
the client binds a fresh reply queue, sends ``revoke(..., reply=True)``, and the worker replies at
once; routed on a stale copy the reply found no queue and was silently dropped (about 1 in 20 with
``--max-tasks-per-child 1``: the worker logged ``no queue bound to exchange 'reply.celery.pidbox'``
at the same millisecond as the terminate whose reply never came). Real etcd; the lag is made
certain: the binding is taken out of the publisher's copy once its watch delivered it, as if the
event had not come yet.
"""
from __future__ import annotations

from kombu import Connection, Exchange, Queue

from etcd_broker.core.ops import KeySpace
from tests.helpers import wait_until


def test_a_direct_publish_finds_a_binding_its_watch_has_not_delivered_yet(etcd_url, etcd_prefix):
    options = {"prefix": etcd_prefix}
    replies = Exchange("replies", type="direct")
    with Connection(etcd_url, transport_options=options) as worker, \
            Connection(etcd_url, transport_options=options) as client:
        producer = worker.Producer(serializer="json")
        producer.publish({"n": 0}, exchange=replies, routing_key="nobody", declare=[replies])  # table loaded
        table = worker.transport.bindings
        queue = client.SimpleQueue(Queue("reply-oid", replies, routing_key="oid"))  # the client binds
        key = KeySpace(etcd_prefix).binding("replies", "reply-oid", "oid").encode()
        wait_until(lambda: key in table._rows["replies"], timeout=20, message="the worker's watch saw the binding")
        del table._rows["replies"][key]  # the worker's copy as it was before the event came
        producer.publish({"n": 1}, exchange=replies, routing_key="oid")  # the worker replies
        message = queue.get(timeout=10)
        assert message.payload == {"n": 1}
        message.ack()
        queue.close()
