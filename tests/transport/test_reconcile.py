"""Reconciliation (etcd_broker/transport/consumer.py) on a real worker: what its live lease owns and it holds nowhere
comes back to the queue once, and what it holds (running, prefetched) never does."""
from __future__ import annotations

import json
import time
import uuid

import pytest
from kombu import Connection

from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import PAGE_KEYS, KeySpace
from etcd_broker.transport import consumer
from etcd_broker.transport.consumer import Reconciler, restore_message, unacked_keys
from tests.backend.conftest import make_app, task, worker_env
from tests.helpers import WorkerProcess, wait_until
from tests.transport.test_idle_cost import idle_consumer

#: Seconds between the worker's reconciliation passes (a stray key comes back after two).
RECONCILE_SECONDS = 1.0
#: Seconds to wait for results and keys on a loaded machine.
TIMEOUT = 60
#: Seconds each held task runs: the three are held (running or prefetched) across several passes.
HELD_SECONDS = 3.0
#: Give-back log line of consumer.py.
GIVEN_BACK = "with nobody here holding it: given back to the queue"


@pytest.fixture
def app_and_prefix(etcd_server):
    prefix = f"/trec-{uuid.uuid4().hex[:10]}"
    app = make_app(etcd_server.url, prefix)
    yield app, prefix
    app.close()


def runs(client, prefix: str, marker: str) -> int:
    return len(list(client.get_prefix(f"{prefix}/runs/{marker}/", keys_only=True)))


def worker_lease(client, keys: KeySpace, pid: int) -> int:
    """The consumer lease of the worker process ``pid`` (its ``consumer/<lease>`` key names the pid)."""
    for value, meta in client.get_prefix(keys.consumers()):
        if json.loads(value)["pid"] == pid:
            return int(meta.key.decode().rsplit("/", 1)[1], 16)
    return 0


def strand_under(client, keys: KeySpace, app, lease: int) -> tuple[str, object]:
    """A task message put under ``lease`` as a claim whose answer was lost leaves it: nobody holds it."""
    result = task(app, "mark_run", "stray").apply_async(queue="parking-lot")  # a queue nobody consumes
    value, meta = next(iter(client.get_prefix(keys.ready("parking-lot"))))
    stray = keys.unacked_message("celery", lease, keys.position_of(meta.key))
    ops.txn(client, [ops.compare(meta.key.decode(), "mod_revision", meta.mod_revision)],
            [ops.delete(meta.key.decode()), ops.put(stray, value)])
    return stray, result


def test_a_stray_key_under_a_live_lease_comes_back_once_and_held_messages_never_do(etcd_server, app_and_prefix,
                                                                                      tmp_path):
    app, prefix = app_and_prefix
    client, keys = get_client(etcd_server.url), KeySpace(prefix)
    # one task runs at a time; prefetch 3: the other two wait in the worker, held and not executing
    worker = WorkerProcess(env=worker_env(etcd_server.url, prefix, ETCD_TEST_RECONCILE_SECONDS=str(RECONCILE_SECONDS)),
                           concurrency=1, extra_args=["--prefetch-multiplier", "3"], log_dir=tmp_path).start()
    try:
        lease = wait_until(lambda: worker_lease(client, keys, worker.process.pid), timeout=TIMEOUT,
                           message="the worker's consumer lease")
        unacked = keys.unacked("celery", lease)
        held = [task(app, "mark_run", "held", HELD_SECONDS).apply_async() for _ in range(3)]
        wait_until(lambda: len(list(client.get_prefix(unacked, keys_only=True))) == 3, timeout=TIMEOUT,
                   message="the worker holds its three messages")
        stray, stray_result = strand_under(client, keys, app, lease)

        assert stray_result.get(timeout=TIMEOUT) == "stray"
        assert [result.get(timeout=TIMEOUT) for result in held] == ["held"] * 3
        wait_until(lambda: not list(client.get_prefix(unacked, keys_only=True)), timeout=TIMEOUT,
                   message="every message acked")
    finally:
        worker.terminate(timeout=30)
    log = worker.log()
    assert log.count(GIVEN_BACK) == 1 and f"message {stray} was under our live lease" in log, log[-3000:]
    assert (runs(client, prefix, "stray"), runs(client, prefix, "held")) == (1, 3)


