"""A worker whose prefork pool cannot start children says so (etcd_broker/pool_health.py).

A real fault (tests/hang_child_init.py): while a file exists, every new pool child hangs before
it reports to billiard. One slot's task is terminated, its replacements keep hanging: the
worker logs an ERROR naming 1 of 2 processes up; once children can start again, it logs the
pool full again and runs a task on both slots at once.
"""
from __future__ import annotations

import json
import os

from etcd_broker.core.client import get_client
from etcd_broker.pool_health import _running
from tests.helpers import wait_until
from tests.transport.busy_app import make_app

APP = "tests.transport.busy_app"
#: A held task runs until it is terminated or the test ends.
HOLD_SECONDS = 600.0
#: Shortened pool-health timing for the test (defaults: 5 s and 30 s).
CHECK_SECONDS, GRACE_SECONDS = 0.5, 3.0
SHORT = "worker pool: only 1 of 2 processes up"
FULL_AGAIN = "worker pool: 2 of 2 processes up again"


def markers(url: str, prefix: str, name: str) -> list[dict]:
    rows = [(meta.create_revision, json.loads(value))
            for value, meta in get_client(url).get_prefix(f"{prefix}/markers/{name}/")]
    return [info for _, info in sorted(rows, key=lambda row: row[0])]


def test_a_pool_that_cannot_start_children_is_reported_and_its_recovery_too(worker_factory, etcd_url, etcd_prefix,
                                                                          tmp_path):
    hang = tmp_path / "hang-new-children"
    env = {"ETCD_TEST_URL": etcd_url, "ETCD_TEST_PREFIX": etcd_prefix, "HANG_CHILD_INIT_FILE": str(hang),
           "POOL_CHECK_SECONDS": str(CHECK_SECONDS), "POOL_GRACE_SECONDS": str(GRACE_SECONDS)}
    worker = worker_factory(app=APP, env=env, pool="prefork", concurrency=2,
                            extra_args=["--include", "tests.hang_child_init"])
    app = make_app(etcd_url, etcd_prefix)
    first = app.send_task("busy.hold", ("first", HOLD_SECONDS))
    wait_until(lambda: markers(etcd_url, etcd_prefix, "first-started"), timeout=60, message="first task running")
    assert "worker pool:" not in worker.log(), "a healthy pool was reported"

    hang.touch()
    app.control.revoke(first.id, terminate=True)
    worker.wait_for_log(SHORT, timeout=60)
    worker.wait_for_log("Timed out waiting for UP message from", timeout=60)  # billiard's, for a hanging child

    hang.unlink()
    worker.wait_for_log(FULL_AGAIN, timeout=60)
    held = [app.send_task("busy.hold", ("again", HOLD_SECONDS)) for _ in range(2)]
    running = wait_until(lambda: len(markers(etcd_url, etcd_prefix, "again-started")) == 2
                         and markers(etcd_url, etcd_prefix, "again-started"), timeout=60, message="both slots run")
    assert {row["task_id"] for row in running} == {result.id for result in held}
    assert len({row["pid"] for row in running}) == 2
    app.close()


def test_an_exited_child_billiard_has_not_reaped_is_not_counted_as_running():
    assert _running(os.getpid())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        wait_until(lambda: not _running(pid), timeout=30, message="the child a zombie")  # exited, not reaped yet
        assert os.path.exists(f"/proc/{pid}"), "reaped already: the zombie case was not seen"
    finally:
        os.waitpid(pid, 0)
    assert not _running(pid)  # reaped: gone
