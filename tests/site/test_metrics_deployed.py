"""Metrics in the production shape, each role its own process as docs/deploy.md runs them:
gunicorn (two workers, PROMETHEUS_MULTIPROC_DIR), ``manage.py watch_jobs`` (METRICS_PORT), a
model worker (WORKER_METRICS_PORT), a fresh PostgreSQL database and etcd. Jobs are submitted
over HTTP; all three /metrics pages are scraped while the jobs wait and after they ran."""
from __future__ import annotations

import http.client
import json
import subprocess
import sys

import psycopg
import pytest

from benchmarks.bench_web import site_env, start_gunicorn
from scripts.etcd_server import free_port
from tests import postgres
from tests.helpers import REPO_ROOT, WorkerProcess, wait_until
from tests.reliability.test_site_flood import make_tokens
from tests.site.test_metrics import Samples, parse, scrape_url, value

pytestmark = pytest.mark.slow

#: Text jobs submitted before the worker starts.
JOBS = 5
RUN_MODEL = "jobs.tasks.run_model"


class Api:
    """One API token's calls to the gunicorn site, each on a new connection (so either gunicorn
    worker may answer, and no idle keep-alive connection is closed under us)."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None, self.headers)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def metrics(self) -> Samples:
        status, text = self.call("GET", "/metrics")
        assert status == 200, text
        return parse(text)


@pytest.fixture
def deployment(etcd_server, etcd_prefix, tiny_models, tmp_path):
    """The web and watch_jobs running on a fresh database; ``start_worker()`` adds the worker."""
    database = postgres.fresh_database("deployed")
    env = {**site_env(etcd_server, str(tmp_path)), "ETCD_PREFIX": etcd_prefix, "DATABASE_URL": database,
           "MODEL_DIR": str(tiny_models), "TF_CPP_MIN_LOG_LEVEL": "2", "JOBS_MAX_QUEUED_PER_OWNER": "100"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=REPO_ROOT, env=env, check=True)
    token = make_tokens(env, 1)[0]
    web_metrics = tmp_path / "web-metrics"
    web_metrics.mkdir()
    web = start_gunicorn("metrics", {**env, "PROMETHEUS_MULTIPROC_DIR": str(web_metrics)},
                         ["--worker-class", "gthread", "--workers", "2", "--threads", "8"], str(tmp_path))
    watch_port = free_port()
    with open(tmp_path / "watch_jobs.log", "wb") as log:
        watcher = subprocess.Popen([sys.executable, "manage.py", "watch_jobs"], cwd=REPO_ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**env, "METRICS_PORT": str(watch_port), "METRICS_ADDR": "127.0.0.1"})
    workers: list[WorkerProcess] = []

    def start_worker(port: int) -> WorkerProcess:
        worker = WorkerProcess(app="deephardway_site", queues="gpu", concurrency=4, log_dir=tmp_path,
                               env={**env, "WORKER_METRICS_PORT": str(port), "WORKER_METRICS_ADDR": "127.0.0.1"},
                               extra_args=["--without-heartbeat"]).start()
        workers.append(worker)
        return worker

    try:
        yield {"api": Api(web.port, token), "watch_port": watch_port, "start_worker": start_worker,
               "database": database, "watch_log": tmp_path / "watch_jobs.log"}
    finally:
        for worker in workers:
            worker.terminate(timeout=20)
        watcher.terminate()
        watcher.wait(20)
        web.stop()


def started_jobs(database: str, ids: list[str]) -> int:
    with psycopg.connect(database) as db:
        return db.execute("SELECT count(*) FROM jobs_job WHERE id = ANY(%s::uuid[]) AND started_at IS NOT NULL",
                          [ids]).fetchone()[0]


def test_every_role_reports_what_was_submitted(deployment):
    api = deployment["api"]
    ids = []
    for index in range(JOBS):
        status, body = api.call("POST", "/api/jobs", {"model": "text", "input": {
            "prompt": f"OTHELLO {index}:", "length": 20, "seed": index}})
        assert status == 202, body
        ids.append(json.loads(body)["id"])

    waiting = api.metrics()  # no worker yet: everything waits, at the default priority
    assert value(waiting, "deephardway_queue_ready_messages", queue="gpu", priority="5") == JOBS
    assert value(waiting, "deephardway_queue_consumers", queue="gpu") == 0
    assert value(waiting, "deephardway_jobs", queue="gpu", model="text", state="queued") == JOBS
    assert value(waiting, "deephardway_jobs_submitted_total", model="text", queue="gpu") == JOBS

    worker_port = free_port()
    deployment["start_worker"](worker_port)

    def all_succeeded() -> bool:
        return all(json.loads(api.call("GET", f"/api/jobs/{job}")[1])["status"] == "succeeded" for job in ids)

    wait_until(all_succeeded, timeout=120, interval=0.5, message="every job succeeded (as watch_jobs recorded)")
    done = api.metrics()
    assert sum(value(done, "deephardway_queue_ready_messages", queue="gpu", priority=str(p)) for p in range(10)) == 0
    assert value(done, "deephardway_queue_unacked_messages", queue="gpu") == 0
    assert value(done, "deephardway_queue_consumers", queue="gpu") == 1
    assert value(done, "deephardway_jobs", queue="gpu", model="text", state="queued") == 0
    assert value(done, "deephardway_jobs", queue="gpu", model="text", state="running") == 0

    watch = scrape_url(f"http://127.0.0.1:{deployment['watch_port']}/metrics")
    assert value(watch, "deephardway_job_total_seconds_count", model="text", outcome="succeeded") == JOBS
    started = started_jobs(deployment["database"], ids)
    assert value(watch, "deephardway_job_wait_seconds_count", model="text", queue="gpu") == started
    assert value(watch, "deephardway_job_run_seconds_count", model="text", outcome="succeeded") == started

    worker = scrape_url(f"http://127.0.0.1:{worker_port}/metrics")
    assert value(worker, "deephardway_worker_tasks_total", task=RUN_MODEL, state="success") == JOBS
    assert value(worker, "deephardway_worker_task_seconds_count", task=RUN_MODEL) == JOBS
