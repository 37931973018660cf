"""ETA tasks (countdown) on etcd, Redis and RabbitMQ side by side in one run (issue 20; docs/benchmarks.md).

For each broker and pool: an idle ``celery worker -c 8`` (``acks_late``, prefetch multiplier 1,
JSON); ``--tasks`` tasks due ``DUE_MIN`` s after the publish starts and spread over
``tasks / DUE_RATE`` s, published by 8 threads; ``WARM_AFTER`` s after the publish ends the worker
gets SIGTERM (a warm shutdown, timed) and a new worker starts. Every run appends a line to a log
(benchmarks/delayed_app.py), so nothing is counted through the broker under test. Columns:

* publish rate (tasks/s, 8 threads);
* worker RSS growth: the worker's process group (VmRSS summed) just before the SIGTERM, less
  before the publish: what holding the waiting tasks costs;
* warm shutdown: seconds from SIGTERM to exit;
* lateness p50/p99: run time less due time, over every run (the restart included);
* lost / duplicated: tasks that never ran / extra runs.

etcd delays natively (delayed.py: the tasks wait in etcd); Redis holds them in the worker
(``visibility_timeout`` 1 h); RabbitMQ with quorum queues uses kombu's native delayed delivery.
Run: ``python -m benchmarks bench_delayed [--tasks 20000] [--pools threads,prefork]
[--brokers etcd,redis,rabbitmq]`` (needs redis-server; rabbitmq-server if named).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime

from benchmarks.common import RabbitMQServer, RedisServer, percentile, print_table, progress
from benchmarks.delayed_app import make_app
from scripts.etcd_server import EtcdServer
from tests.helpers import WorkerProcess

APP = "benchmarks.delayed_app"
#: Seconds from the start of the publish to the first due time (the publish, the wait and the restart fit before).
DUE_MIN = 60.0
#: Due times are spread at this many tasks per second: below what a worker runs, so lateness is delivery's.
DUE_RATE = 400.0
#: Seconds after the publish ends before the worker is told to stop (it has received what it will).
WARM_AFTER = 15.0
#: Publishing threads.
PUBLISHERS = 8
#: Worker pool size.
CONCURRENCY = 8
#: A warm shutdown taking longer is cut short with SIGKILL (and reported as such).
EXIT_WAIT = 120.0
#: After the last due time, how long the runs get to arrive (no progress this long ends the wait).
STALL_SECONDS = 30.0


def group_rss_mb(pid: int) -> float:
    """Resident memory of every process in ``pid``'s session (a worker and its pool), MB."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                session = int(stat.read().rsplit(")", 1)[1].split()[3])
            if session != pid:
                continue
            with open(f"/proc/{entry}/status") as status:
                total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def publish(url: str, prefix: str, tasks: int, start: float, quorum: bool, due_min: float) -> float:
    """Send every task with its ``eta`` from PUBLISHERS threads; returns the seconds it took."""
    app = make_app(url, prefix, quorum)
    spread = tasks / DUE_RATE

    def send(part: int) -> None:
        with app.producer_or_acquire() as producer:
            for index in range(part, tasks, PUBLISHERS):
                due = start + due_min + spread * index / tasks
                app.send_task("delayed.run", args=(index, due), eta=datetime.fromtimestamp(due, UTC),
                              producer=producer)

    threads = [threading.Thread(target=send, args=(part,)) for part in range(PUBLISHERS)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.monotonic() - began
    app.close()
    return took


def warm_stop(worker: WorkerProcess) -> float:
    """SIGTERM; seconds until the worker exited (SIGKILL after EXIT_WAIT)."""
    began = time.monotonic()
    os.killpg(worker.process.pid, signal.SIGTERM)
    try:
        worker.process.wait(EXIT_WAIT)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: report the cut
        worker.kill()
    return time.monotonic() - began


def read_runs(log: str) -> list[tuple[int, float, float]]:
    """Complete lines only (a run may be writing the last one as we read)."""
    try:
        with open(log) as lines:
            fields = [line.split() for line in lines if line.endswith("\n")]
    except FileNotFoundError:
        return []
    return [(int(f[0]), float(f[1]), float(f[2])) for f in fields if len(f) == 4]


def wait_runs(log: str, tasks: int, last_due: float) -> list[tuple[int, float, float]]:
    seen, changed = -1, time.monotonic()
    while True:
        runs = read_runs(log)
        if len({run[0] for run in runs}) >= tasks:
            time.sleep(2)  # duplicates arrive late, if at all
            return read_runs(log)
        if len(runs) != seen:
            seen, changed = len(runs), time.monotonic()
        if time.time() > last_due and time.monotonic() - changed > STALL_SECONDS:
            return runs
        time.sleep(0.5)


def one(name: str, url: str, pool: str, tasks: int, log_dir: str, due_min: float, quorum: bool = False) -> list:
    prefix = f"/bench-delayed-{uuid.uuid4().hex[:8]}"
    log = os.path.join(log_dir, f"runs-{uuid.uuid4().hex[:8]}.log")
    env = {"BENCH_DELAYED_URL": url, "BENCH_DELAYED_PREFIX": prefix, "BENCH_DELAYED_LOG": log,
           "BENCH_DELAYED_QUORUM": "1" if quorum else "0"}
    worker = WorkerProcess(app=APP, env=env, pool=pool, concurrency=CONCURRENCY, log_dir=log_dir).start()
    time.sleep(2)
    before = group_rss_mb(worker.process.pid)
    start = time.time()
    took = publish(url, prefix, tasks, start, quorum, due_min)
    progress(f"{name} {pool}: published {tasks} in {took:.1f} s")
    time.sleep(WARM_AFTER)
    grown = group_rss_mb(worker.process.pid) - before
    stopped = warm_stop(worker)
    progress(f"{name} {pool}: RSS +{grown:.0f} MB, warm shutdown {stopped:.1f} s")
    second = WorkerProcess(app=APP, env=env, pool=pool, concurrency=CONCURRENCY, log_dir=log_dir).start()
    try:
        runs = wait_runs(log, tasks, start + due_min + tasks / DUE_RATE)
    finally:
        second.kill()
    late = [ran - due for _, due, ran in runs]
    distinct = len({run[0] for run in runs})
    row = [name, pool, tasks, f"{tasks / took:.0f}", f"{grown:.0f}", f"{stopped:.1f}",
           f"{percentile(late, 50):.3f}", f"{percentile(late, 99):.3f}", tasks - distinct, len(runs) - distinct]
    progress(" | ".join(map(str, row)))  # each row as it comes: a long run that fails later keeps it
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_delayed")
    parser.add_argument("--tasks", type=int, nargs="+", default=[20_000])
    parser.add_argument("--pools", default="threads,prefork")
    parser.add_argument("--brokers", default="etcd,redis,rabbitmq")
    parser.add_argument("--due-min", type=float, default=DUE_MIN, help="seconds from publish start to first due")
    args = parser.parse_args(argv)
    brokers, pools = args.brokers.split(","), args.pools.split(",")
    log_dir = tempfile.mkdtemp(prefix="bench-delayed-")
    rows = []
    etcd, redis, rabbit = EtcdServer(data_dir=os.path.join(log_dir, "etcd")), None, None
    etcd.start()
    try:
        if "redis" in brokers:
            redis = RedisServer()
        if "rabbitmq" in brokers:
            rabbit = RabbitMQServer()
        for tasks in args.tasks:
            for pool in pools:
                if "etcd" in brokers:
                    rows.append(one("etcd (native delay)", etcd.url, pool, tasks, log_dir, args.due_min))
                if redis is not None:
                    rows.append(one("Redis", redis.url(), pool, tasks, log_dir, args.due_min))
                if rabbit is not None:
                    rows.append(one("RabbitMQ quorum (native delay)", rabbit.url(), pool, tasks, log_dir,
                                    args.due_min, quorum=True))
    finally:
        etcd.stop()
        for server in (redis, rabbit):
            if server is not None:
                server.stop()
    print_table(f"ETA tasks: due {args.due_min:.0f} s after the publish starts, {DUE_RATE:.0f}/s; warm restart "
                f"{WARM_AFTER:.0f} s after the publish; load {os.getloadavg()[0]:.1f}",
                ["broker", "pool", "tasks", "publish/s (8 threads)", "worker RSS growth MB", "warm shutdown s",
                 "lateness p50 s", "lateness p99 s", "lost", "dup"], rows)


if __name__ == "__main__":
    main(sys.argv[1:])
