"""The Celery result backend (``result_backend = "etcdv3://..."``): Celery loads :class:`EtcdBackend`.

A result's path:

- :mod:`~etcd_broker.backend.result_backend`: ``EtcdBackend`` (writes, chords, cancellation),
  ``watch_task()`` and ``follow_task()``; Celery's ``ResultConsumer`` (a watch subscription per
  awaited task, or one on the results prefix shared by a process's many waiters: ``SharedWaits``);
  the held-back STARTED write.
- :mod:`~etcd_broker.backend.result_store`: states, group results, chord counters as etcd keys and bytes.
- :mod:`~etcd_broker.backend.task_events`: one task's states in revision order, resumable.
"""
from etcd_broker.backend.result_backend import EtcdBackend, follow_task, watch_task

__all__ = ["EtcdBackend", "follow_task", "watch_task"]
