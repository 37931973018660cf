"""The main job end to end: ``run_model`` through etcd, Redis, durable Redis and RabbitMQ, in one run.

    python -m benchmarks.bench_main [--seconds 5] [--clients 1 8 64] [--models digits fashion]
                                    [--brokers etcd redis redis-aof rabbitmq] [--model-dir var/models]

Clients (threads of this process) send ``jobs.tasks.run_model`` by name with the web tier's
argsrepr (``jobs.messages``), and each waits for its result (``send_task(...).get()``) before
sending the next. Every broker gets the same worker: ``celery -A deephardway_site worker -Q gpu
-P threads -c 64 --without-gossip --without-mingle --without-heartbeat`` with the project's own
settings (prefetch multiplier 1, task_track_started, result_extended, priorities 0-9) and the same
task code: ``run_model`` is an ``etcd_broker.batches.BatchTask``, so on every broker the requests a
worker receives together run as one forward pass (what differs is how many arrive together, and
that only our result backend stores a batch's results in shared transactions); only the URLs differ
(and Celery's Redis result backend gets a no-op ``stop_if_cancelled``: benchmarks/rival_worker.py):

* etcd: our transport and result backend on one etcd member (every write fsynced);
* redis: Celery with Redis as broker and result backend, Redis's defaults (no persistence);
* redis-aof: the same with ``appendonly yes`` and ``appendfsync always`` (durable, as etcd is);
* rabbitmq: RabbitMQ as broker (Debian's rabbitmq-server, default settings, a throw-away node run
  by this benchmark), Redis (defaults) for results.

Beside each rate: latency percentiles; CPU per request of the worker process, of this client
process and of the servers (from /proc); for etcd its own counters per job (raft proposals
committed, requests by method, from /metrics), for Redis the commands it processed per job.
The in-process ceiling is the model's own batched throughput: the same client threads calling
``ModelHost.run`` in this process with the worker's batching settings, as bench_batching measures.

All configurations run side by side: their servers and workers start first, then each round
(model, client count) goes through every configuration in turn, the order rotating from round
to round, so that the load of a shared machine changes all columns alike (each row shows the
load average when it ended).
"""
from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.bench_batching import QUICK_MODEL_DIR, describe_model, model_dir_for, payloads
from benchmarks.common import (
    REPO_ROOT,
    RabbitMQServer,
    RedisServer,
    drive_clients,
    etcd_counters,
    percentile,
    print_table,
    process_cpu,
    progress,
    session_cpu,
    start_worker,
    stop_worker,
)
from jobs.messages import run_model_argsrepr
from scripts.etcd_server import EtcdServer

CLIENTS = (1, 8, 64)
#: Most client threads one round may start (each holds a connection to the broker and the backend).
MAX_CLIENTS = 512
BROKERS = ("etcd", "redis", "redis-aof", "rabbitmq")
MODELS = ("digits", "fashion")
#: Worker threads, as the project runs its GPU workers (``-P threads -c 64``).
WORKER_THREADS = 64
#: Seconds of unmeasured traffic before each round (queues fill, batches form).
WARMUP_SECONDS = 1.0
#: Seconds a client waits for one result before counting the request failed.
RESULT_TIMEOUT = 60.0
TASK = "jobs.tasks.run_model"
#: gRPC methods that are streams: their messages are not requests of their own.
ETCD_STREAMS = ("Watch", "LeaseKeepAlive")
#: etcd counters shown per job in the detail table (see ``common.etcd_counters``).
ETCD_DETAIL = ("proposals", "wal_fsyncs", "wal_fsync_ms", "rpc_Put", "rpc_Txn", "rpc_Range", "rpc_DeleteRange", "rpc_LeaseGrant",
               "rpc_LeaseKeepAlive", "rpc_Watch", "sent_Watch", "mvcc_put", "mvcc_txn", "mvcc_range",
               "mvcc_delete")


@dataclass
class Stack:
    """A running broker and result backend, and the servers to count on."""

    name: str
    broker_url: str
    backend_url: str
    #: CPU seconds the servers have used so far.
    server_cpu: Callable[[], float]
    etcd: EtcdServer | None = None
    redis: RedisServer | None = None
    prefix: str = field(default_factory=lambda: f"/bench-main-{uuid.uuid4().hex[:6]}")


