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
    if attribute in ("_stubs", "_current_endpoint_label") and isinstance(target, type):
        return  # instance attributes: checked on a live client below
    if attribute in ("_pool", "_waiting_to_start") and isinstance(target, type):
        return  # instance attributes of a running pool: tests/transport/test_pool_health.py reads them
    assert hasattr(target, attribute), f"{owner}.{attribute} is gone: update etcd_broker/compat.py"


def test_it_reads_and_switches_endpoints_on_a_live_client(etcd_url):
    client = make_client(f"{etcd_url},127.0.0.1:1")
    try:
        assert isinstance(client._stubs, dict), "etcd3 client._stubs is no longer a dict"
        label = compat.current_endpoint(client)
        assert label in client.endpoints, "etcd3 _current_endpoint_label no longer names an endpoint"
        other = next(name for name in client.endpoints if name != label)
        client.kvstub  # noqa: B018 - builds and caches a stub
        compat.use_endpoint(client, other)
        assert compat.current_endpoint(client) == other
        compat.clear_stubs(client)
        assert not client._stubs
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


def test_reinit_lock_unlocks_a_held_lock():
    for lock in (threading.Lock(), threading.RLock()):
        lock.acquire()
        compat.reinit_lock(lock)
        assert lock.acquire(blocking=False), f"{type(lock).__name__}._at_fork_reinit did not unlock"
        lock.release()
