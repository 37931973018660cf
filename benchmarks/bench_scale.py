"""Scale by simulation: throughput as worker processes grow, against a three-member etcd cluster.

    python -m benchmarks.bench_scale [--tasks 4000] [--workers 1,2,4,8] [--task-ms 0,20] [--producers 4]

For each task length (0 ms: no-op; 20 ms: a thread held as a GPU task would hold it) and
worker count: a backlog of tasks is published (``--producers`` threads),
N ``celery worker -P threads -c 8`` processes start idle, then one broadcast makes them
all consume it at once; the drain rate is tasks over the time from the first execution
to the last (a Redis counter, so counting costs etcd nothing). Beside it, what was busy:
the machine's CPU, the three etcd processes' and the workers' CPU (from /proc), raft
proposals and WAL fsyncs per second with their mean duration (etcd's /metrics), so the
point where throughput flattens comes with its reason.
"""
from __future__ import annotations

import argparse
import importlib
import os
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from benchmarks.common import RedisServer, print_table, process_cpu, progress, start_worker, stop_worker
from etcd_broker.transport.consumer import close_all_leases
from scripts.etcd_server import EtcdServer, cluster_url, start_cluster

#: Threads per worker process; the prefetch multiplier comes from benchmarks/transport_app.py.
WORKER_THREADS = 8
#: Workers wait on this queue until the broadcast, so that all start draining together.
IDLE_QUEUE = "bench-idle"
#: A gain under this (e.g. 1.2 = +20%) from doubling the workers counts as "flattened".
FLAT_GAIN = 1.2


@dataclass
class Sample:
    """Counters read at one instant: machine CPU jiffies, per-process CPU seconds, etcd metrics."""

    at: float
    machine_busy: int
    machine_total: int
    etcd_cpu: float
    workers_cpu: float
    proposals: float
    fsyncs: float
    fsync_seconds: float


def machine_cpu() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def etcd_metrics(members: list[EtcdServer]) -> tuple[float, float, float]:
    """Committed proposals (leader's count), WAL fsyncs and fsync seconds (summed over members)."""
    proposals = fsyncs = fsync_seconds = 0.0
    for member in members:
        body = urllib.request.urlopen(f"{member.client_url}/metrics", timeout=5).read().decode()
        for line in body.splitlines():
            name, _, value = line.rpartition(" ")
            if name == "etcd_server_proposals_committed_total":
                proposals = max(proposals, float(value))
            elif name == "etcd_disk_wal_fsync_duration_seconds_count":
                fsyncs += float(value)
            elif name == "etcd_disk_wal_fsync_duration_seconds_sum":
                fsync_seconds += float(value)
    return proposals, fsyncs, fsync_seconds


def sample(members: list[EtcdServer], worker_pids: list[int]) -> Sample:
    busy, total = machine_cpu()
    return Sample(time.monotonic(), busy, total, sum(process_cpu(m.process.pid) for m in members),
                  sum(process_cpu(pid) for pid in worker_pids), *etcd_metrics(members))


def load_app(env: dict[str, str]):
    os.environ.update(env)
    from benchmarks import transport_app

    return importlib.reload(transport_app)


