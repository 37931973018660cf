"""Fault: etcd runs out of space (a small --quota-backend-bytes, NOSPACE alarm). Publishes fail with an
error naming the quota and leave nothing behind; after the operator's compaction, defragmentation and
alarm disarm, the refused tasks are sent again and everything completes, nothing lost."""
from __future__ import annotations

import time
import uuid

import pytest

from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from etcd_broker.exceptions import EtcdNoSpace
from scripts.etcd_server import EtcdServer
from tests.helpers import wait_until
from tests.reliability import counting_app
from tests.reliability.counting import PUBLISH_RETRY_POLICY, Tally, locate, read_markers

LEASE_TTL = 3
#: A quota small enough to fill in a second (etcd's default is 2 GiB).
QUOTA_BYTES = 8 * 1024 * 1024
#: One filler value, under etcd's 1.5 MiB request limit.
FILLER_BYTES = 512 * 1024
FILLER_PREFIX = "/filler/"
BATCH = 10
#: The first batch is still queued or running when etcd fills up.
BACKLOG_TASK_SECONDS = 1.0
#: etcd stays full this long before the operator frees space.
FULL_SECONDS = 4.0


def publish(task_ids: list[str], accepted: list[str], refused: list[tuple[str, str]], seconds: float = 0.1) -> None:
    """Send one task per id the way the other fault tests do (Celery's publish retry)."""
    for task_id in task_ids:
        try:
            counting_app.work.apply_async((seconds,), task_id=task_id, retry=True, retry_policy=PUBLISH_RETRY_POLICY)
        except EtcdNoSpace as exc:
            refused.append((task_id, str(exc)))
        else:
            accepted.append(task_id)


def fill(client) -> int:
    """Write filler values until etcd refuses a write for lack of space; how many it took."""
    for count in range(10 * QUOTA_BYTES // FILLER_BYTES):
        try:
            client.put(f"{FILLER_PREFIX}{count}", b"x" * FILLER_BYTES)
        except EtcdNoSpace:
            return count
    raise AssertionError(f"etcd took {10 * QUOTA_BYTES:,} bytes of filler under a {QUOTA_BYTES:,}-byte quota")


def free_space(client) -> None:
    """The operator's way out; each call's etcdctl equivalent alongside (docs/reliability.md)."""
    client.delete_prefix(FILLER_PREFIX)  # etcdctl del --prefix /filler/ (whatever filled it)
    revision = ops.get(client, FILLER_PREFIX, count_only=True).header.revision
    client.compact(revision, physical=True)  # etcdctl compact --physical <revision>
    client.defragment()  # etcdctl defrag
    for alarm in client.list_alarms():  # etcdctl alarm disarm (each alarm by its member id, as etcdctl does)
        client.disarm_alarm(alarm.member_id)


@pytest.mark.reliability
def test_publishes_fail_clearly_when_etcd_is_full_and_resume_after_the_operator_frees_space(
        tmp_path, etcd_url, etcd_prefix, counting_workers, summary):
    server = EtcdServer(data_dir=str(tmp_path / "etcd"), extra_args=["--quota-backend-bytes", str(QUOTA_BYTES)])
    server.start()
    try:
        url = server.url
        # executions are counted on the session's etcd, so tasks finish while this one is full
        (worker,) = counting_workers(url, 1, lease_ttl=LEASE_TTL, marker_url=etcd_url)
        client, counter = get_client(url), get_client(etcd_url)
        accepted: list[str] = []
        refused: list[tuple[str, str]] = []
        before = [uuid.uuid4().hex for _ in range(BATCH)]
        publish(before, accepted, refused, seconds=BACKLOG_TASK_SECONDS)
        wait_until(lambda: len(read_markers(counter, etcd_prefix, "started")) >= 2, timeout=30,
                   message="the worker busy with a backlog behind it")
        fillers = fill(client)
        full_at = time.time()
        assert [alarm.alarm_type for alarm in client.list_alarms()] == [1]  # 1: NOSPACE
        during = [uuid.uuid4().hex for _ in range(BATCH)]
        publish(during, accepted, refused)
        assert [task for task, _ in refused] == during
        assert all("--quota-backend-bytes" in message and "NOSPACE" in message for _, message in refused)
        assert locate(client, etcd_prefix, during) == {task: [] for task in during}  # nothing half-written
        time.sleep(FULL_SECONDS)  # the worker meets the full etcd: claims, results and acks refused

        free_space(client)
        freed_at = time.time()
        assert list(client.list_alarms()) == []

        resent = [task for task, _ in refused]
        publish(resent, accepted, [])  # the callers who were refused send again
        after = [uuid.uuid4().hex for _ in range(BATCH)]
        publish(after, accepted, [])
        assert [counting_app.app.AsyncResult(t).get(timeout=30) for t in before + resent + after] == \
            before + resent + after

        done = read_markers(counter, etcd_prefix, "done")
        tally = Tally(f"etcd out of space ({QUOTA_BYTES // 2**20} MiB quota, {fillers} filler writes), freed",
                      accepted, refused, read_markers(counter, etcd_prefix, "started"), done, full_at, freed_at,
                      fetched=before + resent + after)
        summary(tally)
        assert tally.lost == [], locate(client, etcd_prefix, tally.lost)
        assert tally.duplicated == [] and tally.completed == 3 * BATCH
        assert worker.process.poll() is None, "the worker died while etcd was full"
    finally:
        counting_app.release()
        server.stop()
