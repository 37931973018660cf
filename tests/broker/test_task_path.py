"""One task's path stays readable: the etcd_broker modules a Celery task runs through, end to end,
are at most eight (issue 21; docs/transport.md, "One task's path"). scripts/task_path.py records
them with a profiler in a process of its own (a real etcd, a threads worker)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import REPO_ROOT

#: The most modules one task may touch (publish, claim, deliver, run, ack, store, await).
MAX_MODULES = 8


def test_one_task_runs_through_at_most_eight_modules():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "scripts.task_path"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    count = int(re.match(r"(\d+) etcd_broker modules", done.stdout).group(1))
    modules = re.findall(r"^  (etcd_broker\.\S+)", done.stdout, flags=re.M)
    assert len(modules) == count
    assert count <= MAX_MODULES, done.stdout
    assert {"etcd_broker.transport.channel", "etcd_broker.backend.result_backend"} <= set(modules), done.stdout
