"""Turn on etcd authentication through its gRPC Auth service (what ``etcdctl user/role/auth`` do).

:func:`enable_auth` adds ``root`` (required before auth can be enabled) and an
application user whose role may read and write one key prefix only, the least
privilege docs/deploy.md recommends.
"""
from __future__ import annotations

from etcd3.etcdrpc import auth_pb2, rpc_pb2

from etcd_broker.core.client import EtcdClient
from etcd_broker.core.ops import range_end

#: The permission etcd's ``role grant-permission --prefix <role> readwrite <prefix>`` gives.
READWRITE = auth_pb2.Permission.READWRITE


def add_user(client: EtcdClient, user: str, password: str, role: str) -> None:
    stub = client.authstub
    stub.RoleAdd(rpc_pb2.AuthRoleAddRequest(name=role), client.timeout, metadata=client.metadata)
    stub.UserAdd(rpc_pb2.AuthUserAddRequest(name=user, password=password), client.timeout,
                 metadata=client.metadata)
    stub.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user=user, role=role), client.timeout,
                       metadata=client.metadata)


def grant_prefix(client: EtcdClient, role: str, prefix: str) -> None:
    """Let ``role`` read, write and watch every key under ``prefix`` (which ends in '/')."""
    permission = auth_pb2.Permission(permType=READWRITE, key=prefix.encode(), range_end=range_end(prefix).encode())
    client.authstub.RoleGrantPermission(rpc_pb2.AuthRoleGrantPermissionRequest(name=role, perm=permission),
                                        client.timeout, metadata=client.metadata)


def enable_auth(client: EtcdClient, root_password: str, user: str, password: str, prefix: str) -> None:
    """Create ``root`` and ``user`` (read-write on ``prefix`` only), then switch authentication on."""
    add_user(client, "root", root_password, role="root")
    add_user(client, user, password, role=user)
    grant_prefix(client, user, prefix)
    client.authstub.AuthEnable(rpc_pb2.AuthEnableRequest(), client.timeout, metadata=client.metadata)
