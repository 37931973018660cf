"""The one place that names the private names of python3-etcd3 and Celery we still use.

Each entry says what it uses and why no public API does the job. An upgrade that moves
one of these names breaks here, and ``tests/broker/test_compat.py`` names it.
The list, with reasons, is in docs/transport.md ("Private names we rely on").
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: Every private name used below, as (owner, attribute): the compat test checks each one exists.
PRIVATE_NAMES = (
    ("etcd3.MultiEndpointEtcd3Client", "_manage_grpc_errors"),
    ("celery.app.amqp.AMQP", "_retry_publish"),
    ("celery.concurrency.prefork.TaskPool", "_pool"),
    ("celery.concurrency.asynpool.AsynPool", "_waiting_to_start"),
)


# -- python3-etcd3 ------------------------------------------------------------------------
# etcd_broker.core.client.EtcdClient overrides etcd3's ``_manage_grpc_errors``: every public
# etcd3 method (get, put, transaction, lease...) hands its gRPC errors to that hook, and
# overriding it is how those methods map errors by status code, re-authenticate and fail over.
# It goes once no module calls etcd3's methods directly (all through core/ops.py and
# EtcdClient.call, which map errors themselves). Stubs, failover and fork need no private name:
# EtcdClient caches its stubs by channel, fails over with Endpoint.fail() and the public
# ``channel``, and client.py's ChildLock replaces a lock in a forked child instead of re-initialising it.

# -- Celery ---------------------------------------------------------------------------------

def retry_publish(app: Any, publish: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Publish a chord callback the way Celery's own backends do (``app.amqp._retry_publish``).

    Why: it retries this one message per its retry policy, reconnecting between tries,
    after the header already ran; ``callback.delay`` alone has no such mode.
    """
    return app.amqp._retry_publish(publish, *args, **kwargs)


def pool_processes(pool: Any) -> tuple[list[int], set[int]] | None:
    """A prefork pool's child pids (public: ``pool.info["processes"]``) and the pids of those not up
    yet (``pool._pool._waiting_to_start``); None for a pool without children (threads, solo).

    Why: Celery's pool reports its children's pids (``TaskPool.info``, ``inspect stats``) but not
    which of them billiard still waits on: a child that hangs while starting is listed like a
    working one until billiard kills it, and its replacement is listed again.
    """
    starting = getattr(getattr(pool, "_pool", None), "_waiting_to_start", None)
    if starting is None:
        return None
    return list(pool.info.get("processes", ())), {process.pid for process in list(starting)}
