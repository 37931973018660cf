"""Helpers for tests that run real processes: celery workers and their logs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: A worker on this 2-core machine is ready within a few seconds; TensorFlow-free apps faster.
WORKER_READY_TIMEOUT = 60.0


@dataclass
class WorkerProcess:
    """One ``celery -A <app> worker`` process with its own log file."""

    app: str = "tests.celery_app"
    env: dict[str, str] = field(default_factory=dict)
    queues: str = "celery"
    pool: str = "threads"
    concurrency: int = 2
    hostname: str = field(default_factory=lambda: f"w-{uuid.uuid4().hex[:6]}@%h")
    extra_args: list[str] = field(default_factory=list)
    log_dir: Path = Path("/tmp")
    process: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return Path(self.log_dir) / f"{self.hostname.split('@')[0]}.log"

    def start(self, wait: bool = True) -> WorkerProcess:
        cmd = [
            sys.executable, "-m", "celery", "-A", self.app, "worker", "-l", "INFO",
            "-Q", self.queues, "-P", self.pool, "-c", str(self.concurrency), "-n", self.hostname,
            "--without-gossip", "--without-mingle", *self.extra_args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = WORKER_READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready in {timeout}s:\n{self.log()[-4000:]}")

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not in worker log after {timeout}s:\n{self.log()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL the worker and everything it started (no shutdown handlers run)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def terminate(self, timeout: float = 30.0) -> int:
        """Warm shutdown (SIGTERM) and wait."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll ``predicate`` in a test (never in product code) until it is truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{message} not met within {timeout}s")
