"""Messages larger than one etcd request: the body stored beside the message, in chunks.

etcd refuses a request over ``--max-request-bytes`` (1.5 MiB by default), so a message is one
put of at most that. Celery's control replies are not bounded by the sender: ``inspect
reserved``/``scheduled``/``stats`` of a busy worker ran to 9 MB and were dropped with
``MessageTooLarge`` (issue 20). Such a message is accepted when it expires (its own
``expiration`` or its queue's message TTL, as Celery's reply queues have: ``control_queue_ttl``,
300 s): its body goes to ``q/<queue>/body/<seq>/<n>`` in chunks of ``CHUNK_BYTES``, each put
under the message's TTL lease, *before* the message itself, which carries the body's place
instead of the body. So the body vanishes with the message at its deadline (etcd deletes both),
a consumer reads the chunks back when it takes the message, and a consumer without acks (a
reply consumer) deletes them at once. A message without a deadline still raises
``MessageTooLarge``: a task should send a reference, not megabytes through the broker.
"""
from __future__ import annotations

import logging
from typing import Any

from kombu.utils.json import dumps

from etcd_broker.core import ops
from etcd_broker.core.ops import KeySpace

logger = logging.getLogger(__name__)

#: Bytes of body per chunk: one put each, well under etcd's 1.5 MiB request limit.
CHUNK_BYTES = 1_048_576
#: The field of a stored message that names its body's chunks (the body itself is then empty).
FIELD = "etcd_body"


class BodyMissing(ValueError):
    """A message's body chunks are gone (its deadline passed, or its queue was purged)."""


def split(message: dict, keys: KeySpace, queue: str, seq: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The message as stored (body moved out) and its body's chunks as ``(key, bytes)``."""
    body = message.get("body") or ""
    raw = body.encode() if isinstance(body, str) else bytes(body)
    chunks = [(keys.body_chunk(queue, seq, index), raw[start:start + CHUNK_BYTES])
              for index, start in enumerate(range(0, len(raw), CHUNK_BYTES))]
    stub = {**message, "body": "", FIELD: {"prefix": keys.body_chunks(queue, seq), "chunks": len(chunks),
                                           "bytes": len(raw)}}
    return dumps(stub).encode(), chunks


def put_chunks(client: Any, chunks: list[tuple[str, bytes]], lease: int) -> None:
    """Write the chunks (one put each: together they exceed one request), before the message."""
    for key, value in chunks:
        ops.txn(client, success=[ops.put(key, value, lease)])


def join(client: Any, message: dict, discard: bool) -> dict:
    """``message`` with its body read back from its chunks (no-op for an ordinary message).

    ``discard``: delete the chunks once read (a consumer without acks never needs them again).
    Raises :class:`BodyMissing` if a chunk is gone.
    """
    place = message.pop(FIELD, None)
    if place is None:
        return message
    parts = [kv.value for kv in ops.scan(client, place["prefix"], prefix=True)]
    raw = b"".join(parts)
    if len(parts) != place["chunks"] or len(raw) != place["bytes"]:
        raise BodyMissing(f"body of {place['bytes']} bytes in {place['chunks']} chunk(s) under "
                          f"{place['prefix']} is gone (found {len(parts)}, {len(raw)} bytes)")
    message["body"] = raw.decode()
    if discard:
        ops.txn(client, success=[ops.delete(place["prefix"], prefix=True)])
    return message
