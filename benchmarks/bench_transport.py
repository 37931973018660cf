"""Celery no-op workload over our etcd transport and over Redis, in one run.

    python -m benchmarks.bench_transport [--tasks 2000] [--rounds 200]

Throughput: publish N no-op tasks, time until the worker has run all of them.
Latency: one task at a time on an idle worker; publish-to-execution start.
Both brokers get the same worker (-P threads -c 8) and the same Redis counter.
"""
from __future__ import annotations

import argparse
import os
import time
import uuid

import redis

from benchmarks.common import RedisServer, percentile, print_table, progress, start_worker, stop_worker
from etcd_broker.server import EtcdServer


def run_broker(name: str, broker_url: str, counter_url: str, tasks: int, rounds: int) -> list:
    env = {"BENCH_BROKER_URL": broker_url, "BENCH_COUNTER_URL": counter_url, "BENCH_PREFIX": f"/bench-{uuid.uuid4().hex[:6]}"}
    os.environ.update(env)
    import importlib

    from benchmarks import transport_app
    importlib.reload(transport_app)
    counter = redis.Redis.from_url(counter_url)
    worker = start_worker("benchmarks.transport_app", env, concurrency=8)
    try:
        app = transport_app.app
        with app.connection_for_write() as conn, app.producer_or_acquire() as producer:
            conn.ensure_connection()
            # warm-up
            run = f"warm-{uuid.uuid4().hex}"
            for _ in range(50):
                transport_app.noop.apply_async((run,), producer=producer)
            _wait(counter, run, 50)
            progress(f"{name}: throughput, {tasks} tasks")
            run = f"tp-{uuid.uuid4().hex}"
            start = time.perf_counter()
            for _ in range(tasks):
                transport_app.noop.apply_async((run,), producer=producer)
            published = time.perf_counter() - start
            _wait(counter, run, tasks)
            elapsed = time.perf_counter() - start
            progress(f"{name}: latency, {rounds} rounds")
            run = f"lat-{uuid.uuid4().hex}"
            for i in range(rounds):
                transport_app.stamp.apply_async((run, time.time()), producer=producer)
                _wait_len(counter, run, i + 1)
                time.sleep(0.01)
            latencies = [float(v) * 1000 for v in counter.lrange(run, 0, -1)]
    finally:
        stop_worker(worker)
    return [name, tasks / published, tasks / elapsed, percentile(latencies, 50), percentile(latencies, 95),
            percentile(latencies, 99)]


def _wait(counter, key: str, target: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while int(counter.get(key) or 0) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {counter.get(key)} of {target} tasks ran in {timeout}s")
        time.sleep(0.002)


def _wait_len(counter, key: str, target: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while counter.llen(key) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"latency round {target} did not finish")
        time.sleep(0.0005)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    redis_server = RedisServer()
    etcd = EtcdServer().start()
    try:
        rows = [
            run_broker("etcdv3 (ours)", etcd.url, redis_server.url(15), args.tasks, args.rounds),
            run_broker("redis", redis_server.url(0), redis_server.url(15), args.tasks, args.rounds),
        ]
    finally:
        etcd.cleanup()
        redis_server.stop()
    return print_table(
        f"Celery no-op tasks, worker -P threads -c 8, {args.tasks} tasks, {args.rounds} latency rounds",
        ["broker", "publish tasks/s", "end-to-end tasks/s", "latency p50 ms", "p95 ms", "p99 ms"], rows)


if __name__ == "__main__":
    main()
