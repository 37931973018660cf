"""The kombu transport (``etcdv3://``): kombu loads :class:`Transport` from here.

A message's path, in order (docs/transport.md, "How a message moves"):

- :mod:`~etcd_broker.transport.channel`: kombu's ``Channel`` (publish, claim, requeue) and ``Transport``.
- :mod:`~etcd_broker.transport.offers`: which one consumer a put is offered to; one watch per queue.
- :mod:`~etcd_broker.transport.delivery`: a transport's consumed queues, hints and "known empty".
- :mod:`~etcd_broker.transport.delivery`: delivery into a Celery worker's hub or ``drain_events``.
- :mod:`~etcd_broker.transport.consumer`: ack, reject, requeue; prefetch room.
- :mod:`~etcd_broker.transport.consumer`: the consumer lease, batched acks, the dead-consumer sweep.

Beside that path: ``handoff`` (a publish straight to a parked idle consumer), ``delayed`` (ETA
tasks), ``reconcile`` and ``executing`` (what a live lease holds), ``settle`` (an ``acks_late``
SUCCESS deletes its message), ``bindings``, ``queue_limits``, ``large_body``, ``publish_batch``,
``expired`` (REVOKED for a task dropped as expired), ``options`` (the transport options, checked).
"""
from etcd_broker.transport.channel import Channel, Transport

__all__ = ["Channel", "Transport"]
