"""ETA and long tasks on etcd, Redis and RabbitMQ side by side in one run (issue 20; docs/benchmarks.md).

Every run of a task appends a line to a log as it starts (benchmarks/delayed_app.py), so nothing
is counted through the broker under test. Per broker and pool, an idle ``celery worker -c 8``
(``acks_late``, prefetch multiplier 1, JSON) and, by ``--modes``:

* ``restart``: ``--tasks`` tasks due ``--due-min`` s after the publish starts, spread at
  ``RESTART_RATE`` per second (more than this machine's workers run: lateness there is the run
  rate's), published by 8 threads; ``WARM_AFTER`` s after the publish the worker gets SIGTERM
  (timed) and a new one starts. Publish rate, worker RSS growth (its process group, before the
  SIGTERM less before the publish: what holding the waiting tasks costs), warm shutdown seconds.
* ``lateness``: ``--lateness-tasks`` tasks due from ``LATENESS_DUE_MIN`` s on at ``LATENESS_RATE``
  per second (far below what a worker runs; the tasks take no time), then ``SPARSE_TASKS`` due
  one every 2 s (the worker idles in between), no restart: how late delivery itself starts a
  task when the workers are free.
* ``kill``: ``--kill-tasks`` tasks due from ``KILL_DUE_MIN`` s on at ``KILL_RATE`` per second;
  ``KILL_AFTER`` s after the publish the worker's process group gets SIGKILL while every task
  waits, and a new worker starts: what a crash of the worker holding them loses or repeats.
* ``long``: ``LONG_TASKS`` tasks of ``LONG_SECONDS`` s on a worker, a second worker idle beside,
  etcd with ``lease_ttl`` ``LONG_LEASE_TTL`` s, Redis with ``visibility_timeout``
  ``LONG_VISIBILITY`` s, RabbitMQ with its defaults: how many times each task starts.

Lateness is start time less due time, over every run; lost / dup: tasks that never started within
the wait / extra starts. etcd delays natively (delayed.py: the tasks wait in etcd); Redis holds
them in the worker (``visibility_timeout`` 1 h); RabbitMQ with quorum queues uses kombu's native
delayed delivery. Run: ``python -m benchmarks bench_delayed [--quick] [--modes restart,lateness,kill,long]
[--tasks 20000] [--pools threads,prefork] [--brokers etcd,redis,rabbitmq]`` (needs redis-server;
rabbitmq-server if named).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from benchmarks.common import RabbitMQServer, RedisServer, percentile, print_table, progress
from benchmarks.delayed_app import make_app
from scripts.etcd_server import EtcdServer
from tests.helpers import WorkerProcess

APP = "benchmarks.delayed_app"
#: Seconds from the start of the publish to the first due time in the restart mode (the publish,
#: the wait and the restart fit before).
DUE_MIN = 60.0
#: Due times of the restart mode are spread at this many tasks per second.
RESTART_RATE = 400.0
#: Seconds after the publish ends before the worker is stopped (it has received what it will).
WARM_AFTER = 15.0
#: Lateness mode: first due time (s after the publish starts) and due tasks per second (a worker runs
#: hundreds of empty tasks a second here: at this rate it is free whenever one falls due).
LATENESS_DUE_MIN, LATENESS_RATE = 10.0, 20.0
#: Lateness mode's sparse run: this many tasks, one due every 2 s (the consumer idles, parked, in between).
SPARSE_TASKS, SPARSE_RATE = 20, 0.5
#: Kill mode: first due time, due rate, and seconds after the publish before the SIGKILL.
KILL_DUE_MIN, KILL_RATE, KILL_AFTER = 30.0, 50.0, 5.0
#: Long mode: tasks, their run time, etcd's lease_ttl, Redis's visibility_timeout (seconds).
LONG_TASKS, LONG_SECONDS, LONG_LEASE_TTL, LONG_VISIBILITY = 4, 40.0, 3, 10
#: Publishing threads.
PUBLISHERS = 8
#: Worker pool size.
CONCURRENCY = 8
#: A warm shutdown taking longer is cut short with SIGKILL (and reported as such).
EXIT_WAIT = 120.0
#: After the last due time, how long the runs get to arrive (no progress this long ends the wait).
STALL_SECONDS = 30.0


@dataclass(frozen=True)
class Broker:
    name: str
    url: str
    quorum: bool = False


@dataclass(frozen=True)
class Plan:
    """One ETA run: how many tasks, when due, and what happens to the worker meanwhile."""

    tasks: int
    due_min: float
    rate: float
    stop: str | None  # "term", "kill" or None
    stop_after: float = 0.0

    @property
    def last_due_offset(self) -> float:
        return self.due_min + self.tasks / self.rate


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


def publish(broker: Broker, prefix: str, plan: Plan, start: float) -> float:
    """Send every task with its ``eta`` from PUBLISHERS threads; returns the seconds it took."""
    app = make_app(broker.url, prefix, broker.quorum, {})
    spread = plan.tasks / plan.rate

    def send(part: int) -> None:
        with app.producer_or_acquire() as producer:
            for index in range(part, plan.tasks, PUBLISHERS):
                due = start + plan.due_min + spread * index / plan.tasks
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


def stop_worker(worker: WorkerProcess, how: str) -> float:
    """SIGTERM (``term``) or SIGKILL (``kill``) the worker's group; seconds until it exited (a warm
    shutdown longer than EXIT_WAIT is cut short with SIGKILL)."""
    began = time.monotonic()
    os.killpg(worker.process.pid, signal.SIGTERM if how == "term" else signal.SIGKILL)
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


def worker_env(broker: Broker, prefix: str, log: str, options: dict | None = None) -> dict[str, str]:
    return {"BENCH_DELAYED_URL": broker.url, "BENCH_DELAYED_PREFIX": prefix, "BENCH_DELAYED_LOG": log,
            "BENCH_DELAYED_QUORUM": "1" if broker.quorum else "0",
            "BENCH_DELAYED_OPTIONS": json.dumps(options or {})}


def reset(broker: Broker) -> None:
    """Empty a Redis database before a run: its unacked hash is not per queue, so tasks a SIGKILLed
    worker left there come back (after ``visibility_timeout``) to a later run's worker. etcd runs
    get a fresh prefix; RabbitMQ's queue is drained by the run that fills it (0 lost)."""
    if broker.url.startswith("redis"):
        import redis

        with redis.Redis.from_url(broker.url) as client:
            client.flushdb()


