"""The site flooded: many clients submit as fast as the caps allow, cancel to make room, hold event
streams, while a probe asks GET /healthz every 100 ms. Real gunicorn (gthread), real etcd, and a
real PostgreSQL (tests/postgres.py), so the caps' per-owner advisory locks are what is exercised.

Claims (what a user or an operator would notice): the health check always answers 200 (within a
generous liveness bound, not a speed claim), no request gets a 5xx or a broken connection, no
owner ever has more than JOBS_MAX_QUEUED_PER_OWNER jobs waiting nor one address more than
JOBS_MAX_QUEUED_PER_ADDRESS anonymous ones, every 202 is exactly one Job row and one task in
etcd, and GET /metrics (both gunicorn workers adding up through PROMETHEUS_MULTIPROC_DIR) says so. The summary table (shown without ``-s``) is recorded in docs/reliability.md.

``FLOOD_DATABASE_URL=sqlite`` runs it on a fresh SQLite file instead (the write lock taken at BEGIN is
then what holds the caps); ``FLOOD_DATABASE_URL=postgres://...`` on a fresh, empty database of yours.
"""
from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import pytest

from benchmarks.bench_web import Server, open_stream, site_env, start_gunicorn, still_open
from benchmarks.common import percentile
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.stats import queue_stats
from tests import postgres
from tests.helpers import REPO_ROOT
from tests.site.test_metrics import Samples, parse, value

logger = logging.getLogger(__name__)

ANONYMOUS_CLIENTS = 20
TOKEN_CLIENTS = 12
#: Owners that fire from several threads at once (a script in parallel): the cap's race.
PARALLEL_OWNERS, THREADS_PER_PARALLEL_OWNER = 2, 4
STREAMS = 8
FLOOD_SECONDS = 10.0
HEALTH_INTERVAL = 0.1
#: Liveness bound for one health check (seconds): generous on a loaded 2-core machine; not a speed claim.
HEALTH_DEADLINE = 5.0
#: GET /metrics after the flood, each on a new connection (so either gunicorn worker may answer).
METRICS_SCRAPES = 4
#: Client socket timeout: a request that hangs this long counts as a broken answer.
REQUEST_TIMEOUT = 30.0
OWNER_CAP, ADDRESS_CAP = 5, 20
#: The end of a chunked response: an event stream that ended (keep-alive leaves the socket open).
LAST_CHUNK = b"\r\n0\r\n\r\n"
#: Environment variable: ``sqlite`` (a new SQLite file) or the URL of a fresh, empty database to flood
#: instead of a new database on the tests' PostgreSQL.
DATABASE_VARIABLE = "FLOOD_DATABASE_URL"
#: As docs/api.md recommends; a short graceful timeout, since a stream whose client left holds its
#: thread until the next heartbeat (15 s) and the test need not wait for that at shutdown.
GUNICORN_ARGS = ["--worker-class", "gthread", "--workers", "2", "--threads", "64", "--timeout", "0",
                 "--graceful-timeout", "2"]


@dataclass
class Site:
    server: Server
    env: dict[str, str]
    database: str
    prefix: str
    etcd_url: str
    tokens: list[str]

    @property
    def port(self) -> int:
        return self.server.port


