"""Flower's Broker page and ``/api/queues/length`` for etcd: ``install()`` from a Flower config file.

Flower (2.x) reads queue lengths through ``flower.utils.broker.Broker``, a factory that knows
RabbitMQ and Redis only and answers ``'etcd' broker is not supported`` for anything else. Flower
has no registry for brokers; what it offers is its Python config file (``--conf``), run before the
web app starts. There, ``install()`` teaches the factory ``etcdv3://``:

    # flowerconfig.py                  celery -A proj flower --conf=flowerconfig.py
    import etcd_broker.flower
    etcd_broker.flower.install()

Each row is read like ``manage.py queues`` does (:func:`etcd_broker.stats.queue_stats`, count-only
reads through the transport's own client and key space): messages waiting (``messages_ready``),
delivered and not yet acknowledged (``messages_unacknowledged``), their sum (``messages``) and live
consumers, in the field names Flower shows for RabbitMQ. Needs the ``flower`` extra.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlparse

from flower.utils import broker as flower_broker
from kombu import Connection

from etcd_broker import SCHEME
from etcd_broker.stats import queue_stats, stats_for_connection

logger = logging.getLogger(__name__)


class EtcdQueues(flower_broker.BrokerBase):
    """Flower's broker view of etcd: per queue, messages ready, unacknowledged and consumers."""

    def __init__(self, broker_url: str, *_: Any, broker_options: dict[str, Any] | None = None, **__: Any) -> None:
        super().__init__(broker_url)
        self.broker_url = broker_url
        self.transport_options = dict(broker_options or {})

    async def queues(self, names: list[str]) -> list[dict[str, Any]]:
        """One row per name Flower asks for (the queues its workers consume), zeros for an empty one."""
        return await asyncio.get_running_loop().run_in_executor(None, self.read, list(names))

    def read(self, names: list[str]) -> list[dict[str, Any]]:
        """The rows, read from etcd (blocking: Flower's event loop runs it in a thread)."""
        with Connection(self.broker_url, transport_options=self.transport_options) as connection:
            stats = {row["queue"]: row for row in queue_stats(*stats_for_connection(connection))}
        rows = []
        for name in names:
            row = stats.get(name, {"ready": 0, "unacked": 0, "consumers": 0})
            rows.append({"name": name, "messages": row["ready"] + row["unacked"], "messages_ready": row["ready"],
                         "messages_unacknowledged": row["unacked"], "consumers": row["consumers"]})
        return rows


def install() -> None:
    """Make Flower's broker factory answer ``etcdv3://`` URLs with :class:`EtcdQueues` (idempotent)."""
    factory = flower_broker.Broker
    if getattr(factory, "etcd_broker_installed", False):
        return
    original = factory.__new__

    def __new__(cls, broker_url, *args, **kwargs):
        if urlparse(broker_url).scheme == SCHEME:
            return EtcdQueues(broker_url, *args, **kwargs)
        return original(cls, broker_url, *args, **kwargs)

    factory.__new__ = staticmethod(__new__)
    factory.etcd_broker_installed = True
    logger.info("etcd_broker: Flower's Broker page reads %s:// queues from etcd", SCHEME)
