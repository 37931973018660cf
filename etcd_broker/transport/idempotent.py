"""Idempotent publish: a publish retried after an ambiguous failure is stored once.

A publish whose etcd call fails without an answer (deadline exceeded, connection lost after
sending, a leader change) may have been committed. kombu's ``Connection.ensure`` (Celery's
publish retry) then runs the publish again; without a guard the retry stores a second copy
and the task runs twice.

So a publish is named once, before its first attempt: :meth:`Channel.basic_publish` puts a
publish id (a sequence number, keys.py) in the message's properties, the dict kombu hands to
every retry of one ``Producer.publish``, and in its headers, the dict Celery hands to every
retry of a worker's callback publish (``AMQP._retry_publish``: ``Producer.publish`` called again),
and takes it out of both once the publish returned. The id is never stored with the message (a
consumer that republishes a message's properties makes a new publish). Each attempt is one
transaction that

* compares ``p/<queue>/<id>`` (the publish marker) to absent, and
* writes the message and the marker (empty, on a marker lease of MARKER_SECONDS or a little more).

A retry whose first attempt committed finds the marker and writes nothing, whether the message
still waits, was claimed, or was acked and deleted meanwhile. The message's own key is fixed by
the id too (``ready/<band>/<id>``), so a large message's body chunks are overwritten, not copied.

Cost: one compare and one put more in the same transaction (no extra request, no extra Raft
proposal), one live key per message published in the last MARKER_SECONDS, and one lease grant
and one lease expiry per MARKER_BUCKET_SECONDS per publishing process (the one lease pool,
core/leases.py; a marker lease etcd no longer knows is forgotten and the write tried once more).
A retry later than MARKER_SECONDS after the first attempt is not guarded (Celery's retry policy
gives up long before). ``Producer.batch()`` writes one marker per transaction (publish_batch.py).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from etcd3 import etcdrpc

from etcd_broker.core import leases, ops
from etcd_broker.core.keys import KeySpace

logger = logging.getLogger(__name__)

#: The message property (and header) that names one publish across its retries: "<id> <hash of the body>"
#: (removed before the message is stored).
PUBLISH_ID = "x-etcd-publish-id"
#: Least seconds a publish marker lives: a retry within this of the first attempt is stored once.
MARKER_SECONDS = 120
#: Markers written within this many seconds share one lease (a marker lives MARKER_SECONDS to MARKER_SECONDS
#: + this); its expiry deletes that many seconds of one process's markers in one etcd proposal.
MARKER_BUCKET_SECONDS = 10


def marker_lease(client: Any) -> int:
    """The lease for a marker written now: from the process's one lease pool (core/leases.py), shared by
    the markers of MARKER_BUCKET_SECONDS, ending MARKER_SECONDS to MARKER_SECONDS + that from now."""
    return leases.pool_for(client.config).lease_for(time.time() + MARKER_SECONDS, MARKER_BUCKET_SECONDS)


def forget_lease(client: Any, lease: int) -> None:
    """etcd no longer knows ``lease`` (LeaseNotFound): the next marker gets a new one."""
    leases.pool_for(client.config).forget(lease)


@dataclass(frozen=True)
class Guard:
    """The marker of one publish to one queue: what each attempt's transaction compares and writes."""

    key: str
    lease: int

    def compare(self) -> etcdrpc.Compare:
        """Holds while no attempt of this publish has been committed."""
        return ops.compare(self.key, "version", 0)

    def put(self) -> etcdrpc.RequestOp:
        return ops.put(self.key, b"", self.lease)


def guard(client: Any, keys: KeySpace, queue: str, publish_id: str) -> Guard:
    """The guard of publish ``publish_id`` to ``queue`` (grants a marker lease at most every bucket)."""
    return Guard(keys.published(queue, publish_id), marker_lease(client))


def _places(message: dict) -> list[dict]:
    """Where a publish id survives a retry: the properties (kombu's ``ensure`` passes the same dict to
    each attempt) and the headers (Celery's callback retry calls ``Producer.publish`` again, with new
    properties but the same headers dict)."""
    return [place for place in (message.get("properties"), message.get("headers")) if isinstance(place, dict)]


def name_publish(message: dict, new_id: Callable[[], str]) -> str:
    """Give ``message`` its publish id: the one an earlier attempt of the same publish gave it, if any
    (same dicts and the same body: a caller that reuses a headers dict for another body gets a new id)."""
    places, body = _places(message), f" {hash(message.get('body'))}"
    found = next((place[PUBLISH_ID] for place in places if str(place.get(PUBLISH_ID, "")).endswith(body)), None)
    found = found or new_id() + body
    for place in places:
        place[PUBLISH_ID] = found
    return found.split(" ", 1)[0]


def published(message: dict) -> None:
    """The publish returned: its id goes (a later publish of the same dicts is a new publish)."""
    for place in _places(message):
        place.pop(PUBLISH_ID, None)


def publish_id(message: dict) -> str | None:
    """The id :func:`name_publish` gave this publish (None: an unguarded publish)."""
    value = (message.get("properties") or {}).get(PUBLISH_ID)
    return value.split(" ", 1)[0] if value else None


def stored_form(message: dict) -> dict:
    """``message`` as stored: without the publish id."""
    stored = message
    for field in ("properties", "headers"):
        place = message.get(field)
        if isinstance(place, dict) and PUBLISH_ID in place:
            stored = {**stored, field: {k: v for k, v in place.items() if k != PUBLISH_ID}}
    return stored


def note_retry(queue: str, marker: str) -> None:
    """A publish attempt found its own marker: an earlier attempt was committed; nothing written."""
    logger.info("publish to %r retried after an ambiguous failure was already stored (%s); not stored again",
                queue, marker)
