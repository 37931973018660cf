"""etcd_broker.flower without a browser: Flower's factory answers etcdv3:// with our rows and keeps
its own brokers (the Chromium test, tests/browser/test_flower_in_chromium.py, runs a real Flower)."""
from __future__ import annotations

import asyncio

from flower.utils.broker import Broker, RabbitMQ
from kombu import Connection

import etcd_broker.flower


def test_flowers_factory_gives_etcd_rows_and_still_its_own_brokers(etcd_url, etcd_prefix):
    etcd_broker.flower.install()
    etcd_broker.flower.install()  # a config file read twice changes nothing
    options = {"prefix": etcd_prefix}
    with Connection(etcd_url, transport_options=options) as connection:
        queue = connection.SimpleQueue("waiting")
        queue.put({"n": 1})
        queue.put({"n": 2})
        queue.close()
    broker = Broker(f"{etcd_url}//", http_api=None, broker_options=options, broker_use_ssl=None)
    assert isinstance(broker, etcd_broker.flower.EtcdQueues)
    rows = asyncio.run(broker.queues(["waiting", "never-declared"]))
    assert rows == [
        {"name": "waiting", "messages": 2, "messages_ready": 2, "messages_unacknowledged": 0, "consumers": 0},
        {"name": "never-declared", "messages": 0, "messages_ready": 0, "messages_unacknowledged": 0, "consumers": 0},
    ]
    assert isinstance(Broker("amqp://guest:guest@127.0.0.1:5672//", http_api=None), RabbitMQ)
