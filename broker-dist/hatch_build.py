"""Put etcd_broker into the library's wheel and sdist, and nothing into an editable install.

The package's source is ``../etcd_broker`` in the repository and ``etcd_broker/`` beside
pyproject.toml in an unpacked sdist (the sdist carries it there): :func:`source` finds it, so
a wheel builds from either. hatchling copies ``force-include`` paths into editable installs
too (a stale copy that would shadow the source); the build hook adds the package only to the
standard wheel and the sdist. An editable install gets the repository root on sys.path instead
(``dev-mode-dirs`` in pyproject.toml). The version is the package's ``__version__`` (the
metadata hook), read from wherever the source is.
"""
from __future__ import annotations

import os
import re
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from hatchling.metadata.plugin.interface import MetadataHookInterface

#: The package's name, and its place in the wheel and the sdist.
PACKAGE = "etcd_broker"
#: A file hatchling puts in every sdist, taken out (it is the repository's, not the library's).
IGNORE_FILE = ".gitignore"
#: ``__version__ = "..."`` in the package's __init__.py.
VERSION = re.compile(r'^__version__\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)


def source(root: str) -> str:
    """The package's source: inside ``root`` (an unpacked sdist) or beside it (the repository)."""
    inside = os.path.join(root, PACKAGE)
    return inside if os.path.isdir(inside) else os.path.normpath(os.path.join(root, os.pardir, PACKAGE))


class LibraryBuildHook(BuildHookInterface):
    """Adds the package to the standard wheel, and to the sdist when it lies outside broker-dist/."""

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version != "standard":  # editable: the source runs from the repository root
            return
        package, included = source(self.root), build_data["force_include"]
        if self.target_name == "wheel" or not package.startswith(os.path.join(self.root, "")):
            included[package] = PACKAGE
        for path in [path for path, target in included.items() if target == IGNORE_FILE]:
            del included[path]  # hatchling adds the repository's, the site's: not the library's


class LibraryMetadataHook(MetadataHookInterface):
    """The version: ``etcd_broker.__version__``."""

    def update(self, metadata: dict[str, Any]) -> None:
        with open(os.path.join(source(self.root), "__init__.py"), encoding="utf-8") as init:
            found = VERSION.search(init.read())
        if found is None:
            raise ValueError(f"no __version__ in {source(self.root)}/__init__.py")
        metadata["version"] = found.group(1)
