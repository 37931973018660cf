"""A chord's callback runs exactly once when the worker that counted the last part dies before the
chord is settled: the redelivered part finds the chord complete but its keys still there and takes over."""
from __future__ import annotations

import time

import pytest
from celery import chord

from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from tests.helpers import wait_until
from tests.reliability import counting_app
from tests.reliability.counting import Tally, read_markers

APP = "tests.reliability.counting_app"
LEASE_TTL = 3
PARTS = 6
TASK_SECONDS = 0.2


@pytest.mark.reliability
@pytest.mark.parametrize("point", ["counted", "claimed", "published"])
def test_the_callback_runs_once_when_the_worker_that_counted_the_last_part_dies(
        point, etcd_url, etcd_prefix, worker_factory, summary):
    """``counted``: died before claiming (the redelivered part claims at once); ``claimed``: died
    holding the claim (the redelivered part waits for the claim's lease to lapse); ``published``:
    died after publishing, before deleting the chord (the takeover sees the callback's state)."""
    counting_app.configure(etcd_url, etcd_prefix, LEASE_TTL, backend=True)
    env = counting_app.worker_env(etcd_url, etcd_prefix, LEASE_TTL, backend=True)
    victim = worker_factory(app=APP, env={**env, "FAULT_CHORD_EXIT": point}, concurrency=2)
    client = get_client(etcd_url)
    header = [counting_app.work.s(TASK_SECONDS) for _ in range(PARTS)]
    result = chord(header)(counting_app.collect.s())
    parts = [child.id for child in result.parent.results]

    wait_until(lambda: victim.process.poll() is not None, timeout=60, message="the victim exited at the hook")
    died_at = time.time()
    assert victim.process.returncode == counting_app.CHORD_EXIT_CODE, victim.log()[-3000:]
    assert result.id not in read_markers(client, etcd_prefix, "started")  # nobody ran the callback yet
    survivor = worker_factory(app=APP, env=env, concurrency=2)
    value = result.get(timeout=60)

    wait_until(lambda: list(client.get_prefix(KeySpace(etcd_prefix).chord(result.parent.id))) == [],
               timeout=60, message="the chord's keys deleted")  # the takeover is over
    time.sleep(LEASE_TTL)  # a second publish would have run by now (nothing else is queued)
    tally = Tally(f"chord: the worker that counted the last part died ({point})",
                  [*parts, result.id], [],
                  read_markers(client, etcd_prefix, "started"), read_markers(client, etcd_prefix, "done"),
                  died_at, died_at, fetched=[result.id] if value == PARTS else [])
    summary(tally)
    assert tally.lost == [] and tally.completed == PARTS + 1
    assert len(tally.done[result.id]) == 1, "the callback ran more than once"
    assert tally.done[result.id][0]["pid"] == survivor.process.pid
    assert client.get(KeySpace(etcd_prefix).group_result(result.parent.id))[0] is None  # settled: group gone too
    # only the part the victim counted last ran twice (the victim finished it but never acked it)
    assert set(tally.duplicated) <= {task for task in parts if tally.done[task][0]["pid"] == victim.process.pid}
