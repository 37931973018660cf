"""How a message's cost grows with the work: consumers, backlog, history, queues, workers (issue 19).

    python -m benchmarks.bench_growth [--quick] [--parts consumers,backlog,long,idle,celery]
        [--brokers etcd,redis,redis-aof,rabbitmq] [--consumers 1,4,16,64] [--messages 3000] [--rate 150]
        [--backlogs 0,10000,50000,200000] [--long 1000000 --chunk 100000 [--long-rivals N]]
        [--idle 1,100,1000,10000] [--idle-seconds 30] [--idle-settle 5]
        [--workers 1,4,8] [--tasks 4000] [--etcd-retention 5m]

Every broker runs the same plain-kombu clients (benchmarks/growth_clients.py) in the same run:
our etcd transport on one etcd from scripts/etcd_server.py with its defaults, Redis (defaults,
and appendfsync always) and RabbitMQ (the throw-away node of benchmarks/common.py). Parts:

* consumers: N consumers (<= 16 threads per process, own Connection each, prefetch 4, acking)
  on one queue, ``--messages`` published at ``--rate``/s; per message: broker requests (etcd:
  unary gRPC calls handled, from /metrics; Redis: commands), etcd raft proposals, failed etcd
  transactions (counted in the consumer processes), broker CPU; end-to-end p50/p99;
* backlog: one consumer starts on B waiting messages (B = 0: it is consuming while a burst of
  ``--burst`` is published as fast as one producer can); drain rate and its broker cost;
* long: ``--long`` messages through one queue, one consumer, at most WINDOW in flight
  (``--long-rivals``: fewer for Redis and RabbitMQ, where time is short); per ``--chunk``: rate,
  broker CPU and requests per message, stored size at the chunk's end (etcd: its DB file and the
  part of it in use; Redis: used_memory; RabbitMQ: its data directory);
* idle: one consumer on Q empty queues; broker requests/s and CPU, the consumer's CPU;
* celery: W ``celery worker -P threads -c 8`` processes drain ``--tasks`` no-op tasks from one
  queue (bench_scale's shape, on one server per broker).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Callable

from benchmarks.bench_transport import wait_count
from benchmarks.common import RedisServer, percentile, print_table, progress, start_worker, stop_worker
from benchmarks.growth_brokers import BROKER_NAMES, Broker, Reading, etcd_metrics, start_brokers, stop_brokers
from benchmarks.growth_clients import ConsumerGroup, Publisher

#: Messages in flight at most in the long run (published, not yet consumed).
WINDOW = 200
#: Seconds an idle consumer settles (declares, first reads) before its idle cost is measured (``--idle-settle``:
#: past 100 s, the etcd consumer's start-up passes are over: its first full sweep, the reconciliation
#: passes that read the queues its first gets touched; the window then shows the steady state).
IDLE_SETTLE_SECONDS = 5.0
#: The sizes of ``--quick`` (the idle window stays over 30 s: the transport's safety re-check and
#: sweep run every 30 s, and a shorter window may miss them) (a check that finishes in a few minutes).
QUICK = {"consumers": "1,4,16", "messages": 600, "backlogs": "0,2000,10000", "burst": 2000, "long": 30000,
         "chunk": 10000, "idle": "1,100,1000", "idle_seconds": 31.0, "workers": "1,4", "tasks": 1000}
PARTS = ("consumers", "backlog", "long", "idle", "celery")
#: Seconds between progress lines inside one long step (a 200k backlog, a 1,000,000-message run).
HEARTBEAT_SECONDS = 30.0
#: Seconds without a message consumed after which the long run gives up (a consumer that died).
STALL_SECONDS = 300.0


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def per(value: float | None, count: float, scale: float = 1.0) -> str:
    return "-" if value is None or not count else f"{scale * value / count:.2f}"


def delta(after: Reading, before: Reading, name: str) -> float | None:
    a, b = getattr(after, name), getattr(before, name)
    return None if a is None or b is None else a - b


def mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.1f}"


def new_queue(part: str) -> str:
    return f"growth-{part}-{uuid.uuid4().hex[:8]}"


def heartbeat(label: str, status: Callable[[], str]) -> Callable[[], None]:
    """A tick that prints ``label: status()`` and the load at most every HEARTBEAT_SECONDS."""
    due = [time.monotonic() + HEARTBEAT_SECONDS]

    def tick() -> None:
        now = time.monotonic()
        if now >= due[0]:
            due[0] = now + HEARTBEAT_SECONDS
            progress(f"{label}: {status()} (load {load()})")

    return tick


# -- consumers on one queue --------------------------------------------------------------
def consumers_part(brokers: list[Broker], counts: list[int], messages: int, rate: float) -> str:
    rows = []
    for count in counts:
        for broker in brokers:
            progress(f"consumers: {broker.name}, {count} consumer(s), {messages} msgs at {rate:g}/s")
            rows.append([count, broker.name, *consumers_row(broker, count, messages, rate), load()])
    return print_table(f"{', '.join(str(c) for c in counts)} consumers on one queue, {messages} msgs at {rate:g}/s, "
                       "prefetch 4, per message", ["consumers", "broker", "requests", "proposals", "failed txns",
                                                  "broker CPU ms", "p50 ms", "p99 ms", "delivered", "load"], rows)


def consumers_row(broker: Broker, count: int, messages: int, rate: float) -> list:
    queue = new_queue("c")
    group = ConsumerGroup(broker.url(), [queue], count).start()
    publisher = Publisher(broker.url(), queue)
    try:
        before = broker.read()
        publisher.at_rate(messages, rate)
        group.wait_consumed(messages, timeout=120 + 4 * messages / rate)
        after = broker.read()
    finally:
        latencies, failed = group.finish()
        publisher.close()
    ms = [1000 * value for value in latencies]
    return [per(delta(after, before, "requests"), messages), per(delta(after, before, "proposals"), messages),
            per(failed, messages) if broker.name == "etcd" else "-", per(after.cpu - before.cpu, messages, 1000),
            f"{percentile(ms, 50):.1f}", f"{percentile(ms, 99):.1f}", len(latencies)]


# -- one consumer on a backlog -----------------------------------------------------------
def backlog_part(brokers: list[Broker], sizes: list[int], burst: int) -> str:
    rows = []
    for size in sizes:
        for broker in brokers:
            progress(f"backlog: {broker.name}, {size or burst} msgs{' waiting' if size else ' in a burst'}")
            rows.append([size, broker.name, *backlog_row(broker, size, burst), load()])
    return print_table(f"One consumer drains a backlog (0: a burst of {burst} published while it consumes)",
                       ["waiting", "broker", "publish/s", "drain msg/s", "broker CPU ms/msg", "requests/msg",
                        "stored MB after", "load"], rows)


def backlog_row(broker: Broker, size: int, burst: int) -> list:
    queue = new_queue("b")
    publisher = Publisher(broker.url(), queue)
    count = size or burst
    group = None
    try:
        if not size:
            group = ConsumerGroup(broker.url(), [queue], 1).start()
        started = time.perf_counter()
        before = broker.read()
        published = [0]
        tick = heartbeat(f"backlog: {broker.name}", lambda: f"{published[0]} published, "
                         f"{group.consumed.value if group else 0} consumed")
        for _ in range(count):
            publisher.publish()
            published[0] += 1
            tick()
        publish_rate = count / (time.perf_counter() - started)
        if size:
            group = ConsumerGroup(broker.url(), [queue], 1).start()
            group.wait_consumed(1, timeout=120)
            started, before = time.perf_counter(), broker.read()
            count -= 1
            base = 1
        else:
            base = 0
        group.wait_consumed(base + count, timeout=1800, tick=tick)
        elapsed, after = time.perf_counter() - started, broker.read()
    finally:
        if group is not None:
            group.finish()
        publisher.close()
    return [round(publish_rate), round(count / elapsed), per(after.cpu - before.cpu, count, 1000),
            per(delta(after, before, "requests"), count), mb(after.stored_bytes)]


# -- a long run --------------------------------------------------------------------------
def long_part(brokers: list[Broker], total: int, chunk: int, rivals: int | None = None) -> str:
    """``total`` messages through etcd (``rivals``, default ``total``, through the others)."""
    rows, notes = [], []
    for broker in brokers:
        count = total if broker.name == "etcd" or rivals is None else rivals
        progress(f"long: {broker.name}, {count} msgs, one consumer, readings every {chunk}")
        chunks = long_rows(broker, count, chunk)
        rows += [[broker.name, *row] for row in chunks]
        first, last = float(chunks[0][2]), float(chunks[-1][2])
        notes.append(f"{broker.name}: CPU per msg last / first chunk {last / first:.2f}x" if first else "")
    sizes = f"{total} msgs" + (f" (Redis and RabbitMQ: {rivals})" if rivals is not None and rivals != total else "")
    table = print_table(f"{sizes} through one queue, one consumer (prefetch 4), <= {WINDOW} in flight, "
                        f"per {chunk}", ["broker", "msgs", "msg/s", "broker CPU ms/msg", "requests/msg",
                                         "proposals/msg", "stored MB at end", "in use MB", "load"], rows)
    print("\n".join(notes), flush=True)
    return table + "\n\n" + "\n".join(notes)


def long_rows(broker: Broker, total: int, chunk: int) -> list[list]:
    queue = new_queue("l")
    group = ConsumerGroup(broker.url(), [queue], 1).start()
    publisher = Publisher(broker.url(), queue)
    tick = heartbeat(f"long: {broker.name}", lambda: f"{group.consumed.value} of {total} consumed")
    rows = []
    try:
        mark, base, before, started = chunk, 0, broker.read(), time.perf_counter()
        for index in range(total):
            if index - group.consumed.value >= WINDOW:
                group.wait_consumed(index - WINDOW + 1, timeout=STALL_SECONDS, tick=tick)
            publisher.publish()
            tick()
            if group.consumed.value >= mark or index == total - 1:
                if index == total - 1:
                    group.wait_consumed(total, timeout=300, tick=tick)
                consumed, now, reading = group.consumed.value, time.perf_counter(), broker.read()
                done = consumed - base
                rows.append([f"{mark - chunk}-{min(mark, total)}", round(done / (now - started)),
                             per(reading.cpu - before.cpu, done, 1000), per(delta(reading, before, "requests"), done),
                             per(delta(reading, before, "proposals"), done), mb(reading.stored_bytes),
                             mb(reading.in_use_bytes), load()])
                progress(f"long: {broker.name} {rows[-1]}")
                mark, base, before, started = mark + chunk, consumed, reading, now
    finally:
        group.finish()
        publisher.close()
    return rows


# -- idle queues -------------------------------------------------------------------------
def idle_part(brokers: list[Broker], counts: list[int], seconds: float, settle: float = IDLE_SETTLE_SECONDS) -> str:
    rows = []
    for count in counts:
        for broker in brokers:
            progress(f"idle: {broker.name}, one consumer on {count} empty queue(s), {seconds:g} s after {settle:g} s")
            rows.append([count, broker.name, *idle_row(broker, count, seconds, settle), load()])
    return print_table(f"One consumer on Q empty queues, {seconds:g} s measured from {settle:g} s after it is ready",
                       ["queues", "broker", "requests/s", "broker CPU %", "consumer CPU %", "load"], rows)


def idle_row(broker: Broker, count: int, seconds: float, settle: float) -> list:
    tag = uuid.uuid4().hex[:6]
    group = ConsumerGroup(broker.url(), [f"growth-i-{tag}-{n}" for n in range(count)], 1).start(timeout=1800)
    try:
        time.sleep(settle)
        before, consumer_before = broker.read(), group.cpu()
        time.sleep(seconds)
        after, consumer_after = broker.read(), group.cpu()
    finally:
        group.finish()
    return [per(delta(after, before, "requests"), seconds), per(after.cpu - before.cpu, seconds, 100),
            per(consumer_after - consumer_before, seconds, 100)]


# -- Celery workers ----------------------------------------------------------------------
def celery_part(brokers: list[Broker], workers: list[int], tasks: int) -> str:
    from benchmarks import bench_scale

    counter = RedisServer()
    rows = []
    try:
        for count in workers:
            for broker in brokers:
                progress(f"celery: {broker.name}, {count} worker process(es), {tasks} no-op tasks")
                rows.append([count, broker.name, *celery_row(bench_scale, broker, counter.url(15), count, tasks),
                             load()])
    finally:
        counter.stop()
    return print_table(f"Celery: W workers (-P threads -c {bench_scale.WORKER_THREADS}, prefetch x4) drain "
                       f"{tasks} no-op tasks from one queue", ["workers", "broker", "drain tasks/s",
                                                                "broker CPU ms/task", "requests/task", "load"], rows)


def celery_row(bench_scale, broker: Broker, counter_url: str, count: int, tasks: int) -> list:
    import redis

    env = {"BENCH_BROKER_URL": broker.url(), "BENCH_COUNTER_URL": counter_url,
           "BENCH_PREFIX": f"/growth-{uuid.uuid4().hex[:6]}"}
    module = bench_scale.load_app(env)
    counter = redis.Redis.from_url(counter_url)
    run, queue = f"growth-{uuid.uuid4().hex}", new_queue("w")
    bench_scale.publish(module, run, queue, tasks, 1, 0)
    processes = [start_worker("benchmarks.transport_app", env, concurrency=bench_scale.WORKER_THREADS,
                              queues=bench_scale.IDLE_QUEUE) for _ in range(count)]
    try:
        replies = module.app.control.add_consumer(queue, reply=True, timeout=10, limit=count)
        if len(replies) < count:
            raise SystemExit(f"only {len(replies)} of {count} workers answered add_consumer")
        while not int(counter.get(run) or 0):
            time.sleep(0.001)
        started, before = time.perf_counter(), broker.read()
        wait_count(counter, run, tasks, timeout=900)
        elapsed, after = time.perf_counter(), broker.read()
    finally:
        for process in processes:
            stop_worker(process)
        module.app.close()
    done = tasks - 1
    return [round(done / (elapsed - started)), per(after.cpu - before.cpu, done, 1000),
            per(delta(after, before, "requests"), done)]


# -- main --------------------------------------------------------------------------------
def ints(text: str) -> list[int]:
    return [int(part) for part in str(text).split(",") if part != ""]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a check in a few minutes")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--brokers", default=",".join(BROKER_NAMES))
    parser.add_argument("--etcd-retention", help="etcd's --auto-compaction-retention (default: the launcher's)")
    parser.add_argument("--consumers", default="1,4,16,64")
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=150.0)
    parser.add_argument("--backlogs", default="0,10000,50000,200000")
    parser.add_argument("--burst", type=int, default=10000)
    parser.add_argument("--long", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=100_000)
    parser.add_argument("--long-rivals", type=int, help="messages for Redis and RabbitMQ in the long part "
                        "(default: --long)")
    parser.add_argument("--idle", default="1,100,1000,10000")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--idle-settle", type=float, default=IDLE_SETTLE_SECONDS)
    parser.add_argument("--workers", default="1,4,8")
    parser.add_argument("--tasks", type=int, default=4000)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:  # --quick sets every size not given on the command line
        given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in argv if arg.startswith("--")}
        for name, value in QUICK.items():
            if name not in given:
                setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    parts = args.parts.split(",")
    progress(f"starting brokers: {args.brokers}")
    brokers = start_brokers(args.brokers.split(","), args.etcd_retention)
    tables = []
    try:
        if "consumers" in parts:
            tables.append(consumers_part(brokers, ints(args.consumers), args.messages, args.rate))
        if "backlog" in parts:
            tables.append(backlog_part(brokers, ints(args.backlogs), args.burst))
        if "long" in parts:
            tables.append(long_part(brokers, args.long, args.chunk, args.long_rivals))
        if "idle" in parts:
            tables.append(idle_part(brokers, ints(args.idle), args.idle_seconds, args.idle_settle))
        if "celery" in parts:
            tables.append(celery_part(brokers, ints(args.workers), args.tasks))
        etcd = next((b for b in brokers if b.name == "etcd"), None)
        if etcd is not None:
            metrics = etcd_metrics(etcd.server.client_url)
            note = (f"etcd at the end: DB {mb(metrics['etcd_mvcc_db_total_size_in_bytes'])} MB allocated, "
                    f"{mb(metrics.get('etcd_mvcc_db_total_size_in_use_in_bytes'))} MB in use")
            print(note, flush=True)
            tables.append(note)
    finally:
        stop_brokers(brokers)
    return "\n\n".join(tables)


if __name__ == "__main__":
    main()
