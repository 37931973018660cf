"""Stop a server we started and read the end of its log: shared by etcd_server.py and postgres_server.py.

Each server asks its process to stop in its own way (etcd: SIGTERM or SIGKILL, PostgreSQL: SIGINT,
its "fast" shutdown), waits a bounded time, and SIGKILLs a process that hangs.
"""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

#: How long a server gets to exit after the signal before it is killed (seconds).
STOP_TIMEOUT = 10.0


def stop_process(process: subprocess.Popen | None, sig: int = signal.SIGTERM,
                 timeout: float = STOP_TIMEOUT) -> None:
    """Send ``sig`` to ``process``, wait up to ``timeout`` s, then SIGKILL it; reaped on return.

    Nothing happens to a process that was never started or has already exited.
    """
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def log_tail(path: str | Path, lines: int = 20) -> str:
    """The last ``lines`` lines of the log at ``path`` ("" if it cannot be read)."""
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(True)[-lines:])
    except OSError:
        return ""
