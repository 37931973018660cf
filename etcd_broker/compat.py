"""The one place that touches private names of python3-etcd3, Celery, kombu and CPython.

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
    ("etcd3.MultiEndpointEtcd3Client", "_stubs"),
    ("etcd3.MultiEndpointEtcd3Client", "_current_endpoint_label"),
    ("celery.app.amqp.AMQP", "_retry_publish"),
    ("celery.worker.request.Request", "_context"),
    ("celery.concurrency.prefork.TaskPool", "_pool"),
    ("celery.concurrency.asynpool.AsynPool", "_pool"),
    ("celery.concurrency.asynpool.AsynPool", "_waiting_to_start"),
    ("threading.Lock", "_at_fork_reinit"),
)


# -- python3-etcd3 ------------------------------------------------------------------------
# etcd_broker.core.client.EtcdClient also overrides etcd3's ``_manage_grpc_errors``: every public
# etcd3 method (get, put, transaction, lease...) hands its gRPC errors to that hook, and
# overriding it is how those methods map errors by status code, re-authenticate and fail over.

def clear_stubs(client: Any) -> None:
    """Forget the cached gRPC stubs (``client._stubs``) so the next call builds them again.

    Why: after re-authentication, failover or a fork the stubs must bind to the current
    channel; etcd3's own ``_clear_old_stubs`` also closes its shared watcher, which we never use.
    """
    client._stubs.clear()


def current_endpoint(client: Any) -> str:
    """The label (``host:port``) of the endpoint in use (``client._current_endpoint_label``).

    Why: etcd3 has ``endpoint_in_use`` (the Endpoint) but no public name for its label, and
    failover round robin needs the position in ``client.endpoints``.
    """
    return client._current_endpoint_label


def use_endpoint(client: Any, label: str) -> None:
    """Switch to the endpoint ``label`` (setting ``client._current_endpoint_label``).

    Why: etcd3 switches only when the current endpoint has failed and its retry window
    has not passed; we fail over at once, round robin (client.EtcdClient.fail_over).
    """
    client._current_endpoint_label = label


# -- Celery ---------------------------------------------------------------------------------

def retry_publish(app: Any, publish: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Publish a chord callback the way Celery's own backends do (``app.amqp._retry_publish``).

    Why: it retries this one message per its retry policy, reconnecting between tries,
    after the header already ran; ``callback.delay`` alone has no such mode.
    """
    return app.amqp._retry_publish(publish, *args, **kwargs)


def request_context(request: Any) -> Any:
    """The task context (``celery.app.task.Context``) of a worker request (``request._context``).

    Why: it is what Celery's trace hands the result backend (``request=`` of ``mark_as_done``:
    task name, arguments, callbacks, chord); the worker request (``celery.worker.request.Request``)
    has no public name for it, and building one would copy Celery's merge of headers and body.
    """
    return request._context


def pool_processes(pool: Any) -> tuple[list[Any], set[Any]] | None:
    """A prefork pool's child processes and those not up yet (``pool._pool._pool``,
    ``pool._pool._waiting_to_start``); None for a pool without children (threads, solo).

    Why: Celery's pool reports its children's pids (``TaskPool.info``, ``inspect stats``) but not
    which of them billiard still waits on: a child that hangs while starting is listed like a
    working one until billiard kills it, and its replacement is listed again.
    """
    asynpool = getattr(pool, "_pool", None)
    starting = getattr(asynpool, "_waiting_to_start", None)
    if asynpool is None or starting is None:
        return None
    return list(asynpool._pool), set(starting)


# -- CPython --------------------------------------------------------------------------------

def reinit_lock(lock: Any) -> None:
    """Unlock ``lock`` in a forked child (``lock._at_fork_reinit()``, what threading and logging use).

    Why: a thread that held it in the parent does not exist in the child, so it would stay
    locked for ever; the module-level registries of clients, hubs and leases are guarded by such locks.
    """
    lock._at_fork_reinit()