def eta_run(broker: Broker, pool: str, plan: Plan, log_dir: str) -> list:
    """One ETA run by ``plan``: its table row."""
    reset(broker)
    prefix = f"/bench-delayed-{uuid.uuid4().hex[:8]}"
    log = os.path.join(log_dir, f"runs-{uuid.uuid4().hex[:8]}.log")
    env = worker_env(broker, prefix, log)
    worker = WorkerProcess(app=APP, env=env, pool=pool, concurrency=CONCURRENCY, log_dir=log_dir).start()
    time.sleep(2)
    before = group_rss_mb(worker.process.pid)
    start = time.time()
    took = publish(broker, prefix, plan, start)
    progress(f"{broker.name} {pool}: published {plan.tasks} in {took:.1f} s")
    grown = stopped = 0.0
    if plan.stop is not None:
        time.sleep(plan.stop_after)
        grown = group_rss_mb(worker.process.pid) - before
        stopped = stop_worker(worker, plan.stop)
        if time.time() > start + plan.due_min:
            progress(f"{broker.name} {pool}: WARNING the worker stopped after the first due time")
        progress(f"{broker.name} {pool}: RSS +{grown:.0f} MB, SIG{plan.stop.upper()} exit {stopped:.1f} s")
        worker = WorkerProcess(app=APP, env=env, pool=pool, concurrency=CONCURRENCY, log_dir=log_dir).start()
    try:
        runs = wait_runs(log, plan.tasks, start + plan.last_due_offset)
    finally:
        worker.kill()
    late = [ran - due for _, due, ran in runs]
    distinct = len({run[0] for run in runs})
    held = ("-", "-") if plan.stop is None else (f"{grown:.0f}", f"{stopped:.1f}")
    row = [broker.name, pool, plan.tasks, f"{plan.rate:g}", f"{plan.tasks / took:.0f}", *held,
           f"{percentile(late, 50):.3f}", f"{percentile(late, 99):.3f}", f"{max(late, default=float('nan')):.3f}",
           plan.tasks - distinct, len(runs) - distinct]
    progress(" | ".join(map(str, row)))  # each row as it comes: a long run that fails later keeps it
    return row


