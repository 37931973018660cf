"""Counting for fault tests: a producer thread that records what etcd accepted, and a tally of executions.

Every execution of ``counting_app.work`` leaves a ``started`` and a ``done`` marker
keyed by task id; a task is *completed* when it has a ``done`` marker, *lost* when it
was accepted and has none, *duplicated* when it has more than one.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from etcd_broker.core.client import CONNECTION_ERRORS, EtcdClient
from etcd_broker.core.ops import KeySpace
from tests.helpers import wait_until
from tests.reliability import counting_app

logger = logging.getLogger(__name__)

#: Celery's publish retry while etcd is down or electing: up to ~60 s, then the caller sees an error.
PUBLISH_RETRY_POLICY = {"max_retries": 120, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}
#: Worker pool of the fault tests that kill no worker (FAULT_TEST_POOL=prefork runs them on prefork).
WORKER_POOL = os.environ.get("FAULT_TEST_POOL", "threads")
SUMMARY_HEADERS = ("test", "tasks sent", "completed", "duplicated", "lost", "refused at publish",
                   "results fetched", "max redelivery delay (s)", "first completion after the fault (s)")


class Producer(threading.Thread):
    """Sends ``count`` tasks, one every ``interval`` seconds; remembers which ones were accepted."""

    def __init__(self, count: int, seconds: float, interval: float, task: str = "work") -> None:
        super().__init__(name="fault-test-producer", daemon=True)
        self.count, self.seconds, self.interval = count, seconds, interval
        self.task = getattr(counting_app, task)  # work, or work_batch (a batched task)
        self.accepted: list[str] = []
        self.refused: list[tuple[str, str]] = []
        self.results: list = []
        self.sent_half = threading.Event()

    def run(self) -> None:
        for index in range(self.count):
            task_id = uuid.uuid4().hex
            try:
                result = self.task.apply_async((self.seconds,), task_id=task_id, retry=True,
                                                       retry_policy=PUBLISH_RETRY_POLICY)
            except Exception as exc:  # noqa: BLE001 - the caller saw an error: refused, not lost
                logger.warning("publish of %s refused: %r", task_id, exc)
                self.refused.append((task_id, repr(exc)))
            else:
                self.accepted.append(task_id)
                self.results.append(result)
            if index + 1 == self.count // 2:
                self.sent_half.set()
            time.sleep(self.interval)
        self.sent_half.set()


class Collector(threading.Thread):
    """Waits on every accepted task's result through the result backend (``AsyncResult.get``), in order.

    It is waiting while the fault happens, so a result fetched is a result that crossed it.
    """

    def __init__(self, producer: Producer, timeout: float) -> None:
        super().__init__(name="fault-test-results", daemon=True)
        self.producer, self.timeout = producer, timeout
        self.fetched: list[str] = []
        self.failed: list[tuple[str, str]] = []

    def run(self) -> None:
        index = 0
        while self.producer.is_alive() or index < len(self.producer.results):
            if index == len(self.producer.results):
                time.sleep(0.05)
                continue
            result = self.producer.results[index]
            index += 1
            try:
                value = result.get(timeout=self.timeout)
            except Exception as exc:  # noqa: BLE001 - counted and reported by the test
                self.failed.append((result.id, repr(exc)))
            else:
                (self.fetched if value == result.id else self.failed).append(result.id)


def start_traffic(tasks: int, seconds: float, interval: float, timeout: float,
                  task: str = "work") -> tuple[Producer, Collector]:
    """A :class:`Producer` of ``tasks`` ``task`` tasks of ``seconds`` each, one every ``interval`` seconds,
    and a :class:`Collector` waiting up to ``timeout`` for each result: both started."""
    producer = Producer(tasks, seconds, interval=interval, task=task)
    collector = Collector(producer, timeout=timeout)
    producer.start()
    collector.start()
    return producer, collector


def read_markers(client: EtcdClient, prefix: str, kind: str) -> dict[str, list[dict]]:
    """Every ``kind`` marker under ``prefix``, grouped by task id, oldest first."""
    found: dict[str, list[dict]] = defaultdict(list)
    for value, _ in client.get_prefix(counting_app.marker_prefix(prefix, kind)):
        info = json.loads(value)
        found[info["task_id"]].append(info)
    for rows in found.values():
        rows.sort(key=lambda row: row["at"])
    return dict(found)


def read_markers_retrying(client: EtcdClient, prefix: str, kind: str) -> dict[str, list[dict]]:
    """:func:`read_markers`, tolerating a cluster that is still electing a leader."""
    for _ in range(100):
        try:
            return read_markers(client, prefix, kind)
        except CONNECTION_ERRORS:
            time.sleep(0.2)
    return read_markers(client, prefix, kind)


@dataclass
class Tally:
    """What happened to every accepted task, around one fault at ``fault_at`` (ending at ``fault_end``)."""

    name: str
    accepted: list[str]
    refused: list[tuple[str, str]]
    started: dict[str, list[dict]]
    done: dict[str, list[dict]]
    fault_at: float
    fault_end: float
    fetched: list[str] | None = None

    @classmethod
    def collect(cls, name: str, client: EtcdClient, prefix: str, producer: Producer, fault_at: float,
                fault_end: float | None = None, collector: Collector | None = None) -> Tally:
        return cls(name, list(producer.accepted), list(producer.refused),
                   read_markers_retrying(client, prefix, "started"), read_markers_retrying(client, prefix, "done"),
                   fault_at, fault_end or fault_at, list(collector.fetched) if collector else None)

    @property
    def lost(self) -> list[str]:
        return [task for task in self.accepted if task not in self.done]

    @property
    def duplicated(self) -> list[str]:
        return [task for task in self.accepted if len(self.done.get(task, ())) > 1]

    @property
    def completed(self) -> int:
        return sum(1 for task in self.accepted if task in self.done)

    @property
    def unexpected(self) -> list[str]:
        """Executions of tasks nobody was told were accepted (a refused publish that did land)."""
        refused = {task for task, _ in self.refused}
        return [task for task in self.done if task not in self.accepted and task not in refused]

    def redelivery_delays(self) -> list[float]:
        """Per task that started before the fault and again after it: seconds from the fault to the restart."""
        delays = []
        for runs in self.started.values():
            before = [run for run in runs if run["at"] <= self.fault_at]
            after = [run for run in runs if run["at"] > self.fault_at]
            if before and after:
                delays.append(after[0]["at"] - self.fault_at)
        return delays

    def first_completion_after_fault(self) -> float | None:
        finished = [run["at"] for runs in self.done.values() for run in runs if run["at"] > self.fault_end]
        return min(finished) - self.fault_end if finished else None

    def row(self) -> tuple:
        delays = self.redelivery_delays()
        first = self.first_completion_after_fault()
        return (self.name, len(self.accepted) + len(self.refused), self.completed, len(self.duplicated),
                len(self.lost), len(self.refused), "-" if self.fetched is None else len(self.fetched),
                f"{max(delays):.1f} ({len(delays)} tasks)" if delays else "-",
                f"{first:.1f}" if first is not None else "-")

    def table(self) -> str:
        lines = ["| " + " | ".join(SUMMARY_HEADERS) + " |", "|" + "---|" * len(SUMMARY_HEADERS),
                 "| " + " | ".join(str(cell) for cell in self.row()) + " |"]
        return "\n".join(lines)


def locate(client: EtcdClient, prefix: str, tasks: list[str]) -> dict[str, list[str]]:
    """Where each task's message is now (ready, unacked under which lease, dead), for failure messages."""
    keys = KeySpace(prefix)
    found: dict[str, list[str]] = {task: [] for task in tasks}
    for value, meta in client.get_prefix(keys.root + "/"):
        try:
            task = json.loads(value).get("headers", {}).get("id", "").replace("-", "")
        except (ValueError, AttributeError):
            continue
        if task in found:
            found[task].append(meta.key.decode()[len(keys.root):])
    return found


