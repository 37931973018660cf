"""The worker's own /metrics (jobs/worker_metrics.py) on real workers, prefork and threads:
every task sent is counted once (succeeded, failed, revoked), failures by exception, nothing
left running."""
from __future__ import annotations

import urllib.request

import pytest
from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3://
from scripts.etcd_server import free_port
from tests.helpers import wait_until
from tests.site.test_metrics import Samples, parse, value

#: Tasks of tests/celery_app.py, sent by name.
ADD, FAIL = "tests.celery_app.add", "tests.celery_app.fail"
SUCCEEDING, FAILING = 12, 3


def sender(url: str, prefix: str) -> Celery:
    app = Celery(f"metrics-{prefix}", broker=url, set_as_current=False)
    app.conf.update(broker_transport_options={"prefix": prefix}, task_serializer="json",
                    accept_content=["json"], task_ignore_result=True)
    return app


def worker_env(url: str, prefix: str, port: int, **extra: str) -> dict[str, str]:
    return {"ETCD_TEST_URL": url, "ETCD_TEST_PREFIX": prefix, "WORKER_METRICS_PORT": str(port),
            "WORKER_METRICS_ADDR": "127.0.0.1", **extra}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return parse(response.read().decode())


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_every_task_is_counted_once_across_the_pool(pool, etcd_server, etcd_prefix, worker_factory, tmp_path):
    port, directory = free_port(), tmp_path / "metrics"
    directory.mkdir()
    env = worker_env(etcd_server.url, etcd_prefix, port, PROMETHEUS_MULTIPROC_DIR=str(directory))
    worker = worker_factory(env=env, pool=pool, concurrency=2, extra_args=["--include", "jobs.worker_metrics"])
    app = sender(etcd_server.url, etcd_prefix)
    for index in range(SUCCEEDING):
        app.send_task(ADD, args=(index, 1))
    for index in range(FAILING):
        app.send_task(FAIL, args=(f"boom {index}",))
    replies = app.control.revoke("revoked-before-it-was-sent", reply=True, timeout=10)
    assert replies, "the worker did not answer the revoke"
    app.send_task(ADD, args=(0, 0), task_id="revoked-before-it-was-sent")

    def finished() -> Samples | None:
        samples = scrape(port)
        done = (value(samples, "deephardway_worker_tasks_total", task=ADD, state="success")
                + value(samples, "deephardway_worker_tasks_total", task=FAIL, state="failure")
                + value(samples, "deephardway_worker_tasks_total", task=ADD, state="revoked"))
        return samples if done >= SUCCEEDING + FAILING + 1 else None

    wait_until(finished, timeout=60, interval=0.2, message="every task counted")
    samples = scrape(port)
    assert value(samples, "deephardway_worker_tasks_total", task=ADD, state="success") == SUCCEEDING
    assert value(samples, "deephardway_worker_tasks_total", task=FAIL, state="failure") == FAILING
    assert value(samples, "deephardway_worker_tasks_total", task=ADD, state="revoked") == 1
    assert value(samples, "deephardway_worker_task_failures_total", task=FAIL, exception="ValueError") == FAILING
    assert value(samples, "deephardway_worker_task_seconds_count", task=ADD) == SUCCEEDING
    assert value(samples, "deephardway_worker_tasks_running", task=ADD) == 0
    # The pool's reading (etcd_broker.pool_health, every 5 s): both slots up, as wanted.
    wait_until(lambda: value(scrape(port), "deephardway_worker_pool_processes") == 2, timeout=30, interval=0.5,
               message="2 pool processes up on /metrics")
    assert value(scrape(port), "deephardway_worker_pool_processes_wanted") == 2
    writers = {int(path.stem.split("_")[1]) for path in directory.glob("counter_*.db")}
    if pool == "prefork":  # pool children counted the tasks they ran (the main one, the revoked one)
        assert writers - {worker.process.pid}, writers
    else:
        assert writers == {worker.process.pid}
    app.close()


def test_prefork_without_a_metrics_directory_refuses_to_start(etcd_server, etcd_prefix, worker_factory, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    env = worker_env(etcd_server.url, etcd_prefix, free_port())
    with pytest.raises(RuntimeError, match="worker exited") as refused:
        worker_factory(env=env, pool="prefork", concurrency=1, extra_args=["--include", "jobs.worker_metrics"])
    assert "WORKER_METRICS_PORT with the prefork pool needs PROMETHEUS_MULTIPROC_DIR" in str(refused.value)
