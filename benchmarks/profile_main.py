"""Where one job's time goes on our path: run_model jobs through etcd, profiled.

    python -m benchmarks.profile_main [--jobs 200] [--clients 1] [--model digits] [--rate 250]
                                      [--out var/profile]

One etcd and one worker as bench_main runs them (``-Q gpu -P threads -c 64``, the project's
settings); ``--clients`` client threads (1: sequential jobs) each send ``jobs.tasks.run_model``
and wait for its result before the next. Around the measured jobs (after warm-up ones):

* wall time, and CPU per job of the worker, this client process and etcd (from /proc), the
  worker's CPU by OS thread name;
* etcd's own counters per job (/metrics): raft proposals, WAL fsyncs, requests by gRPC method,
  MVCC operations;
* etcd's history of the jobs' keys: revisions (one proposal each) by what they wrote, with how
  many jobs share one (batching), and each job's writes in order (publish put, claim, STARTED,
  SUCCESS, ack ...) with how many jobs wrote exactly that;
* etcd requests per job by the code that made them, in the worker and in the client
  (benchmarks/etcd_calls.py wraps etcd3's stubs in both processes);
* py-spy (``record --gil --nonblocking``: the thread holding the GIL) on the worker and on this
  process: samples by what they were doing, and the functions on the most samples.
  Raw stacks and the report are kept in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import etcd_calls
from benchmarks.bench_batching import describe_model, payloads
from benchmarks.bench_main import TASK, client_app, is_answer, pick_model_dir, running, worker_env
from benchmarks.common import (
    CLOCK_TICKS,
    REPO_ROOT,
    etcd_counters,
    print_table,
    process_cpu,
    progress,
    start_worker,
    stop_worker,
)
from jobs.messages import run_model_argsrepr

#: Jobs run before measuring (model load, connections, first watch).
WARMUP_JOBS = 20
#: A key segment that is an id (uuid, hex or number) is shown as <id>.
ID_SEGMENT = re.compile(r"^(?:[0-9a-f]{8}-[0-9a-f-]{27}|[0-9a-f]{16,}|\d+|[0-9a-f-]{20,})$")
#: A Celery task id (uuid4) inside a key or a message.
TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Rows shown in the "most samples" tables.
TOP_FUNCTIONS = 25
#: Checked first, anywhere on a sample's stack: the phase it names wins.
PHASE_OVERRIDES = (("etcd_counters", "this benchmark reading etcd's /metrics (not the path)"),
                   ("is_cancelled", "cancel check (backend.is_cancelled: one Range)"),
                   ("store_result", "result writes (STARTED, SUCCESS: backend.store_result)"),
                   ("(ml/", "model (ModelHost.run: checks, preprocessing, batcher, forward pass, top-5)"))
#: Otherwise the innermost frame matching one of these (in this order for each frame) names the phase.
PHASES = (("(jobs/", "jobs.tasks glue"),
          ("(celery/app/trace.py", "Celery task trace (outside the model and the backend)"),
          ("(celery/app/amqp.py", "Celery: building the task message (send_task)"),
          ("(celery/backends/", "Celery result backend (waiting for, decoding the result)"),
          ("(celery/result.py", "Celery result backend (waiting for, decoding the result)"),
          ("(celery/worker/", "Celery consumer (strategy, request, pool hand-off)"),
          ("(etcd_broker/transport/channel.py", "transport (read ready, claim, deliver, publish)"),
          ("(etcd_broker/transport/delivery.py", "transport (read ready, claim, deliver, publish)"),
          ("(etcd_broker/transport/consumer.py", "consumer (acks, leases)"),
          ("(etcd_broker/core/watch.py", "watch streams"),
          ("(etcd_broker/backend/", "result consumer / store"),
          ("(etcd_broker/", "etcd_broker, other"),
          ("(kombu/", "kombu"),
          ("(celery/", "Celery, other"))
#: Frames that only carry a call: the phase is their caller's.
PLUMBING = ("(etcd_broker/core/ops.py", "(etcd_broker/core/client.py", "(benchmarks/etcd_calls.py", "(celery/utils/",
            "(kombu/utils/")
#: Frames left out of the inclusive table: entry points every sample shares.
NOISE_FRAMES = ("Thread.run", "Thread._bootstrap", "main (", "<module> (", "_run_code (", "_run_module_as_main")
NOISE_PACKAGES = ("click", "<frozen runpy>")
#: Seconds to read the jobs' history back from etcd.
HISTORY_TIMEOUT = 60.0


def revision(client) -> int:
    """etcd's current revision (a count-only read of one key)."""
    from etcd_broker.core import ops

    return ops.get(client, b"\0", count_only=True).header.revision


