"""What a consumer held when its connection failed goes back to the queue while the process lives:
after a channel reset (what Celery does on any broker error) and after a claim whose answer was lost;
except a message whose task is running in this process, which its task acks later (consumer.py)."""
from __future__ import annotations

import time

import pytest
from kombu import Connection, Consumer, Queue

import etcd_broker  # noqa: F401
from etcd_broker.core.client import CONNECTION_ERRORS
from etcd_broker.transport.consumer import ORPHAN_GRACE_SECONDS, kept
from tests.helpers import wait_until
from tests.reliability.blackhole import BlackholeProxy

HELD = 3


def test_an_ack_after_its_connection_was_reset_is_harmless_and_the_message_comes_back(etcd_url, etcd_prefix):
    """Celery acks a task that ran across a broker reconnect on the old channel; that must not raise."""
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        queue = conn.SimpleQueue("reset")
        queue.put({"n": 1})
        channel = conn.channel()
        message = channel.basic_get("reset")
        channel.close()  # what a connection reset does: the held message is requeued
        message.ack()
        again = queue.get(timeout=5)
        again.ack()
        assert again.payload == {"n": 1} and again.delivery_info["redelivered"]
        queue.close()


class _StartedRequest:
    """What Celery's worker puts in ``celery.worker.state.active_requests`` when a task starts (its id)."""

    def __init__(self, task_id: str) -> None:
        self.id = task_id


def test_a_reset_keeps_the_message_of_a_running_task_and_gives_back_the_others(etcd_url, etcd_prefix):
    """Given back, a running task's message would run on another worker while it still runs here."""
    from celery.worker import state

    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        queue = conn.SimpleQueue("running")
        queue.put({"n": 1}, headers={"id": "task-running"})
        queue.put({"n": 2}, headers={"id": "task-waiting"})
        channel = conn.channel()
        channel.basic_qos(0, 2, False)
        keys, client = channel.keys, channel.client
        running = channel.basic_get("running")
        waiting = channel.basic_get("running")
        assert (running.headers["id"], waiting.headers["id"]) == ("task-running", "task-waiting")
        request = _StartedRequest("task-running")
        state.active_requests.add(request)
        try:
            channel.close()  # a connection reset, while task-running runs and task-waiting waits
            assert kept() == 1
            back = queue.get(timeout=5)
            assert back.headers["id"] == "task-waiting" and back.delivery_info["redelivered"]
            back.ack()
            with pytest.raises(queue.Empty):
                queue.get(timeout=1)  # the running task's message stays with us, under our lease
            running.ack()  # the task ends: its ack on the old channel deletes the message
            assert kept() == 0
        finally:
            state.active_requests.discard(request)
        wait_until(lambda: not list(client.get_prefix(keys.unacked("running"))), timeout=10,
                   message="the running task's ack deleted its message")
        queue.close()


def test_a_kept_message_whose_task_ends_without_an_ack_comes_back(etcd_url, etcd_prefix):
    """A task that stops running without acking (e.g. Celery cancels it on connection loss) must not
    leave its message held by this live process for ever."""
    from celery.worker import state

    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        queue = conn.SimpleQueue("orphan")
        queue.put({"n": 1}, headers={"id": "task-cancelled"})
        channel = conn.channel()
        held = channel.basic_get("orphan")
        request = _StartedRequest("task-cancelled")
        state.active_requests.add(request)
        try:
            channel.close()
            assert kept() == 1
        finally:
            state.active_requests.discard(request)  # it stops running; nobody acks
        wait_until(lambda: kept() == 0, timeout=ORPHAN_GRACE_SECONDS + 10,
                   interval=0.2, message="the orphaned message given back")
        back = queue.get(timeout=10)
        assert back.headers["id"] == held.headers["id"] and back.delivery_info["redelivered"]
        back.ack()
        queue.close()


def test_messages_a_channel_held_when_etcd_was_down_come_back_while_the_process_lives(private_etcd, etcd_prefix):
    """The channel cannot requeue while etcd is down, and our lease never lapses (we are alive):
    the messages must still return once etcd answers, not when this process exits."""
    options = {"prefix": etcd_prefix, "lease_ttl": 2}
    with Connection(private_etcd.url, transport_options=options) as conn:
        feeder = conn.SimpleQueue("held")
        for n in range(HELD):
            feeder.put({"n": n})
        channel = conn.channel()
        channel.basic_qos(0, HELD, False)
        held = []
        Consumer(channel, [Queue("held")], callbacks=[lambda body, message: held.append(body)],
                 accept=["json"]).consume()
        while len(held) < HELD:
            conn.drain_events(timeout=10)
        private_etcd.stop()
        channel.close()  # a reset while etcd is down: nothing can be written now
        private_etcd.start()
        back = [feeder.get(timeout=20) for _ in range(HELD)]
        for message in back:
            message.ack()
        assert sorted(m.payload["n"] for m in back) == list(range(HELD))
        assert all(m.delivery_info["redelivered"] for m in back)
        feeder.close()



def test_a_claim_whose_answer_was_lost_gives_its_message_back(etcd_url, etcd_prefix):
    """etcd applied the claim but the consumer never heard: nobody holds the message in memory, so it
    must not sit under the (live) consumer's lease for as long as that process runs."""
    proxy = BlackholeProxy(int(etcd_url.rsplit(":", 1)[1]))
    options = {"prefix": etcd_prefix, "timeout": 1}
    try:
        with Connection(proxy.url, transport_options=options) as conn, \
                Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as direct:
            queue = conn.SimpleQueue("ambiguous")
            with pytest.raises(queue.Empty):
                queue.get(timeout=0.5)  # consuming: the queue is read, found empty, and watched
            direct.SimpleQueue("ambiguous").put({"n": 1})
            time.sleep(0.5)  # the watch tells the consumer a message arrived
            proxy.swallow.set()
            with pytest.raises(CONNECTION_ERRORS):
                queue.get(timeout=5)  # the claim transaction reaches etcd; its answer does not come back
            proxy.swallow.clear()
            elsewhere = direct.SimpleQueue("ambiguous")
            message = elsewhere.get(timeout=15)
            message.ack()
            assert message.payload == {"n": 1} and message.delivery_info["redelivered"]
    finally:
        proxy.close()