def long_options(broker: Broker) -> list[tuple[dict, str]]:
    """The options that decide when a broker gives an unacked task to another worker, and how they read.

    kombu's Redis worker looks for unacked messages past ``visibility_timeout`` every
    ``unacked_restore_interval`` (10 s) times ``unacked_restore_throttle`` (10) calls: a task
    shorter than that may end before any look; throttle 1 (its knob for a low visibility
    timeout) looks every 10 s."""
    if broker.url.startswith("etcd"):
        return [({"lease_ttl": LONG_LEASE_TTL}, f"lease_ttl={LONG_LEASE_TTL}")]
    if broker.url.startswith("redis"):
        return [({"visibility_timeout": LONG_VISIBILITY}, f"visibility_timeout={LONG_VISIBILITY}"),
                ({"visibility_timeout": LONG_VISIBILITY, "unacked_restore_throttle": 1},
                 f"visibility_timeout={LONG_VISIBILITY}, unacked_restore_throttle=1")]
    return [({}, "consumer_timeout default (30 min)")]


def long_run(broker: Broker, pool: str, log_dir: str, seconds: float, options: dict, option: str) -> list:
    """LONG_TASKS tasks of ``seconds`` on one worker, a second idle beside: starts per task."""
    reset(broker)
    prefix = f"/bench-long-{uuid.uuid4().hex[:8]}"
    log = os.path.join(log_dir, f"long-{uuid.uuid4().hex[:8]}.log")
    env = worker_env(broker, prefix, log, options)
    first = WorkerProcess(app=APP, env=env, pool=pool, concurrency=LONG_TASKS, log_dir=log_dir).start()
    app = make_app(broker.url, prefix, broker.quorum, options)
    for index in range(LONG_TASKS):
        app.send_task("delayed.run", args=(index, time.time(), seconds))
    app.close()
    workers = [first]
    try:
        began = time.monotonic()
        while len({run[0] for run in read_runs(log)}) < LONG_TASKS:
            if time.monotonic() - began > STALL_SECONDS * 4:
                raise RuntimeError(f"{broker.name} {pool}: the long tasks did not all start")
            time.sleep(0.2)
        workers.append(WorkerProcess(app=APP, env=env, pool=pool, concurrency=LONG_TASKS, log_dir=log_dir).start())
        while time.time() < max(run[2] for run in read_runs(log)) + seconds + 5:
            time.sleep(0.5)  # every start so far has ended (and any re-run it caused has started)
    finally:
        for worker in workers:
            worker.kill()
    starts = Counter(run[0] for run in read_runs(log))
    row = [broker.name, pool, LONG_TASKS, f"{seconds:.0f}", option,
           " ".join(str(starts[index]) for index in range(LONG_TASKS)), sum(starts.values()) - LONG_TASKS]
    progress(" | ".join(map(str, row)))
    return row


ETA_HEADERS = ["broker", "pool", "tasks", "due/s", "publish/s (8 threads)", "worker RSS growth MB", "worker exit s",
               "lateness p50 s", "lateness p99 s", "lateness max s", "lost", "dup"]
LONG_HEADERS = ["broker", "pool", "tasks", "task s", "redelivery option", "starts per task", "re-runs"]


