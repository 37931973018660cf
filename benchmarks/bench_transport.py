"""Celery no-op workload over our etcd transport and over Redis, in one run.

    python -m benchmarks.bench_transport [--tasks 2000] [--rounds 200] [--latency-only]

Brokers: our etcd transport; Redis with its defaults (no persistence); Redis with
``appendonly yes`` and ``appendfsync always`` (every write fsynced before it is answered, the
durable configuration comparable to etcd's). For each, the same worker (``-P threads -c 8``)
and the same Redis counter (on the non-durable server):
* publish: tasks/s one producer thread sends (etcd makes each message durable first);
* drain: tasks/s a worker runs from a backlog published before it started;
* end-to-end: tasks/s from the first publish to the last execution, publishing
  while the worker runs, with 1 and with 4 producer threads (a web tier publishes
  from many threads at once);
* latency: one task at a time on an idle worker, publish to execution start.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis

from benchmarks.common import RedisServer, percentile, print_table, progress, start_worker, stop_worker
from scripts.etcd_server import EtcdServer

PRODUCER_THREADS = (1, 4)


def load_app(env: dict[str, str]):
    os.environ.update(env)
    from benchmarks import transport_app

    return importlib.reload(transport_app)


def publish(module, run: str, count: int, threads: int) -> float:
    """Send ``count`` no-op tasks from ``threads`` threads; return the seconds it took."""
    def send(share: int) -> None:
        with module.app.producer_or_acquire() as producer:
            for _ in range(share):
                module.noop.apply_async((run,), producer=producer)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, [count // threads] * threads))
    return time.perf_counter() - start


def wait_count(counter, key: str, target: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while int(counter.get(key) or 0) < target:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {counter.get(key)} of {target} tasks ran in {timeout}s")
        time.sleep(0.002)


def measure(name: str, broker_url: str, counter_url: str, tasks: int, rounds: int, latency_only: bool = False) -> list:
    env = {"BENCH_BROKER_URL": broker_url, "BENCH_COUNTER_URL": counter_url,
           "BENCH_PREFIX": f"/bench-{uuid.uuid4().hex[:6]}"}
    module = load_app(env)
    counter = redis.Redis.from_url(counter_url)
    progress(f"{name}: publishing a backlog of {tasks}")
    backlog = f"drain-{uuid.uuid4().hex}"
    publish_seconds = 0.0 if latency_only else publish(module, backlog, tasks, 1)
    worker = start_worker("benchmarks.transport_app", env, concurrency=8)
    try:
        if latency_only:
            return [name, "-", "-", "-", "-", *latency(name, module, counter, rounds)]
        while not int(counter.get(backlog) or 0):
            time.sleep(0.001)
        start = time.perf_counter()
        wait_count(counter, backlog, tasks)
        drain_rate = tasks / (time.perf_counter() - start)
        end_to_end = []
        for threads in PRODUCER_THREADS:
            progress(f"{name}: end-to-end, {tasks} tasks from {threads} producer thread(s)")
            run = f"e2e-{uuid.uuid4().hex}"
            start = time.perf_counter()
            publish(module, run, tasks, threads)
            wait_count(counter, run, tasks)
            end_to_end.append(tasks / (time.perf_counter() - start))
        lat = latency(name, module, counter, rounds)
    finally:
        stop_worker(worker)
        module.app.pool.force_close_all()
    return [name, tasks / publish_seconds, drain_rate, *end_to_end, *lat]


def latency(name: str, module, counter, rounds: int) -> list[float]:
    """One task at a time on an idle worker: p50, p95, p99 ms from publish to execution start."""
    progress(f"{name}: idle latency, {rounds} rounds")
    run = f"lat-{uuid.uuid4().hex}"
    with module.app.producer_or_acquire() as producer:
        for i in range(rounds):
            module.stamp.apply_async((run, time.time()), producer=producer)
            while counter.llen(run) < i + 1:
                time.sleep(0.0005)
            time.sleep(0.005)
    latencies = [float(v) * 1000 for v in counter.lrange(run, 0, -1)]
    return [percentile(latencies, 50), percentile(latencies, 95), percentile(latencies, 99)]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--latency-only", action="store_true", help="only the idle latency rounds")
    args = parser.parse_args(argv)
    redis_server = RedisServer()
    durable_redis = RedisServer(durable=True)
    etcd = EtcdServer().start()
    counter_url = redis_server.url(15)
    try:
        rows = [measure(name, url, counter_url, args.tasks, args.rounds, args.latency_only) for name, url in (
            ("etcdv3 (ours)", etcd.url),
            ("redis", redis_server.url(0)),
            ("redis appendfsync always", durable_redis.url(0)),
        )]
    finally:
        etcd.cleanup()
        redis_server.stop()
        durable_redis.stop()
    headers = ["broker", "publish/s (1 thread)", "drain/s", *[f"end-to-end/s ({n} prod.)" for n in PRODUCER_THREADS],
               "latency p50 ms", "p95 ms", "p99 ms"]
    tasks = "" if args.latency_only else f"{args.tasks} tasks, "
    table = print_table(f"Celery no-op tasks, worker -P threads -c 8, {tasks}{args.rounds} latency rounds, "
                        f"load average {os.getloadavg()[0]:.1f}", headers, rows)
    ours, default, durable = (row[-3] for row in rows)
    ratios = (f"latency p50 ours / redis default: {ours / default:.2f}x (issue 14: at most 1.2x); "
              f"ours / redis appendfsync always: {ours / durable:.2f}x (at most 1x)")
    print(ratios, flush=True)
    return f"{table}\n\n{ratios}"


if __name__ == "__main__":
    main()
