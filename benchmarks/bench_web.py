"""The web tier under gunicorn: submit throughput and latency, and open event streams held at once.

    python -m benchmarks.bench_web [--seconds 5] [--clients 1 8 32] [--streams 100 300]
                                   [--threads 200] [--workers 2]

Starts its own etcd and a fresh SQLite database, then gunicorn twice, side by side in one
run: ``--worker-class sync`` (gunicorn's default) and ``--worker-class gthread --threads N``
(what docs/api.md recommends). No Celery worker runs, so every submitted job stays queued
and every event stream stays open, waiting.

* submit: N client threads, each on its own keep-alive connection (stdlib http.client), POST
  /api/jobs with distinct prompts (each a new anonymous owner, so no dedup, no cap); requests/s,
  p50 and p99 latency, non-202 answers.
* streams: M GET /api/jobs/<id>/events (a staff API token) opened at once; counted as held when its
  first event arrived within STREAM_OPEN_TIMEOUT and the socket is still open HOLD_SECONDS later.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from benchmarks.common import REPO_ROOT, drive_clients, percentile, print_table, progress
from scripts.etcd_server import EtcdServer, free_port

CLIENTS = (1, 8, 32)
STREAMS = (100, 300)
#: Seconds of unmeasured submits before each round (connections, first queries).
WARMUP_SECONDS = 1.0
#: Seconds a stream gets to deliver its first event before it counts as not served.
STREAM_OPEN_TIMEOUT = 15.0
#: Seconds every opened stream must stay open to count as held.
HOLD_SECONDS = 5.0
#: Pause between stream rounds: a server thread notices its client left at its next write
#: (a heartbeat, JOBS_SSE_HEARTBEAT_SECONDS apart), then is free again.
REAP_SECONDS = 17.0
#: Jobs the streams are spread over (each stream is its own watch, whatever the job).
STREAM_JOBS = 10
#: Client thread stack size: hundreds of stream threads need little stack each.
CLIENT_STACK_BYTES = 256 * 1024


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    log_path: str

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def site_env(etcd: EtcdServer, workdir: str) -> dict[str, str]:
    return {
        **os.environ, "PYTHONUNBUFFERED": "1", "DJANGO_SETTINGS_MODULE": "deephardway_site.settings",
        "ETCD_URL": etcd.url, "CELERY_BROKER_URL": etcd.url, "CELERY_RESULT_BACKEND": etcd.url,
        "ETCD_PREFIX": f"/{os.path.basename(workdir)}", "VAR_DIR": workdir,
        "DATABASE_URL": f"sqlite:///{workdir}/bench.sqlite3", "MEDIA_ROOT": f"{workdir}/media",
        "JOBS_MAX_QUEUED_PER_OWNER": "1000000", "JOBS_MAX_QUEUED_PER_ADDRESS": "1000000",
        "LOG_LEVEL": "WARNING", "DEBUG": "1",
    }


def start_gunicorn(name: str, env: dict[str, str], args: list[str], workdir: str) -> Server:
    port = free_port()
    log_path = os.path.join(workdir, f"gunicorn-{name}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "deephardway_site.wsgi", "--bind", f"127.0.0.1:{port}",
             "--backlog", "2048", *args], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/api/models")
            if conn.getresponse().status == 200:
                return Server(name, process, port, log_path)
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"gunicorn {name} did not answer: {open(log_path).read()[-2000:]}")


def submit_once(conn: http.client.HTTPConnection, prompt: str, cookie: str = "") -> tuple[int, dict, str]:
    body = json.dumps({"model": "text", "input": {"prompt": prompt, "length": 50}})
    headers = {"Content-Type": "application/json"}
    if cookie:
        headers["Cookie"] = cookie
    conn.request("POST", "/api/jobs", body, headers)
    response = conn.getresponse()
    data = json.loads(response.read() or b"{}")
    return response.status, data, response.getheader("Set-Cookie") or ""


def submit_round(port: int, clients: int, seconds: float) -> dict:
    """``clients`` threads POST for ``seconds`` (after a warm-up); returns rate, latencies, failures."""
    def make_request(index: int):
        state = {"conn": http.client.HTTPConnection("127.0.0.1", port, timeout=60), "count": 0}

        def request() -> int:
            state["count"] += 1
            try:
                status, _, _ = submit_once(state["conn"], f"bench {index} {state['count']} {time.time_ns()}")
            except (OSError, http.client.HTTPException):
                state["conn"].close()
                state["conn"], status = http.client.HTTPConnection("127.0.0.1", port, timeout=60), 0
            return status
        return request

    rate, flat, statuses = drive_clients(clients, make_request, seconds, WARMUP_SECONDS)
    return {"rate": rate, "p50": percentile(flat, 50) * 1000, "p99": percentile(flat, 99) * 1000,
            "count": len(flat), "failures": sum(status != 202 for status in statuses)}


def stream_jobs(port: int) -> list[str]:
    """STREAM_JOBS fresh jobs to stream (they stay queued: no worker runs); their events URLs."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    urls = []
    for i in range(STREAM_JOBS):
        status, data, _ = submit_once(conn, f"stream job {i} {time.time_ns()}")
        if status != 202:
            raise SystemExit(f"could not submit: {status} {data}")
        urls.append(data["events_url"])
    conn.close()
    return urls


