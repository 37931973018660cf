"""One consumer offered each message (offers.py, issue 19): no claim races, and a fallback after the grace.

Counts come from the transport's own transactions (every claim passes ``etcd_broker.core.ops.txn``);
nothing here asserts a duration.
"""
from __future__ import annotations

import json
import logging
import threading
from contextlib import ExitStack

import pytest
from kombu import Connection, Exchange, Queue

from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.transport import offers
from tests.helpers import wait_until

#: Messages published one at a time in the race test (each waits for the one before to be consumed).
MESSAGES = 120
#: Seconds a test waits for what a loaded machine may take long to do.
SLOW = 60


@pytest.fixture
def failed_txns(monkeypatch) -> list[int]:
    """How many etcd transactions of this process failed (a lost claim race is one)."""
    failed = [0]
    original = ops.txn

    def counted(*args, **kwargs):
        response = original(*args, **kwargs)
        if not response.succeeded:
            failed[0] += 1
        return response

    monkeypatch.setattr(ops, "txn", counted)
    return failed


def kombu_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, "direct"), routing_key=name)


class Consumers:
    """Consumer threads, each on its own Connection (prefetch 4, acking), recording what each got."""

    def __init__(self, urls_and_options: list[tuple[str, dict]], queue: str) -> None:
        self.queue = queue
        self.got: list[list[int]] = [[] for _ in urls_and_options]
        self.transports: list = [None] * len(urls_and_options)
        self.stop = threading.Event()
        self._ready = threading.Semaphore(0)
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(index, url, options), daemon=True)
                        for index, (url, options) in enumerate(urls_and_options)]

    def __enter__(self) -> Consumers:
        for thread in self.threads:
            thread.start()
        for _ in self.threads:
            assert self._ready.acquire(timeout=SLOW), "a consumer did not start"
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(SLOW)

    def consumed(self) -> int:
        with self._lock:
            return sum(len(got) for got in self.got)

    def _run(self, index: int, url: str, options: dict) -> None:
        def on_message(body, message) -> None:
            message.ack()
            with self._lock:
                self.got[index].append(body["n"])

        with Connection(url, transport_options=options) as connection:
            with connection.Consumer([kombu_queue(self.queue)], callbacks=[on_message], prefetch_count=4,
                                     accept=["json"]):
                self.transports[index] = connection.transport
                self._ready.release()
                while not self.stop.is_set():
                    try:
                        connection.drain_events(timeout=0.5)
                    except TimeoutError:
                        pass


def members_known(transports: list, queue: str, leases: int) -> bool:
    """Every transport's lease knows ``leases`` live consumers of ``queue`` (its own among them)."""
    for transport in transports:
        known = transport.lease.members.of(queue)
        if known is None or len(known) != leases or transport.lease.lease_id not in known:
            return False
    return True


def test_consumers_of_one_queue_claim_each_message_once_without_races(etcd_url, etcd_prefix, failed_txns,
                                                                      monkeypatch):
    # a grace no owner outlasts, even on a loaded machine: a failed claim here means the offer rule failed
    monkeypatch.setattr(offers, "OFFER_GRACE_SECONDS", SLOW)
    # two consumer leases (two client configurations: one lease each) with three transports each
    options = [{"prefix": etcd_prefix, "timeout": timeout} for timeout in (5.0, 6.0) for _ in range(3)]
    queue = "offered"
    with Consumers([(etcd_url, option) for option in options], queue) as consumers, \
            Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as publisher:
        wait_until(lambda: members_known(consumers.transports, queue, 2), timeout=SLOW,
                   message="every consumer knows both consumer leases")
        producer = publisher.Producer(serializer="json")
        before = failed_txns[0]
        for n in range(MESSAGES):
            producer.publish({"n": n}, exchange=kombu_queue(queue).exchange, routing_key=queue,
                             declare=[kombu_queue(queue)])
            wait_until(lambda n=n: consumers.consumed() > n, timeout=SLOW, interval=0.002,
                       message=f"message {n} consumed")
        failed = failed_txns[0] - before
        got = [n for each in consumers.got for n in each]
    assert sorted(got) == list(range(MESSAGES))  # each message once
    assert failed <= 0.1 * MESSAGES, f"{failed} failed claim transactions for {MESSAGES} messages"
    assert all(consumers.got), f"every consumer is offered some: {[len(g) for g in consumers.got]}"


