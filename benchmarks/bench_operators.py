"""What an operator sees on a busy worker, etcd and Redis side by side in one run (docs/operators.md).

For each broker and pool (prefork, threads), one ``celery worker -c 2`` whose two slots
are held by long tasks while two more wait:

* ``inspect ping`` to that worker: reply time, and how many got no reply within 2 s;
* ``inspect stats``: ``put-guarded-by-semaphore`` (True: the consumer blocks in billiard);
* ``revoke(terminate=True)`` of a running task: time until the result says REVOKED;
* shutdown with the broker unreachable (SIGSTOP, a partition: sockets open, no answers):
  seconds from SIGTERM to exit, and how many of the tasks it held ran once the broker
  was back and a second worker started.

Run: ``python -m benchmarks bench_operators`` (needs redis-server).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from benchmarks.common import RedisServer, percentile, print_table, progress
from benchmarks.operators_app import make_app
from scripts.etcd_server import EtcdServer
from tests.helpers import WorkerProcess

APP = "benchmarks.operators_app"
#: Pings per configuration (each waits for the one worker's reply, at most PING_TIMEOUT).
PINGS = 20
PING_TIMEOUT = 2.0
#: Terminates per configuration; a task not REVOKED within TERMINATE_WAIT counts as not stopped.
TERMINATES = 5
TERMINATE_WAIT = 5.0
#: Held tasks outlast every measurement (each worker is killed at the end).
HOLD_SECONDS = 120.0
#: The etcd consumer lease TTL (the transport's default).
LEASE_TTL = 10
#: How long a worker told to stop with the broker unreachable gets before we call it hung.
EXIT_WAIT = 60.0
#: How long the held tasks get to run again once the broker is back.
RETURN_WAIT = 60.0


def start_worker(url: str, prefix: str, pool: str, log_dir: str) -> WorkerProcess:
    env = {"BENCH_OPS_URL": url, "BENCH_OPS_PREFIX": prefix, "BENCH_OPS_LEASE_TTL": str(LEASE_TTL)}
    return WorkerProcess(app=APP, env=env, pool=pool, concurrency=2, log_dir=log_dir).start()


def node_name(worker: WorkerProcess) -> str:
    return worker.hostname.replace("%h", socket.gethostname())


def running_ids(app, node: str) -> list[str]:
    active = app.control.inspect(destination=[node], limit=1, timeout=PING_TIMEOUT).active() or {}
    return [task["id"] for task in active.get(node, [])]


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    return None


def busy_worker(name: str, url: str, pool: str, log_dir: str) -> list:
    """Ping, stats and terminate on a full worker; one table row."""
    prefix = f"/bench-ops-{uuid.uuid4().hex[:8]}"
    app = make_app(url, prefix, LEASE_TTL)
    worker = start_worker(url, prefix, pool, log_dir)
    node = node_name(worker)
    try:
        for _ in range(4):
            app.send_task("ops.hold", (HOLD_SECONDS,))
        wait_for(lambda: len(running_ids(app, node)) >= 2, 60)
        replies, missed = [], 0
        for _ in range(PINGS):
            started = time.monotonic()
            if app.control.inspect(destination=[node], limit=1, timeout=PING_TIMEOUT).ping():
                replies.append(time.monotonic() - started)
            else:
                missed += 1
        stats = (app.control.inspect(destination=[node], limit=1, timeout=PING_TIMEOUT).stats() or {}).get(node, {})
        guarded = stats.get("pool", {}).get("put-guarded-by-semaphore", "n/a") if stats else "no reply"
        stopped, not_stopped = [], 0
        for _ in range(TERMINATES):
            ids = wait_for(lambda: running_ids(app, node), 10) or []
            if not ids:
                not_stopped += 1
                continue
            victim = app.AsyncResult(ids[0])
            started = time.monotonic()
            app.control.revoke(victim.id, terminate=True)
            if wait_for(lambda: victim.state == "REVOKED", TERMINATE_WAIT):  # noqa: B023 - called in this round
                stopped.append(time.monotonic() - started)
            else:
                not_stopped += 1
            app.send_task("ops.hold", (HOLD_SECONDS,))  # keep every slot busy
    finally:
        worker.kill()
        app.close()
    ms = [1000 * s for s in replies]
    stop_ms = [1000 * s for s in stopped]
    return [name, pool, _fmt(ms, 50), _fmt(ms, 90), f"{missed}/{PINGS}", guarded,
            _fmt(stop_ms, 50), f"{len(stopped)}/{TERMINATES}"]


def shutdown_unreachable(name: str, url: str, broker_pid: int, log_dir: str) -> list:
    """SIGTERM a prefork worker holding 4 tasks while the broker does not answer."""
    prefix = f"/bench-ops-{uuid.uuid4().hex[:8]}"
    app = make_app(url, prefix, LEASE_TTL)
    first = start_worker(url, prefix, "prefork", log_dir)
    ids = [app.send_task("ops.nap", (3.0,)).id for _ in range(4)]
    wait_for(lambda: first.log().count("ops.nap[") >= 2, 30)
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        os.kill(first.process.pid, signal.SIGTERM)
        try:
            first.process.wait(EXIT_WAIT)
            exited = f"{time.monotonic() - started:.1f}"
        except subprocess.TimeoutExpired:
            exited = f"> {EXIT_WAIT:.0f} (SIGKILLed)"
            first.kill()
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    back_at = time.monotonic()
    second = start_worker(url, prefix, "prefork", log_dir)

    def ran() -> set[str]:
        return {m for log in (first.log(), second.log()) for m in re.findall(r"ops\.nap\[([0-9a-f-]+)\] succeeded", log)}

    done = wait_for(lambda: set(ids) <= ran(), RETURN_WAIT)
    took = f" in {time.monotonic() - back_at:.0f} s" if done else f" after {RETURN_WAIT:.0f} s"
    second.kill()
    app.close()
    return [name, exited, f"{len(set(ids) & ran())}/4{took}"]


def _fmt(values: list[float], pct: float) -> str:
    return f"{percentile(values, pct):.0f}" if values else "-"


def main(argv: list[str]) -> None:
    log_dir = tempfile.mkdtemp(prefix="bench-operators-")
    etcd = EtcdServer(data_dir=os.path.join(log_dir, "etcd")).start()
    redis = RedisServer()
    brokers = [("etcd", etcd.url, etcd.process.pid), ("Redis", redis.url(), redis.process.pid)]
    try:
        rows = []
        for pool in ("prefork", "threads"):
            for name, url, _ in brokers:
                progress(f"busy worker: {name} {pool}")
                rows.append(busy_worker(name, url, pool, log_dir))
        print_table(f"A busy worker (-c 2, both slots held, 2 tasks waiting): {PINGS} pings, {TERMINATES} terminates",
                    ["broker", "pool", "ping p50 ms", "ping p90 ms", "no reply (2 s)", "put-guarded-by-semaphore",
                     "terminate -> REVOKED p50 ms", "terminated"], rows)
        rows = []
        for name, url, pid in brokers:
            progress(f"shutdown with {name} unreachable")
            rows.append(shutdown_unreachable(name, url, pid, log_dir))
        print_table("Warm shutdown (SIGTERM) of a prefork worker holding 4 tasks (3 s each) while the broker "
                    f"is unreachable (SIGSTOP); etcd lease TTL {LEASE_TTL} s",
                    ["broker", "exit after SIGTERM (s)", "held tasks run once the broker is back"], rows)
    finally:
        redis.stop()
        etcd.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
