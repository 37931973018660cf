"""Make ``import django`` fail in this process: the library's tests prove it needs no Django.

Loaded as a plugin (``pytest -p tests.broker.no_django``) or by tests/broker/conftest.py.
When Django is imported already (the whole suite in one process, with pytest-django), the
blocker is not installed; tests/broker/test_no_django.py still checks in a clean subprocess.
"""
from __future__ import annotations

import importlib.abc
import sys

#: Top-level packages the library must never import.
FORBIDDEN = ("django",)


class NoDjango(importlib.abc.MetaPathFinder):
    """A meta path finder that refuses the forbidden packages, naming what asked."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in FORBIDDEN:
            raise ImportError(f"{fullname!r} imported in a process that runs etcd_broker without Django")
        return None


def install() -> bool:
    """Install the blocker unless Django is loaded already; True if installed."""
    if any(name.split(".")[0] in FORBIDDEN for name in sys.modules):
        return False
    if not any(isinstance(finder, NoDjango) for finder in sys.meta_path):
        sys.meta_path.insert(0, NoDjango())
    return True


INSTALLED = install()
