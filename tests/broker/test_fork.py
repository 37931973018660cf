"""Fork safety: a process that published, consumed and waited for results forks, and both sides work.

Real etcd, real Celery app objects, children made by ``os.fork``, multiprocessing's fork
context and billiard's (Celery's prefork pool) in turn, while the parent keeps a result
watch open and another thread writes results. Before the library quiesced gRPC around
fork(), about a third of such children died (SIGSEGV, or SIGABRT in ev_epoll1_linux.cc).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import traceback
import uuid

import billiard
import pytest
from celery import Celery, states

import etcd_broker  # noqa: F401 - registers etcdv3://
from etcd_broker.backend.result_store import close_shared
from etcd_broker.core.client import GATE, ChildLock, PerProcess, get_client
from etcd_broker.transport.consumer import close_all_leases

#: Fork rounds; each forks CHILDREN children (the abort was 1 in 3 children, so 50 rounds catch it).
ROUNDS = 50
CHILDREN = 2
#: A child that has not finished its publish, consume and result write by then counts as hung.
CHILD_SECONDS = 30


@pytest.fixture
def app(etcd_url, etcd_prefix):
    app = Celery(f"fork-{etcd_prefix}", broker=etcd_url, backend=etcd_url, set_as_current=False)
    app.conf.update(broker_transport_options={"prefix": etcd_prefix},
                    result_backend_transport_options={"prefix": etcd_prefix},
                    task_serializer="json", result_serializer="json", accept_content=["json"])
    yield app
    close_shared()
    app.close()


def round_trip(app: Celery, tag: str) -> str:
    """Publish and consume one message, store a result and read it back; the result's id."""
    with app.connection_for_write() as connection:
        # Celery publishes with connection retries; about 1 forked child in 100 on this loaded host
        # found its first connection not ready within connect_timeout (docs/transport.md, Fork safety).
        connection.ensure_connection(max_retries=3)
        queue = connection.SimpleQueue(f"fork-{tag}")
        queue.put({"tag": tag})
        message = queue.get(timeout=10)
        assert message.payload == {"tag": tag}
        message.ack()
        queue.close()
    task_id = f"{tag}-{uuid.uuid4().hex[:8]}"
    app.backend.store_result(task_id, tag, states.SUCCESS)
    assert app.AsyncResult(task_id).get(timeout=10) == tag
    return task_id


def child_main(app: Celery, tag: str, report_path: str) -> None:
    """Runs in the forked child; leaves the result id (or the error) in ``report_path``."""
    signal.alarm(CHILD_SECONDS)
    try:
        text = "ok " + round_trip(app, tag)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent reports it
        text, code = "error " + traceback.format_exc(), 3
    with open(report_path, "w") as report:
        report.write(text)
    sys.stdout.flush()
    os._exit(code)


def start_child(how: str, app: Celery, tag: str, report_path: str):
    if how == "os.fork":
        pid = os.fork()
        if pid == 0:
            child_main(app, tag, report_path)
        return pid
    context = (multiprocessing if how == "multiprocessing" else billiard).get_context("fork")
    process = context.Process(target=child_main, args=(app, tag, report_path))
    process.start()
    return process


def wait_child(child) -> str:
    """'exit 0', 'exit 3', 'signal 11'..."""
    if isinstance(child, int):
        _, status = os.waitpid(child, 0)
        return f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    child.join(CHILD_SECONDS + 5)
    code = child.exitcode
    return f"signal {-code}" if code is not None and code < 0 else f"exit {code}"