# -- the pass itself, on a real etcd, with the process's holdings given by the test ----------------
class Holdings:
    """What the process holds (``held``), and hand-offs on their way (``arriving``), as a test sets them."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.arriving: set[str] = set()


def reconciler_on(client, keys: KeySpace, holdings: Holdings) -> Reconciler:
    """interval 0: a key is given back on the second pass that finds it unheld and unchanged."""
    def restore(key, value, revision):
        return restore_message(client, keys, keys.queue_of(key), key, value, revision)
    return Reconciler(client, keys, lambda: set(holdings.held), holdings.arriving.__contains__, str, restore, 0.0)


def test_a_pass_gives_back_only_what_stays_unheld_and_unchanged_and_each_key_once(etcd_url, etcd_prefix):
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    lease = client.lease(30).id
    stray, held, arriving, acked, reclaimed = (keys.unacked_message("q", lease, f"9/{n:020d}") for n in range(5))
    for key in (stray, held, arriving, acked, reclaimed):
        client.put(key, json.dumps({"body": key, "properties": {"delivery_info": {}}}))
    holdings = Holdings()
    holdings.held.add(held)
    holdings.arriving.add(arriving)
    reconciler = reconciler_on(client, keys, holdings)
    reconciler.read_all()  # keys no touch announced (as an adopt leaves them): a full pass reads them

    assert reconciler.run(lease, ["q"]) == 0  # first sight: suspects only
    client.delete(acked)  # its ack came
    client.put(reclaimed, b"changed")  # a new mod revision: seen anew
    assert reconciler.run(lease, ["q"]) == 1  # the stray alone
    assert reconciler.run(lease, ["q"]) == 1  # the re-claimed one, unheld across two passes now
    assert reconciler.run(lease, ["q"]) == 0  # nothing twice
    left = {meta.key.decode() for _, meta in client.get_prefix(keys.unacked("q", lease))}
    ready = [meta.key.decode() for _, meta in client.get_prefix(keys.ready("q"))]
    assert left == {held, arriving}
    assert sorted(keys.position_of(key) for key in ready) == sorted(keys.position_of(k) for k in (stray, reclaimed))
    assert json.loads(client.get(keys.ready_message("q", keys.position_of(stray)))[0])["redelivered"] is True
    client.revoke_lease(lease)


def test_a_pass_reads_a_lease_holding_more_than_a_page(etcd_url, etcd_prefix):
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    lease = client.lease(30).id
    written = {keys.unacked_message("q", lease, f"9/{n:020d}") for n in range(PAGE_KEYS + 3)}
    for start in range(0, len(written), 100):
        ops.txn(client, success=[ops.put(key, b"{}") for key in sorted(written)[start:start + 100]])
    assert {key for key, _ in unacked_keys(client, keys, "q", lease)} == written
    client.revoke_lease(lease)


def stray_on(client, keys: KeySpace, queue: str, lease: int, n: int = 0) -> str:
    key = keys.unacked_message(queue, lease, f"9/{n:020d}")
    client.put(key, json.dumps({"body": key, "properties": {"delivery_info": {}}}))
    return key


def test_a_pass_reads_only_queues_touched_or_holding_keys_of_ours(etcd_url, etcd_prefix, monkeypatch):
    """An idle queue costs a pass nothing (issue 19); a touch (before a claim or park), keys found the
    pass before, an outage (``soon``) and an adopt (``read_all``) make it read."""
    monkeypatch.setattr(consumer, "TOUCH_MARGIN_SECONDS", 0.0)  # a touch counts for the pass after it alone
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    lease = client.lease(30).id
    queues = ["a", "b", "c"]
    reconciler = reconciler_on(client, keys, Holdings())

    def read_by_a_pass() -> int:
        before = reconciler.queues_read
        reconciler.run(lease, queues)
        return reconciler.queues_read - before

    assert read_by_a_pass() == 0  # a new lease: none (nothing under it that no touch announced)
    reconciler.read_all()
    assert read_by_a_pass() == 3  # a full pass
    assert read_by_a_pass() == 0  # idle: none
    reconciler.touch("b")
    assert read_by_a_pass() == 1
    assert read_by_a_pass() == 0  # the touch was before that pass began: it read b
    untouched = stray_on(client, keys, "c", lease)  # no touch announced it: the lease's full sweep will
    assert read_by_a_pass() == 0
    reconciler.touch("c")  # what the full sweep does on finding a key of ours
    assert read_by_a_pass() == 1  # a suspect now
    assert read_by_a_pass() == 1  # read again (it found a key there), given back
    assert client.get(untouched)[0] is None
    assert read_by_a_pass() == 1  # the pass before found a key on c
    assert read_by_a_pass() == 0
    reconciler.soon()
    assert read_by_a_pass() == 3
    reconciler.read_all()
    assert read_by_a_pass() == 3
    client.revoke_lease(lease)


def test_a_claim_after_a_pass_read_its_touched_queue_is_read_by_the_next_pass(etcd_url, etcd_prefix):
    """touch, then a pass reads the queue, then the claim lands: the next pass still reads the queue
    (a touch counts for the passes that begin up to TOUCH_MARGIN_SECONDS after it)."""
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    lease = client.lease(30).id
    reconciler = reconciler_on(client, keys, Holdings())
    reconciler.touch("a")
    assert reconciler.run(lease, ["a"]) == 0
    stray = stray_on(client, keys, "a", lease)  # the claim whose answer was lost, after that pass's read
    assert reconciler.run(lease, ["a"]) == 0  # seen: a suspect
    assert reconciler.run(lease, ["a"]) == 1
    assert client.get(stray)[0] is None
    client.revoke_lease(lease)


def test_the_full_sweep_makes_reconciliation_read_a_queue_no_touch_announced(private_etcd, etcd_prefix,
                                                                              monkeypatch):
    """A key of our live lease on an idle queue, which no claim touched: passes skip the queue until
    the lease's full sweep (every FULL_SWEEP_SECONDS) sees the key and touches it; then it comes back."""
    monkeypatch.setattr(consumer, "TOUCH_MARGIN_SECONDS", 0.0)
    options = {"prefix": etcd_prefix, "reconcile_seconds": 0.3}
    # private_etcd: its teardown ends this process's leases (this one's passes every 0.3 s with it)
    with Connection(private_etcd.url, transport_options=options) as conn:
        idle_consumer(conn, "unannounced", 3)
        lease = conn.transport.lease
        reconciler = lease.reconciler
        passes_read = reconciler.queues_read
        wait_until(lambda: reconciler.queues_read > passes_read or reconciler.due() == 0, timeout=TIMEOUT,
                   message="a pass after the consumer read its queues")
        client, keys = conn.transport.etcd, conn.transport.keys
        stray = stray_on(client, keys, "unannounced-1", lease.lease_id)
        before = reconciler.queues_read
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # ten passes or so: none reads the idle queue
            with pytest.raises(TimeoutError):
                conn.drain_events(timeout=0.3)
        assert reconciler.queues_read == before and client.get(stray)[0] is not None
        lease.sweep()  # the full pass, run now
        wait_until(lambda: client.get(stray)[0] is None, timeout=TIMEOUT, message="the stray key given back")
