"""Fixtures for the wheel checks: one real etcd (ETCD_BIN picks 3.4 or 3.5), unique key prefixes."""
from __future__ import annotations

import uuid

import pytest

from scripts.etcd_server import EtcdServer


@pytest.fixture(scope="session")
def etcd_url(tmp_path_factory):
    """One etcd for the run, on a free loopback port with a temporary data dir."""
    with EtcdServer(data_dir=str(tmp_path_factory.mktemp("etcd"))) as server:
        yield server.url


@pytest.fixture
def etcd_prefix() -> str:
    return f"/lib-{uuid.uuid4().hex[:12]}"