def test_a_message_offered_to_a_consumer_that_never_claims_is_delivered_after_the_grace(
        etcd_url, etcd_prefix, caplog):
    caplog.set_level(logging.DEBUG, logger="etcd_broker.transport.offers")
    client, keys, queue = get_client(etcd_url), KeySpace(etcd_prefix), "orphaned"
    # a live consumer lease that lists the queue but never claims (a process stuck, or about to die)
    silent = client.lease(SLOW * 2)
    client.put(keys.consumer(silent.id), json.dumps({"queues": [queue]}), lease=silent.id)
    try:
        with Consumers([(etcd_url, {"prefix": etcd_prefix})], queue) as consumers, \
                Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as publisher:
            wait_until(lambda: members_known(consumers.transports, queue, 2), timeout=SLOW,
                       message="the consumer knows the silent lease")
            producer = publisher.Producer(serializer="json")
            for n in range(40):  # about half are offered to the silent lease (2^-40: none are)
                producer.publish({"n": n}, exchange=kombu_queue(queue).exchange, routing_key=queue,
                                 declare=[kombu_queue(queue)])
            wait_until(lambda: consumers.consumed() >= 40, timeout=SLOW, message="all 40 consumed")
            assert sorted(consumers.got[0]) == list(range(40))
    finally:
        client.revoke_lease(silent.id)
    assert "not claimed by their owner within the grace" in caplog.text


def test_a_full_consumer_s_offers_go_to_another_after_the_grace(etcd_url, etcd_prefix):
    queue, options = "full", {"prefix": etcd_prefix}
    held = []
    with ExitStack() as stack:
        full = stack.enter_context(Connection(etcd_url, transport_options=options))
        stack.enter_context(full.Consumer([kombu_queue(queue)], callbacks=[lambda body, m: held.append(m)],
                                          prefetch_count=1, accept=["json"]))
        publisher = stack.enter_context(Connection(etcd_url, transport_options=options))
        producer = publisher.Producer(serializer="json")

        def publish(n: int) -> None:
            producer.publish({"n": n}, exchange=kombu_queue(queue).exchange, routing_key=queue,
                             declare=[kombu_queue(queue)])

        publish(0)
        full.drain_events(timeout=SLOW)
        assert len(held) == 1  # unacked: its prefetch of 1 is full from now on
        consumers = stack.enter_context(Consumers([(etcd_url, options)], queue))
        for n in range(1, 31):  # about half are offered to the full consumer (same lease, two transports)
            publish(n)
        wait_until(lambda: consumers.consumed() >= 30, timeout=SLOW, message="the other consumer got all 30")
        assert sorted(consumers.got[0]) == list(range(1, 31))
        held[0].ack()


def test_every_process_agrees_on_one_owner_and_one_backup_lease_and_an_unknown_view_claims_at_once():
    leases = [3, 7, 11, 19]
    for n in range(200):
        key = f"/p/default/q/work/ready/9/{n:020d}-0".encode()
        ranks = sorted(offers.place(key, leases, lease, 5)[0] for lease in leases)
        assert ranks == [0, 1, 2, 2]  # one owner process, one backup process
        assert {offers.place(key, leases, lease, 5)[1] for lease in leases} <= set(range(5))
        assert offers.place(key, None, 3, 5)[0] == 0  # the view not read yet: as before, ours
        assert offers.place(key, [7, 11], 3, 5)[0] == 0  # our own lease not in it yet: ours
