"""Micro-batching: classify throughput and latency with batching off and on, in one run.

    python -m benchmarks.bench_batching [--seconds 3] [--models digits fashion] [--model-dir var/models]
                                        [--no-end-to-end]

In-process, through the code path ``run_model`` uses (``ModelHost.run``: validate, preprocess,
batcher or direct forward pass, top-5): N client threads (1, 8, 64) call it in a loop, like the
threads of a ``-P threads -c 64`` worker. Ceilings in the same run: the raw compiled forward pass
at batch 1/8/64 (no Python per request), and one thread preprocessing 64 requests then running
them as one batch (the best a process can do with this per-request work).
End-to-end: the same clients call ``run_model`` through a real worker (``-Q gpu -P threads
-c 64``, BATCHING=0 then 1) over our etcd broker and result backend.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO_ROOT, drive_clients, percentile, print_table, progress
from ml import artifacts, batching, datasets

CLIENTS = (1, 8, 64)
RAW_BATCHES = (1, 8, 64)
#: Seconds of unmeasured traffic before each round (tracing, thread start-up).
WARMUP_SECONDS = 0.5
#: Where untrained models get a quick timing-only training, kept for the next run.
QUICK_MODEL_DIR = REPO_ROOT / "var" / "bench-models"
#: Training examples of a quick model (1 epoch): seconds, not minutes.
QUICK_EXAMPLES = 2000


def payloads(name: str, count: int) -> list[dict]:
    """Real test images as ``pixels`` grids at the model's own resolution (what a client may send)."""
    split = datasets.digits() if name == "digits" else datasets.fashion()
    images = split.x_test[:count, :, :, 0]
    return [{"pixels": [round(float(v), 3) for v in image.ravel()]} for image in images]


def model_dir_for(name: str, model_dir: Path) -> Path:
    """The trained model if there is one; otherwise a 1-epoch model on 2,000 examples, trained once
    into ``QUICK_MODEL_DIR`` and reused (speed does not depend on the weights)."""
    if artifacts.is_trained(model_dir, name):
        return model_dir
    if not artifacts.is_trained(QUICK_MODEL_DIR, name):
        progress(f"{name} is not trained in {model_dir}; training 1 epoch into {QUICK_MODEL_DIR} for timing only")
        import importlib

        importlib.import_module(f"ml.{name}").train(QUICK_MODEL_DIR, epochs=1, limit=QUICK_EXAMPLES)
    return QUICK_MODEL_DIR


def describe_model(name: str, model_dir: Path) -> str:
    """Which model a benchmark ran: where from, epochs, training examples, held-out accuracy."""
    card = artifacts.read_card(model_dir, name) or {}
    accuracy = card.get("metrics", {}).get("test_accuracy", float("nan"))
    return (f"{name}: {model_dir / (name + '.keras')}, {card.get('epochs', '?')} epoch(s) on "
            f"{card.get('train_examples', '?')} examples, held-out accuracy {accuracy:.2f}")


def drive(call, work: list[dict], clients: int, seconds: float) -> tuple[float, list[float]]:
    """``clients`` threads call ``call(payload)`` for ``seconds``; returns (requests/s, latencies in s)."""
    def make_request(index: int):
        position = iter(range(index, 1 << 62, clients))
        return lambda: call(work[next(position) % len(work)])

    rate, latencies, _ = drive_clients(clients, make_request, seconds, WARMUP_SECONDS)
    return rate, latencies


def raw_throughput(module, model, batch: np.ndarray, seconds: float) -> float:
    """Items/s of the compiled forward pass alone, on one pre-stacked batch."""
    module.predict(model, batch)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        module.predict(model, batch)
        count += len(batch)
    return count / (time.perf_counter() - began)


def pipeline_throughput(host, name: str, work: list[dict], seconds: float) -> float:
    """One thread: preprocess 64 requests, one forward pass, top-5 each (no threads, no waiting)."""
    from ml import classifier

    loaded = host.get(name)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        chunk = work[count % len(work):][:64] or work[:64]
        xs = np.stack([loaded.module.preprocess(p) for p in chunk])
        for row, x in zip(loaded.module.predict(loaded.model, xs), xs, strict=True):
            classifier.top(row, loaded.spec.labels)
            classifier.seen(x)
        count += len(chunk)
    return count / (time.perf_counter() - began)


def bench_model(name: str, model_dir: Path, seconds: float, window_ms: float, max_size: int) -> tuple[list, dict]:
    from ml.serving import ModelHost

    model_dir = model_dir_for(name, model_dir)
    work = payloads(name, 256)
    hosts = {"off": ModelHost(model_dir, batching=False),
             "on": ModelHost(model_dir, batch_max_size=max_size, batch_window_ms=window_ms)}
    rows, summary = [], {}
    rounds = [(c, mode) for c in CLIENTS for mode in ("off", "on")]
    for number, (clients, mode) in enumerate(rounds, start=1):
        host = hosts[mode]
        loaded = host.get(name)
        before = (loaded.batcher.stats.batches, loaded.batcher.stats.items) if loaded.batcher else (0, 0)
        rate, latencies = drive(lambda p, h=host: h.run(name, p), work, clients, seconds)
        mean_batch = 1.0
        if loaded.batcher:
            batches = loaded.batcher.stats.batches - before[0]
            mean_batch = (loaded.batcher.stats.items - before[1]) / max(batches, 1)
        p50, p95 = percentile(latencies, 50) * 1e3, percentile(latencies, 95) * 1e3
        rows.append([name, clients, mode, round(rate), p50, p95, mean_batch])
        summary[(clients, mode)] = rate
        progress(f"[{name} {number}/{len(rounds)}] {clients:>2} clients, batching {mode:<3}: "
                 f"{rate:8.0f} req/s  p50 {p50:6.2f} ms  p95 {p95:6.2f} ms  mean batch {mean_batch:5.1f}")
    loaded = hosts["off"].get(name)
    x = np.stack([loaded.module.preprocess(p) for p in work[:64]])
    for size in RAW_BATCHES:
        summary[("raw", size)] = raw_throughput(loaded.module, loaded.model, x[:size], seconds)
        progress(f"[{name} raw] batch {size:>2}: {summary[('raw', size)]:8.0f} items/s")
    summary["pipeline"] = pipeline_throughput(hosts["off"], name, work, seconds)
    progress(f"[{name} pipeline] one thread, batches of 64 with preprocessing: {summary['pipeline']:8.0f} items/s")
    for host in hosts.values():
        host.close()
    return rows, summary


