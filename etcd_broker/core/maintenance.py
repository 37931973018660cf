"""etcd's own health for operators: database size, compaction lag, alarms; and defragmentation.

``etcd_status(client, keys)`` is read-only (one Status call, one alarm list, one short watch that
etcd cancels at once with the revision it compacted last); ``manage.py queues`` and the
``/metrics`` collector show it. ``defragment_members(client, keys)`` gives the space that compaction
freed back to the file system, one member at a time (``manage.py etcd_defrag``): a member is
blocked while it defragments (seconds per GiB), so never all at once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
from etcd3 import etcdrpc

from etcd_broker.core.client import EtcdClient, EtcdConfig, make_client
from etcd_broker.core.ops import KeySpace

logger = logging.getLogger(__name__)

#: StatusResponse field ``dbSizeInUse`` (etcd 3.4+), absent from python3-etcd3's older proto.
DB_SIZE_IN_USE_FIELD = 9
#: Seconds the probe waits for etcd's "compacted" answer (etcd sends it within its 100 ms watcher sync;
#: none comes if nothing was ever compacted).
PROBE_TIMEOUT = 0.5


@dataclass(frozen=True)
class EtcdStatus:
    """One member's view: sizes in bytes, revisions, alarms (e.g. ``["NOSPACE"]``)."""

    endpoint: str
    version: str
    db_size: int
    db_size_in_use: int | None
    revision: int
    compact_revision: int
    alarms: tuple[str, ...]

    @property
    def compaction_lag(self) -> int:
        """Revisions of history etcd keeps (and range reads may walk) since the last compaction."""
        return self.revision - self.compact_revision

    def describe(self) -> str:
        in_use = f", {self.db_size_in_use / 1e6:.1f} MB in use" if self.db_size_in_use is not None else ""
        return (f"etcd {self.version} at {self.endpoint}: DB {self.db_size / 1e6:.1f} MB{in_use}; revision "
                f"{self.revision}, compacted at {self.compact_revision} (lag {self.compaction_lag}); "
                f"alarms: {', '.join(self.alarms) or 'none'}")


def etcd_status(client: EtcdClient, keys: KeySpace) -> EtcdStatus:
    """The status of the member ``client`` talks to (``keys``: where the compaction probe may watch)."""
    response = client.call("Status", etcdrpc.StatusRequest(), service="Maintenance")
    alarms = client.call("Alarm", etcdrpc.AlarmRequest(action=etcdrpc.AlarmRequest.GET), service="Maintenance")
    return EtcdStatus(endpoint=_endpoint(client), version=response.version, db_size=response.dbSize,
                      db_size_in_use=_varint_field(response.SerializeToString(), DB_SIZE_IN_USE_FIELD),
                      revision=response.header.revision, compact_revision=compact_revision(client, keys),
                      alarms=tuple(etcdrpc.AlarmType.Name(alarm.alarm) for alarm in alarms.alarms))


def compact_revision(client: EtcdClient, keys: KeySpace) -> int:
    """The revision etcd compacted last (0: never): a watch from revision 1 is cancelled with it."""
    probe = keys.compaction_probe().encode()
    request = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(key=probe, start_revision=1))
    stub = etcdrpc.WatchStub(client.channel)
    try:
        for response in stub.Watch(iter([request]), PROBE_TIMEOUT, credentials=client.call_credentials,
                                   metadata=client.metadata):
            if response.compact_revision or response.canceled:
                return response.compact_revision
    except grpc.RpcError as exc:  # the deadline ran out first (etcd may report it as UNKNOWN)
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED and "deadline" not in (exc.details() or ""):
            raise
    return 0


def _varint_field(message: bytes, number: int) -> int | None:
    """The value of varint field ``number`` in a serialized protobuf message (None if absent)."""
    position = 0
    while position < len(message):
        tag, position = _varint(message, position)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, position = _varint(message, position)
            if field == number:
                return value
        elif wire == 1:
            position += 8
        elif wire == 2:
            length, position = _varint(message, position)
            position += length
        elif wire == 5:
            position += 4
        else:
            return None
    return None


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _endpoint(client: EtcdClient) -> str:
    endpoint = getattr(client, "endpoint_in_use", None)
    return getattr(endpoint, "netloc", None) or client.config.describe()


def member_configs(client: EtcdClient) -> list[EtcdConfig]:
    """One configuration per cluster member (its first client URL), with ``client``'s credentials."""
    configs = []
    for member in client.call("MemberList", etcdrpc.MemberListRequest(), service="Cluster").members:
        if not member.clientURLs:
            continue  # a learner or a member not started yet
        parsed = urlsplit(member.clientURLs[0])
        configs.append(EtcdConfig(endpoints=((parsed.hostname, parsed.port),), user=client.config.user,
                                  password=client.config.password, ca_cert=client.config.ca_cert,
                                  cert_key=client.config.cert_key, cert_cert=client.config.cert_cert,
                                  timeout=client.config.timeout))
    return configs


def defragment_members(client: EtcdClient, keys: KeySpace, timeout: float = 600.0) -> list[tuple[EtcdStatus, EtcdStatus]]:
    """Defragment every member in turn; (status before, status after) for each.

    Compaction marks history free inside the file; defragmenting rewrites the file without it.
    A member answers nothing while it defragments, so members go one after the other.
    """
    done: list[tuple[EtcdStatus, EtcdStatus]] = []
    for config in member_configs(client):
        member = make_client(config, timeout=timeout)
        try:
            before = etcd_status(member, keys)
            logger.info("defragmenting %s (DB %.1f MB)", before.endpoint, before.db_size / 1e6)
            member.call("Defragment", etcdrpc.DefragmentRequest(), service="Maintenance")
            done.append((before, etcd_status(member, keys)))
        finally:
            member.close()
    return done

