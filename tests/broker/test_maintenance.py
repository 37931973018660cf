"""etcd_broker.core.maintenance against a real etcd: the status operators see (DB size, compaction lag,
alarms) and defragmentation member by member."""
from __future__ import annotations

from etcd_broker.core.client import make_client
from etcd_broker.core.maintenance import defragment_members, etcd_status
from etcd_broker.core.ops import KeySpace


def test_status_reports_the_compacted_revision_and_defragmenting_shrinks_the_file(private_etcd, etcd_prefix):
    client = make_client(private_etcd.url)
    keys = KeySpace(etcd_prefix)
    try:
        fresh = etcd_status(client, keys)
        assert fresh.compact_revision == 0 and fresh.alarms == () and fresh.db_size > 0
        for index in range(1500):  # history: 1,500 revisions of 10 keys
            client.put(f"{etcd_prefix}/k{index % 10}", "v" * 1000)
        _, meta = client.get(f"{etcd_prefix}/k9")
        client.compact(meta.mod_revision, physical=True)
        compacted = etcd_status(client, keys)
        assert compacted.compact_revision == meta.mod_revision
        assert compacted.compaction_lag == compacted.revision - meta.mod_revision
        assert compacted.db_size_in_use is not None and compacted.db_size_in_use <= compacted.db_size
        [(before, after)] = defragment_members(client, keys)
        assert before.db_size == compacted.db_size
        assert after.db_size < before.db_size / 2, (before, after)
        assert client.get(f"{etcd_prefix}/k3")[0] == b"v" * 1000  # nothing live was lost
    finally:
        client.close()
