"""Batched tasks (etcd_broker/batches.py) on real workers: what a batch keeps of each task.

The tasks are published before the worker starts, so its first claim takes many at once
and the batch sizes the results report are the ones the worker actually ran.
"""
from __future__ import annotations

import re
import uuid

import pytest

from etcd_broker.core.client import get_client
from tests.backend.conftest import make_app, task, worker_env
from tests.celery_app import RUN_ALONE
from tests.helpers import WorkerProcess, wait_until

#: Seconds to wait for a batch's results.
RESULT_TIMEOUT = 60


@pytest.fixture
def app_and_prefix(etcd_server):
    prefix = f"/tbatch-{uuid.uuid4().hex[:10]}"
    app = make_app(etcd_server.url, prefix)
    yield app, prefix
    app.close()


def start_worker(etcd_server, prefix, tmp_path, pool="threads", concurrency=16, **env) -> WorkerProcess:
    return WorkerProcess(env=worker_env(etcd_server.url, prefix, **env), pool=pool, concurrency=concurrency,
                         log_dir=tmp_path).start()


def messages_left(etcd_server, prefix) -> list[str]:
    """Keys of messages still waiting or unacked in the celery queue."""
    keys = [meta.key.decode() for _, meta in get_client(etcd_server.url).get_prefix(prefix)]
    return [key for key in keys if "/q/celery/ready/" in key or "/q/celery/unacked/" in key]


def send_doubles(app, values):
    return [task(app, "double", value).apply_async() for value in values]


def test_tasks_received_together_run_as_one_batch_each_once_with_its_own_result(etcd_server, app_and_prefix, tmp_path):
    app, prefix = app_and_prefix
    values = list(range(40))
    results = send_doubles(app, values)
    worker = start_worker(etcd_server, prefix, tmp_path)
    try:
        answers = [result.get(timeout=RESULT_TIMEOUT) for result in results]
        assert [answer["double"] for answer in answers] == [2 * value for value in values]
        assert max(answer["batch"] for answer in answers) > 1, "no two requests ran in one batch"
        assert all(result.state == "SUCCESS" for result in results)
        log = worker.log()
        assert "tests.celery_app.double: batch of" in log
        assert log.count("] received") == len(values)  # Celery's strategy still saw each message
    finally:
        worker.terminate(timeout=15)
    assert messages_left(etcd_server, prefix) == []  # every acks_late message deleted


def test_a_failure_stays_with_its_own_request_and_the_rest_of_the_batch_succeeds(etcd_server, app_and_prefix, tmp_path):
    app, prefix = app_and_prefix
    results = send_doubles(app, [1, -2, 3, -4, 5])
    worker = start_worker(etcd_server, prefix, tmp_path)
    try:
        for result, value in zip(results, [1, -2, 3, -4, 5], strict=True):
            if value < 0:
                with pytest.raises(ValueError, match=f"negative: {value}"):
                    result.get(timeout=RESULT_TIMEOUT)
                assert result.state == "FAILURE"
            else:
                assert result.get(timeout=RESULT_TIMEOUT)["double"] == 2 * value
    finally:
        worker.terminate(timeout=15)
    assert messages_left(etcd_server, prefix) == []  # failed ones acked too (acks_on_failure)


def test_a_request_cancelled_while_queued_never_runs_and_its_batch_does_not_wait_for_it(etcd_server, app_and_prefix, tmp_path):
    app, prefix = app_and_prefix
    results = send_doubles(app, [1, 2, 3, 4])
    app.backend.request_cancel(results[1].id)
    worker = start_worker(etcd_server, prefix, tmp_path)
    try:
        for index in (0, 2, 3):
            assert results[index].get(timeout=RESULT_TIMEOUT)["double"] == 2 * (index + 1)
        cancelled = results[1]
        assert app.backend.get_task_meta(cancelled.id)["status"] == "REVOKED"
        assert "was cancelled: not running it" in worker.log()
    finally:
        worker.terminate(timeout=15)
    assert messages_left(etcd_server, prefix) == []


def test_a_request_the_task_will_not_batch_runs_alone_through_celery(etcd_server, app_and_prefix, tmp_path):
    app, prefix = app_and_prefix
    results = send_doubles(app, [1, RUN_ALONE, 2, 3])
    worker = start_worker(etcd_server, prefix, tmp_path)
    try:
        answers = [result.get(timeout=RESULT_TIMEOUT) for result in results]
    finally:
        worker.terminate(timeout=15)
    assert answers[1]["double"] == 2 * RUN_ALONE and answers[1]["batch"] == 1
    assert f"tests.celery_app.double[{results[1].id}] succeeded" in worker.log()  # Celery's own trace
    assert max(answers[i]["batch"] for i in (0, 2, 3)) > 1