@dataclass
class Snapshot:
    """Counters read at one instant of a round."""

    worker_cpu: float
    client_cpu: float
    server_cpu: float
    etcd: dict[str, float]
    redis_commands: int


@contextmanager
def running(name: str) -> Iterator[Stack]:
    """Start the servers of broker configuration ``name``; stop them afterwards."""
    progress(f"{name}: starting servers")
    if name == "etcd":
        from etcd_broker.transport.consumer import close_all_leases

        etcd = EtcdServer().start()
        try:
            yield Stack(name, etcd.url, etcd.url, lambda: process_cpu(etcd.process.pid), etcd=etcd)
        finally:
            close_all_leases()  # this process's leases, while etcd still answers
            etcd.cleanup()
        return
    redis_server = RedisServer(durable=name == "redis-aof")
    rabbit = RabbitMQServer() if name == "rabbitmq" else None
    try:
        broker = rabbit.url() if rabbit else redis_server.url(0)
        def server_cpu() -> float:  # RabbitMQ: the node's whole session (beam.smp, epmd, helpers)
            return process_cpu(redis_server.process.pid) + (session_cpu(rabbit.process.pid) if rabbit else 0.0)

        yield Stack(name, broker, redis_server.url(0), server_cpu, redis=redis_server)
    finally:
        if rabbit:
            rabbit.stop()
        redis_server.stop()


def site_celery_settings() -> dict[str, Any]:
    """The project's ``CELERY_*`` settings (what its web tier and workers run with)."""
    from deephardway_site import settings

    return {key: getattr(settings, key) for key in dir(settings) if key.startswith("CELERY_")}


def client_app(stack: Stack):
    """A client Celery app configured as the web tier's, pointed at ``stack``."""
    from celery import Celery

    import etcd_broker  # noqa: F401 - registers etcdv3://

    options = {"prefix": stack.prefix} if stack.etcd else {}
    conf = {**site_celery_settings(), "CELERY_BROKER_URL": stack.broker_url,
            "CELERY_RESULT_BACKEND": stack.backend_url, "CELERY_BROKER_TRANSPORT_OPTIONS": options,
            "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS": options}
    app = Celery("bench-main-client", set_as_current=False)
    app.config_from_object(conf, namespace="CELERY")
    return app


