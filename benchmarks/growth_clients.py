"""bench_growth's kombu clients: consumer processes (threads, one Connection each), a publisher.

Plain kombu, the same code on every broker: ``Consumer(prefetch_count=4)`` acking each message,
the body carrying its publish time so each consumer records end-to-end latency. Consumer
processes are spawned (no forked gRPC state) and report through multiprocessing values and a
result queue; in each, failed etcd transactions are counted where every one passes
(``etcd_broker.core.ops.txn``).
"""
from __future__ import annotations

import multiprocessing
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kombu import Connection, Exchange, Producer, Queue

#: Messages a consumer holds unacked at most (Celery's default prefetch for one process slot x4).
PREFETCH = 4
#: Seconds a consumer's drain_events waits before looking at the stop flag.
DRAIN_TIMEOUT = 0.5
#: Most consumer threads in one process (64 consumers run in 4 processes).
THREADS_PER_PROCESS = 16
#: Seconds a consumer waits after a connection error before it connects again.
RECONNECT_SECONDS = 1.0
SPAWN = multiprocessing.get_context("spawn")


def kombu_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, "direct"), routing_key=name)


def _count_failed_txns(failed: list[int]) -> None:
    """Count the failed transactions of this process's etcd transport (a no-op for the rivals)."""
    from etcd_broker.core import ops

    original = ops.txn

    def counted(*args: Any, **kwargs: Any) -> Any:
        response = original(*args, **kwargs)
        if not response.succeeded:
            failed[0] += 1
        return response

    ops.txn = counted


def consumer_process(url: str, queues: list[str], threads: int, consumed: Any, ready: Any, stop: Any,
                     results: Any) -> None:
    """``threads`` consumers on ``queues`` until ``stop``; then (latencies, failed txns) to ``results``."""
    failed, reconnects = [0], [0]
    _count_failed_txns(failed)
    latencies: list[float] = []

    def on_message(body: dict, message: Any) -> None:
        latencies.append(time.time() - body["t"])
        message.ack()
        with consumed.get_lock():
            consumed.value += 1

    def consume() -> None:
        errors = Connection(url).connection_errors
        started = [False]
        while not stop.is_set():  # a connection error (an etcd call past its deadline at load 30):
            try:                  # a new Connection, as kombu's ConsumerMixin and Celery do
                consume_once(started)
            except errors as exc:
                reconnects[0] += 1
                print(f"consumer reconnects after {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                time.sleep(RECONNECT_SECONDS)

    def consume_once(started: list[bool]) -> None:
        with Connection(url) as connection:
            declared = [kombu_queue(name) for name in queues]
            with connection.Consumer(declared, callbacks=[on_message], prefetch_count=PREFETCH, accept=["json"]):
                if not started[0]:
                    started[0] = True
                    with ready.get_lock():
                        ready.value += 1
                while not stop.is_set():
                    try:
                        connection.drain_events(timeout=DRAIN_TIMEOUT)
                    except TimeoutError:
                        pass

    workers = [threading.Thread(target=consume, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if reconnects[0]:
        print(f"consumers reconnected {reconnects[0]} time(s)", file=sys.stderr, flush=True)
    results.put((latencies, failed[0]))


@dataclass
class ConsumerGroup:
    """``count`` consumers on ``queues`` in ceil(count / THREADS_PER_PROCESS) spawned processes."""

    url: str
    queues: list[str]
    count: int
    consumed: Any = field(default_factory=lambda: SPAWN.Value("q", 0))
    ready: Any = field(default_factory=lambda: SPAWN.Value("i", 0))
    stop: Any = field(default_factory=SPAWN.Event)
    results: Any = field(default_factory=SPAWN.Queue)
    processes: list = field(default_factory=list)

    def start(self, timeout: float = 180) -> ConsumerGroup:
        left = self.count
        while left:
            threads = min(left, THREADS_PER_PROCESS)
            left -= threads
            process = SPAWN.Process(target=consumer_process, daemon=True, args=(
                self.url, self.queues, threads, self.consumed, self.ready, self.stop, self.results))
            process.start()
            self.processes.append(process)
        deadline = time.monotonic() + timeout
        while self.ready.value < self.count:
            if time.monotonic() > deadline or any(p.exitcode is not None for p in self.processes):
                self.finish()
                raise SystemExit(f"only {self.ready.value} of {self.count} consumers started")
            time.sleep(0.05)
        return self

    def wait_consumed(self, target: int, timeout: float, tick: Callable[[], None] | None = None) -> None:
        """Wait until ``target`` messages are consumed; ``tick()`` between looks (progress lines)."""
        deadline = time.monotonic() + timeout
        while self.consumed.value < target:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {self.consumed.value} of {target} messages consumed in {timeout:.0f} s")
            if tick is not None:
                tick()
            time.sleep(0.002)

    def cpu(self) -> float:
        from benchmarks.common import process_cpu

        return sum(process_cpu(p.pid) for p in self.processes if p.exitcode is None)

    def finish(self) -> tuple[list[float], int]:
        """Stop every consumer; return all latencies (s) and failed transactions."""
        self.stop.set()
        latencies: list[float] = []
        failed = 0
        for _ in [p for p in self.processes if p.exitcode is None or p.exitcode == 0]:
            try:
                part, fails = self.results.get(timeout=60)
            except Exception:  # noqa: BLE001 - a process that died reports nothing
                break
            latencies += part
            failed += fails
        for process in self.processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        return latencies, failed


class Publisher:
    """One kombu producer (its own Connection) publishing ``{"t": now}`` to one queue."""

    def __init__(self, url: str, queue: str) -> None:
        self.connection = Connection(url)
        self.queue = kombu_queue(queue)
        self.producer = Producer(self.connection.default_channel, serializer="json")
        self.queue(self.producer.channel).declare()

    def publish(self) -> None:
        self.producer.publish({"t": time.time()}, exchange=self.queue.exchange, routing_key=self.queue.routing_key,
                              delivery_mode=2)

    def at_rate(self, count: int, rate: float) -> None:
        start = time.perf_counter()
        for index in range(count):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.publish()

    def close(self) -> None:
        self.connection.release()
