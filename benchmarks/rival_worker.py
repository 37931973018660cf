"""Entry point of bench_main's Redis and RabbitMQ workers: Celery's own main, after giving
Celery's Redis result backend the one method ``jobs.tasks`` asks of a result backend.

    python -m benchmarks.rival_worker -A deephardway_site worker ...

``jobs.tasks.guarded`` calls ``backend.stop_if_cancelled(task_id)`` before a job starts (our
EtcdBackend reads the job's cancel marker there: one etcd Range). Redis has no cancel marker,
so here it does nothing; a job revoked while queued is still skipped by the worker's own
revoked set, as on any Celery deployment.
"""
from __future__ import annotations

import sys

from celery.backends.redis import RedisBackend


def stop_if_cancelled(self: RedisBackend, task_id: str) -> None:
    """Nothing to check: a Redis result backend keeps no cancel marker."""


if __name__ == "__main__":
    if not hasattr(RedisBackend, "stop_if_cancelled"):
        RedisBackend.stop_if_cancelled = stop_if_cancelled
    from celery.__main__ import main

    sys.argv[0] = "celery"
    sys.exit(main())
