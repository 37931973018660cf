"""Group commit (etcd_broker/core/ops.py) against a real etcd: shared transactions, separate outcomes."""
from __future__ import annotations

import threading

from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import GroupCommit

#: Concurrent writers in these tests.
THREADS = 32


def run_all(calls) -> list:
    """Start every call in its own thread at once; their results in order."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index: int) -> None:
        start.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_concurrent_puts_are_all_durable_in_fewer_revisions(etcd_url, etcd_prefix):
    client = get_client(etcd_url)
    committer = GroupCommit(client)
    before = ops.get(client, "/").header.revision
    keys = [f"{etcd_prefix}/gc/{i}" for i in range(THREADS)]
    responses = run_all([lambda k=k: committer.txn(success=[ops.put(k, k)]) for k in keys])
    assert all(r.succeeded for r in responses)
    for key, response in zip(keys, responses, strict=True):
        value, meta = client.get(key)
        assert value == key.encode() and meta.mod_revision == response.header.revision
    revisions = {r.header.revision for r in responses}
    # shared transactions, one revision each (the etcd is shared: another test's lease expiring, such as
    # a publish marker's 120 s after it was written, may take a revision in between, so no gap check)
    assert min(revisions) > before and len(revisions) < THREADS


def test_a_failed_compare_fails_only_its_own_transaction(etcd_url, etcd_prefix):
    client = get_client(etcd_url)
    committer = GroupCommit(client)
    taken = f"{etcd_prefix}/gc-taken"
    client.put(taken, "x")
    calls = [lambda i=i: committer.txn([ops.compare(f"{etcd_prefix}/gc-cas/{i}", "version", 0)],
                                       [ops.put(f"{etcd_prefix}/gc-cas/{i}", "v")]) for i in range(THREADS)]
    calls.append(lambda: committer.txn([ops.compare(taken, "version", 0)], [ops.put(taken, "y")],
                                       [ops.range_(taken)]))
    responses = run_all(calls)
    assert all(r.succeeded for r in responses[:-1])
    assert not responses[-1].succeeded and ops.first_kv(responses[-1].responses[0]).value == b"x"
    assert client.get(taken)[0] == b"x"
    assert len(list(client.get_prefix(f"{etcd_prefix}/gc-cas/"))) == THREADS