@dataclass
class Tally:
    """Everything the clients saw, counted under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    submits: Counter = field(default_factory=Counter)
    cancels: Counter = field(default_factory=Counter)
    refusals: Counter = field(default_factory=Counter)
    broken: Counter = field(default_factory=Counter)
    crashed: Counter = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    streams: Counter = field(default_factory=Counter)
    health: list[tuple[int, float]] = field(default_factory=list)

    def add(self, counter: str, key) -> None:
        with self.lock:
            getattr(self, counter)[key] += 1


def make_tokens(env: dict[str, str], count: int) -> list[str]:
    """``count`` users with an API token each, made through the ORM in one manage.py shell."""
    code = ("import json; from django.contrib.auth import get_user_model; from jobs.models import ApiToken; "
            f"users = [get_user_model().objects.create_user(f'flood-{{i}}') for i in range({count})]; "
            "print(json.dumps([ApiToken.issue(u, 'flood')[1] for u in users]))")
    result = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def site(etcd_server, etcd_prefix, tmp_path):
    """A fresh database and the site under gunicorn gthread, with the default caps."""
    workdir = str(tmp_path)
    database = os.environ.get(DATABASE_VARIABLE) or postgres.fresh_database("flood")
    if database == "sqlite":
        database = f"sqlite:///{workdir}/flood.sqlite3"
    env = {**site_env(etcd_server, workdir), "ETCD_PREFIX": etcd_prefix, "DATABASE_URL": database,
           "JOBS_MAX_QUEUED_PER_OWNER": str(OWNER_CAP), "JOBS_MAX_QUEUED_PER_ADDRESS": str(ADDRESS_CAP)}
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")  # every gunicorn worker's samples
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"])
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=REPO_ROOT, env=env, check=True)
    tokens = make_tokens(env, TOKEN_CLIENTS + PARALLEL_OWNERS)
    server = start_gunicorn("flood", env, GUNICORN_ARGS, workdir)
    try:
        yield Site(server, env, database, etcd_prefix, etcd_server.url, tokens)
    finally:
        server.stop()


class Caller:
    """One owner's HTTP identity on one keep-alive connection: an API token, or an anonymous
    browser session (csrftoken from a page, sessionid from the first POST, X-CSRFToken after)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port, self.token = port, token
        self.cookies: dict[str, str] = {}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        if token is None:
            self.request("GET", "/")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            headers["X-CSRFToken"] = self.cookies.get("csrftoken", "")
        try:
            self.conn.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            raise
        self._keep_cookies(response.headers.get_all("Set-Cookie") or [])
        data = json.loads(raw) if response.getheader("Content-Type") == "application/json" else {}
        return response.status, data

    def _keep_cookies(self, headers: list[str]) -> None:
        for header in headers:
            name, _, value = header.split(";", 1)[0].partition("=")
            self.cookies[name.strip()] = value.strip()


class Owner:
    """The jobs one owner has waiting (shared by that owner's threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: list[str] = []

    def add(self, job_id: str) -> None:
        with self.lock:
            self.waiting.append(job_id)

    def take_oldest(self) -> str | None:
        with self.lock:
            return self.waiting.pop(0) if self.waiting else None

    def newest(self) -> str | None:
        with self.lock:
            return self.waiting[-1] if self.waiting else None


def submitter(caller: Caller, owner: Owner, name: str, tally: Tally, stop: threading.Event) -> None:
    """Submit distinct jobs as fast as allowed; on 429, cancel the oldest waiting job to make room."""
    for count in itertools.count():
        if stop.is_set():
            return
        try:
            status, body = caller.request("POST", "/api/jobs", {
                "model": "text", "input": {"prompt": f"flood {name} {count}", "length": 20}})
            tally.add("submits", status)
            if status == 202:
                owner.add(body["id"])
                with tally.lock:
                    tally.accepted.append(body["id"])
            elif status == 429:
                tally.add("refusals", "address" if "address" in body.get("error", "") else "owner")
                cancel_oldest(caller, owner, tally)
        except (OSError, http.client.HTTPException) as exc:
            tally.add("broken", type(exc).__name__)


def cancel_oldest(caller: Caller, owner: Owner, tally: Tally) -> None:
    job_id = owner.take_oldest()
    if job_id is not None:
        tally.add("cancels", caller.request("DELETE", f"/api/jobs/{job_id}")[0])


def streamer(port: int, token: str, owner: Owner, tally: Tally, stop: threading.Event) -> None:
    """Hold an event stream on the owner's newest job; when it ends (the job was cancelled), open another."""
    while not stop.is_set():
        job_id = owner.newest()
        if job_id is None:
            time.sleep(0.05)
            continue
        tally.add("streams", "opened")
        first = threading.Event()
        try:
            sock = open_stream(port, f"/api/jobs/{job_id}/events", token, first)
        except OSError:
            sock = None
        tally.add("streams", "first event" if first.is_set() else "no first event")
        if sock is not None:
            hold(sock, tally, stop)


def hold(sock: socket.socket, tally: Tally, stop: threading.Event) -> None:
    """Read until the stream ends (its last chunk, or the server closing) or the flood stops."""
    sock.settimeout(0.5)
    tail = b""
    try:
        while not stop.is_set():
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            tail = (tail + chunk)[-16:]
            if not chunk or tail.endswith(LAST_CHUNK):
                tally.add("streams", "ended at the job's final state")
                return
        tally.add("streams", "open at the end" if still_open(sock) else "closed at the end")
    except OSError:
        tally.add("streams", "broken")
    finally:
        sock.close()


