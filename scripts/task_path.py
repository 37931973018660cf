"""Which etcd_broker modules one Celery task runs through, end to end (docs/transport.md, "One task's path").

Starts an etcd (scripts/etcd_server.py), a Celery app on ``etcdv3://`` for broker and results and a
threads worker in this process (``celery.contrib.testing.worker.start_worker``); once the worker is
up, records every etcd_broker function called in any thread (``sys.setprofile`` and
``threading.setprofile``) while one task is sent, claimed, run, acked, its result stored and awaited,
except in the upkeep threads (UPKEEP_THREADS), which wake on their own timers whatever the task does:
a 35 s window caught the delayed mover's 30 s wake-up, so a short one did now and then.

    PYTHONPATH=$PWD python -m scripts.task_path [--functions]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import etcd_broker
from scripts.etcd_server import EtcdServer

#: The library's source directory: calls from files under it are recorded.
PACKAGE_DIR = str(Path(etcd_broker.__file__).parent) + "/"
#: Seconds the result may take (a loaded machine).
RESULT_TIMEOUT = 60.0
#: Seconds recorded after the result arrived: the worker's ack leaves after the result is stored.
SETTLE_SECONDS = 0.5
#: Threads that keep the broker's state on timers, not on one task's path: the lease keepalive and its
#: probe, the dead-consumer sweep (and reconciliation passes), the delayed mover, the queue-expiry keeper.
UPKEEP_THREADS = frozenset({"etcd-lease-keepalive", "etcd-lease-probe", "etcd-sweeper", "etcd-delayed",
                            "etcd-queue-expiry"})


class CallRecorder:
    """Module -> functions called in it, in first-call order, from every thread while ``recording``.

    Installed before any thread of ours starts (``threading.setprofile`` reaches only threads
    started later), so the worker's, the watch hub's and the keepalive's threads are all seen.
    """

    def __init__(self) -> None:
        self.calls: dict[str, dict[str, None]] = defaultdict(dict)
        self.recording = False
        self._lock = threading.Lock()

    def _profile(self, frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event != "call" or not self.recording or threading.current_thread().name in UPKEEP_THREADS:
            return
        filename = frame.f_code.co_filename
        if filename.startswith(PACKAGE_DIR):
            module = "etcd_broker." + filename[len(PACKAGE_DIR):-3].replace("/", ".").removesuffix(".__init__")
            name = getattr(frame.f_code, "co_qualname", frame.f_code.co_name)
            with self._lock:
                self.calls[module].setdefault(name, None)

    def install(self) -> None:
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)

    def uninstall(self) -> None:
        sys.setprofile(None)
        threading.setprofile(None)


def run_one_task() -> CallRecorder:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    recorder = CallRecorder()
    with tempfile.TemporaryDirectory() as data_dir:
        server = EtcdServer(data_dir=data_dir).start()
        recorder.install()
        try:
            app = Celery("task_path", broker=server.url, backend=server.url)
            app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                            broker_transport_options={"prefix": "/task-path"})

            @app.task(name="task_path.add")
            def add(x: int, y: int) -> int:
                return x + y

            with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, loglevel="WARNING"):
                add.delay(0, 0).get(timeout=RESULT_TIMEOUT)  # warm: queues declared, consumer lease granted
                recorder.recording = True
                assert add.delay(2, 3).get(timeout=RESULT_TIMEOUT) == 5
                time.sleep(SETTLE_SECONDS)
                recorder.recording = False
            return recorder
        finally:
            recorder.uninstall()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--functions", action="store_true", help="list the functions called in each module")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recorder = run_one_task()
    modules = sorted(recorder.calls)
    print(f"{len(modules)} etcd_broker modules on one task's path (send, claim, run, ack, store, await):")
    for module in modules:
        functions = list(recorder.calls[module])
        print(f"  {module} ({len(functions)} functions)")
        if args.functions:
            for name in functions:
                print(f"      {name}")


if __name__ == "__main__":
    main()
