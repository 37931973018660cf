"""One client, one worker: a Celery task's round trip (send, run, result) on etcd, p50/p99.

The worker path alone, without the site or a model (bench_main's one-client rows): one thread
sends ``echo`` and waits for its result, then sends the next. Each round starts its own worker
(``-P threads -c 64`` as bench_main's, or ``--pool prefork -c 1``) under its own key prefix of one
etcd. ``--code`` names checkouts to compare (each a directory holding an ``etcd_broker`` package;
the worker and this client import it): rounds alternate between them, so load changes on a shared
machine fall on all of them alike. Per round: requests/s, latency p50/p90/p99, etcd requests per task
(unary requests, from etcd's ``/metrics``)::

    python -m benchmarks.bench_roundtrip --code /tmp/before . --rounds 3 --tasks 400
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    REPO_ROOT,
    etcd_counters,
    percentile,
    print_table,
    progress,
    stop_worker,
    wait_worker_ready,
)
from scripts.etcd_server import EtcdServer

#: Tasks run before a round's measured ones (the worker's connections, watches and parks settle).
WARMUP_TASKS = 30
#: gRPC methods counted as requests (the watch and lease keepalive streams count one per message).
UNARY = ("rpc_Range", "rpc_Txn", "rpc_Put", "rpc_DeleteRange", "rpc_LeaseGrant", "rpc_LeaseRevoke")


def client(url: str, prefix: str, tasks: int) -> dict:
    """Run in a subprocess (``--client``) with the checkout's PYTHONPATH: the measured loop."""
    os.environ.update(BENCH_BROKER_URL=url, BENCH_PREFIX=prefix)
    import etcd_broker
    from benchmarks.roundtrip_app import echo

    for i in range(WARMUP_TASKS):
        assert echo.delay(i).get(timeout=60) == i
    latencies = []
    started = time.perf_counter()
    for i in range(tasks):
        sent = time.perf_counter()
        assert echo.delay(i).get(timeout=60) == i
        latencies.append(time.perf_counter() - sent)
    return {"seconds": time.perf_counter() - started, "latencies": latencies, "code": etcd_broker.__file__}


def start_worker(env: dict, pool: str, concurrency: int, log_path: str) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.roundtrip_app", "worker", "-l", "INFO",
             "-P", pool, "-c", str(concurrency), "--without-gossip", "--without-mingle", "--without-heartbeat",
             "-n", f"roundtrip-{time.time_ns()}@%h"],
            cwd=env["BENCH_CODE"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return wait_worker_ready(process, log_path)


def run_round(server: EtcdServer, code: str, prefix: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{Path(code).resolve()}:{REPO_ROOT}", "PYTHONUNBUFFERED": "1",
           "BENCH_BROKER_URL": server.url, "BENCH_PREFIX": prefix, "BENCH_CODE": str(Path(code).resolve())}
    log_path = f"/tmp/roundtrip-worker-{prefix.strip('/')}.log"
    worker = start_worker(env, args.pool, args.concurrency, log_path)
    try:
        before = etcd_counters(server.client_url)
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_roundtrip", "--client", server.url, prefix,
                              str(args.tasks)], cwd=env["BENCH_CODE"], env=env, capture_output=True, text=True, check=True)
        after = etcd_counters(server.client_url)
    finally:
        stop_worker(worker)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    progress(f"etcd_broker from {result['code']}")
    total = args.tasks + WARMUP_TASKS
    requests = sum(after.get(name, 0) - before.get(name, 0) for name in UNARY)
    lat = result["latencies"]
    return {"rate": args.tasks / result["seconds"], "p50": 1e3 * percentile(lat, 50), "p90": 1e3 * percentile(lat, 90),
            "p99": 1e3 * percentile(lat, 99), "req": requests / total,
            "range": (after.get("rpc_Range", 0) - before.get("rpc_Range", 0)) / total}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--client", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--code", nargs="+", default=["."], help="checkouts to compare (directories with etcd_broker/)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per checkout, alternating")
    parser.add_argument("--tasks", type=int, default=300, help="measured tasks per round")
    parser.add_argument("--pool", default="threads", choices=("threads", "prefork"))
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if args.client:
        url, prefix, tasks = args.client
        print(json.dumps(client(url, prefix, int(tasks))))
        return ""
    rows = []
    with EtcdServer() as server:
        for round_ in range(args.rounds):
            for index, code in enumerate(args.code):
                prefix = f"/rt{round_}x{index}"
                progress(f"round {round_ + 1}: {code}")
                r = run_round(server, code, prefix, args)
                load = os.getloadavg()[0]
                rows.append([round_ + 1, code, f"{r['rate']:.1f}", f"{r['p50']:.1f}", f"{r['p90']:.1f}",
                             f"{r['p99']:.1f}", f"{r['req']:.2f}", f"{r['range']:.2f}", f"{load:.1f}"])
    return print_table(f"echo round trip, one client, worker -P {args.pool} -c {args.concurrency}, "
                       f"{args.tasks} tasks per round",
                       ["round", "code", "tasks/s", "p50 ms", "p90 ms", "p99 ms", "etcd req/task", "Range/task", "load"],
                       rows)


if __name__ == "__main__":
    main()