def test_on_prefork_every_request_runs_alone_and_succeeds(etcd_server, app_and_prefix, tmp_path):
    app, prefix = app_and_prefix
    results = send_doubles(app, list(range(8)))
    worker = start_worker(etcd_server, prefix, tmp_path, pool="prefork", concurrency=2)
    try:
        answers = [result.get(timeout=RESULT_TIMEOUT) for result in results]
        # on prefork a child stores SUCCESS and the parent acks once the child reports back: the
        # last ack may follow the last result by a moment (a SIGTERM in between requeues it)
        wait_until(lambda: messages_left(etcd_server, prefix) == [], timeout=RESULT_TIMEOUT, message="every message acked")
    finally:
        worker.terminate(timeout=30)
    assert [(answer["double"], answer["batch"]) for answer in answers] == [(2 * value, 1) for value in range(8)]


def test_a_batch_whose_worker_is_killed_runs_again_on_another_worker_each_request_once(etcd_server, app_and_prefix,
                                                                                         tmp_path):
    app, prefix = app_and_prefix
    values = list(range(8))
    results = send_doubles(app, values)
    doomed = start_worker(etcd_server, prefix, tmp_path, DOUBLE_PAUSE="60")  # holds its batches, never finishes them
    # every message claimed by it and received by Celery (its batches then sleep in run_batch)
    wait_until(lambda: doomed.log().count("] received") == len(values)
               and all("/unacked/" in key for key in messages_left(etcd_server, prefix)),
               timeout=RESULT_TIMEOUT, message="the doomed worker holds every message")
    doomed.kill()  # SIGKILL: its claimed messages come back when its lease lapses
    assert all(result.state == "PENDING" for result in results)
    survivor = start_worker(etcd_server, prefix, tmp_path)
    try:
        answers = [result.get(timeout=RESULT_TIMEOUT) for result in results]
        assert [answer["double"] for answer in answers] == [2 * value for value in values]
        assert {answer["pid"] for answer in answers} == {survivor.process.pid}
    finally:
        survivor.terminate(timeout=15)
    # counted once the worker has exited: a batch stores its results before it logs "ran", so a
    # count taken when the last result arrived could miss the last batch's line (7 == 8 under load)
    ran = sum(int(count) for count in re.findall(r"double: batch of (\d+) ran", survivor.log()))
    assert ran == len(values)  # each request once on the live worker
    assert messages_left(etcd_server, prefix) == []


@pytest.mark.parametrize("fault", ["EtcdUnreachable", "RuntimeError"])
def test_a_batch_whose_cancel_read_fails_still_runs_each_request_once_and_leaves_nothing_held(
        etcd_server, app_and_prefix, tmp_path, fault):
    """The batch's cancel read fails once (a leader move, or a bug): before the fix the thread pool
    swallowed the exception and the whole batch stayed accepted, never run, its messages under the
    live worker's lease for as long as it lived (issue 18, item 2)."""
    app, prefix = app_and_prefix
    values = list(range(8))
    results = send_doubles(app, values)
    worker = start_worker(etcd_server, prefix, tmp_path, DOUBLE_CANCEL_READ_FAULT=fault)
    try:
        answers = [result.get(timeout=RESULT_TIMEOUT) for result in results]
        assert [answer["double"] for answer in answers] == [2 * value for value in values]
        wait_until(lambda: messages_left(etcd_server, prefix) == [], timeout=RESULT_TIMEOUT,
                   message="every message acked")
    finally:
        worker.terminate(timeout=15)
    log = worker.log()
    # the fault happened: retried (a connection error), or the batch broke off and went back (any other)
    assert ("injected: etcd unreachable" in log) if fault == "EtcdUnreachable" else ("broke off" in log)
    ran = sum(int(count) for count in re.findall(r"double: batch of (\d+) ran", log))
    assert ran == len(values)  # each request once: the failed batch never reached run_batch


def test_a_request_with_a_callback_runs_alone_and_its_callback_runs(etcd_server, app_and_prefix, tmp_path):
    """The batcher reads each request's callbacks from its task context (batches.task_context)."""
    app, prefix = app_and_prefix
    callback = task(app, "sleep_then_record", 0, "linked").set(immutable=True)
    callback_id = callback.freeze().id
    results = [task(app, "double", 1).apply_async(), task(app, "double", 2).apply_async(link=callback),
               task(app, "double", 3).apply_async()]
    worker = start_worker(etcd_server, prefix, tmp_path)
    try:
        answers = [result.get(timeout=RESULT_TIMEOUT) for result in results]
        assert app.AsyncResult(callback_id).get(timeout=RESULT_TIMEOUT) == "linked"
    finally:
        worker.terminate(timeout=15)
    assert answers[1] == {"double": 4, "batch": 1, "pid": answers[1]["pid"]}  # double() itself: not a batch
    assert f"tests.celery_app.double[{results[1].id}] succeeded" in worker.log()  # Celery's own trace