def test_children_forked_after_the_parent_used_etcd_all_work_and_so_does_the_parent(app, tmp_path):
    round_trip(app, "parent-before")  # publish, consume, wait for a result: every gRPC path is warm
    stop = threading.Event()
    writes = []

    def keep_writing():  # etcd calls in flight at the moment of each fork
        while not stop.is_set():
            task_id = f"busy-{len(writes)}"
            app.backend.store_result(task_id, len(writes), states.SUCCESS)
            writes.append(task_id)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    waiting = app.AsyncResult(f"late-{uuid.uuid4().hex[:8]}")  # a result watch open across every fork
    waited: list = []
    waiter = threading.Thread(target=lambda: waited.append(waiting.get(timeout=600)), daemon=True)
    waiter.start()

    forks_before = GATE.forks
    failures, children_ids = [], []
    methods = ("os.fork", "multiprocessing", "billiard")
    try:
        for round_number in range(ROUNDS):
            started = []
            for n in range(CHILDREN):
                how = methods[(round_number * CHILDREN + n) % len(methods)]
                report = tmp_path / f"child-{round_number}-{n}"
                started.append((how, report, start_child(how, app, f"c{round_number}x{n}", str(report))))
            for how, report, child in started:
                outcome = wait_child(child)
                text = report.read_text() if report.exists() else "(no report)"
                if outcome != "exit 0" or not text.startswith("ok "):
                    failures.append(f"{how} child {report.name}: {outcome}: {text[-1500:]}")
                else:
                    children_ids.append(text.split()[1])
            round_trip(app, f"parent-{round_number}")  # the parent keeps working after each fork
    finally:
        stop.set()
        writer.join(10)

    assert not failures, f"{len(failures)} of {ROUNDS * CHILDREN} children failed:\n" + "\n".join(failures[:5])
    # The parent reads what the children stored, and its open watch still delivers.
    assert [app.AsyncResult(task_id).get(timeout=10) for task_id in children_ids[:10]]
    app.backend.store_result(waiting.id, "after the forks", states.SUCCESS)
    waiter.join(30)
    assert waited == ["after the forks"]
    assert writes, "the writer thread never wrote"
    forks = GATE.forks - forks_before
    assert forks >= ROUNDS * CHILDREN


def test_a_forked_child_never_revokes_its_parents_consumer_lease(app, tmp_path):
    """A child that closes its leases (what its atexit handler does) leaves the parent's lease alone."""
    with app.connection_for_write() as connection:
        queue = connection.SimpleQueue("lease-owner")
        queue.put({"n": 1})
        held = queue.get(timeout=10)  # claimed under the parent's lease, not acked yet
        pid = os.fork()
        if pid == 0:
            signal.alarm(CHILD_SECONDS)
            code = 0
            try:
                round_trip(app, "exiting-child")
                close_all_leases(ack_timeout=2.0)  # membership's atexit handler (sys.exit would resume pytest)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        other = connection.SimpleQueue("lease-owner")
        with pytest.raises(other.Empty):
            other.get(timeout=2)  # had the child revoked our lease, the held message would be back
        held.ack()
        other.close()
        queue.close()


def test_a_child_collecting_inherited_connections_waits_on_no_lock_and_gives_back_nothing(app, etcd_url,
                                                                                          etcd_prefix):
    """Issue 18: what kombu's after-fork clean-up runs in a new prefork child (``Connection.collect``
    of the pooled connections), with the parent's watch-stream and queue-watch locks held by a parent
    thread at the fork, as the stream thread holds its lock while it re-opens a stream the fork cancelled.
    The child must finish, and the message the parent holds unacked must stay the parent's."""
    connection = app.pool.acquire(block=True)
    try:
        queue = connection.SimpleQueue("held-across-fork")
        queue.put({"n": 1})
        held = queue.get(timeout=10)  # claimed under the parent's lease, not acked
        transport = connection.transport
        transport.bindings.table("celery")  # the bindings watch a new child used to wait on
        stream = transport.watch_hub._stream
        holding, release = threading.Event(), threading.Event()

        def hold_locks() -> None:
            with stream._lock, transport._watch_lock:
                holding.set()
                release.wait(CHILD_SECONDS)

        holder = threading.Thread(target=hold_locks, daemon=True)
        holder.start()
        assert holding.wait(10)
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)  # a child stuck on a lock dies of SIGALRM
            code = 0
            try:
                connection.collect()
            except BaseException:  # noqa: BLE001 - reported by the exit code
                traceback.print_exc()
                code = 3
            os._exit(code)
        release.set()
        holder.join(10)
        _, status = os.waitpid(pid, 0)
        outcome = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        assert outcome == "exit 0", f"the child collecting inherited connections ended with {outcome}"
        ready = get_client(etcd_url).get_prefix(transport.keys.ready("held-across-fork"))
        assert list(ready) == [], "the child gave back a message its parent holds"
        held.ack()
        queue.close()
    finally:
        connection.release()


def test_a_child_lock_held_by_a_parent_thread_is_free_in_the_child():
    """ChildLock: a new lock in the child (no private CPython name), also under a Condition."""
    lock, registry = ChildLock(), PerProcess()
    condition = threading.Condition(ChildLock())
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock, condition:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(10)
    registry.get(("parent",), object)
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a child stuck on a lock dies of SIGALRM
        ok = lock.acquire(timeout=1) and condition.acquire(timeout=1) and registry.mine() == []
        os._exit(0 if ok else 3)
    release.set()
    holder.join(10)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child status {status}"
    assert lock.acquire(blocking=False), "the parent's lock was released by its holder"
    lock.release()
