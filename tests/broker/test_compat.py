"""The private names etcd_broker/compat.py relies on still exist in the pinned versions.

An upgrade of python3-etcd3, Celery or CPython that moves one fails here, naming it.
"""
from __future__ import annotations

import importlib
import threading

import pytest

from etcd_broker import compat
from etcd_broker.core.client import EtcdClient, make_client


def _resolve(dotted: str):
    if dotted == "threading.Lock":
        return threading.Lock()
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("owner", "attribute"), compat.PRIVATE_NAMES, ids=lambda v: str(v))
def test_it_finds_each_private_name(owner, attribute):
    target = _resolve(owner)
    if attribute in ("_pool", "_waiting_to_start") and isinstance(target, type):
        return  # instance attributes of a running pool: tests/transport/test_pool_health.py reads them
    assert hasattr(target, attribute), f"{owner}.{attribute} is gone: update etcd_broker/compat.py"


def test_failover_and_stubs_need_no_private_name(etcd_url):
    """Round robin through etcd3's public Endpoint.fail() and ``channel``; stubs follow the channel."""
    port = etcd_url.rsplit(":", 1)[1]
    client = make_client(f"etcdv3://127.0.0.1:1,127.0.0.1:{port},127.0.0.1:2")
    try:
        labels = list(client.endpoints)
        first = client.endpoint_in_use.netloc
        stub = client.kvstub
        assert client.kvstub is stub, "a stub is made again on the same channel"
        client.fail_over()
        second = client.endpoint_in_use.netloc
        assert second == labels[(labels.index(first) + 1) % 3] and client.endpoints[first].is_failed()
        assert client.kvstub is not stub, "the stub still calls the failed endpoint"
        client.fail_over()
        assert client.endpoint_in_use.netloc not in (first, second)  # the third: the first is still failed
        live = f"127.0.0.1:{port}"
        while client.endpoint_in_use.netloc != live:  # each dead one in turn, as a failed call would
            for endpoint in client.endpoints.values():
                endpoint.last_failed = 0  # their marks lapse (ENDPOINT_RETRY_SECONDS)
            client.fail_over()
        client.put("/compat/failover", "ok")
        assert client.get("/compat/failover")[0] == b"ok"
    finally:
        client.close()


def test_etcd3_still_routes_public_methods_through_the_error_hook(etcd_url, monkeypatch):
    """EtcdClient overrides etcd3's _manage_grpc_errors; etcd3's get() must still call it."""
    client = make_client(etcd_url.rsplit(":", 1)[0] + ":1", timeout=1)  # nothing listens on port 1
    seen = []
    original = EtcdClient._manage_grpc_errors

    def spy(self, exc):
        seen.append(exc)
        return original(self, exc)

    monkeypatch.setattr(EtcdClient, "_manage_grpc_errors", spy)
    try:
        with pytest.raises(Exception):  # noqa: B017 - which one is test_errors.py's subject
            client.get("/k")
        assert seen, "etcd3's public methods no longer call _manage_grpc_errors: errors go unmapped"
    finally:
        client.close()
