"""A Celery app on etcd for the wheel checks: broker and result backend from LIB_ETCD_URL, keys
under LIB_PREFIX. It imports etcd_broker for the broker scheme; the backend comes by entry point."""
from __future__ import annotations

import os

from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3:// with kombu

app = Celery("lib_app", broker=os.environ["LIB_ETCD_URL"], backend=os.environ["LIB_ETCD_URL"])
app.conf.update(
    broker_transport_options={"prefix": os.environ["LIB_PREFIX"]},
    result_backend_transport_options={"prefix": os.environ["LIB_PREFIX"]},
    task_serializer="json", result_serializer="json", accept_content=["json"],
    task_default_queue="lib",
)


@app.task
def add(x: int, y: int) -> int:
    return x + y
