"""Where one consumer's backlog drain waits: broker CPU, consumer CPU and a cProfile of the drain.

    python -m benchmarks.profile_drain etcd|redis [MESSAGES]

Publishes MESSAGES (default 5,000) to one queue on a fresh broker (bench_growth's brokers and
clients), then one plain-kombu consumer (prefetch 4, acking) drains them in this process under
cProfile. Prints msg/s, consumer and broker CPU and requests per message, then the 25 costliest
calls by cumulative time (the profiler slows the Redis client, which makes many more Python
calls, more than ours: compare the CPU figures, not the rates).
"""
from __future__ import annotations

import cProfile
import pstats
import sys
import time

from kombu import Connection

from benchmarks.growth_brokers import EtcdBroker, RedisBroker
from benchmarks.growth_clients import PREFETCH, Publisher, kombu_queue

#: Messages published before the drain starts, unless given.
DEFAULT_MESSAGES = 5000
#: Seconds one drain_events call may wait.
DRAIN_TIMEOUT = 5.0


def main(argv: list[str]) -> None:
    which = argv[0] if argv else "etcd"
    count = int(argv[1]) if len(argv) > 1 else DEFAULT_MESSAGES
    broker = EtcdBroker() if which == "etcd" else RedisBroker(durable=False)
    try:
        publisher = Publisher(broker.url(), "drain")
        for _ in range(count):
            publisher.publish()
        publisher.close()
        done = [0]

        def on_message(_body: dict, message) -> None:
            message.ack()
            done[0] += 1

        with Connection(broker.url()) as connection:
            with connection.Consumer([kombu_queue("drain")], callbacks=[on_message], prefetch_count=PREFETCH,
                                     accept=["json"]):
                connection.drain_events(timeout=DRAIN_TIMEOUT)  # the first message: connected, declared
                before, cpu, started = broker.read(), time.process_time(), time.perf_counter()
                profile = cProfile.Profile()
                profile.enable()
                while done[0] < count:
                    connection.drain_events(timeout=DRAIN_TIMEOUT)
                profile.disable()
                elapsed, cpu, after = time.perf_counter() - started, time.process_time() - cpu, broker.read()
        drained = count - 1
        requests = "-" if after.requests is None else f"{(after.requests - before.requests) / drained:.2f}"
        print(f"{which}: {drained / elapsed:.0f} msg/s, consumer CPU {1000 * cpu / drained:.2f} ms/msg, broker CPU "
              f"{1000 * (after.cpu - before.cpu) / drained:.2f} ms/msg, requests/msg {requests}", flush=True)
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    finally:
        broker.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
