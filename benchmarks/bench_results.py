"""Result round trip, ``noop.apply_async().get()``, on our etcd backend and on Celery's Redis backend.

    python -m benchmarks.bench_results [--rounds 500] [--burst 500]

All sides run in one process, rounds interleaved (order reversed every other round), each
against its own ``celery worker -P threads -c 8``: etcd broker + etcd backend (ours), Redis
broker + Redis backend (Celery's), and our backend on a Redis broker, which isolates the
result path from the broker. ``--burst`` tasks are then sent at once and each ``get()``
in turn. This module is also the workers' Celery app (``-A benchmarks.bench_results``).
"""
from __future__ import annotations

import argparse
import os
import time
import uuid
from contextlib import ExitStack

from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3://
from benchmarks.common import RedisServer, percentile, print_table, progress, start_worker, stop_worker
from scripts.etcd_server import EtcdServer

TASK = "benchmarks.bench_results.noop"
#: Tasks sent and awaited before timing starts (connections, leases, watch stream up).
WARMUP_ROUNDS = 30


def make_app(broker: str, backend: str, prefix: str) -> Celery:
    app = Celery("bench-results", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        broker_transport_options={"prefix": prefix}, result_backend_transport_options={"prefix": prefix},
        task_serializer="json", result_serializer="json", accept_content=["json"],
        worker_prefetch_multiplier=4, broker_connection_retry_on_startup=True,
    )
    return app


app = make_app(os.environ.get("BENCH_BROKER_URL", "etcdv3://127.0.0.1:2379"),
               os.environ.get("BENCH_BACKEND_URL", "etcdv3://127.0.0.1:2379"),
               os.environ.get("BENCH_PREFIX", "/bench-results"))


@app.task(name=TASK)
def noop() -> None:
    return None


class Side:
    """One backend under test: its client app, its worker, its timings."""

    def __init__(self, name: str, broker: str, backend: str, stack: ExitStack) -> None:
        self.name, self.broker = name, broker.split(":", 1)[0]
        prefix = f"/bench-{uuid.uuid4().hex[:8]}"
        env = {"BENCH_BROKER_URL": broker, "BENCH_BACKEND_URL": backend, "BENCH_PREFIX": prefix}
        worker = start_worker("benchmarks.bench_results", env, concurrency=8)
        stack.callback(stop_worker, worker)
        self.app = make_app(broker, backend, prefix)
        stack.callback(self.app.close)
        self.signature = self.app.signature(TASK)
        self.round_trips: list[float] = []
        self.burst_rate = 0.0

    def round_trip(self) -> float:
        start = time.perf_counter()
        self.signature.apply_async().get(timeout=30)
        return (time.perf_counter() - start) * 1000

    def burst(self, count: int) -> None:
        start = time.perf_counter()
        results = [self.signature.apply_async() for _ in range(count)]
        for result in results:
            result.get(timeout=60)
        self.burst_rate = count / (time.perf_counter() - start)

    def row(self) -> list:
        times = self.round_trips
        return [self.name, self.broker, percentile(times, 50), percentile(times, 95), percentile(times, 99),
                1000 * len(times) / sum(times), self.burst_rate]


def interleave(sides: list[Side], rounds: int) -> None:
    """Alternate the order every round so neither side always runs second."""
    for side in sides:
        for _ in range(WARMUP_ROUNDS):
            side.round_trip()
    step = max(1, rounds // 10)
    for i in range(rounds):
        for side in sides if i % 2 == 0 else reversed(sides):
            side.round_trips.append(side.round_trip())
        if (i + 1) % step == 0:
            progress(f"round {i + 1}/{rounds}: " + ", ".join(
                f"{s.name} on {s.broker} p50 {percentile(s.round_trips, 50):.2f} ms" for s in sides))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=500, help="serial get() round trips per backend")
    parser.add_argument("--burst", type=int, default=500, help="tasks sent at once, then each get()")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        redis_server = RedisServer()
        stack.callback(redis_server.stop)
        etcd = EtcdServer().start()
        stack.callback(etcd.cleanup)
        progress("starting one worker per backend")
        sides = [Side("etcdv3 (ours)", etcd.url, etcd.url, stack),
                 Side("redis (Celery's)", redis_server.url(0), redis_server.url(1), stack),
                 Side("etcdv3 (ours)", redis_server.url(2), etcd.url, stack)]
        progress(f"{args.rounds} interleaved rounds of noop.apply_async().get()")
        interleave(sides, args.rounds)
        for side in sides:
            progress(f"{side.name} on {side.broker}: burst of {args.burst}")
            side.burst(args.burst)
        rows = [side.row() for side in sides]
    headers = ["result backend", "broker", "get() p50 ms", "p95 ms", "p99 ms", "serial results/s",
               f"burst results/s ({args.burst})"]
    return print_table(f"noop.apply_async().get() round trip, worker -P threads -c 8, {args.rounds} rounds "
                       "interleaved", headers, rows)


if __name__ == "__main__":
    main()
