"""Shared benchmark plumbing: a redis-server on a free port, worker processes, percentiles, tables."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from scripts.etcd_server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


class RedisServer:
    """A throw-away redis-server (no persistence) on a free loopback port."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found: apt-get install redis-server (make bench does this as root)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="deephardway-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_worker(app: str, env: dict[str, str], concurrency: int = 8, queues: str = "celery",
                 log_path: str | None = None) -> subprocess.Popen:
    """A ``celery worker -P threads`` process; returns once it logs ``ready``."""
    log_path = log_path or tempfile.mktemp(prefix="bench-worker-", suffix=".log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", "-l", "INFO", "-P", "threads",
             "-c", str(concurrency), "-Q", queues, "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"bench-{os.getpid()}-{time.time_ns()}@%h"],
            cwd=REPO_ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if " ready." in Path(log_path).read_text(errors="replace"):
            return process
        if process.poll() is not None:
            raise SystemExit(f"worker exited: {Path(log_path).read_text()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit(f"worker not ready: {Path(log_path).read_text()[-2000:]}")


def stop_worker(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def print_table(title: str, headers: list[str], rows: list[list]) -> str:
    """Print (and return) a Markdown table."""
    lines = [f"### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(f"{cell:.2f}" if isinstance(cell, float) else str(cell) for cell in row) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def drive_clients(clients: int, make_request: Callable[[int], Callable[[], object]], seconds: float,
                  warmup: float) -> tuple[float, list[float], list[object]]:
    """``clients`` threads each call ``make_request(index)()`` in a loop; after ``warmup`` seconds,
    ``seconds`` are measured. Returns (requests/s, latencies in s, what the measured calls returned)."""
    stop, measuring = threading.Event(), threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    outcomes: list[list[object]] = [[] for _ in range(clients)]

    def client(index: int) -> None:
        request = make_request(index)
        while not stop.is_set():
            started = time.perf_counter()
            outcome = request()
            if measuring.is_set():
                latencies[index].append(time.perf_counter() - started)
                outcomes[index].append(outcome)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(warmup)
    measuring.set()
    began = time.perf_counter()
    time.sleep(seconds)
    measuring.clear()
    elapsed = time.perf_counter() - began
    stop.set()
    for thread in threads:
        thread.join(timeout=70)
    flat = [value for part in latencies for value in part]
    return len(flat) / elapsed, flat, [value for part in outcomes for value in part]