def health_probe(port: int, tally: Tally, stop: threading.Event) -> None:
    """GET /healthz every HEALTH_INTERVAL on a fresh connection; (status, seconds), 0 = no answer."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HEALTH_DEADLINE)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
        except (OSError, http.client.HTTPException):
            status = 0
        elapsed = time.perf_counter() - started
        with tally.lock:
            tally.health.append((status, elapsed))
        stop.wait(max(0.0, HEALTH_INTERVAL - elapsed))


def start_threads(site: Site, tally: Tally, stop: threading.Event) -> list[threading.Thread]:
    threads = []

    def spawn(target, *args) -> None:
        def run() -> None:
            try:
                target(*args, tally, stop)
            except Exception as exc:  # noqa: BLE001 - a crashed client thread fails the test
                tally.add("crashed", f"{target.__name__}: {exc!r}")

        threads.append(threading.Thread(target=run, name=target.__name__, daemon=True))

    for index in range(ANONYMOUS_CLIENTS):
        spawn(submitter, Caller(site.port), Owner(), f"anon{index}")
    owners = [Owner() for _ in site.tokens]
    for index, (token, owner) in enumerate(zip(site.tokens, owners, strict=True)):
        threads_for_owner = THREADS_PER_PARALLEL_OWNER if index >= TOKEN_CLIENTS else 1
        for thread in range(threads_for_owner):
            spawn(submitter, Caller(site.port, token), owner, f"user{index}t{thread}")
    for token, owner in list(zip(site.tokens, owners, strict=True))[:STREAMS]:
        spawn(streamer, site.port, token, owner)
    spawn(health_probe, site.port)
    for thread in threads:
        thread.start()
    return threads


def read_jobs(database: str) -> list[tuple[str, str, str | None, datetime, datetime | None]]:
    """(id, owner_key, client_address, created_at, cancel_requested_at) of every job, read straight
    from the site's database (SQLite file, or PostgreSQL)."""
    query = "SELECT id, owner_key, client_address, created_at, cancel_requested_at FROM jobs_job"
    if database.startswith("sqlite:///"):
        with sqlite3.connect(f"file:{database[len('sqlite:///'):]}?mode=ro", uri=True) as db:
            rows = db.execute(query).fetchall()
    else:
        import psycopg

        with psycopg.connect(database) as db:
            rows = db.execute(query).fetchall()
    return [(str(uuid.UUID(str(job_id))), owner, str(address) if address else None, _when(created),
             _when(cancelled)) for job_id, owner, address, created, cancelled in rows]


def _when(value: str | datetime | None) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def most_waiting(jobs: list[tuple], group) -> tuple[int, str]:
    """The most jobs that waited at once in any one group (replayed from created/cancel times)."""
    events: dict[str, list[tuple[datetime, int]]] = defaultdict(list)
    for job in jobs:
        key = group(job)
        if key is None:
            continue
        events[key].append((job[3], 1))
        if job[4] is not None:
            events[key].append((job[4], -1))
    best = (0, "-")
    for key, changes in events.items():
        waiting = 0
        for _, change in sorted(changes, key=lambda item: (item[0], item[1])):  # a cancel first on a tie
            waiting += change
            best = max(best, (waiting, key))
    return best


def gpu_messages(site: Site) -> int:
    rows = queue_stats(get_client(site.etcd_url), KeySpace(site.prefix))
    return sum(row["ready"] + row["unacked"] for row in rows if row["queue"] == "gpu")


