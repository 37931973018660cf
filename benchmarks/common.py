"""Shared benchmark plumbing: redis-server and RabbitMQ nodes on free ports, worker processes,
CPU and etcd counters, percentiles, tables."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from scripts.etcd_server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Debian's rabbitmq-server start script (run directly: /usr/sbin's wrapper switches to the rabbitmq user).
RABBITMQ_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
#: Seconds a fresh RabbitMQ node gets to accept AMQP connections (Erlang boots slowly on a busy machine).
RABBITMQ_START_TIMEOUT = 120.0


class RedisServer:
    """A throw-away redis-server on a free loopback port: no persistence, or with ``durable=True``
    an append-only file fsynced before every write is acknowledged (``appendfsync always``)."""

    def __init__(self, durable: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found: apt-get install redis-server (make bench does this as root)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="deephardway-redis-")
        self._counter = None
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
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

    def commands(self) -> int:
        """Commands this server has processed so far (``INFO stats``; each INFO counts one, on a
        connection kept for counting so that connecting adds nothing between two readings)."""
        import redis

        if self._counter is None:
            self._counter = redis.Redis(port=self.port)
        return int(self._counter.info("stats")["total_commands_processed"])

    def stop(self) -> None:
        if self._counter is not None:
            self._counter.close()
        self.process.terminate()
        self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitMQServer:
    """A throw-away RabbitMQ node run as the current user: no system service, its own node name,
    AMQP, distribution and epmd ports on loopback, and every file (mnesia, logs, cookie) under
    one temporary directory. Default broker settings otherwise."""

    def __init__(self) -> None:
        if not os.access(RABBITMQ_SCRIPT, os.X_OK):
            raise SystemExit(f"{RABBITMQ_SCRIPT} not found: apt-get install rabbitmq-server "
                             "(scripts/system-deps.sh bench does this as root)")
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.dir = tempfile.mkdtemp(prefix="deephardway-rabbitmq-")
        self.log_path = os.path.join(self.dir, "server.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([RABBITMQ_SCRIPT], cwd=self.dir, env=self.env(), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def env(self) -> dict[str, str]:
        base = self.dir
        return {**os.environ, "HOME": base, "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_CRASH_DUMP": f"{base}/erl_crash.dump",
                "RABBITMQ_NODENAME": f"bench{os.getpid()}@localhost", "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONF_ENV_FILE": f"{base}/rabbitmq-env.conf", "RABBITMQ_CONFIG_FILE": f"{base}/rabbitmq",
                "RABBITMQ_ADVANCED_CONFIG_FILE": f"{base}/advanced.config",
                "RABBITMQ_ENABLED_PLUGINS_FILE": f"{base}/enabled_plugins",
                "RABBITMQ_PLUGINS_EXPAND_DIR": f"{base}/plugins-expand", "RABBITMQ_MNESIA_BASE": f"{base}/mnesia",
                "RABBITMQ_LOG_BASE": f"{base}/log", "RABBITMQ_PID_FILE": f"{base}/rabbitmq.pid"}

    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def wait_ready(self) -> None:
        from kombu import Connection

        deadline = time.monotonic() + RABBITMQ_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"rabbitmq-server exited: {Path(self.log_path).read_text()[-2000:]}")
            try:
                with Connection(self.url(), connect_timeout=1) as connection:
                    connection.connect()
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"rabbitmq-server not ready in {RABBITMQ_START_TIMEOUT:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        stop_group(self.process, timeout=60)
        epmd = shutil.which("epmd")
        if epmd:  # the node started its own epmd on our port; it outlives the node otherwise
            subprocess.run([epmd, "-kill"], env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_worker(app: str, env: dict[str, str], concurrency: int = 8, queues: str = "celery",
                 log_path: str | None = None, module: str = "celery") -> subprocess.Popen:
    """A ``celery worker -P threads`` process; returns once it logs ``ready``. ``module`` is the
    ``python -m`` entry point (a wrapper that instruments the worker before Celery's main)."""
    log_path = log_path or tempfile.mktemp(prefix="bench-worker-", suffix=".log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "-A", app, "worker", "-l", "INFO", "-P", "threads",
             "-c", str(concurrency), "-Q", queues, "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-n", f"bench-{os.getpid()}-{time.time_ns()}@%h"],
            cwd=REPO_ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return wait_worker_ready(process, log_path)


def wait_worker_ready(process: subprocess.Popen, log_path: str, timeout: float = 60) -> subprocess.Popen:
    """``process`` once its log at ``log_path`` says ``ready``; exits the benchmark if it dies or is late."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if " ready." in Path(log_path).read_text(errors="replace"):
            return process
        if process.poll() is not None:
            raise SystemExit(f"worker exited: {Path(log_path).read_text()[-2000:]}")
        time.sleep(0.1)
    raise SystemExit(f"worker not ready: {Path(log_path).read_text()[-2000:]}")


def stop_group(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group ``process`` leads (started with ``start_new_session``); SIGKILL after
    ``timeout`` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def stop_worker(process: subprocess.Popen) -> None:
    stop_group(process)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def session_cpu(session: int) -> float:
    """CPU seconds used by the live processes of session ``session`` (a server and its helpers)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[3]) == session:
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def etcd_counters(client_url: str) -> dict[str, float]:
    """etcd's own request counters from ``/metrics``: ``proposals`` (raft proposals committed),
    ``wal_fsyncs`` and ``wal_fsync_ms`` (write-ahead log fsyncs and the time they took),
    ``mvcc_range/put/delete/txn`` (operations, those inside transactions included), ``rpc_<Method>``
    (gRPC messages received: one per unary request, one per stream message) and ``sent_Watch``
    (watch responses sent)."""
    body = urllib.request.urlopen(f"{client_url}/metrics", timeout=5).read().decode()
    counters: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        if name == "etcd_server_proposals_committed_total":
            counters["proposals"] = float(value)
        elif name == "etcd_disk_wal_fsync_duration_seconds_count":
            counters["wal_fsyncs"] = float(value)
        elif name == "etcd_disk_wal_fsync_duration_seconds_sum":
            counters["wal_fsync_ms"] = 1000 * float(value)
        elif name.startswith("etcd_mvcc_") and name.endswith("_total") and not labels:
            counters[name[len("etcd_"):-len("_total")]] = float(value)
        elif name in ("grpc_server_msg_received_total", "grpc_server_msg_sent_total") and float(value):
            method = labels.split('grpc_method="', 1)[1].split('"', 1)[0]
            if name.endswith("received_total"):
                counters[f"rpc_{method}"] = counters.get(f"rpc_{method}", 0.0) + float(value)
            elif method == "Watch":
                counters["sent_Watch"] = counters.get("sent_Watch", 0.0) + float(value)
    return counters


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
                  warmup: float, on_window: Callable[[bool], None] | None = None,
                  ) -> tuple[float, list[float], list[object]]:
    """``clients`` threads each call ``make_request(index)()`` in a loop; after ``warmup`` seconds,
    ``seconds`` are measured. ``on_window(True)`` runs as the measured window opens and
    ``on_window(False)`` as it closes (to read counters around it).
    Returns (requests/s, latencies in s, what the measured calls returned)."""
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
    if on_window:
        on_window(True)
    measuring.set()
    began = time.perf_counter()
    time.sleep(seconds)
    measuring.clear()
    elapsed = time.perf_counter() - began
    if on_window:
        on_window(False)
    stop.set()
    for thread in threads:
        thread.join(timeout=70)
    flat = [value for part in latencies for value in part]
    return len(flat) / elapsed, flat, [value for part in outcomes for value in part]
