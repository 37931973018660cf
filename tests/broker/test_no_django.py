"""etcd_broker imports no Django: every module imports in a process where ``import django`` fails."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import etcd_broker
from tests.helpers import REPO_ROOT

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.broker import no_django
assert no_django.INSTALLED
import importlib
for name in {modules!r}:
    importlib.import_module(name)
try:
    import django
except ImportError:
    print("blocked")
"""


def test_it_imports_every_module_with_django_blocked():
    modules = ["etcd_broker"] + [m.name for m in pkgutil.walk_packages(etcd_broker.__path__, "etcd_broker.")]
    assert {"etcd_broker.transport.channel", "etcd_broker.backend.result_backend", "etcd_broker.core.client"} <= set(modules)
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(REPO_ROOT), modules=modules)],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("blocked")
