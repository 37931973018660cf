"""Put ../etcd_broker into the library's wheel, and nothing into an editable install.

hatchling copies ``force-include`` paths into editable installs too (a stale copy that would shadow
the source); this hook adds the package only to the standard wheel. An editable install gets the
repository root on sys.path instead (``dev-mode-dirs`` in pyproject.toml).
"""
from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: The package's source, relative to this folder, and its place in the wheel.
SOURCE, TARGET = "../etcd_broker", "etcd_broker"


class LibraryBuildHook(BuildHookInterface):
    """Adds the package to the standard wheel only."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "standard":
            build_data["force_include"][SOURCE] = TARGET