def scrape_metrics(site: Site) -> Samples:
    """GET /metrics on a fresh connection (any gunicorn worker may answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=REQUEST_TIMEOUT)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    assert response.status == 200, body
    return parse(body)


def metric_writers(site: Site) -> set[int]:
    """Pids of the processes that recorded a counter in the multiprocess directory."""
    files = os.listdir(site.env["PROMETHEUS_MULTIPROC_DIR"])
    return {int(name[len("counter_"):-len(".db")]) for name in files if name.startswith("counter_")}


def summary_table(tally: Tally, jobs: list, owner_peak: tuple, address_peak: tuple, messages: int) -> str:
    statuses = [status for status, _ in tally.health]
    seconds = [elapsed for _, elapsed in tally.health]
    clients = ANONYMOUS_CLIENTS + TOKEN_CLIENTS + PARALLEL_OWNERS * THREADS_PER_PARALLEL_OWNER
    rows = [
        ("client threads (owners)", f"{clients} ({ANONYMOUS_CLIENTS + TOKEN_CLIENTS + PARALLEL_OWNERS}), "
                                    f"{STREAMS} event streams, {FLOOD_SECONDS:.0f} s"),
        ("submits", sum(tally.submits.values())),
        ("answers", ", ".join(f"{status}: {n}" for status, n in sorted(tally.submits.items()))),
        ("429 by reason", ", ".join(f"{reason} cap: {n}" for reason, n in sorted(tally.refusals.items())) or "-"),
        ("5xx answers", sum(n for status, n in tally.submits.items() if status >= 500)
         + sum(n for status, n in tally.cancels.items() if status >= 500)),
        ("broken connections", sum(tally.broken.values())),
        ("cancels (to make room)", ", ".join(f"{status}: {n}" for status, n in sorted(tally.cancels.items())) or "-"),
        ("Job rows / tasks in etcd / 202s", f"{len(jobs)} / {messages} / {len(tally.accepted)}"),
        ("health checks 200 / total", f"{statuses.count(200)} / {len(statuses)}"),
        ("health p50 / max ms", f"{percentile(seconds, 50) * 1000:.0f} / {max(seconds, default=0) * 1000:.0f}"),
        ("most waiting for one owner (cap)", f"{owner_peak[0]} ({OWNER_CAP})"),
        ("most anonymous waiting from one address (cap)", f"{address_peak[0]} ({ADDRESS_CAP})"),
        ("streams", ", ".join(f"{kind}: {n}" for kind, n in sorted(tally.streams.items()))),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


@pytest.mark.reliability
def test_a_flooded_site_keeps_answering_health_checks_and_holds_every_cap(site, capsys):
    tally, stop = Tally(), threading.Event()
    threads = start_threads(site, tally, stop)
    time.sleep(FLOOD_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(timeout=REQUEST_TIMEOUT + 5)
    assert not [thread.name for thread in threads if thread.is_alive()], "a client thread hung"

    jobs = read_jobs(site.database)
    owner_peak = most_waiting(jobs, lambda job: job[1])
    address_peak = most_waiting(jobs, lambda job: job[2] if job[1].startswith("session:") else None)
    messages = gpu_messages(site)
    scrapes = [scrape_metrics(site) for _ in range(METRICS_SCRAPES)]
    with capsys.disabled():
        print(f"\n\nsite flood ({os.cpu_count()} CPUs, {site.database.split(':', 1)[0]})\n{summary_table(tally, jobs, owner_peak, address_peak, messages)}\n",
              flush=True)

    assert not tally.crashed, tally.crashed
    assert tally.submits[202] > 0 and tally.submits[429] > 0, tally.submits  # the flood reached the caps
    assert not [s for s in itertools.chain(tally.submits, tally.cancels) if s >= 500 or s == 0], tally.submits
    assert not tally.broken, tally.broken
    assert set(tally.cancels) <= {202}, tally.cancels
    assert all(status == 200 and elapsed <= HEALTH_DEADLINE for status, elapsed in tally.health), \
        [sample for sample in tally.health if sample[0] != 200 or sample[1] > HEALTH_DEADLINE]
    assert len(tally.health) > FLOOD_SECONDS  # the probe kept asking throughout
    assert owner_peak[0] <= OWNER_CAP, owner_peak
    assert address_peak[0] <= ADDRESS_CAP, address_peak
    assert sorted(tally.accepted) == sorted(job[0] for job in jobs)  # each 202 is one row, no row without one
    assert messages == len(jobs)  # and one task waiting in etcd per row (no worker runs)
    assert tally.streams["opened"] == tally.streams["first event"] > 0, tally.streams
    assert len(metric_writers(site)) >= 2, metric_writers(site)  # both gunicorn workers created jobs
    for samples in scrapes:  # whichever worker answered, it added up every worker's counts
        assert value(samples, "deephardway_jobs_submitted_total", model="text", queue="gpu") == len(jobs)
        assert value(samples, "deephardway_jobs", queue="gpu", model="text", state="queued") == len(jobs)
        assert sum(value(samples, "deephardway_queue_ready_messages", queue="gpu", priority=str(priority))
                   for priority in range(10)) == messages
