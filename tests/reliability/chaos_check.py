"""The chaos test's history and its checker, in the spirit of Jepsen's queue checkers.

The :class:`History` records what the test did: each task Celery accepted (kind, when, its
countdown's ETA, a chord's parts), each fault, each worker started and killed, each cut, each
terminate. Executions come from the marker keys every run of a counting task writes (worker,
pid, start and done times). :func:`check` replays both and names every task that broke a rule:

- every accepted task finished, and at most once on workers that were neither killed nor cut off
  before its ack had surely landed (runs on such workers are counted apart: at-least-once by design;
  a worker killed after that proves nothing); an early-ack task whose worker was killed may be lost,
  or finish without its SUCCESS if the kill came before that write had surely landed (at-most-once by
  design), counted apart;
- an execution on a live, connected worker that started also finished (a pool slot did not die);
- a terminated task is REVOKED (or finished before the revoke reached it) and never runs again;
- a countdown task never starts before its ETA; a chord callback starts after its last part;
- the result backend holds SUCCESS for every finished task;
- at the end nothing is under any lease (``unacked/``), in the task queue's ``ready/`` or ``delayed/``, in ``dead/``
  or under ``chords/``, and every worker nobody killed is alive.
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from etcd_broker.core.client import DEFAULT_TIMEOUT
from etcd_broker.core.ops import KeySpace

#: A finished task's ack (or SUCCESS write) lands within this on a loaded 2-core machine, unless etcd could
#: not take writes meanwhile (ETCD_FAULTS): a worker killed or cut off this soon after a run finished may
#: still have its message, so the task may run again elsewhere; killed later, it had nothing left (seconds).
ACK_GRACE = 2.0
#: One etcd call's deadline: a write sent to a member just before it was stopped or lost its leadership may
#: wait this long after the fault ends before it fails and is retried.
CALL_DEADLINE = DEFAULT_TIMEOUT
#: Faults during which etcd may refuse or delay writes (an ack waits, retried, until they end).
ETCD_FAULTS = ("kill_leader", "stop_member", "move_leader")
#: A task a worker took during a cut may begin only once etcd answers again (a batch reads its cancel
#: markers first): a run that begins this soon after the heal, of a task sent before it, counts as taken
#: during the cut (seconds).
HEAL_GRACE = 5.0
#: A revoke broadcast reaches every worker within this (seconds); a run that starts later is a re-run.
REVOKE_GRACE = 2.0
#: Clock slack between markers and the test's own times, one machine (seconds).
CLOCK_SLACK = 0.05
#: What a worker logs when etcd expired its lease while it was alive (etcd_broker/transport/consumer.py).
#: What a worker logs when Celery publishes a chord callback again after an error (celery/app/amqp.py).
CALLBACK_RETRY_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): WARNING/\w+\] Retrying refused callback publish")
LAPSE_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): ERROR/\w+\] consumer lease \w+ expired while we were alive")


@dataclass
class Sent:
    """One task Celery accepted."""

    task: str
    kind: str
    at: float
    eta: float | None = None
    parts: list[str] = field(default_factory=list)  # a chord callback's header tasks


@dataclass
class Execution:
    """One run of a task, from its markers."""

    worker: str
    pid: int
    started: float
    done: float | None
    redelivered: bool = False  # False for a fresh message: a second publish, not a redelivery
    sent: float = float("inf")  # when its task was accepted (from the history)


class History:
    """What the test did, with wall-clock times (thread-safe)."""

    def __init__(self, seed: int, lease_ttl: int) -> None:
        self.seed, self.lease_ttl, self.t0 = seed, lease_ttl, time.time()
        self.sent: dict[str, Sent] = {}
        self.refused: dict[str, str] = {}
        self.faults: list[tuple[float, float, str, str]] = []  # start, end, fault, outcome
        self.workers: dict[str, dict] = {}  # name: pool, pid, log, started, killed
        self.cuts: dict[str, list[list[float]]] = {}
        self.terminated: dict[str, tuple[float, str]] = {}  # task: (when, worker it ran on)
        self.publish_retries: dict[str, list[float]] = {}  # task: when its publish was retried after an error
        self._lock = threading.Lock()

    def accepted(self, task: str, kind: str, eta: float | None = None, parts: list[str] | None = None) -> None:
        with self._lock:
            self.sent[task] = Sent(task, kind, time.time(), eta, list(parts or []))

    def refuse(self, task: str, error: str) -> None:
        with self._lock:
            self.refused[task] = error

    def kind_of(self, task: str) -> str | None:
        sent = self.sent.get(task)
        return sent.kind if sent else None

    def fault(self, start: float, name: str, outcome: str) -> None:
        with self._lock:
            self.faults.append((start, time.time(), name, outcome))

    def worker_started(self, name: str, pool: str, pid: int, log: Path) -> None:
        with self._lock:
            self.workers[name] = {"pool": pool, "pid": pid, "log": Path(log), "started": time.time(), "killed": None}

    def worker_killed(self, name: str) -> None:
        with self._lock:
            self.workers[name]["killed"] = time.time()

    def cut(self, name: str, on: bool) -> None:
        with self._lock:
            if on:
                self.cuts.setdefault(name, []).append([time.time(), float("inf")])
            else:
                self.cuts[name][-1][1] = time.time()

    def publish_retried(self, tasks: list[str]) -> None:
        """The test's publish of ``tasks`` failed and is retried: if the failed try was applied, both copies run."""
        with self._lock:
            for task in tasks:
                self.publish_retries.setdefault(task, []).append(time.time())

    def terminate(self, task: str, worker: str) -> None:
        with self._lock:
            self.terminated[task] = (time.time(), worker)

    def rel(self, at: float | None) -> str:
        return "-" if at is None else f"+{at - self.t0:.1f}s"

    def schedule(self) -> list[str]:
        return [f"{self.rel(start)}..{self.rel(end)} {name}: {outcome}" for start, end, name, outcome in self.faults]

    def lapses(self) -> dict[str, list[float]]:
        """Per worker: when its log says etcd expired its lease while it lived."""
        return self.logged(LAPSE_LINE)

    def logged(self, line_re: re.Pattern) -> dict[str, list[float]]:
        """Per worker: the times of its log lines that ``line_re`` matches (group 1: Celery's timestamp)."""
        found: dict[str, list[float]] = {}
        for name, info in self.workers.items():
            try:
                lines = info["log"].read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                if match := line_re.match(line):
                    found.setdefault(name, []).append(
                        datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
        return found


def executions(started: list[dict], done: list[dict]) -> list[Execution]:
    """Pair a task's start and done markers by process, in time order (a process runs a task's copies in turn)."""
    runs = []
    for pid in {row["pid"] for row in started}:
        starts = sorted((row for row in started if row["pid"] == pid), key=lambda row: row["at"])
        ends = sorted(row["at"] for row in done if row["pid"] == pid)
        for index, row in enumerate(starts):
            runs.append(Execution(row.get("worker", ""), pid, row["at"], ends[index] if index < len(ends) else None,
                                  bool(row.get("redelivered"))))
    return sorted(runs, key=lambda run: run.started)


@dataclass
class Leftovers:
    """What etcd still holds at the end: keys under leases, in ready/, dead/, chords/; results by task."""

    unacked: list[str]
    ready: list[str]  # and delayed/: a countdown task's message is due long before the end
    dead: list[str]
    chords: list[str]
    states: dict[str, str]
    task_of_key: dict[str, str]

    @classmethod
    def read(cls, client, prefix: str, queue: str = "celery") -> Leftovers:
        keys = KeySpace(prefix)
        unacked, ready, dead, task_of_key = [], [], [], {}
        for value, meta in client.get_prefix(keys.root + "/"):
            key = meta.key.decode()
            try:
                task_of_key[key] = json.loads(value).get("headers", {}).get("id", "")
            except (ValueError, AttributeError):
                task_of_key[key] = ""
            if "/unacked/" in key:
                unacked.append(key)
            elif key.startswith((keys.ready(queue), keys.delayed(queue))):
                ready.append(key)
            elif key.startswith(f"{keys.root}/dead/"):
                dead.append(key)
        chords = [meta.key.decode() for _, meta in client.get_prefix(f"{keys.prefix}/chords/")]
        states = {keys.task_id_of_result(meta.key): json.loads(value).get("status")
                  for value, meta in client.get_prefix(keys.results())}
        return cls(unacked, ready, dead, chords, states, task_of_key)

    def where(self, task: str) -> list[str]:
        return [key for key, owner in self.task_of_key.items() if owner == task]


@dataclass
class Violation:
    task: str
    rule: str
    detail: str = ""


@dataclass
class Verdict:
    """The checker's findings and counts."""

    violations: list[Violation]
    counts: Counter
    open: list[str]  # what still had to happen (the drain waits until this is empty)


class Checker:
    """Replays a :class:`History` against the executions and what etcd holds."""

    def __init__(self, history: History, started: dict[str, list[dict]], done: dict[str, list[dict]],
                 leftovers: Leftovers, alive: dict[str, bool]) -> None:
        self.history, self.leftovers, self.alive = history, leftovers, alive
        self.runs = {task: executions(started.get(task, []), done.get(task, [])) for task in set(started) | set(done)}
        for task, runs in self.runs.items():
            for run in runs:
                run.sent = history.sent[task].at if task in history.sent else run.sent
        self.lapses = history.lapses()
        self.callback_retries = sorted(at for times in history.logged(CALLBACK_RETRY_LINE).values() for at in times)

    def suspect(self, run: Execution) -> str | None:
        """Why ``run`` may be repeated elsewhere: its worker was killed or cut off (or lost its lease) before
        the run's ack had surely landed (:meth:`acked_by`). A worker killed later had acked it: a second run
        then is a violation, however the worker ended."""
        info = self.history.workers.get(run.worker, {})
        acked = self.acked_by(run)
        if info.get("killed") is not None and run.started <= info["killed"] <= acked:
            return "worker killed"
        for start, end in self.history.cuts.get(run.worker, []):
            if run.started <= end and start <= acked:
                return "worker cut off"
            if run.sent <= end and end < run.started <= end + HEAL_GRACE:
                return "worker cut off (taken during the cut, begun at the heal)"
        for lapse in self.lapses.get(run.worker, []):
            if run.started <= lapse and (run.done is None or run.done >= lapse - self.history.lease_ttl):
                if any(start - ACK_GRACE <= lapse <= end + self.history.lease_ttl
                       for start, end in self.history.cuts.get(run.worker, [])):
                    return "worker cut off"
                return "lease lapsed (not cut off)"
        return None

    def acked_by(self, run: Execution) -> float:
        """When ``run``'s ack had surely landed: ACK_GRACE after it finished, pushed past the end of every etcd
        fault in progress meanwhile by a call's deadline (the ack is retried until etcd takes it); never, for a run that
        did not finish."""
        if run.done is None:
            return float("inf")
        acked = run.done + ACK_GRACE
        for start, end, name, _ in sorted(self.history.faults):
            if name in ETCD_FAULTS and start <= acked and end >= run.done:
                acked = max(acked, end + CALL_DEADLINE + ACK_GRACE)
        return acked

    def verdict(self) -> Verdict:
        violations: list[Violation] = []
        counts: Counter = Counter()
        open_items: list[str] = []
        for task, sent in self.history.sent.items():
            counts[f"sent {sent.kind}"] += 1
            self._check_task(task, sent, violations, counts, open_items)
        self._check_globals(violations, open_items)
        for lapses in self.lapses.values():
            counts["lease lapses"] += len(lapses)
        return Verdict(violations, counts, open_items)

    def _check_task(self, task: str, sent: Sent, violations: list[Violation], counts: Counter,
                    open_items: list[str]) -> None:
        runs = self.runs.get(task, [])
        revoke = self.history.terminated.get(task)
        finished = [run for run in runs if run.done is not None]
        live_finished = [run for run in finished if self.suspect(run) is None]
        state = self.leftovers.states.get(task)
        if len(live_finished) > 1:
            if all(self._published_twice(task, sent, run) for run in live_finished[1:]):
                counts["published twice (a publish retried after a lost answer)"] += len(live_finished) - 1
            else:
                violations.append(Violation(task, f"finished {len(live_finished)} times on live, connected workers"))
        counts["finished again after a kill or cut"] += max(len(finished) - 1, 0)
        for run in runs:
            stopped_by_revoke = revoke is not None and run.started <= revoke[0] + REVOKE_GRACE
            if run.done is None and self.suspect(run) is None and not stopped_by_revoke:
                open_items.append(f"{task}: running on {run.worker}")
                violations.append(Violation(task, f"started on {run.worker} (pid {run.pid}), alive and connected, "
                                                  "and never finished"))
            if revoke is not None and run.started > revoke[0] + REVOKE_GRACE and not self._revoked_run_suspect(task):
                violations.append(Violation(task, f"ran again on {run.worker} after it was terminated"))
            if sent.eta is not None and run.started < sent.eta - CLOCK_SLACK:
                violations.append(Violation(task, f"started {sent.eta - run.started:.2f} s before its countdown"))
        if sent.parts:
            self._check_callback(task, sent, runs, violations)
        if revoke is not None:
            counts["terminated"] += 1
            if not finished and state != "REVOKED":
                open_items.append(f"{task}: terminated, state {state}")
                violations.append(Violation(task, f"terminated, not finished, but its state is {state}, not REVOKED"))
            elif finished and state not in ("SUCCESS", "REVOKED"):
                violations.append(Violation(task, f"finished before its terminate, but its state is {state}"))
            counts["terminated: REVOKED" if state == "REVOKED" else "terminated: finished first"] += 1
            return
        if not finished:
            if sent.kind == "early" and any(self.suspect(run) == "worker killed" for run in runs):
                counts["lost with a killed worker (early ack)"] += 1
                return
            open_items.append(f"{task}: not finished")
            violations.append(Violation(task, "accepted and never finished"))
            return
        counts["finished"] += 1
        if state is None and sent.kind == "early" and all(self.suspect(run) == "worker killed" for run in finished):
            # its body ended, then its worker died before the SUCCESS write landed: at most once, as above
            counts["result lost with a killed worker (early ack)"] += 1
            return
        if state != "SUCCESS":
            open_items.append(f"{task}: state {state}")
            violations.append(Violation(task, f"finished but its state is {state}, not SUCCESS"))

    def _published_twice(self, task: str, sent: Sent, run: Execution) -> bool:
        """Whether ``run`` ran a second message of ``task``: a fresh one (not redelivered) while a publish of the
        task was retried after an error (the test's own publish, or a worker's chord callback publish between
        the last part's end and this run). A publish whose answer was lost is applied, and retried: at least
        once by design until the transport's publish is idempotent (docs/reliability.md)."""
        if run.redelivered:
            return False
        if task in self.history.publish_retries:
            return True
        if not sent.parts:
            return False
        last_part = max((r.done for part in sent.parts for r in self.runs.get(part, []) if r.done), default=sent.at)
        return any(last_part - ACK_GRACE <= at <= run.started for at in self.callback_retries)

    def _revoked_run_suspect(self, task: str) -> bool:
        """Whether the run a terminate aimed at was on a worker killed or cut off (so a replacement that never
        heard the revoke may run the task again)."""
        at, _ = self.history.terminated[task]
        return any(self.suspect(run) for run in self.runs.get(task, []) if run.started <= at)

    def _check_callback(self, task: str, sent: Sent, runs: list[Execution], violations: list[Violation]) -> None:
        firsts = [min((run.done for run in self.runs.get(part, []) if run.done is not None), default=None)
                  for part in sent.parts]
        if None in firsts:
            return  # the part itself is reported
        for run in runs:
            if run.started < max(firsts) - CLOCK_SLACK:
                violations.append(Violation(task, "chord callback started before its last part finished"))

    def _check_globals(self, violations: list[Violation], open_items: list[str]) -> None:
        left = self.leftovers
        for name, keys in (("under a lease (unacked/)", left.unacked), ("in ready/ or delayed/", left.ready),
                           ("in dead/", left.dead), ("under chords/", left.chords)):
            for key in keys:
                open_items.append(f"{key} {name}")
                violations.append(Violation(left.task_of_key.get(key, "") or _part_task(key) or "-",
                                            f"message left {name}", key))
        accepted = set(self.history.sent) | set(self.history.refused)
        for task in sorted(set(self.runs) - accepted):
            violations.append(Violation(task, "ran although nobody was told it was accepted"))
        for name, lapses in self.lapses.items():
            for lapse in lapses:
                if not any(start - ACK_GRACE <= lapse <= end + self.history.lease_ttl
                           for start, end in self.history.cuts.get(name, [])):
                    violations.append(Violation("-", f"worker {name}'s lease lapsed at {self.history.rel(lapse)} "
                                                      "although nobody cut it off"))
        for name, alive in self.alive.items():
            if not alive:
                violations.append(Violation("-", f"worker {name} exited although nobody killed it (see its log: "
                                                  f"{self.history.workers[name]['log']})"))

    def describe(self, task: str) -> str:
        """A task's runs and where its message is, for a failure message."""
        sent = self.history.sent.get(task)
        lines = [f"  {task} ({sent.kind if sent else '?'}, sent {self.history.rel(sent.at if sent else None)})"]
        for run in self.runs.get(task, []):
            lines.append(f"    ran on {run.worker} pid {run.pid}: {self.history.rel(run.started)}.."
                         f"{self.history.rel(run.done)} {'redelivered ' if run.redelivered else ''}"
                         f"{self.suspect(run) or ''}")
        if task in self.history.terminated:
            at, worker = self.history.terminated[task]
            lines.append(f"    terminated {self.history.rel(at)} while on {worker}")
        lines.append(f"    state {self.leftovers.states.get(task)}; message at {self.leftovers.where(task) or 'nowhere'}")
        lines.extend(f"    {line}" for line in self.log_lines(task))
        return "\n".join(lines)

    def log_lines(self, task: str) -> list[str]:
        """Every worker's log lines that name ``task`` (Celery's, with dashes, or ours)."""
        dashed = f"{task[:8]}-{task[8:12]}-{task[12:16]}-{task[16:20]}-{task[20:]}" if len(task) == 32 else task
        found = []
        for name, info in self.history.workers.items():
            try:
                lines = info["log"].read_text(errors="replace").splitlines()
            except OSError:
                continue
            found.extend(f"{name}: {line[:240]}" for line in lines if task in line or dashed in line)
        return found

    def failure_text(self, verdict: Verdict) -> str:
        lines = [f"chaos seed {self.history.seed}: {len(verdict.violations)} violation(s); replay with "
                 f"CHAOS_SEED={self.history.seed}", "schedule:", *("  " + line for line in self.history.schedule()),
                 "lease lapses: " + json.dumps({n: [self.history.rel(t) for t in ts] for n, ts in self.lapses.items()}),
                 "violations:"]
        for violation in verdict.violations:
            lines.append(f"- {violation.task}: {violation.rule} {violation.detail}")
            if violation.task != "-":
                lines.append(self.describe(violation.task))
        return "\n".join(lines)


def _part_task(key: str) -> str:
    """The task id in a chord part's key (``chords/<group>/parts/<task>.<index>``), else ""."""
    return key.rsplit("/", 1)[1].rsplit(".", 1)[0] if "/parts/" in key else ""
