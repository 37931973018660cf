"""Every ``revoke(terminate=True, reply=True)`` is answered while a prefork pool forks often (opt-in).

    REVOKE_REPLY_ROUNDS=60 .venv/bin/python -m pytest tests/transport/test_revoke_replies.py -s

Each round holds a task on a real prefork worker (``-c 2 --max-tasks-per-child 1 -E``), waits
for it to start, and revokes it with terminate and a reply, waiting REPLY_SECONDS. Celery binds
a new reply queue for each call; the worker replies through the direct exchange at once. Before
the fix in bindings.py about 1 in 20 replies was dropped (the worker's watch-fed copy of the
bindings had not seen the new reply queue yet): 3 of 60 here. About 1 s a round, so not in the
default suite; tests/transport/test_binding_lag.py is the cheap deterministic check.
"""
from __future__ import annotations

import os
import time

import pytest

from tests.transport.busy_app import client_app
from tests.transport.test_prefork_terminate import SLOT_SECONDS, started_ids

APP = "tests.transport.busy_app"
ROUNDS = int(os.environ.get("REVOKE_REPLY_ROUNDS", "0"))
#: What the prefork terminate test waits for a reply (a reply is slower than this only when lost).
REPLY_SECONDS = 2.0

pytestmark = pytest.mark.skipif(not ROUNDS, reason="set REVOKE_REPLY_ROUNDS to run it")


def test_every_terminate_is_answered_while_the_pool_forks(worker_factory, etcd_url, etcd_prefix):
    busy = client_app(etcd_url, etcd_prefix, lease_ttl=10)
    env = {"ETCD_TEST_URL": etcd_url, "ETCD_TEST_PREFIX": etcd_prefix, "ETCD_TEST_LEASE_TTL": "10"}
    worker_factory(app=APP, env=env, pool="prefork", concurrency=2, extra_args=["-E", "--max-tasks-per-child", "1"])
    unanswered, slowest = [], 0.0
    try:
        with started_ids(etcd_url, f"{etcd_prefix}/markers/held-started/") as started:
            for _ in range(ROUNDS):
                busy.send_task("busy.hold", ("held", 600.0))
                task_id = started.get(timeout=SLOT_SECONDS)
                began = time.monotonic()
                if not busy.control.revoke(task_id, terminate=True, reply=True, limit=1, timeout=REPLY_SECONDS):
                    unanswered.append(task_id)
                else:
                    slowest = max(slowest, time.monotonic() - began)
    finally:
        busy.close()
    print(f"{ROUNDS} terminates: {len(unanswered)} unanswered, slowest reply {slowest:.2f} s")
    assert not unanswered, f"{len(unanswered)} of {ROUNDS} replies never came: {unanswered}"