def worker_env(stack: Stack, model_dir: Path) -> dict[str, str]:
    env = {"CELERY_BROKER_URL": stack.broker_url, "CELERY_RESULT_BACKEND": stack.backend_url,
           "ETCD_PREFIX": stack.prefix, "MODEL_DIR": str(model_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if stack.etcd:
        env["ETCD_URL"] = stack.etcd.url
    return env


def snapshot(stack: Stack, worker_pid: int) -> Snapshot:
    return Snapshot(process_cpu(worker_pid), process_cpu(os.getpid()), stack.server_cpu(),
                    etcd_counters(stack.etcd.client_url) if stack.etcd else {},
                    stack.redis.commands() if stack.redis else 0)


def is_answer(result: object) -> bool:
    return isinstance(result, dict) and "top" in result


def payload_cycle(work: list[dict], index: int, clients: int) -> Callable[[], dict]:
    """Client ``index`` of ``clients`` walks its own share of ``work`` round and round."""
    position = iter(range(index, 1 << 62, clients))
    return lambda: work[next(position) % len(work)]


def remote_request(app, model: str, work: list[dict], clients: int) -> Callable[[int], Callable[[], object]]:
    """``make_request`` for drive_clients: send run_model by name and wait for its result."""
    def make_request(index: int) -> Callable[[], object]:
        next_payload = payload_cycle(work, index, clients)

        def call() -> object:
            try:
                payload = next_payload()
                result = app.send_task(TASK, args=[model, payload], argsrepr=run_model_argsrepr(model, payload))
                return is_answer(result.get(timeout=RESULT_TIMEOUT))
            except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
                return type(exc).__name__

        return call

    return make_request


def per_job(before: dict[str, float], after: dict[str, float], jobs: int, keys) -> dict[str, float]:
    return {key: (after.get(key, 0.0) - before.get(key, 0.0)) / max(jobs, 1) for key in keys}


def measure_round(label: str, stack: Stack, worker_pid: int, make_request, clients: int,
                  seconds: float) -> dict[str, Any]:
    """One round: ``clients`` clients for ``seconds``; the row's numbers and etcd counters per job."""
    marks: dict[bool, Snapshot] = {}
    rate, latencies, outcomes = drive_clients(clients, make_request, seconds, WARMUP_SECONDS,
                                              on_window=lambda opening: marks.__setitem__(
                                                  opening, snapshot(stack, worker_pid)))
    jobs, (a, b) = len(latencies), (marks[True], marks[False])
    etcd = per_job(a.etcd, b.etcd, jobs, sorted(set(a.etcd) | set(b.etcd)))
    result = {
        "rate": rate, "p50": percentile(latencies, 50) * 1e3, "p95": percentile(latencies, 95) * 1e3,
        "p99": percentile(latencies, 99) * 1e3, "jobs": jobs,
        "worker_ms": 1e3 * (b.worker_cpu - a.worker_cpu) / max(jobs, 1),
        "client_ms": 1e3 * (b.client_cpu - a.client_cpu) / max(jobs, 1),
        "server_ms": 1e3 * (b.server_cpu - a.server_cpu) / max(jobs, 1),
        "etcd": etcd, "redis_cmds": (b.redis_commands - a.redis_commands) / max(jobs, 1) if stack.redis else None,
        "errors": sum(1 for outcome in outcomes if outcome is not True), "load": os.getloadavg()[0],
    }
    etcd_text = (f"  etcd {sum(v for k, v in etcd.items() if k.startswith('rpc_') and k[4:] not in ETCD_STREAMS):.1f} "
                 f"req/job, {etcd.get('proposals', 0):.2f} proposals/job") if stack.etcd else ""
    progress(f"[{label}] {clients:>2} clients: {rate:7.0f} req/s  p50 {result['p50']:7.2f} ms  p99 "
             f"{result['p99']:7.2f} ms  worker CPU {result['worker_ms']:.2f} ms/req{etcd_text}"
             f"{'  ERRORS ' + str(result['errors']) if result['errors'] else ''}")
    return result


@dataclass
class Participant:
    """One column of the comparison, ready to run a round: ``run(model, clients, seconds)``."""

    name: str
    run: Callable[[str, int, float], dict[str, Any]]


def remote_participant(exits: ExitStack, name: str, models: list[str], model_dir: Path,
                       work: dict[str, list[dict]]) -> Participant:
    """Broker configuration ``name`` with its servers, its own worker and a client app, models loaded."""
    stack = exits.enter_context(running(name))
    progress(f"{name}: starting the worker (-Q gpu -P threads -c {WORKER_THREADS})")
    worker = start_worker("deephardway_site", worker_env(stack, model_dir), concurrency=WORKER_THREADS, queues="gpu",
                          module="celery" if stack.etcd else "benchmarks.rival_worker")
    exits.callback(stop_worker, worker)
    app = client_app(stack)
    exits.callback(app.close)
    for model in models:
        first = app.send_task(TASK, args=[model, work[model][0]]).get(timeout=120)  # the worker loads the model
        if not is_answer(first):
            raise SystemExit(f"{name}: run_model({model}) answered {first!r}")

    def run(model: str, clients: int, seconds: float) -> dict[str, Any]:
        return measure_round(f"{name} {model}", stack, worker.pid, remote_request(app, model, work[model], clients),
                             clients, seconds)

    return Participant(name, run)


def in_process_round(host, model: str, work: list[dict], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads call ``host.run`` in this process; this process's CPU is the worker's."""
    def make_request(index: int) -> Callable[[], object]:
        next_payload = payload_cycle(work, index, clients)
        return lambda: is_answer(host.run(model, next_payload()))

    marks: dict[bool, float] = {}
    rate, latencies, outcomes = drive_clients(
        clients, make_request, seconds, WARMUP_SECONDS,
        on_window=lambda opening: marks.__setitem__(opening, process_cpu(os.getpid())))
    result = {"rate": rate, "p50": percentile(latencies, 50) * 1e3, "p95": percentile(latencies, 95) * 1e3,
              "p99": percentile(latencies, 99) * 1e3, "jobs": len(latencies),
              "worker_ms": 1e3 * (marks[False] - marks[True]) / max(len(latencies), 1),
              "client_ms": None, "server_ms": None, "etcd": {}, "redis_cmds": None,
              "errors": sum(1 for outcome in outcomes if outcome is not True), "load": os.getloadavg()[0]}
    progress(f"[in-process {model}] {clients:>2} clients: {rate:7.0f} req/s  p50 {result['p50']:7.2f} ms  "
             f"CPU {result['worker_ms']:.2f} ms/req")
    return result


def in_process_participant(exits: ExitStack, models: list[str], model_dir: Path,
                           work: dict[str, list[dict]]) -> Participant:
    """The ceiling: client threads call ``ModelHost.run`` in this process (no queue at all), with
    the worker's batching settings."""
    from deephardway_site import settings
    from ml.serving import ModelHost

    host = ModelHost(model_dir, batch_max_size=settings.BATCH_MAX_SIZE, batch_window_ms=settings.BATCH_WINDOW_MS,
                     batching=settings.BATCHING)
    exits.callback(host.close)
    for model in models:
        host.run(model, work[model][0])  # loads and traces the model
    return Participant("in-process", lambda model, clients, seconds: in_process_round(
        host, model, work[model], clients, seconds))


def run_rounds(participants: list[Participant], models: list[str], clients: list[int],
               seconds: float) -> dict[str, dict[tuple[str, int], dict]]:
    """Every (model, clients) round through every participant, the order rotating from round to
    round, so that a change in the machine's load falls on all of them alike."""
    results: dict[str, dict[tuple[str, int], dict]] = {p.name: {} for p in participants}
    rounds = [(model, count) for model in models for count in clients]
    for number, (model, count) in enumerate(rounds):
        shift = number % len(participants)
        progress(f"round {number + 1}/{len(rounds)}: {model}, {count} clients, load average {os.getloadavg()[0]:.1f}")
        for participant in participants[shift:] + participants[:shift]:
            results[participant.name][(model, count)] = participant.run(model, count, seconds)
    return results


def pick_model_dir(models: list[str], model_dir: Path) -> Path:
    """``model_dir`` if every model is trained there; otherwise quick timing-only models."""
    from ml import artifacts

    if all(artifacts.is_trained(model_dir, name) for name in models):
        return model_dir
    for name in models:
        model_dir_for(name, QUICK_MODEL_DIR)
    return QUICK_MODEL_DIR


def client_count(text: str) -> int:
    """argparse type: a client count from 1 to MAX_CLIENTS."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clients takes whole numbers, got {text!r}") from None
    if not 1 <= value <= MAX_CLIENTS:
        raise argparse.ArgumentTypeError(f"--clients must be from 1 to {MAX_CLIENTS}, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seconds takes a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--seconds must be above 0, got {text}")
    return value


def cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main_rows(results: dict[str, dict]) -> list[list]:
    rows = []
    for broker, rounds in results.items():
        for (model, clients), r in rounds.items():
            etcd = r["etcd"]
            requests = sum(v for k, v in etcd.items() if k.startswith("rpc_") and k[4:] not in ETCD_STREAMS)
            rows.append([broker, model, clients, round(r["rate"]), cell(r["p50"]), cell(r["p95"]), cell(r["p99"]),
                         cell(r["worker_ms"]), cell(r["client_ms"]), cell(r["server_ms"]),
                         cell(requests if etcd else None, 1), cell(etcd.get("proposals") if etcd else None),
                         cell(r["redis_cmds"], 1), r["errors"], cell(r["load"], 1)])
    return rows


def etcd_rows(results: dict[str, dict]) -> list[list]:
    return [[model, clients, *(cell(r["etcd"].get(key, 0.0)) for key in ETCD_DETAIL)]
            for (model, clients), r in results.get("etcd", {}).items()]


def target_rows(results: dict[str, dict]) -> list[list]:
    """The issue's targets as ratios of this run's numbers (only those this run measured)."""
    ours, rows = results.get("etcd", {}), []
    for (model, clients), r in ours.items():
        rivals = {b: results[b][(model, clients)] for b in ("redis", "rabbitmq") if (model, clients) in results.get(b, {})}
        ceiling = results.get("in-process", {}).get((model, max(c for _, c in ours)))
        if clients == max(c for _, c in ours):
            if rivals:
                best = max(rivals.values(), key=lambda x: x["rate"])["rate"]
                rows.append([model, f"{clients} clients: req/s vs best of Redis, RabbitMQ+Redis", ">= 3.0x",
                             f"{r['rate'] / best:.2f}x"])
            if ceiling:
                rows.append([model, f"{clients} clients: req/s vs in-process batched ceiling", ">= 25%",
                             f"{100 * r['rate'] / ceiling['rate']:.0f}%"])
            rows.append([model, f"{clients} clients: raft proposals per job", "<= 1.5",
                         cell(r["etcd"].get("proposals"))])
        if clients == 1:
            for rival, rival_result in rivals.items():
                rows.append([model, f"1 client: p50 vs {rival}", "<= 1.0x", f"{r['p50'] / rival_result['p50']:.2f}x"])
            if (model, 1) in results.get("redis-aof", {}):
                rows.append([model, "1 client: p50 vs redis-aof (appendfsync always)", "< 1.0x",
                             f"{r['p50'] / results['redis-aof'][(model, 1)]['p50']:.2f}x"])
            rows.append([model, "1 client (sequential): raft proposals per job", "<= 3",
                         cell(r["etcd"].get("proposals"))])
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_main", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive_seconds, default=5.0, help="measured seconds per round")
    parser.add_argument("--clients", type=client_count, nargs="+", default=list(CLIENTS),
                        help=f"concurrent clients per round, 1 to {MAX_CLIENTS}")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--brokers", nargs="+", default=list(BROKERS), choices=BROKERS)
    parser.add_argument("--no-in-process", dest="in_process", action="store_false", help="skip the ceiling")
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", REPO_ROOT / "var/models")))
    args = parser.parse_args(argv)
    from ml import datasets

    models = [m for m in args.models if m != "fashion" or datasets.fashion_available()[0]]
    model_dir = pick_model_dir(models, args.model_dir)
    work = {model: payloads(model, 256) for model in models}
    started_load = os.getloadavg()
    progress(f"{os.cpu_count()} CPUs, load average {started_load[0]:.1f}; models: "
             + "; ".join(describe_model(m, model_dir) for m in models))
    began = time.monotonic()
    with ExitStack() as exits:
        participants = [remote_participant(exits, broker, models, model_dir, work) for broker in args.brokers]
        if args.in_process:
            participants.append(in_process_participant(exits, models, model_dir, work))
        results = run_rounds(participants, models, args.clients, args.seconds)
    load = os.getloadavg()
    title = (f"run_model end to end, worker -P threads -c {WORKER_THREADS}, {args.seconds:g} s per round, "
             f"{os.cpu_count()} CPUs, load average {started_load[0]:.1f} at the start, {load[0]:.1f} / "
             f"{load[1]:.1f} (1 / 5 min) at the end, {time.monotonic() - began:.0f} s")
    parts = [print_table(title, ["broker", "model", "clients", "req/s", "p50 ms", "p95 ms", "p99 ms",
                                 "worker CPU ms/req", "client CPU ms/req", "server CPU ms/req", "etcd req/job",
                                 "proposals/job", "redis cmds/job", "errors", "load 1m"], main_rows(results))]
    if "etcd" in results:
        parts.append(print_table("etcd counters per job (from its /metrics): proposals, gRPC messages received "
                                 "by method, watch responses sent, MVCC operations",
                                 ["model", "clients", *ETCD_DETAIL], etcd_rows(results)))
    targets = target_rows(results)
    if targets:
        parts.append(print_table("Targets (issue 14) as ratios of this run", ["model", "target", "goal", "today"],
                                 targets))
    return "\n\n".join(parts)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
