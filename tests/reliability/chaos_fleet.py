"""The chaos test's fleet and faults: a three-member etcd cluster, workers behind per-worker proxies,
and the faults a seeded schedule picks from, each recorded in the :class:`~tests.reliability.chaos_check.History`.

Every worker reaches each member through its own :class:`BlackholeProxy`, so cutting one worker off
etcd (all its proxies hold their bytes) leaves the others connected; its markers go straight to the
cluster, so the history sees what it does while it is cut off.
"""
from __future__ import annotations

import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from etcd_broker.core.client import get_client
from scripts.etcd_server import EtcdServer, cluster_url
from tests.helpers import WorkerProcess, wait_until
from tests.reliability import counting_app
from tests.reliability.blackhole import BlackholeProxy
from tests.reliability.chaos_check import History
from tests.reliability.cluster_tools import leader_of, make_leader
from tests.reliability.counting import read_markers_retrying

logger = logging.getLogger(__name__)

APP = "tests.reliability.counting_app"
#: Pool sizes: threads slots are cheap, prefork slots are processes.
CONCURRENCY = {"threads": 4, "prefork": 3}
#: Longest an etcd member stays SIGSTOPped or SIGKILLed before it is resumed or restarted (seconds).
MEMBER_DOWN_MAX = 5.0
#: The terminate fault aims at prefork workers too (a terminated child is replaced: the fork fix of issue 18,
#: item 1); CHAOS_TERMINATE_PREFORK=0 keeps it to threads workers.
TERMINATE_ON_PREFORK = os.environ.get("CHAOS_TERMINATE_PREFORK", "1") == "1"
#: The terminate fault waits this long for a ``work_steps`` task to be running (seconds).
TERMINATE_WAIT = 8.0


@dataclass
class Slot:
    """One place in the fleet: a pool kind, and the worker (and its proxies) that fills it now."""

    index: int
    pool: str
    generation: int = 0
    worker: WorkerProcess | None = None
    proxies: list[BlackholeProxy] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.pool[0]}{self.index}-{self.generation}"


class Fleet:
    """The cluster, the workers, and the faults."""

    def __init__(self, members: list[EtcdServer], prefix: str, pools: list[str], lease_ttl: int,
                 log_dir: Path, history: History, rng: random.Random) -> None:
        self.members, self.prefix, self.lease_ttl = members, prefix, lease_ttl
        self.log_dir, self.history, self.rng = log_dir, history, rng
        self.url = cluster_url(members)
        self.slots = [Slot(index, pool) for index, pool in enumerate(pools)]
        self.faults = {"kill_worker": self.kill_worker, "stop_member": self.stop_member,
                       "kill_leader": self.kill_leader, "move_leader": self.move_leader,
                       "cut_worker": self.cut_worker, "terminate": self.terminate}

    # -- workers ------------------------------------------------------------------------
    def start_all(self) -> None:
        for slot in self.slots:
            self.start(slot, wait=False)
        for slot in self.slots:
            slot.worker.wait_ready()

    def start(self, slot: Slot, wait: bool = True) -> None:
        """Fill ``slot`` with a new worker behind new proxies."""
        slot.proxies = [BlackholeProxy(member.port) for member in self.members]
        url = ";".join(proxy.url for proxy in slot.proxies)
        env = {**counting_app.worker_env(url, self.prefix, self.lease_ttl, backend=True, marker_url=self.url),
               "CHAOS_WORKER": slot.name}
        slot.worker = WorkerProcess(app=APP, env=env, pool=slot.pool, concurrency=CONCURRENCY[slot.pool],
                                    hostname=f"{slot.name}-{os.urandom(3).hex()}@%h", log_dir=self.log_dir)
        slot.worker.start(wait=False)
        self.history.worker_started(slot.name, slot.pool, slot.worker.process.pid, slot.worker.log_path)
        if wait:
            slot.worker.wait_ready()

    def stop_all(self) -> None:
        for slot in self.slots:
            if slot.worker is not None:
                slot.worker.kill()
            for proxy in slot.proxies:
                proxy.close()

    def dead_workers(self) -> list[str]:
        """Workers of the fleet that exited although nobody killed them."""
        return [slot.name for slot in self.slots if slot.worker.process.poll() is not None]

    # -- faults -------------------------------------------------------------------------
    def kill_worker(self) -> str:
        """SIGKILL a worker (and its pool), then start a replacement in its slot."""
        slot = self.rng.choice(self.slots)
        name = slot.name
        slot.worker.kill()
        self.history.worker_killed(name)
        for proxy in slot.proxies:
            proxy.close()
        slot.generation += 1
        self.start(slot)
        return f"{name} killed, {slot.name} started"

    def stop_member(self) -> str:
        """SIGSTOP an etcd member for a while, then SIGCONT it."""
        member = self.rng.choice(self.members)
        seconds = self.rng.uniform(1.0, MEMBER_DOWN_MAX)
        os.kill(member.process.pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(member.process.pid, signal.SIGCONT)
        return f"{member.name} stopped {seconds:.1f} s"

    def kill_leader(self) -> str:
        """SIGKILL the leader, wait, restart it with its data dir."""
        leader = wait_until(lambda: leader_of(self.members), timeout=30, interval=0.2, message="a leader")
        seconds = self.rng.uniform(1.0, MEMBER_DOWN_MAX)
        leader.stop(kill=True)
        time.sleep(seconds)
        leader.start()
        return f"{leader.name} killed, restarted after {seconds:.1f} s"

    def move_leader(self) -> str:
        """Hand leadership to a follower (etcd's MoveLeader)."""
        leader = wait_until(lambda: leader_of(self.members), timeout=30, interval=0.2, message="a leader")
        target = self.rng.choice([member for member in self.members if member is not leader])
        make_leader(self.members, target)
        return f"{leader.name} -> {target.name}"

    def cut_worker(self) -> str:
        """Cut a worker off etcd (every proxy holds its bytes) for a while, shorter or longer than its lease."""
        slot = self.rng.choice(self.slots)
        seconds = self.rng.uniform(1.0, self.lease_ttl + 5.0)
        self.history.cut(slot.name, True)
        for proxy in slot.proxies:
            proxy.cut.set()
        try:
            time.sleep(seconds)
        finally:
            for proxy in slot.proxies:
                proxy.cut.clear()
            self.history.cut(slot.name, False)
        return f"{slot.name} cut off {seconds:.1f} s"

    def terminate(self) -> str:
        """``revoke(terminate=True)`` of a ``work_steps`` task running now (see :data:`TERMINATE_ON_PREFORK`),
        waiting a little for one to start."""
        try:
            running = wait_until(self._terminable, timeout=TERMINATE_WAIT, interval=0.3, message="a work_steps task")
        except TimeoutError:
            return "no work_steps task running: nothing terminated"
        task, worker = self.rng.choice(sorted(running.items()))
        self.history.terminate(task, worker)
        counting_app.app.control.revoke(task, terminate=True)
        return f"{task} on {worker}"

    def _terminable(self) -> dict[str, str]:
        """``work_steps`` tasks running now, not terminated yet, on a pool the fault may aim at: task -> worker."""
        pools = {slot.name: slot.pool for slot in self.slots}
        started = read_markers_retrying(get_client(self.url), self.prefix, "started")
        done = read_markers_retrying(get_client(self.url), self.prefix, "done")
        return {task: runs[-1].get("worker", "") for task, runs in started.items()
                if self.history.kind_of(task) == "steps" and task not in done and task not in self.history.terminated
                and (TERMINATE_ON_PREFORK or pools.get(runs[-1].get("worker")) == "threads")}
