"""The kombu transport (``etcdv3://``): kombu loads :class:`Transport` from here.

One message's path runs through three modules (docs/transport.md, "One task's path"):

- :mod:`~etcd_broker.transport.channel`: kombu's ``Channel`` (publish, claim, requeue) and
  ``Transport``; idempotent publish; queue arguments (TTL, expiry, length limits).
- :mod:`~etcd_broker.transport.delivery`: hand-off to a parked consumer, the wake-up pipe into a
  Celery worker's hub (or ``drain_events``), the queue watch's hints.
- :mod:`~etcd_broker.transport.consumer`: ack, reject, requeue (``QoS``); the consumer lease, its
  batched acks and the dead-consumer sweep; reconciliation; tasks running across a reset.

Beside that path: ``offers`` (which one consumer a put is offered to, one watch per queue),
``delayed`` (ETA tasks wait in etcd), ``bindings``, ``large_body`` (a large expiring message's
body in chunks), ``publish_batch`` (``Producer.batch()``), ``expired`` (REVOKED for a task dropped
as expired), ``options`` (the transport options, checked).
"""
from etcd_broker.transport.channel import Channel, Transport

__all__ = ["Channel", "Transport"]
