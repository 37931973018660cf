"""The one place that touches private names of python3-etcd3, Celery and kombu.

Each entry says what it uses and why no public API does the job. An upgrade that moves
one of these names breaks here, and the library's compat test names it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def kv_stub(client: Any) -> Any:
    """python3-etcd3's KV stub on the endpoint in use (``client.kvstub``).

    Why: etcd3's public methods cannot run a transaction with count_only/keys_only/limit
    ranges or hand back the TxnResponse header revision; ops.py sends the protobufs itself.
    """
    return client.kvstub


def raise_connection_error(client: Any, exc: grpc.RpcError) -> None:
    """Map a KV call's gRPC error to our connection errors (``client._manage_grpc_errors``).

    Why: it marks the endpoint failed and fails over (etcd_broker.client.EtcdClient overrides
    etcd3's); raises a CONNECTION_ERRORS member, or returns and the caller re-raises ``exc``.
    """
    client._manage_grpc_errors(exc)


def retry_publish(app: Any, publish: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Publish a chord callback the way Celery's own backends do (``app.amqp._retry_publish``).

    Why: it retries this one message per its retry policy, reconnecting between tries,
    after the header already ran; ``callback.delay`` alone has no such mode.
    """
    return app.amqp._retry_publish(publish, *args, **kwargs)
