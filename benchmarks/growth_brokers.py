"""bench_growth's brokers side by side: etcd (scripts/etcd_server.py's defaults), Redis (defaults),
Redis with ``appendfsync always`` and RabbitMQ (the unprivileged node of benchmarks/common.py),
each with the same readings: CPU seconds, requests, raft proposals and stored size."""
from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass

from benchmarks.common import RabbitMQServer, RedisServer, process_cpu, session_cpu
from scripts.etcd_server import EtcdServer

#: The brokers bench_growth knows, in the order of its tables.
BROKER_NAMES = ("etcd", "redis", "redis-aof", "rabbitmq")


@dataclass
class Reading:
    """A broker's counters at one instant (None: the broker has no such counter)."""

    cpu: float
    requests: float | None
    proposals: float | None
    stored_bytes: float | None
    #: etcd only: the part of its DB file in use (the rest is free pages until a defragmentation).
    in_use_bytes: float | None = None


def etcd_metrics(client_url: str) -> dict[str, float]:
    """From etcd's /metrics: unary requests handled, proposals committed, DB size (allocated and
    in use), the revision compacted last and the current one."""
    body = urllib.request.urlopen(f"{client_url}/metrics", timeout=10).read().decode()
    found = {"requests": 0.0}
    for line in body.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, _, value = line.rpartition(" ")
        name = series.partition("{")[0]
        if name == "grpc_server_handled_total" and 'grpc_type="unary"' in series:
            found["requests"] += float(value)
        elif name in ("etcd_server_proposals_committed_total", "etcd_mvcc_db_total_size_in_bytes",
                      "etcd_mvcc_db_total_size_in_use_in_bytes", "etcd_debugging_mvcc_compact_revision",
                      "etcd_debugging_mvcc_current_revision"):
            found[name] = float(value)
    return found


class Broker:
    """One running broker: its kombu URL and its readings."""

    name = ""

    def url(self) -> str:
        raise NotImplementedError

    def read(self) -> Reading:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class EtcdBroker(Broker):
    name = "etcd"

    def __init__(self, retention: str | None = None) -> None:
        extra = ["--auto-compaction-retention", retention] if retention else []  # the last flag wins
        self.server = EtcdServer(extra_args=extra).start()

    def url(self) -> str:
        return self.server.url

    def read(self) -> Reading:
        metrics = etcd_metrics(self.server.client_url)
        return Reading(process_cpu(self.server.process.pid), metrics["requests"],
                       metrics["etcd_server_proposals_committed_total"], metrics["etcd_mvcc_db_total_size_in_bytes"],
                       metrics.get("etcd_mvcc_db_total_size_in_use_in_bytes"))

    def stop(self) -> None:
        self.server.cleanup()


class RedisBroker(Broker):
    def __init__(self, durable: bool) -> None:
        self.name = "redis-aof" if durable else "redis"
        self.server = RedisServer(durable=durable)

    def url(self) -> str:
        return self.server.url(0)

    def read(self) -> Reading:
        commands = self.server.commands()  # its INFO counts one: the next reading's delta includes it
        memory = self.server._counter.info("memory")["used_memory"]
        return Reading(process_cpu(self.server.process.pid), commands, None, float(memory))

    def stop(self) -> None:
        self.server.stop()


class RabbitBroker(Broker):
    name = "rabbitmq"

    def __init__(self) -> None:
        self.server = RabbitMQServer()

    def url(self) -> str:
        return self.server.url()

    def read(self) -> Reading:
        return Reading(session_cpu(self.server.process.pid), None, None, float(_tree_bytes(self.server.dir)))

    def stop(self) -> None:
        self.server.stop()


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total


def start_brokers(names: list[str], etcd_retention: str | None = None) -> list[Broker]:
    """Start the brokers named (in BROKER_NAMES' order); stop those started if one fails.
    ``etcd_retention``: etcd's ``--auto-compaction-retention`` instead of the launcher's."""
    makers = {"etcd": lambda: EtcdBroker(etcd_retention), "redis": lambda: RedisBroker(False), "redis-aof": lambda: RedisBroker(True),
              "rabbitmq": RabbitBroker}
    started: list[Broker] = []
    try:
        for name in BROKER_NAMES:
            if name in names:
                started.append(makers[name]())
    except BaseException:
        stop_brokers(started)
        raise
    return started


def stop_brokers(brokers: list[Broker]) -> None:
    for broker in brokers:
        broker.stop()