def shape(key: bytes, prefix: str) -> str:
    """A key with the prefix cut and ids replaced, so that jobs' keys compare equal."""
    text = key.decode(errors="replace")[len(prefix):] if key.decode(errors="replace").startswith(prefix) else key.decode(
        errors="replace")
    return "/".join("<id>" if ID_SEGMENT.match(part) else part for part in text.split("/"))


def history(client, prefix: str, start: int, stop_key: str) -> list:
    """Every event (``etcdrpc.Event``) under ``prefix`` from revision ``start`` until ``stop_key``
    is written: one plain watch on the client's channel, read until then and cancelled."""
    from etcd3 import etcdrpc
    from etcd3.utils import prefix_range_end

    done = threading.Event()

    def requests():
        yield etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=prefix.encode(), range_end=prefix_range_end(prefix.encode()), start_revision=start))
        done.wait()

    call = etcdrpc.WatchStub(client.channel).Watch(requests(), timeout=HISTORY_TIMEOUT)
    seen = []
    try:
        for response in call:
            for event in response.events:
                if event.kv.key == stop_key.encode():
                    return seen
                seen.append(event)
    finally:
        done.set()
        call.cancel()
    return seen


def owned_events(events: list, task_ids: list[str], prefix: str) -> list[tuple[int, str, str | None]]:
    """(revision, "PUT|DELETE key-shape", owning task id or None) per event: a job owns an event
    whose key or value holds its task id, and every later event on a key it owned."""
    owner_of_key: dict[bytes, str] = {}
    ids = set(task_ids)
    owned = []
    for event in events:
        kind, key = ("DELETE" if event.type == event.DELETE else "PUT"), event.kv.key
        owner = owner_of_key.get(key)
        if owner is None:
            found = TASK_ID.findall((key + event.kv.value).decode(errors="replace"))
            owner = next((task_id for task_id in found if task_id in ids), None)
        if owner is not None:
            owner_of_key[key] = owner
        owned.append((event.kv.mod_revision, f"{kind} {shape(key, prefix)}", owner))
    return owned


def writes_per_job(owned: list[tuple[int, str, str | None]]) -> tuple[Counter, Counter]:
    """(how many jobs wrote each sequence of revisions, events that belong to no job)."""
    per_job: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    stray: Counter[str] = Counter()
    for rev, what, owner in owned:
        if owner is None:
            stray[what] += 1
        else:
            per_job[owner][rev].append(what)
    sequences: Counter[tuple[str, ...]] = Counter()
    for revisions in per_job.values():
        sequences[tuple(" + ".join(sorted(revisions[rev])) for rev in sorted(revisions))] += 1
    return sequences, stray


def revision_kinds(owned: list[tuple[int, str, str | None]], jobs: int) -> list[list]:
    """Revisions by what they wrote: revisions per job, and jobs sharing one revision (batching)."""
    shapes: dict[int, set[str]] = defaultdict(set)
    owners: dict[int, set[str]] = defaultdict(set)
    for rev, what, owner in owned:
        shapes[rev].add(what)
        if owner is not None:
            owners[rev].add(owner)
    count: Counter[str] = Counter()
    sharing: Counter[str] = Counter()
    for rev, whats in shapes.items():
        kind = " + ".join(sorted(whats))
        count[kind] += 1
        sharing[kind] += len(owners[rev])
    return [[f"`{kind}`", f"{n / jobs:.3f}", f"{sharing[kind] / n:.1f}"] for kind, n in count.most_common()]


def package_of(frame: str) -> str:
    """``function (path:line)`` as py-spy names it (path relative to sys.path) -> the package or
    project directory the code lives in, ``stdlib:module`` for a top-level module."""
    path = frame.rsplit("(", 1)[-1].rstrip(")").rsplit(":", 1)[0]
    if "/" in path:
        return path.split("/", 1)[0]
    return f"stdlib:{path.removesuffix('.py')}" if path.endswith(".py") else path


def read_stacks(path: Path) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) output: ``frame;frame;... count`` per line, outermost first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if body and count.isdigit():
            stacks[tuple(body.split(";"))] += int(count)
    return stacks


