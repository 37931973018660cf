"""A redelivered acks_late task that already succeeded is not run again (the chaos test's seed
2875818680 on prefork: a chord callback ran twice on one live worker).

The race: a prefork child accepts and finishes a task while the worker's main process is blocked on
an etcd call (a leader change); the call fails, Celery resets the connection before it has read the
child's acceptance, so kombu gives the message back and Celery's pool forgets the job. The message
comes back marked redelivered (membership.restore_message); with ``worker_deduplicate_successful_tasks``
Celery looks the task's result up in our backend first and acks it unrun. This test makes the
redelivery by hand: the same task id published again and moved into the queue as a restore moves it.
"""
from __future__ import annotations

import pytest

from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from etcd_broker.core.keys import KeySpace
from etcd_broker.transport.membership import mark_redelivered
from tests.helpers import wait_until
from tests.reliability import counting_app
from tests.reliability.counting import read_markers

#: A queue no worker consumes: the second copy waits there until the test moves it.
HOLD_QUEUE = "hold"


@pytest.mark.reliability
@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_a_redelivered_task_that_already_succeeded_is_acked_unrun(etcd_url, etcd_prefix, counting_workers, pool):
    [worker] = counting_workers(etcd_url, 1, pool=pool)
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    first = counting_app.work.apply_async((0.05,))
    assert first.get(timeout=60) == first.id

    counting_app.work.apply_async((0.05,), task_id=first.id, queue=HOLD_QUEUE)
    wait_until(lambda: ops.get(client, keys.ready(HOLD_QUEUE), prefix=True, count_only=True).count == 1,
               timeout=30, message="the second copy waits in the hold queue")
    [kv] = ops.get(client, keys.ready(HOLD_QUEUE), prefix=True).kvs
    moved = keys.ready_message("celery", keys.position_of(kv.key.decode()))
    ops.txn(client, success=[ops.delete(kv.key), ops.put(moved, mark_redelivered(kv.value))])

    wait_until(lambda: worker.log().count(f"[{first.id}] received") == 2, timeout=60,
               message="the worker received the redelivered copy")
    wait_until(lambda: not any(ops.get(client, prefix, prefix=True, count_only=True).count
                               for prefix in (keys.ready("celery"), keys.unacked("celery"))),
               timeout=30, message="the redelivered copy acked")
    assert len(read_markers(client, etcd_prefix, "started")[first.id]) == 1
    if pool == "prefork":  # a threads worker remembers the id (successful_requests): it skips without a word
        assert f"[{first.id}] Task already completed successfully" in worker.log()
