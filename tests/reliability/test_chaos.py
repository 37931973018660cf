"""A randomized fault schedule ("chaos") under steady mixed load, checked like Jepsen's queue checkers.

For ``CHAOS_SECONDS`` (default 120) a seeded schedule strikes every few seconds: SIGKILL a worker
(a replacement starts), SIGSTOP/SIGCONT an etcd member, kill the leader (restarted after), move
the leader, cut a worker off etcd and heal it, terminate a running task. Meanwhile
:class:`~tests.reliability.chaos_load.MixedLoad` sends early-ack, acks-late, batched, countdown,
cancellable and chord tasks to a three-member cluster and three workers (threads and prefork).
Then the faults stop, the work drains, and :class:`~tests.reliability.chaos_check.Checker` replays
the history (see its module for the rules). On failure the message has the seed, the schedule and
each task that broke a rule with its runs and where its message is.

Environment: ``CHAOS_SEED`` replays a schedule (the seed is printed either way); ``CHAOS_SECONDS``
(600 for the note's 10-minute runs); ``CHAOS_POOLS`` the workers' pools, comma separated
(``threads,prefork,threads`` by default; ``threads`` or ``prefork`` alone means three of it);
``CHAOS_FAULTS`` the faults to draw from (default :data:`DEFAULT_FAULTS`); ``CHAOS_LEASE_TTL``;
``CHAOS_LOG_DIR`` where the worker logs go (default: the test's tmp dir, which pytest rotates).
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from etcd_broker.core.client import get_client
from scripts.etcd_server import cluster_url, etcd_version, find_etcd_binary
from tests.helpers import wait_until
from tests.reliability import counting_app
from tests.reliability.chaos_check import Checker, History, Leftovers
from tests.reliability.chaos_fleet import Fleet
from tests.reliability.chaos_load import MixedLoad
from tests.reliability.cluster_tools import divergence
from tests.reliability.counting import PUBLISH_RETRY_POLICY, read_markers_retrying

SECONDS = float(os.environ.get("CHAOS_SECONDS", "120"))
SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
POOLS = os.environ.get("CHAOS_POOLS", "threads,prefork,threads").split(",")
POOLS = POOLS * 3 if len(POOLS) == 1 else POOLS
#: The default lease TTL: a worker whose etcd member is SIGSTOPped fails over (5 s request timeout) well within it.
LEASE_TTL = int(os.environ.get("CHAOS_LEASE_TTL", "10"))
DEFAULT_FAULTS = ("kill_worker", "stop_member", "kill_leader", "move_leader", "cut_worker", "terminate")
FAULTS = tuple(os.environ.get("CHAOS_FAULTS", ",".join(DEFAULT_FAULTS)).split(","))
#: Seconds between the end of one fault and the start of the next, drawn uniformly.
FAULT_GAP = (1.0, 4.0)
#: Starting the cluster and the workers, the last fault's end, the check (seconds; for pytest's timeout).
SETUP_TIMEOUT = 240
#: After the last fault: every accepted task settles and every queue empties within this (seconds).
DRAIN_TIMEOUT = 60.0 + 2 * LEASE_TTL


def run_schedule(fleet: Fleet, history: History, rng: random.Random, seconds: float) -> None:
    """A random fault, then a random pause, until ``seconds`` have passed (the last fault completes)."""
    end, index = time.time() + seconds, 0
    while time.time() < end:
        name = rng.choice(FAULTS)
        fleet.rng = random.Random(f"{SEED}:{index}")  # each fault's own draws: a replay aims the same faults alike
        index += 1
        start = time.time()
        outcome = fleet.faults[name]()
        history.fault(start, name, outcome)
        print(f"chaos {history.rel(start)} {name}: {outcome}", flush=True)
        time.sleep(rng.uniform(*FAULT_GAP))


def checker(history: History, fleet: Fleet, client, prefix: str) -> Checker:
    return Checker(history, read_markers_retrying(client, prefix, "started"),
                   read_markers_retrying(client, prefix, "done"), Leftovers.read(client, prefix),
                   {slot.name: slot.worker.process.poll() is None for slot in fleet.slots})


#: The summary table's columns (docs/reliability.md keeps the runs' rows).
REPORT_HEADERS = ("seed", "s", "pools", "faults: kill worker / stop member / kill leader / move leader / cut / "
                  "terminate (done)", "tasks accepted", "finished", "finished again after a kill or cut",
                  "lost with a killed worker (early ack)", "terminated: REVOKED", "lease lapses", "violations")


def report(history: History, verdict) -> list[str]:
    """A Markdown table of one run: its faults by kind, what was accepted and what became of it."""
    def faults(name: str) -> int:
        return sum(1 for fault in history.faults if fault[2] == name)

    counts = verdict.counts
    terminated = sum(1 for fault in history.faults if fault[2] == "terminate" and "nothing" not in fault[3])
    row = (SEED, f"{SECONDS:.0f}", ",".join(POOLS),
           " / ".join(str(faults(name)) for name in DEFAULT_FAULTS[:-1]) + f" / {faults('terminate')} ({terminated})",
           len(history.sent), counts["finished"], counts["finished again after a kill or cut"],
           counts["lost with a killed worker (early ack)"], counts["terminated: REVOKED"], counts["lease lapses"],
           len(verdict.violations))
    return ["| " + " | ".join(REPORT_HEADERS) + " |", "|" + "---|" * len(REPORT_HEADERS),
            "| " + " | ".join(str(cell) for cell in row) + " |",
            "counts: " + ", ".join(f"{key} {value}" for key, value in sorted(counts.items()))]


@pytest.mark.reliability
@pytest.mark.timeout(int(SECONDS + DRAIN_TIMEOUT + SETUP_TIMEOUT))
def test_a_random_fault_schedule_loses_nothing_and_runs_nothing_twice_on_live_workers(
        cluster, etcd_prefix, tmp_path, summary_lines):
    print(f"\nchaos seed {SEED} (CHAOS_SEED={SEED} replays it), {SECONDS:.0f} s, pools {POOLS}, "
          f"faults {FAULTS}, lease TTL {LEASE_TTL} s", flush=True)
    url = cluster_url(cluster)
    history = History(SEED, LEASE_TTL)
    counting_app.configure(url, etcd_prefix, LEASE_TTL, backend=True)
    log_dir = Path(os.environ.get("CHAOS_LOG_DIR") or tmp_path)  # kept across pytest's tmp rotation if set
    log_dir.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(cluster, etcd_prefix, POOLS, LEASE_TTL, log_dir, history, random.Random(SEED))
    load = MixedLoad(history, random.Random(SEED + 1))
    retry_policy = counting_app.app.conf.task_publish_retry_policy  # a chord's header waits out elections:
    counting_app.app.conf.task_publish_retry_policy = {**PUBLISH_RETRY_POLICY, "errback": load.retry_errback}
    client = get_client(url)
    try:
        fleet.start_all()
        load.start()
        run_schedule(fleet, history, random.Random(SEED + 2), SECONDS)
        load.stop()
        load.join(120)
        assert not load.is_alive(), "the load was still publishing"
        try:
            wait_until(lambda: not checker(history, fleet, client, etcd_prefix).verdict().open,
                       timeout=DRAIN_TIMEOUT, interval=1.0, message="every task settled, every queue empty")
        except TimeoutError:
            pass  # the verdict names what is still open
        final = checker(history, fleet, client, etcd_prefix)
        verdict = final.verdict()
        summary_lines(f"chaos seed {SEED}, {SECONDS:.0f} s, pools {','.join(POOLS)}", report(history, verdict))
        diverged = divergence(cluster)  # first: a diverged member explains any violation after it (T10c)
        assert diverged is None, (f"etcd {etcd_version(find_etcd_binary())}'s members diverged {diverged}: a member "
                                  f"restarted after a SIGKILL lacks writes the others applied (seed {SEED})")
        assert not verdict.violations, final.failure_text(verdict)
    finally:
        counting_app.app.conf.task_publish_retry_policy = retry_policy
        load.stop()
        fleet.stop_all()
