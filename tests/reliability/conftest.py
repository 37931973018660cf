"""Fault-test fixtures: counting workers, a three-member etcd cluster, and the summary table printed after the run."""
from __future__ import annotations

import pytest

from etcd_broker.backend.result_store import close_shared
from etcd_broker.transport.consumer import close_all_leases
from scripts.etcd_server import EtcdServer, start_cluster
from tests.helpers import WorkerProcess
from tests.reliability import counting_app
from tests.reliability.counting import SUMMARY_HEADERS, Tally

#: The app every fault-test worker runs: each execution leaves markers the tests count.
APP = "tests.reliability.counting_app"

_rows: list[tuple] = []
_notes: list[tuple[str, list[str]]] = []


@pytest.fixture(autouse=True)
def _release_counting_app():
    yield
    counting_app.release()
    close_shared()  # result watch streams end with the test (its etcd is about to go)
    close_all_leases()  # so do this process's consumer leases


@pytest.fixture
def counting_workers(etcd_prefix, worker_factory):
    """``start(url, count, ...)``: point this process's counting app at ``url`` under the test's prefix
    and start ``count`` counting workers configured the same way (``marker_url``: they count
    executions on that etcd instead); returns the workers, each ready."""
    def start(url: str, count: int, *, lease_ttl: int = 3, backend: bool = True, concurrency: int = 2,
              pool: str = "threads", marker_url: str | None = None) -> list[WorkerProcess]:
        counting_app.configure(url, etcd_prefix, lease_ttl, backend=backend)
        env = counting_app.worker_env(url, etcd_prefix, lease_ttl, backend=backend, marker_url=marker_url)
        return [worker_factory(app=APP, env=env, concurrency=concurrency, pool=pool) for _ in range(count)]

    return start


@pytest.fixture
def cluster():
    """Three etcd members on loopback (three processes, three client ports), removed afterwards."""
    members: list[EtcdServer] = start_cluster(3)
    yield members
    for member in members:
        member.cleanup()


@pytest.fixture
def summary():
    """Print a test's tally (``pytest -s`` shows it) and keep it for the table at the end of the run."""
    def record(tally: Tally) -> None:
        print(f"\n{tally.table()}\n", flush=True)
        _rows.append(tally.row())

    return record


@pytest.fixture
def summary_lines():
    """``record(title, lines)``: print a test's own summary now and again at the end of the run."""
    def record(title: str, lines: list[str]) -> None:
        print(f"\n{title}\n" + "\n".join(lines), flush=True)
        _notes.append((title, lines))

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    for title, lines in _notes:
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
    if not _rows:
        return
    terminalreporter.section("fault tests: what was sent and what arrived")
    terminalreporter.write_line("| " + " | ".join(SUMMARY_HEADERS) + " |")
    terminalreporter.write_line("|" + "---|" * len(SUMMARY_HEADERS))
    for row in _rows:
        terminalreporter.write_line("| " + " | ".join(str(cell) for cell in row) + " |")
