"""etcd_broker imports no Django, and every module imports on its own.

Each module is imported first thing in a fresh interpreter where ``import django`` fails: an import
cycle shows only when its module is the first one loaded (``etcd_broker.stats`` first, as Flower's
config file does, once failed that way while every module imported fine after ``etcd_broker``).
"""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import etcd_broker
from tests.helpers import REPO_ROOT

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.broker import no_django
assert no_django.INSTALLED
import importlib
importlib.import_module({module!r})
try:
    import django
except ImportError:
    print("blocked")
"""
#: Interpreters at once (each one mostly waits on imports from disk).
PARALLEL = 4


def import_alone(module: str) -> str | None:
    """None if ``module`` imports first in a fresh interpreter without Django; else why not."""
    run = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(REPO_ROOT), module=module)],
                         capture_output=True, text=True, timeout=120, cwd="/")
    if run.returncode == 0 and run.stdout.strip().endswith("blocked"):
        return None
    return f"{module}: exit {run.returncode}: {run.stderr.strip().splitlines()[-1:] or run.stdout[-200:]}"


def test_every_module_imports_alone_with_django_blocked():
    modules = ["etcd_broker"] + [m.name for m in pkgutil.walk_packages(etcd_broker.__path__, "etcd_broker.")]
    assert {"etcd_broker.transport.channel", "etcd_broker.backend.result_backend", "etcd_broker.stats"} <= set(modules)
    with ThreadPoolExecutor(PARALLEL) as pool:
        failures = [failure for failure in pool.map(import_alone, modules) if failure]
    assert not failures, "\n".join(failures)