def remote_call(app, name: str):
    """A client call: send run_model by name (as the web does) and wait for its result."""
    def call(payload: dict) -> dict:
        return app.send_task("jobs.tasks.run_model", args=[name, payload], queue="gpu").get(timeout=60)

    return call


def end_to_end(name: str, model_dir: Path, seconds: float) -> list:
    """Clients send ``run_model`` through etcd to a real worker and wait for each result."""
    import uuid

    from celery import Celery

    from benchmarks.common import start_worker, stop_worker
    from scripts.etcd_server import EtcdServer

    model_dir = model_dir_for(name, model_dir)
    work = payloads(name, 256)
    etcd, rows = EtcdServer().start(), []
    try:
        for mode in ("off", "on"):
            prefix = f"/bench-batching-{uuid.uuid4().hex[:6]}"
            env = {"ETCD_URL": etcd.url, "CELERY_BROKER_URL": etcd.url, "CELERY_RESULT_BACKEND": etcd.url,
                   "ETCD_PREFIX": prefix, "MODEL_DIR": str(model_dir), "BATCHING": "1" if mode == "on" else "0",
                   "TF_CPP_MIN_LOG_LEVEL": "2"}
            worker = start_worker("deephardway_site", env, concurrency=max(CLIENTS), queues="gpu")
            app = Celery("bench-client", broker=etcd.url, backend=etcd.url, set_as_current=False)
            app.conf.update(broker_transport_options={"prefix": prefix}, task_serializer="json",
                            result_backend_transport_options={"prefix": prefix}, accept_content=["json"])
            try:
                call = remote_call(app, name)
                call(work[0])  # the worker loads the model
                for clients in CLIENTS:
                    rate, latencies = drive(call, work, clients, seconds)
                    p50, p95 = percentile(latencies, 50) * 1e3, percentile(latencies, 95) * 1e3
                    rows.append([name, clients, mode, round(rate), p50, p95])
                    progress(f"[{name} end-to-end] {clients:>2} clients, batching {mode:<3}: {rate:8.0f} req/s  "
                             f"p50 {p50:6.2f} ms  p95 {p95:6.2f} ms")
            finally:
                app.close()
                stop_worker(worker)
    finally:
        etcd.cleanup()
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_batching", description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per round")
    parser.add_argument("--models", nargs="+", default=["digits", "fashion"], choices=["digits", "fashion"])
    parser.add_argument("--model-dir", type=Path, default=Path(os.environ.get("MODEL_DIR", REPO_ROOT / "var/models")))
    parser.add_argument("--window-ms", type=float, default=batching.DEFAULT_WINDOW_MS)
    parser.add_argument("--max-size", type=int, default=batching.DEFAULT_MAX_SIZE)
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false",
                        help="skip the runs through a real worker and etcd")
    args = parser.parse_args(argv)
    import tensorflow as tf

    progress(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, GPUs: {len(tf.config.list_physical_devices('GPU'))}; "
             f"batch window {args.window_ms} ms, max batch {args.max_size}; load average {os.getloadavg()[0]:.1f}")
    names = [n for n in args.models if n != "fashion" or datasets.fashion_available()[0]]
    results = {name: bench_model(name, args.model_dir, args.seconds, args.window_ms, args.max_size)
               for name in names}
    print_table("In-process classify through ModelHost.run: batching off vs on",
                ["model", "clients", "batching", "req/s", "p50 ms", "p95 ms", "mean batch"],
                [row for rows, _ in results.values() for row in rows])
    ceiling_rows = []
    for name, (_, s) in results.items():
        on, off, raw = s[(64, "on")], s[(64, "off")], s[("raw", 64)]
        ceiling_rows.append([name, round(s[("raw", 1)]), round(s[("raw", 8)]), round(raw), round(s["pipeline"]),
                             f"{on / off:.1f}x", f"{100 * on / raw:.0f}%", f"{100 * on / s['pipeline']:.0f}%"])
    print_table("Ceilings and the 64-client comparison",
                ["model", "raw b=1 items/s", "raw b=8", "raw b=64", "1 thread preprocess+b=64",
                 "on/off @64", "on / raw b=64", "on / 1-thread pipeline"], ceiling_rows)
    progress(f"load average now {os.getloadavg()[0]:.1f} (other processes share these cores)")
    if args.end_to_end:
        rows = [row for name in names for row in end_to_end(name, args.model_dir, args.seconds)]
        print_table("End-to-end: run_model through etcd and a real worker (-P threads -c 64)",
                    ["model", "clients", "batching", "req/s", "p50 ms", "p95 ms"], rows)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
