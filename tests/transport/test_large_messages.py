"""Messages over etcd's request limit that expire (Celery's control replies): body stored beside (issue 20 item 2).

``inspect reserved`` of a busy worker ran to megabytes and was dropped with ``MessageTooLarge``;
a reply queue has a message TTL (Celery's ``control_queue_ttl``), so its body now goes to etcd
in chunks under that TTL and comes back whole.
"""
from __future__ import annotations

import pytest
from kombu import Connection, Queue

from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.exceptions import MessageTooLarge
from etcd_broker.transport.channel import DEFAULT_MAX_MESSAGE_BYTES
from tests.helpers import wait_until
from tests.transport.test_busy_worker import APP, HOLD_SECONDS, busy, env_for  # noqa: F401 - busy is a fixture

#: Reserved tasks in the busy worker, and each one's argument: a reply of several times the limit.
RESERVED, ARG_BYTES = 100, 50_000


def test_an_expiring_message_over_the_limit_arrives_whole_and_one_without_ttl_is_refused(etcd_url, etcd_prefix):
    body = "é" + "x" * (4 * DEFAULT_MAX_MESSAGE_BYTES)  # several chunks; a non-ASCII start survives the split
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        replies = conn.SimpleQueue(Queue("replies", routing_key="replies", message_ttl=60, auto_delete=True), no_ack=True)
        replies.put(body)
        assert replies.get(timeout=10).payload == body
        chunks = KeySpace(etcd_prefix).queue("replies") + "body/"
        assert get_client(etcd_url).get_range_response(chunks, chunks[:-1] + "0", count_only=True).count == 0
        plain = conn.SimpleQueue("plain")
        with pytest.raises(MessageTooLarge):
            plain.put(body)
        replies.close()
        plain.close()


def test_inspect_reserved_of_a_busy_worker_answers_beyond_the_request_limit(busy, worker_factory, etcd_url,  # noqa: F811
                                                                            etcd_prefix):
    worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix), concurrency=1,
                   extra_args=["--prefetch-multiplier", str(RESERVED + 10)])
    busy.send_task("busy.hold", ("busy", HOLD_SECONDS))
    wait_until(lambda: busy.markers("busy-started"), timeout=60, message="the only slot busy")
    for _ in range(RESERVED):
        busy.send_task("busy.hold", ("x" * ARG_BYTES, HOLD_SECONDS))
    inspect = busy.control.inspect(timeout=20)
    reserved = wait_until(lambda: (reply := inspect.reserved()) and sum(map(len, reply.values())) >= RESERVED
                          and reply, timeout=90, interval=1.0, message="every task reserved and reported")
    (tasks,) = reserved.values()
    assert len(tasks) == RESERVED
    assert len(repr(tasks)) > 3 * DEFAULT_MAX_MESSAGE_BYTES
