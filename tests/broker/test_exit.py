"""At exit the library quiets its own loggers only: the host application's logging keeps working
(membership's exit handler used to call ``logging.disable``, silencing the host's last words)."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO_ROOT

SCRIPT = """
import atexit, logging, sys
sys.path.insert(0, {root!r})
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s %(message)s")
atexit.register(lambda: logging.getLogger("host").warning("host says goodbye"))  # runs after ours
import etcd_broker.transport.consumer
from kombu import Connection
with Connection({url!r}, transport_options={{"prefix": {prefix!r}}}) as connection:
    queue = connection.SimpleQueue("exit")  # consumes: this process holds a consumer lease
    queue.put("x")
    queue.get(timeout=30).ack()
"""


def test_the_hosts_logging_still_works_after_our_exit_handler(etcd_url, etcd_prefix):
    script = SCRIPT.format(root=str(REPO_ROOT), url=etcd_url, prefix=etcd_prefix)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "host host says goodbye" in run.stdout.splitlines(), run.stdout[-3000:]
