"""Looking at and steering a loopback etcd cluster in tests: who leads, who is connected where."""
from __future__ import annotations

import os
from collections import Counter

from etcd3 import etcdrpc

from etcd_broker.core.client import make_client
from scripts.etcd_server import EtcdServer
from tests.helpers import wait_until


def member_status(member: EtcdServer):
    """The member's own Status (its id, the leader it follows), asked of it alone; None if it is silent."""
    client = make_client(member.url, timeout=1.0)
    try:
        return client.maintenancestub.Status(etcdrpc.StatusRequest(), 1.0)
    except Exception:  # noqa: BLE001 - not answering is an answer here
        return None
    finally:
        client.close()


def leader_of(members: list[EtcdServer]) -> EtcdServer | None:
    """The running member that says it leads, or None while there is no leader."""
    for member in members:
        status = member_status(member) if member.running else None
        if status is not None and status.leader and status.leader == status.header.member_id:
            return member
    return None


def divergence(members: list[EtcdServer], attempts: int = 5) -> str | None:
    """None if every member holds the same keys at the newest revision all of them have (etcd's HashKV at that
    revision, asked of each member alone); else each member's revision and hash. Members differ only after a
    bug: an etcd 3.5.0-3.5.2 member SIGKILLed under load can skip a write it had applied (scripts/etcd_server.py,
    INCONSISTENT_AFTER_CRASH), and every later compare on a mod_revision then goes its own way there."""
    found = ""
    for _ in range(attempts):  # a compaction between two members' answers: ask again
        clients = [make_client(member.url, timeout=5.0) for member in members]
        try:
            revision = min(client.maintenancestub.Status(etcdrpc.StatusRequest(), 5).header.revision
                           for client in clients)
            hashes = [client.maintenancestub.HashKV(etcdrpc.HashKVRequest(revision=revision), 5) for client in clients]
        finally:
            for client in clients:
                client.close()
        if len({h.compact_revision for h in hashes}) > 1:
            continue
        if len({h.hash for h in hashes}) == 1:
            return None
        found = f"at revision {revision}: " + ", ".join(
            f"{member.name} hash {h.hash} (its revision {h.header.revision})" for member, h in zip(members, hashes, strict=True))
        break
    return found or None


def make_leader(members: list[EtcdServer], target: EtcdServer) -> None:
    """Hand leadership to ``target`` (etcd's MoveLeader, asked of the current leader)."""
    leader = wait_until(lambda: leader_of(members), timeout=20, message="a leader")
    if leader is target:
        return
    target_id = member_status(target).header.member_id
    client = make_client(leader.url)
    try:
        client.maintenancestub.MoveLeader(etcdrpc.MoveLeaderRequest(targetID=target_id), 10)
    finally:
        client.close()
    wait_until(lambda: leader_of(members) is target, timeout=20, message="leadership moved")


def connected_ports(pid: int) -> Counter:
    """Remote ports process ``pid`` has established TCP connections to (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports: Counter = Counter()
    for name in ("tcp", "tcp6"):  # gRPC uses dual-stack sockets: IPv4 peers appear in tcp6
        with open(f"/proc/{pid}/net/{name}") as table:
            for line in list(table)[1:]:
                fields = line.split()
                if fields[9] in inodes and fields[3] == "01":  # 01: ESTABLISHED
                    ports[int(fields[2].rsplit(":", 1)[1], 16)] += 1
    return ports


def busiest_member(members: list[EtcdServer], pids: list[int]) -> tuple[EtcdServer, int]:
    """The member most of ``pids`` are connected to, and how many are."""
    counts = Counter({member.name: 0 for member in members})
    for pid in pids:
        ports = connected_ports(pid)
        for member in members:
            if ports[member.port]:
                counts[member.name] += 1
    name, count = counts.most_common(1)[0]
    return next(m for m in members if m.name == name), count