def staff_token(env: dict[str, str]) -> str:
    """An API token of a staff user (staff may stream any job)."""
    code = ("from django.contrib.auth import get_user_model; from jobs.models import ApiToken; "
            "user = get_user_model().objects.create_user('bench', is_staff=True); "
            "print(ApiToken.issue(user, 'bench')[1])")
    result = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, check=True)
    return result.stdout.strip().splitlines()[-1]


def open_stream(port: int, url: str, token: str, first_event: threading.Event) -> socket.socket | None:
    """A raw socket with the GET sent; sets ``first_event`` when the first SSE event arrives."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=STREAM_OPEN_TIMEOUT)
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    received = b""
    try:
        while b"event:" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                sock.close()
                return None
            received += chunk
    except OSError:
        sock.close()
        return None
    first_event.set()
    return sock


def still_open(sock: socket.socket) -> bool:
    """True if the server has not closed the stream (reads whatever it sent meanwhile)."""
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False


def stream_round(port: int, streams: int, token: str) -> dict:
    """Open ``streams`` event streams at once; count how many deliver and stay open."""
    urls = stream_jobs(port)
    sockets: list[socket.socket | None] = [None] * streams
    firsts = [threading.Event() for _ in range(streams)]

    def opener(index: int) -> None:
        try:
            sockets[index] = open_stream(port, urls[index % len(urls)], token, firsts[index])
        except OSError:
            sockets[index] = None

    threading.stack_size(CLIENT_STACK_BYTES)
    began = time.perf_counter()
    threads = [threading.Thread(target=opener, args=(i,), daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=STREAM_OPEN_TIMEOUT + 5)
    threading.stack_size(0)
    served = sum(event.is_set() for event in firsts)
    open_seconds = time.perf_counter() - began
    time.sleep(HOLD_SECONDS)
    held = sum(1 for sock in sockets if sock is not None and still_open(sock))
    for sock in sockets:
        if sock is not None:
            sock.close()
    return {"served": served, "held": held, "seconds": open_seconds}


def run_server(name: str, args: list[str], env: dict[str, str], workdir: str, clients: list[int],
               streams: list[int], seconds: float, token: str) -> tuple[list[list], list[list]]:
    progress(f"starting gunicorn {name}: {' '.join(args)}")
    server = start_gunicorn(name, env, args, workdir)
    submit_rows, stream_rows = [], []
    try:
        for count in clients:
            progress(f"{name}: {count} client(s) submitting for {seconds:.0f} s")
            result = submit_round(server.port, count, seconds)
            submit_rows.append([name, count, result["count"], result["rate"], result["p50"], result["p99"],
                                result["failures"]])
            progress(f"{name}: {count} client(s): {result['rate']:.1f} submits/s, p99 {result['p99']:.1f} ms")
        for index, count in enumerate(streams):
            if index:
                progress(f"{name}: waiting {REAP_SECONDS:.0f} s for the server to notice the closed streams")
                time.sleep(REAP_SECONDS)
            progress(f"{name}: opening {count} event streams at once")
            result = stream_round(server.port, count, token)
            stream_rows.append([name, count, result["served"], result["held"], result["seconds"]])
            progress(f"{name}: {result['held']} of {count} streams held open")
    finally:
        server.stop()
    return submit_rows, stream_rows


def fresh_site(etcd: EtcdServer, name: str) -> tuple[dict[str, str], str, str]:
    """A new database and etcd prefix for one server (so each starts from the same state)."""
    workdir = tempfile.mkdtemp(prefix=f"bench-web-{name}-")
    env = site_env(etcd, workdir)
    progress(f"{name}: migrating a fresh SQLite database")
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=REPO_ROOT, env=env, check=True)
    return env, workdir, staff_token(env)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_web", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per submit round")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--streams", type=int, nargs="+", default=list(STREAMS))
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=200, help="threads per gthread worker")
    options = parser.parse_args(argv)

    etcd_dir = tempfile.mkdtemp(prefix="bench-web-etcd-")
    etcd = EtcdServer(data_dir=etcd_dir).start()
    configs = [("sync", ["--worker-class", "sync", "--workers", str(options.workers)]),
               ("gthread", ["--worker-class", "gthread", "--workers", str(options.workers),
                            "--threads", str(options.threads), "--timeout", "0"])]
    submit_rows, stream_rows = [], []
    try:
        for name, args in configs:
            env, workdir, token = fresh_site(etcd, name)
            try:
                rows = run_server(name, args, env, workdir, options.clients, options.streams, options.seconds, token)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            submit_rows += rows[0]
            stream_rows += rows[1]
    finally:
        etcd.stop()
        shutil.rmtree(etcd_dir, ignore_errors=True)
    print_table(f"Submit (POST /api/jobs, {options.workers} gunicorn workers, SQLite, one etcd, no model worker)",
                ["server", "clients", "requests", "submits/s", "p50 ms", "p99 ms", "non-202"], submit_rows)
    print()
    print_table(f"Event streams opened at once (held = first event within {STREAM_OPEN_TIMEOUT:.0f} s and "
                f"still open {HOLD_SECONDS:.0f} s later)",
                ["server", "streams opened", "first event", "held open", "seconds to open"], stream_rows)


if __name__ == "__main__":
    main(sys.argv[1:])
