"""The chaos checker on hand-made histories: each rule fires on the history that breaks it, and only then."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.chaos_check import Checker, History, Leftovers

T0 = 1_000_000.0
#: A worker log's timestamp 5 s after T0 (Celery logs local time).
AT_5 = time.strftime("%Y-%m-%d %H:%M:%S,000", time.localtime(T0 + 5))


def history(tmp_path: Path, lapse_log: str = "") -> History:
    made = History(seed=7, lease_ttl=10)
    made.t0 = T0
    for name in ("t0-0", "t1-0"):
        log = tmp_path / f"{name}.log"
        log.write_text(lapse_log if name == "t1-0" else "")
        made.workers[name] = {"pool": "threads", "pid": 1, "log": log, "started": T0, "killed": None}
    return made


def marker(task: str, worker: str, pid: int, at: float) -> dict:
    return {"task_id": task, "worker": worker, "pid": pid, "at": T0 + at}


def verdict(made: History, runs: list[tuple], states: dict[str, str] | None = None, unacked: list[str] | None = None):
    """``runs``: (task, worker, pid, start, end[, redelivered]) relative to T0."""
    started: dict[str, list[dict]] = {}
    done: dict[str, list[dict]] = {}
    for task, worker, pid, start, end, *redelivered in runs:
        started.setdefault(task, []).append({**marker(task, worker, pid, start), "redelivered": any(redelivered)})
        if end is not None:
            done.setdefault(task, []).append(marker(task, worker, pid, end))
    states = states if states is not None else {task: "SUCCESS" for task in made.sent}
    leftovers = Leftovers(list(unacked or []), [], [], [], states, {key: "a" for key in unacked or []})
    checker = Checker(made, started, done, leftovers, {name: True for name in made.workers})
    return checker.verdict(), checker


def send(made: History, task: str, kind: str = "late", **extra) -> None:
    made.accepted(task, kind, **extra)
    made.sent[task].at = T0


def rules(found) -> list[str]:
    return [violation.rule for violation in found.violations]


def test_a_task_run_once_breaks_no_rule(tmp_path):
    made = history(tmp_path)
    send(made, "a")
    found, _ = verdict(made, [("a", "t0-0", 11, 1.0, 2.0)])
    assert rules(found) == [] and found.counts["finished"] == 1


def test_two_runs_on_live_workers_are_a_violation_but_a_rerun_after_a_kill_is_not(tmp_path):
    made = history(tmp_path)
    send(made, "a")
    found, checker = verdict(made, [("a", "t0-0", 11, 1.0, 2.0), ("a", "t1-0", 12, 3.0, 4.0)])
    assert rules(found) == ["finished 2 times on live, connected workers"]
    assert "ran on t1-0 pid 12: +3.0s..+4.0s" in checker.failure_text(found)
    made.workers["t0-0"]["killed"] = T0 + 2.5
    found, _ = verdict(made, [("a", "t0-0", 11, 1.0, 2.0), ("a", "t1-0", 12, 3.0, 4.0)])
    assert rules(found) == [] and found.counts["finished again after a kill or cut"] == 1


def test_a_kill_excuses_a_rerun_only_if_it_came_before_the_first_runs_ack(tmp_path):
    made = history(tmp_path)
    send(made, "a")
    runs = [("a", "t0-0", 11, 1.0, 2.0), ("a", "t1-0", 12, 40.0, 41.0)]
    made.workers["t0-0"]["killed"] = T0 + 30.0  # long after its run finished and acked: nothing to redeliver
    found, checker = verdict(made, runs)
    assert rules(found) == ["finished 2 times on live, connected workers"]
    assert "ran on t0-0 pid 11: +1.0s..+2.0s \n" in checker.failure_text(found) + "\n"
    made.workers["t0-0"]["killed"] = T0 + 3.5  # within the ack's grace: its ack may not have landed
    assert rules(verdict(made, runs)[0]) == []
    made.workers["t0-0"]["killed"] = T0 + 9.0
    assert rules(verdict(made, runs)[0]) == ["finished 2 times on live, connected workers"]
    made.faults.append((T0 + 1.5, T0 + 8.0, "kill_leader", "m0 killed"))  # the ack waited out the election
    assert rules(verdict(made, runs)[0]) == []
    made.faults[-1] = (T0 + 1.5, T0 + 8.0, "kill_worker", "t1-0 killed")  # not an etcd fault: no wait
    assert rules(verdict(made, runs)[0]) == ["finished 2 times on live, connected workers"]


def test_a_rerun_after_a_cut_is_allowed_only_for_what_ran_during_the_cut(tmp_path):
    made = history(tmp_path)
    send(made, "a")
    made.cuts["t0-0"] = [[T0 + 5.0, T0 + 9.0]]
    runs = [("a", "t0-0", 11, 1.0, 2.0), ("a", "t1-0", 12, 3.0, 4.0)]
    assert rules(verdict(made, runs)[0]) == ["finished 2 times on live, connected workers"]
    made.cuts["t0-0"] = [[T0 + 1.5, T0 + 9.0]]
    assert rules(verdict(made, runs)[0]) == []


def test_a_task_taken_during_a_cut_and_begun_at_the_heal_may_run_again_elsewhere(tmp_path):
    made = history(tmp_path)
    send(made, "a")  # sent at T0, during the cut
    made.cuts["t0-0"] = [[T0 - 1.0, T0 + 9.0]]
    runs = [("a", "t1-0", 12, 8.0, 8.5), ("a", "t0-0", 11, 9.1, 9.6)]
    assert rules(verdict(made, runs)[0]) == []
    made.sent["a"].at = T0 + 9.05  # sent after the heal: the cut-off worker cannot have taken it during the cut
    assert rules(verdict(made, runs)[0]) == ["finished 2 times on live, connected workers"]


def test_a_lost_task_is_a_violation_unless_it_acked_early_on_a_killed_worker(tmp_path):
    made = history(tmp_path)
    send(made, "a")
    send(made, "b", kind="early")
    made.workers["t0-0"]["killed"] = T0 + 2.0
    found, _ = verdict(made, [("a", "t0-0", 11, 1.0, None), ("b", "t0-0", 11, 1.0, None)], states={})
    assert rules(found) == ["accepted and never finished"]
    assert found.violations[0].task == "a" and found.counts["lost with a killed worker (early ack)"] == 1


def test_an_early_ack_task_may_lose_its_result_only_to_a_kill_before_the_write_landed(tmp_path):
    made = history(tmp_path)
    send(made, "b", kind="early")
    runs = [("b", "t0-0", 11, 1.0, 2.0)]
    made.workers["t0-0"]["killed"] = T0 + 30.0  # long after the SUCCESS write: its loss is a violation
    assert rules(verdict(made, runs, states={})[0]) == ["finished but its state is None, not SUCCESS"]
    made.faults.append((T0 + 0.5, T0 + 2.0, "stop_member", "m1 stopped"))  # the write met a stopped member
    made.workers["t0-0"]["killed"] = T0 + 6.9  # killed while that write waited out its deadline
    found, _ = verdict(made, runs, states={})
    assert rules(found) == [] and found.counts["result lost with a killed worker (early ack)"] == 1
    send(made, "a")  # acks late: a kill there brings the message back, so a lost result is still a violation
    found, _ = verdict(made, runs + [("a", "t0-0", 11, 1.0, 2.0)], states={"a": None})
    assert rules(found) == ["finished but its state is None, not SUCCESS"]


def test_a_run_that_stops_on_a_live_worker_is_a_violation(tmp_path):
    made = history(tmp_path)
    send(made, "a")
    found, _ = verdict(made, [("a", "t0-0", 11, 1.0, None), ("a", "t1-0", 12, 3.0, 4.0)])
    assert rules(found) == ["started on t0-0 (pid 11), alive and connected, and never finished"]


def test_a_terminated_task_must_be_revoked_and_never_run_again(tmp_path):
    made = history(tmp_path)
    send(made, "a", kind="steps")
    made.terminated["a"] = (T0 + 2.0, "t0-0")
    assert rules(verdict(made, [("a", "t0-0", 11, 1.0, None)], states={"a": "REVOKED"})[0]) == []
    assert rules(verdict(made, [("a", "t0-0", 11, 1.0, None)], states={})[0]) == [
        "terminated, not finished, but its state is None, not REVOKED"]
    found, _ = verdict(made, [("a", "t0-0", 11, 1.0, None), ("a", "t1-0", 12, 9.0, 10.0)])
    assert rules(found) == ["ran again on t1-0 after it was terminated"]


@pytest.mark.parametrize(("start", "broken"), [(2.9, True), (3.1, False)])
def test_countdown_and_chord_order(tmp_path, start, broken):
    made = history(tmp_path)
    send(made, "c", kind="countdown", eta=T0 + 3.0)
    send(made, "p1", kind="part")
    send(made, "cb", kind="callback", parts=["p1"])
    found, _ = verdict(made, [("c", "t0-0", 11, start, 4.0), ("p1", "t0-0", 11, 1.0, 3.0),
                              ("cb", "t1-0", 12, start, 4.0)])
    assert bool(found.violations) is broken
    if broken:
        assert rules(found) == ["started 0.10 s before its countdown",
                                "chord callback started before its last part finished"]


def test_leftover_messages_and_an_unexplained_lease_lapse_are_violations(tmp_path):
    made = history(tmp_path, lapse_log=f"[{AT_5}: ERROR/MainProcess] consumer lease 00ab "
                                       "expired while we were alive; re-registering\n")
    send(made, "a")
    found, _ = verdict(made, [("a", "t0-0", 11, 1.0, 2.0)], unacked=["/p/q/celery/unacked/00ab/9/1"])
    assert rules(found)[0] == "message left under a lease (unacked/)"
    assert [rule for rule in rules(found) if "lease lapsed" in rule]
    assert found.counts["lease lapses"] == 1


def test_a_second_copy_from_a_retried_publish_is_counted_apart_only_with_the_retry_on_record(tmp_path):
    made = history(tmp_path)
    send(made, "a")
    twice = [("a", "t0-0", 11, 1.0, 2.0), ("a", "t1-0", 12, 3.0, 4.0)]
    assert rules(verdict(made, twice)[0]) == ["finished 2 times on live, connected workers"]
    made.publish_retried(["a"])
    found, _ = verdict(made, twice)
    assert rules(found) == [] and found.counts["published twice (a publish retried after a lost answer)"] == 1
    redelivered = [twice[0], (*twice[1], True)]  # a redelivery of the same message is no second publish
    assert rules(verdict(made, redelivered)[0]) == ["finished 2 times on live, connected workers"]


def test_a_callback_published_twice_needs_a_worker_retrying_its_publish_after_the_last_part(tmp_path):
    made = history(tmp_path)
    send(made, "p1", kind="part")
    send(made, "cb", kind="callback", parts=["p1"])
    runs = [("p1", "t0-0", 11, 1.0, 2.0), ("cb", "t0-0", 11, 3.0, 3.1), ("cb", "t1-0", 12, 8.0, 8.1)]
    assert rules(verdict(made, runs)[0]) == ["finished 2 times on live, connected workers"]
    (tmp_path / "t0-0.log").write_text(f"[{AT_5}: WARNING/MainProcess] Retrying refused callback "
                                       "publish for 'tests.reliability.counting_app.collect' (2/3, waiting 0.2s)\n")
    assert rules(verdict(made, runs)[0]) == []