def wait_all_settled(client: EtcdClient, prefix: str, tasks: list[str], timeout: float = 30.0) -> dict[str, list[str]]:
    """Wait until no message of ``tasks`` is left in etcd (each acked once it ran); return what is left.

    A message kept by a live worker across a reset must be deleted by its task's ack, not linger
    under the worker's lease.
    """
    try:
        wait_until(lambda: not any(locate(client, prefix, tasks).values()), timeout=timeout, interval=0.5,
                   message="every message acked")
    except TimeoutError:
        pass
    return {task: keys for task, keys in locate(client, prefix, tasks).items() if keys}


def wait_for_completion(client: EtcdClient, prefix: str, producer: Producer, timeout: float,
                        collector: Collector | None = None) -> None:
    """Wait for the producer to finish, every accepted task to have a ``done`` marker, and the
    ``collector`` (if any) to have waited on every result."""
    producer.join(timeout)
    assert not producer.is_alive(), "the producer was still publishing"

    def all_done() -> bool:
        done = read_markers_retrying(client, prefix, "done")
        return all(task in done for task in producer.accepted)

    try:
        wait_until(all_done, timeout=timeout, interval=0.5, message="every accepted task done")
    except TimeoutError:
        pass  # the tally names what is missing
    if collector is not None:
        collector.join(timeout)


def assert_every_task_ran_once(tally: Tally, client: EtcdClient, prefix: str, tasks: int,
                               collector: Collector) -> None:
    """What a fault that kills no worker must leave: nothing refused or lost, no task run twice,
    no message left in etcd, every result fetched through the backend."""
    assert tally.refused == [], "a producer gave up instead of waiting for etcd"
    assert tally.unexpected == []
    assert tally.lost == [], locate(client, prefix, tally.lost)
    assert tally.completed == tasks
    assert tally.duplicated == [], "a task ran twice although no worker died"
    assert wait_all_settled(client, prefix, tally.accepted) == {}, "a message outlived its task"
    assert collector.failed == [] and sorted(tally.fetched) == sorted(tally.accepted)