def phase_of(frames: tuple[str, ...]) -> str:
    """What a sample was doing: an override found anywhere on the stack (``PHASE_OVERRIDES``), else
    the innermost frame of our code, Celery, kombu or the model (``PHASES``), else the running
    frame's package (threads of gRPC and the like)."""
    for marker, phase in PHASE_OVERRIDES:
        if any(marker in frame for frame in frames):
            return phase
    for frame in reversed(frames):
        if any(marker in frame for marker in PLUMBING):
            continue
        for marker, phase in PHASES:
            if marker in frame:
                return phase
    return f"{package_of(frames[-1])} (its own threads and helpers)"


def summarize(stacks: Counter, label: str) -> list[str]:
    total = sum(stacks.values()) or 1
    phases: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks.items():
        phases[phase_of(frames)] += count
        for name in {re.sub(r":\d+\)$", ")", frame) for frame in frames[1:]}:
            if not name.startswith(NOISE_FRAMES) and package_of(name) not in NOISE_PACKAGES:
                inclusive[name] += count
    return [print_table(f"{label}: where the GIL-holding samples were ({total} samples)", ["doing", "share"],
                        [[p, f"{100 * c / total:.1f}%"] for p, c in phases.most_common()]),
            print_table(f"{label}: functions on the most samples (inclusive; entry points left out)",
                        ["function", "share"],
                        [[f"`{n}`", f"{100 * c / total:.1f}%"] for n, c in inclusive.most_common(TOP_FUNCTIONS)])]


def thread_cpu(pid: int) -> Counter[str]:
    """CPU seconds of process ``pid``'s threads so far, summed by OS thread name (Python threads
    are all named after the process; gRPC's and TensorFlow's own threads carry their names)."""
    totals: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                head, _, tail = stat.read().rpartition(")")
        except OSError:  # the thread ended meanwhile
            continue
        fields = tail.split()
        totals[re.sub(r"\d+$", "N", head.split("(", 1)[1])] += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return totals


def spy(pid: int, output: Path, rate: int) -> subprocess.Popen:
    binary = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(binary), "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                             "--output", str(output), "--nonblocking", "--gil"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_spy(process: subprocess.Popen, output: Path) -> None:
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    if not output.exists():
        raise SystemExit(f"py-spy wrote nothing to {output}: {err.decode(errors='replace')[-1000:]}")


def worker_calls(out: Path, worker_pid: int, number: int) -> dict[str, int]:
    os.kill(worker_pid, signal.SIGUSR2)
    path = Path(f"{out}.{number}.json")
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"the worker wrote no etcd call counts to {path}")
        time.sleep(0.05)
    return json.loads(path.read_text())


def calls_rows(before: dict, after: dict, jobs: int, side: str) -> list[list]:
    rows = []
    for key in sorted(set(after) | set(before), key=lambda k: -(after.get(k, 0) - before.get(k, 0))):
        delta = after.get(key, 0) - before.get(key, 0)
        if delta:
            method, _, where = key.partition(" <- ")
            rows.append([side, method, f"`{where}`", f"{delta / jobs:.2f}"])
    return rows


