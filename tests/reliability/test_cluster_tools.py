"""The chaos test's consistency check itself: ``divergence`` finds members whose keys differ.

A diverged cluster cannot be made on purpose (etcd 3.5.0-3.5.2 does it by chance, under SIGKILL), so two
single-member etcds stand in for two members of one: the same writes give the same hash at a revision,
one different value does not.
"""
from __future__ import annotations

from etcd_broker.core.client import make_client
from scripts.etcd_server import EtcdServer
from tests.reliability.cluster_tools import divergence


def write(server: EtcdServer, values: list[str]) -> None:
    client = make_client(server.url)
    try:
        for n, value in enumerate(values):
            client.put(f"/hash/{n}", value)
    finally:
        client.close()


def test_members_with_the_same_writes_agree_and_one_different_value_is_reported():
    with EtcdServer(name="first") as first, EtcdServer(name="second") as second:
        write(first, ["a", "b", "c"])
        write(second, ["a", "b", "c"])
        assert divergence([first, second]) is None

        write(first, ["a", "b", "c", "same"])
        write(second, ["a", "b", "c", "other"])
        found = divergence([first, second])
        assert found is not None and "first hash" in found and "second hash" in found, found