def publish(module, run: str, queue: str, count: int, threads: int, task_ms: float) -> float:
    """Send ``count`` tasks to ``queue`` from ``threads`` threads; return tasks per second."""
    def send(share: int) -> None:
        with module.app.producer_or_acquire() as producer:
            for _ in range(share):
                module.hold.apply_async((run, task_ms), producer=producer, queue=queue)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(send, [count // threads] * threads))
    return (count // threads * threads) / (time.perf_counter() - start)


def drain(module, counter, members, workers, run: str, queue: str, tasks: int) -> tuple[float, Sample, Sample]:
    """Tell every worker to consume ``queue``; return the drain rate and samples around it."""
    pids = [worker.pid for worker in workers]
    with ThreadPoolExecutor(1) as pool:
        watching = pool.submit(watch_counter, counter, run, tasks, members, pids)
        replies = module.app.control.add_consumer(queue, reply=True, timeout=10, limit=len(workers))
        if len(replies) < len(workers):
            raise SystemExit(f"only {len(replies)} of {len(workers)} workers answered add_consumer")
        return watching.result()


def watch_counter(counter, run: str, tasks: int, members, pids: list[int]) -> tuple[float, Sample, Sample]:
    """From the first execution to the last: the rate, and what the machine did meanwhile."""
    while not int(counter.get(run) or 0):
        time.sleep(0.001)
    first, before = time.perf_counter(), sample(members, pids)
    deadline = time.monotonic() + 600
    while int(counter.get(run) or 0) < tasks:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {counter.get(run)} of {tasks} tasks ran in 600 s")
        time.sleep(0.002)
    rate = tasks / (time.perf_counter() - first)
    return rate, before, sample(members, pids)


def measure(count: int, task_ms: float, url: str, counter_url: str, members, tasks: int, producers: int) -> list:
    env = {"BENCH_BROKER_URL": url, "BENCH_COUNTER_URL": counter_url,
           "BENCH_PREFIX": f"/bench-scale-{uuid.uuid4().hex[:6]}"}
    module = load_app(env)
    counter = redis.Redis.from_url(counter_url)
    run, queue = f"scale-{uuid.uuid4().hex}", f"bench-{uuid.uuid4().hex[:8]}"
    progress(f"{task_ms:g} ms tasks, {count} worker(s): publishing {tasks} tasks from {producers} threads")
    publish_rate = publish(module, run, queue, tasks, producers, task_ms)
    tasks = tasks // producers * producers
    progress(f"{count} worker(s): starting them (-P threads -c {WORKER_THREADS})")
    workers = [start_worker("benchmarks.transport_app", env, concurrency=WORKER_THREADS, queues=IDLE_QUEUE)
               for _ in range(count)]
    try:
        progress(f"{count} worker(s): draining")
        rate, before, after = drain(module, counter, members, workers, run, queue, tasks)
    finally:
        for worker in workers:
            stop_worker(worker)
        module.app.close()
    return row(count, task_ms, publish_rate, rate, before, after)


def row(count: int, task_ms: float, publish_rate: float, rate: float, before: Sample, after: Sample) -> list:
    wall = after.at - before.at
    fsyncs = after.fsyncs - before.fsyncs
    etcd_cpu = after.etcd_cpu - before.etcd_cpu
    return [f"{task_ms:g}", count, round(publish_rate), round(rate), round(rate / count),
            f"{100 * (after.machine_busy - before.machine_busy) / max(1, after.machine_total - before.machine_total):.0f}%",
            f"{100 * etcd_cpu / wall:.0f}%", f"{1000 * etcd_cpu / (rate * wall):.2f}",
            f"{100 * (after.workers_cpu - before.workers_cpu) / wall:.0f}%",
            f"{(after.proposals - before.proposals) / (rate * wall):.2f}", round(fsyncs / wall),
            f"{1000 * (after.fsync_seconds - before.fsync_seconds) / max(1.0, fsyncs):.2f}",
            f"{os.getloadavg()[0]:.1f}"]


def verdict(rows: list[list]) -> list[str]:
    """Per task length: where doubling the workers stopped paying, and what was saturated there."""
    notes = []
    for task_ms in dict.fromkeys(r[0] for r in rows):
        series = [r for r in rows if r[0] == task_ms]
        flat = next(((a, b) for a, b in zip(series, series[1:], strict=False) if b[3] < a[3] * FLAT_GAIN), None)
        if flat is None:
            notes.append(f"{task_ms} ms tasks: still growing at {series[-1][1]} workers ({series[-1][3]} tasks/s).")
            continue
        a, b = flat
        notes.append(f"{task_ms} ms tasks: flattens between {a[1]} and {b[1]} workers ({a[3]} -> {b[3]} tasks/s); "
                     f"there machine CPU {b[5]} of {os.cpu_count()} cores, etcd {b[6]} ({b[7]} CPU ms/task), "
                     f"workers {b[8]}, {b[10]} fsyncs/s at {b[11]} ms.")
    return notes


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker process counts")
    parser.add_argument("--task-ms", default="0,20", help="comma-separated task lengths (ms)")
    parser.add_argument("--producers", type=int, default=4, help="publishing threads")
    args = parser.parse_args(argv)
    redis_server = RedisServer()
    progress("starting a three-member etcd cluster on loopback")
    members = start_cluster(3)
    try:
        rows = [measure(count, task_ms, cluster_url(members), redis_server.url(15), members, args.tasks,
                        args.producers)
                for task_ms in (float(ms) for ms in args.task_ms.split(","))
                for count in (int(n) for n in args.workers.split(","))]
    finally:
        close_all_leases()  # our control replies' consumer lease, while the cluster still answers
        for member in members:
            member.cleanup()
        redis_server.stop()
    headers = ["task ms", "workers", "publish/s", "drain tasks/s", "per worker", "machine CPU", "etcd CPU (3)",
               "etcd CPU ms/task", "workers CPU", "proposals/task", "fsyncs/s (3)", "fsync ms", "load 1m"]
    table = print_table(f"Celery tasks on a 3-member etcd cluster, {args.tasks} tasks per row, "
                        f"-P threads -c {WORKER_THREADS} per worker, {os.cpu_count()} cores", headers, rows)
    notes = "\n".join(verdict(rows))
    print(f"\n{notes}", flush=True)
    return f"{table}\n\n{notes}"


if __name__ == "__main__":
    main()