def plans(args: argparse.Namespace) -> dict[str, list[Plan]]:
    return {
        "lateness": [Plan(args.lateness_tasks, LATENESS_DUE_MIN, LATENESS_RATE, None),
                     Plan(args.sparse_tasks, LATENESS_DUE_MIN, SPARSE_RATE, None)],
        "kill": [Plan(args.kill_tasks, KILL_DUE_MIN, KILL_RATE, "kill", KILL_AFTER)],
        "restart": [Plan(tasks, args.due_min, RESTART_RATE, "term", WARM_AFTER) for tasks in args.tasks],
    }


def titles(args: argparse.Namespace) -> dict[str, str]:
    return {
        "lateness": f"ETA tasks, workers free: due from {LATENESS_DUE_MIN:.0f} s after the publish, "
                    "no restart",
        "kill": f"ETA tasks across a SIGKILL: due from {KILL_DUE_MIN:.0f} s at {KILL_RATE:.0f}/s; the worker's "
                f"group SIGKILLed {KILL_AFTER:.0f} s after the publish, a new worker started",
        "restart": f"ETA tasks across a warm restart: due from {args.due_min:.0f} s at {RESTART_RATE:.0f}/s; "
                   f"SIGTERM {WARM_AFTER:.0f} s after the publish, a new worker started",
        "long": f"Long tasks: {LONG_TASKS} on a worker, a second worker idle beside",
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_delayed")
    parser.add_argument("--quick", action="store_true", help="small sizes, threads only (make bench)")
    parser.add_argument("--modes", default="lateness,kill,restart,long")
    parser.add_argument("--tasks", type=int, nargs="+", default=[20_000], help="restart mode's task counts")
    parser.add_argument("--lateness-tasks", type=int, default=600)
    parser.add_argument("--sparse-tasks", type=int, default=SPARSE_TASKS)
    parser.add_argument("--kill-tasks", type=int, default=1000)
    parser.add_argument("--long-seconds", type=float, default=LONG_SECONDS)
    parser.add_argument("--pools", default="threads,prefork")
    parser.add_argument("--brokers", default="etcd,redis,rabbitmq")
    parser.add_argument("--due-min", type=float, default=DUE_MIN, help="restart mode: seconds to the first due")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.lateness_tasks, args.sparse_tasks, args.kill_tasks = [2000], 200, 6, 300
        args.pools, args.due_min, args.long_seconds = "threads", 30.0, 20.0
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    modes, pools, names = args.modes.split(","), args.pools.split(","), args.brokers.split(",")
    log_dir = tempfile.mkdtemp(prefix="bench-delayed-")
    etcd, servers = EtcdServer(data_dir=os.path.join(log_dir, "etcd")), []
    etcd.start()
    rows: dict[str, list] = {mode: [] for mode in modes}
    try:
        brokers = [Broker("etcd (native delay)", etcd.url)] if "etcd" in names else []
        if "redis" in names:
            servers.append(RedisServer())
            brokers.append(Broker("Redis", servers[-1].url()))
        if "rabbitmq" in names:
            servers.append(RabbitMQServer())
            brokers.append(Broker("RabbitMQ quorum (native delay)", servers[-1].url(), quorum=True))
        for mode in modes:
            for pool in pools:
                for broker in brokers:
                    if mode == "long":
                        rows[mode] += [long_run(broker, pool, log_dir, args.long_seconds, *variant)
                                       for variant in long_options(broker)]
                        continue
                    for plan in plans(args)[mode]:
                        rows[mode].append(eta_run(broker, pool, plan, log_dir))
    finally:
        etcd.stop()
        for server in servers:
            server.stop()
    for mode in modes:
        print_table(f"{titles(args)[mode]}; load {os.getloadavg()[0]:.1f}",
                    LONG_HEADERS if mode == "long" else ETA_HEADERS, rows[mode])


if __name__ == "__main__":
    main(sys.argv[1:])
