"""Pool children report the tasks they start and finish to the worker's main process (consumer.py):
a prefork job the main process never heard accepted (blocked on etcd when a connection reset came,
Celery's pool then forgets it) still counts as running, and once its child finished it, its kept
message is settled instead of given back to run again (the 10-minute prefork chaos run, seed
2875818680: a chord callback ran twice on one live worker, 1.4 s apart).

Real forks of this process stand in for billiard's children; the reports go through the same
signal handlers Celery calls in a child (``task_prerun``, ``task_postrun``).
"""
from __future__ import annotations

import os
from collections import OrderedDict

import pytest
from celery import Celery
from celery.worker import state as worker_state
from kombu import Message

from etcd_broker.transport import consumer
from etcd_broker.transport.consumer import (
    _finished_in_child,
    _started_in_child,
    finished_in_child,
    is_executing,
    keep,
    kept,
    open_reports,
)
from tests.helpers import wait_until

app = Celery("reports", set_as_current=False)


@app.task(name="reports.noop")
def noop() -> None:
    """A real task object: the handlers read its request's retries."""


@pytest.fixture(autouse=True)
def fresh_reports(monkeypatch):
    """This process as a worker's main process with a report pipe of its own, restored afterwards."""
    for name, value in (("_reports", None), ("_reports_reader", 0), ("_unread", b""), ("_in_children", {}),
                        ("_finished_in_children", OrderedDict()), ("_kept", {}), ("_checked_at", 0.0)):
        monkeypatch.setattr(consumer, name, value)
    open_reports()
    yield
    for pid in _children:  # a failed test leaves its child waiting for the word to finish
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):  # finished and reaped already
            pass
    _children.clear()
    os.close(consumer._reports[0])
    os.close(consumer._reports[1])


_children: list[int] = []


def child_running(task_id: str) -> tuple[int, int]:
    """Fork a child that reports ``task_id`` started, then finished once the returned fd is written."""
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            _started_in_child(task_id=task_id, task=noop)
            os.read(go_read, 1)
            _finished_in_child(task_id=task_id, task=noop)
        finally:
            os._exit(0)
    os.close(go_read)
    _children.append(pid)
    return pid, go_write


def finish(child: tuple[int, int]) -> None:
    pid, go = child
    os.write(go, b"x")
    os.close(go)
    os.waitpid(pid, 0)


def test_a_task_a_child_started_counts_as_running_here_until_it_reports_it_finished():
    child = child_running("t-running")
    wait_until(lambda: is_executing("t-running"), timeout=30, message="the child's start report")
    finish(child)
    wait_until(lambda: finished_in_child("t-running", 0), timeout=30, message="the finish report")
    assert not is_executing("t-running")


def test_a_child_killed_mid_task_no_longer_counts_as_running():
    pid, go = child_running("t-killed")
    wait_until(lambda: is_executing("t-killed"), timeout=30, message="the child's start report")
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(go)
    assert not is_executing("t-killed")
    assert not finished_in_child("t-killed", 0)


def kept_message(task_id: str, given_back: list, settled: list) -> Message:
    message = Message(body="{}", delivery_tag=1, headers={"id": task_id, "retries": 0},
                      delivery_info={"etcd_key": f"/q/celery/unacked/1/9/{task_id}"})
    keep(object(), message, given_back.append, settled.append)
    return message


def test_a_kept_message_whose_task_a_child_finished_and_celery_forgot_is_settled_not_given_back():
    given_back, settled = [], []
    child = child_running("t-forgotten")
    wait_until(lambda: is_executing("t-forgotten"), timeout=30, message="the child's start report")
    message = kept_message("t-forgotten", given_back, settled)  # the reset: kept, as it runs here
    assert kept() == 1
    finish(child)
    wait_until(lambda: (kept(), settled)[1], timeout=30, interval=0.2, message="settled")
    assert (settled, given_back) == ([message], [])


def test_a_kept_message_celery_still_knows_is_left_to_celery(monkeypatch):
    """Celery acks (or requeues) what it knows; only past the grace with no ack is it given back."""
    monkeypatch.setitem(worker_state.requests, "t-known", object())
    monkeypatch.setattr(consumer, "ORPHAN_GRACE_SECONDS", 0.5)
    given_back, settled = [], []
    child = child_running("t-known")
    wait_until(lambda: is_executing("t-known"), timeout=30, message="the child's start report")
    message = kept_message("t-known", given_back, settled)
    finish(child)
    wait_until(lambda: (kept(), given_back)[1], timeout=30, interval=0.2, message="given back")
    assert (given_back, settled) == ([message], [])
