"""Celery tasks the broker drops because they expired: their result becomes REVOKED.

Celery's worker marks a task it receives after its ``expires`` as REVOKED (reason
"expired"), so ``result.get()`` raises ``TaskRevokedError`` and monitors show it. Our
transport drops such a message itself (at publish when it is already past its deadline, at
claim when it expired waiting), so no worker ever sees it: the transport writes that state
instead, through the current Celery app's result backend when it is ours (etcd). A message
etcd deletes by its TTL lease while no consumer looks is not seen by anyone (docs/transport.md).
"""
from __future__ import annotations

import json
import logging
import sys

logger = logging.getLogger(__name__)

#: The reason Celery's worker gives an expired task's TaskRevokedError.
REASON = "expired"


def revoke_expired(message: dict | bytes) -> bool:
    """Store REVOKED for the Celery task in ``message`` (a kombu message, or its JSON); True if stored.

    Nothing happens for a plain kombu message, a task that ignores its result, or an app
    whose result backend is not etcd. Never raises: dropping the message must go on.
    """
    try:
        if isinstance(message, bytes):
            message = json.loads(message)
        headers = message.get("headers") or {}
        task_id = headers.get("id")
        if not (isinstance(task_id, str) and headers.get("task")) or headers.get("ignore_result"):
            return False
        backend = _etcd_backend()
        if backend is None:
            return False
        backend.mark_as_revoked(task_id, REASON)
    except Exception as exc:  # noqa: BLE001 - a result write must never stop the drop
        logger.warning("expired task's REVOKED state not stored: %s", exc)
        return False
    logger.info("task %s expired before delivery: dropped, stored REVOKED", task_id)
    return True


def _etcd_backend():
    # Celery imported late, and only if the process loaded it: kombu-only users import no Celery
    # (and a process without Celery has no app whose results to write).
    if "celery" not in sys.modules:
        return None
    from celery import current_app

    from etcd_broker.backend.result_backend import EtcdBackend

    backend = current_app.backend
    return backend if isinstance(backend, EtcdBackend) else None