def run_jobs(app, model: str, work: list[dict], jobs: int, clients: int) -> tuple[list[str], int, float]:
    """``jobs`` jobs from ``clients`` threads, each sending one and waiting for its result, then
    the next; returns (task ids, failed jobs, seconds spent in send_task summed over threads)."""
    def client(index: int) -> tuple[list[str], int, float]:
        ids, failed, publish = [], 0, 0.0
        for number in range(index, jobs, clients):
            sent = time.perf_counter()
            payload = work[number % len(work)]
            result = app.send_task(TASK, args=[model, payload], argsrepr=run_model_argsrepr(model, payload))
            publish += time.perf_counter() - sent
            ids.append(result.id)
            failed += not is_answer(result.get(timeout=60))
        return ids, failed, publish

    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(client, range(clients)))
    return [i for ids, _, _ in parts for i in ids], sum(p[1] for p in parts), sum(p[2] for p in parts)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_main", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=1, help="client threads (1: sequential jobs)")
    parser.add_argument("--model", default="digits", choices=("digits", "fashion"))
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "var" / "profile")
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", REPO_ROOT / "var/models")))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    etcd_calls.install()  # before any etcd client of this process exists
    model_dir = pick_model_dir([args.model], args.model_dir)
    work = payloads(args.model, 256)
    progress(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; model {describe_model(args.model, model_dir)}")
    calls_out = args.out / f"worker-etcd-calls-{os.getpid()}"
    with running("etcd") as stack:
        env = {**worker_env(stack, model_dir), "ETCD_CALLS_OUT": str(calls_out)}
        worker = start_worker("deephardway_site", env, concurrency=64, queues="gpu", module="benchmarks.etcd_calls")
        app = client_app(stack)
        from etcd_broker.core.client import make_client

        probe = make_client(stack.etcd.url)
        try:
            for index in range(WARMUP_JOBS):
                app.send_task(TASK, args=[args.model, work[index]]).get(timeout=120)
            spies = {side: (spy(pid, args.out / f"{side}.txt", args.rate), args.out / f"{side}.txt")
                     for side, pid in (("worker", worker.pid), ("client", os.getpid()))}
            time.sleep(1.0)  # py-spy attaches
            progress(f"{args.jobs} {args.model} jobs from {args.clients} client(s), py-spy on the worker and on this process")
            start_rev = revision(probe)
            metrics_before, worker_before, client_before = (etcd_counters(stack.etcd.client_url),
                                                            worker_calls(calls_out, worker.pid, 1), etcd_calls.snapshot())
            threads_before = thread_cpu(worker.pid)
            cpu_before = [process_cpu(worker.pid), process_cpu(os.getpid()), process_cpu(stack.etcd.process.pid)]
            began = time.perf_counter()
            task_ids, failures, publish = run_jobs(app, args.model, work, args.jobs, args.clients)
            wall = time.perf_counter() - began
            threads_after = thread_cpu(worker.pid)
            cpu_after = [process_cpu(worker.pid), process_cpu(os.getpid()), process_cpu(stack.etcd.process.pid)]
            metrics_after, worker_after, client_after = (etcd_counters(stack.etcd.client_url),
                                                         worker_calls(calls_out, worker.pid, 2), etcd_calls.snapshot())
            for process, output in spies.values():
                stop_spy(process, output)
            stop_key = f"{stack.prefix}/~profile-end"
            probe.put(stop_key, b"1")
            events = history(probe, stack.prefix, start_rev + 1, stop_key)
        finally:
            probe.close()
            app.close()
            stop_worker(worker)
    jobs = args.jobs
    parts = [print_table(
        f"{jobs} {args.model} jobs through etcd from {args.clients} client(s) ({failures} failed), "
        f"load average {os.getloadavg()[0]:.1f}",
        ["wall ms/job", "send_task ms/job", "worker CPU ms/job", "client CPU ms/job", "etcd CPU ms/job",
         "revisions/job"],
        [[f"{1e3 * wall / jobs:.2f}", f"{1e3 * publish / jobs:.2f}", *(f"{1e3 * (b - a) / jobs:.2f}" for a, b in zip(cpu_before, cpu_after, strict=True)),
          f"{len({e.kv.mod_revision for e in events}) / jobs:.2f}"]])]
    parts.append(print_table("etcd /metrics per job", ["counter", "per job"],
                             [[key, f"{(metrics_after.get(key, 0) - metrics_before.get(key, 0)) / jobs:.2f}"]
                              for key in sorted(metrics_after) if metrics_after.get(key, 0) - metrics_before.get(key, 0)]))
    threads = Counter({name: threads_after[name] - threads_before.get(name, 0.0) for name in threads_after})
    parts.append(print_table("Worker CPU per job by OS thread name (from /proc)", ["threads", "CPU ms/job"],
                             [[f"`{name}`", f"{1e3 * cpu / jobs:.2f}"] for name, cpu in threads.most_common(12) if cpu]))
    owned = owned_events(events, task_ids, stack.prefix)
    parts.append(print_table("Revisions (one raft proposal each) by what they wrote", ["revision writes", "per job",
                                                                                      "jobs per revision"],
                             revision_kinds(owned, jobs)))
    sequences, stray = writes_per_job(owned)
    for sequence, count in sequences.most_common(3):
        parts.append(print_table(f"The writes of one job, in order ({count} of {jobs} jobs wrote exactly this)",
                                 ["#", "one revision: events"], [[i + 1, f"`{step}`"] for i, step in enumerate(sequence)]))
    if stray:
        parts.append(print_table("Writes belonging to no job (whole run)", ["events", "count"],
                                 [[f"`{k}`", v] for k, v in stray.most_common(10)]))
    parts.append(print_table("etcd requests per job by the code that made them", ["process", "method", "callers", "per job"],
                             calls_rows(worker_before, worker_after, jobs, "worker")
                             + calls_rows(client_before, client_after, jobs, "client")))
    for side, (_, output) in spies.items():
        parts.extend(summarize(read_stacks(output), f"py-spy, {side}"))
    text = "\n\n".join(parts)
    (args.out / "profile.md").write_text(text + "\n")
    progress(f"raw stacks and this report in {args.out}")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
