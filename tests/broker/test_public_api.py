"""The library's public face: ``__all__``, ``__version__`` and its changelog, and kombu users who
import no Celery (a subprocess where ``import celery`` fails runs a kombu round trip on etcd)."""
from __future__ import annotations

import re
import subprocess
import sys

import etcd_broker
from tests.helpers import REPO_ROOT

KOMBU_ONLY = """
import importlib.abc, sys
sys.path.insert(0, {root!r})
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("celery", "django"):
            raise ImportError(f"{{name}} is blocked: a kombu-only user has no Celery")
sys.meta_path.insert(0, Block())
import etcd_broker
from kombu import Connection
for name in ("Transport", "queue_stats", "live_consumers", "stats_for_connection", "QueueFull", "EtcdUnreachable"):
    getattr(etcd_broker, name)
with Connection({url!r}, transport_options={{"prefix": {prefix!r}}}) as connection:
    queue = connection.SimpleQueue("kombu-only")
    queue.put({{"n": 1}}, priority=1)
    queue.put({{"n": 9}}, priority=9)
    got = [queue.get(timeout=30) for _ in range(2)]
    for message in got:
        message.ack()
    print([message.payload["n"] for message in got])
    print(etcd_broker.stats_for_connection(connection)[1].root)
    queue.close()
try:
    etcd_broker.EtcdBackend
except ImportError as exc:
    print("backend needs celery:", "blocked" in str(exc))
print(sorted(name for name in sys.modules if name.split(".")[0] in ("celery", "django")))
"""


def test_kombu_users_import_no_celery_and_round_trip_by_priority(etcd_url, etcd_prefix):
    script = KOMBU_ONLY.format(root=str(REPO_ROOT), url=etcd_url, prefix=etcd_prefix)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines() == ["[9, 1]", f"{etcd_prefix}/default", "backend needs celery: True", "[]"]


def test_the_result_backend_alias_is_registered_when_celery_came_first():
    script = (f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r}); from celery.app.backends import BACKEND_ALIASES;"
              "import etcd_broker; print(BACKEND_ALIASES['etcdv3'])")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd="/")
    assert run.stdout.strip() == "etcd_broker.backend:EtcdBackend", run.stderr[-3000:]


def test_every_public_name_resolves_and_nothing_else_is_offered():
    for name in etcd_broker.__all__:
        assert getattr(etcd_broker, name) is not None, name
    assert {"Transport", "EtcdBackend", "BatchTask", "QueueFull"} <= set(etcd_broker.__all__)
    assert set(dir(etcd_broker)) >= set(etcd_broker.__all__)


def test_the_changelog_describes_this_version():
    changelog = (REPO_ROOT / "broker-dist/CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(etcd_broker.__version__)}$", changelog, re.MULTILINE), (
        f"broker-dist/CHANGELOG.md has no section for {etcd_broker.__version__}")
