"""Test the library's wheel (broker-dist/) in fresh venvs: Python x dependency pins x etcd version.

    python -m scripts.lib_matrix           # the full matrix: 3.10-3.13 x floor/ceiling x etcd 3.4/3.5
    python -m scripts.lib_matrix --quick   # two cells: 3.10 at the floor on etcd 3.4, 3.13 at the ceiling on 3.5

The sdist is built once, and the wheel from it (scripts/library_dist.py: what `make dist` ships);
each (Python, pins) venv lives in var/matrix/ and is made again only when its pins change (pip with
the machine's configured index, binary wheels only). The checks (tests/lib_matrix/check_*.py) run
from a staging dir that holds no etcd_broker, so they import the installed wheel. Pythons come from pyenv (PYENV_ROOT) or PATH; etcd 3.5 from the launcher
(scripts/etcd_server.py), etcd 3.4 from ETCD_34_BIN or var/etcd-3.4 (scripts/system-deps.sh test).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scripts.etcd_server import etcd_candidates, etcd_version
from scripts.library_dist import DIST_DIR, build, pip

REPO = Path(__file__).resolve().parent.parent
#: Venvs, the sdist and wheel, and the staging dir (gitignored).
WORK = REPO / "var" / "matrix"
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
PINS = ("floor", "ceiling")
ETCDS = ("3.4", "3.5")
#: The cells `make test` runs: both ends of Python, of the ranges and of etcd.
QUICK = (("3.10", "floor", "3.4"), ("3.13", "ceiling", "3.5"))
#: Test tools from requirements-dev.txt (their exact pins) installed beside the wheel.
TEST_TOOLS = ("pytest", "pytest-timeout")
#: Files copied into the staging dir: the etcd launcher, the worker helper and the checks.
STAGED = ("scripts/__init__.py", "scripts/etcd_server.py", "scripts/processes.py", "tests/helpers.py")


@dataclass(frozen=True)
class Cell:
    python: str
    pins: str
    etcd: str

    @property
    def name(self) -> str:
        return f"py{self.python} {self.pins:7} etcd {self.etcd}"


def find_python(version: str) -> str:
    """The interpreter for ``version`` (pyenv first, then PATH)."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}")) or [shutil.which(f"python{version}")]
    if not found[-1]:
        raise SystemExit(f"no python{version}: install it (pyenv install {version}) or put it on PATH")
    return found[-1]


def find_etcd(version: str) -> str:
    """An etcd binary of ``version`` (major.minor)."""
    candidates = [path for _, path in etcd_candidates()]
    candidates += [os.environ.get("ETCD_34_BIN", ""), str(REPO / "var/etcd-3.4/usr/bin/etcd"), "/usr/bin/etcd"]
    for path in candidates:
        if path and os.access(path, os.X_OK) and etcd_version(path).startswith(version + "."):
            return path
    raise SystemExit(f"no etcd {version}: for 3.4 run `bash scripts/system-deps.sh test` as root "
                     "(unpacks Debian's etcd-server into var/etcd-3.4) or set ETCD_34_BIN")


def test_tools() -> list[str]:
    lines = (REPO / "requirements-dev.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.split("==")[0].strip() in TEST_TOOLS]


def venv_for(python: str, pins: str) -> Path:
    """A venv with ``python`` and the ``pins`` file's exact versions (made again when they change)."""
    venv = WORK / f"py{python}-{pins}"
    pin_file = DIST_DIR / f"pins-{pins}.txt"
    wanted = hashlib.sha256((pin_file.read_text() + "\n".join(test_tools())).encode()).hexdigest()
    stamp = venv / ".pins"
    if not (stamp.exists() and stamp.read_text() == wanted):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([find_python(python), "-m", "venv", str(venv)], check=True)
        pip(venv / "bin/python", "--only-binary", ":all:", "-r", pin_file, *test_tools())
        stamp.write_text(wanted)
    return venv


def stage() -> Path:
    """A dir with the checks and their helpers, and no etcd_broker."""
    path = WORK / "stage"
    shutil.rmtree(path, ignore_errors=True)
    for name in STAGED:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, path / name)
    (path / "tests/__init__.py").touch()
    (path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\npython_files = check_*.py\ntimeout = 300\n")
    for source in (REPO / "tests/lib_matrix").glob("*.py"):
        if source.name != "__init__.py":
            shutil.copy(source, path / source.name)
    return path


def run_cell(cell: Cell, sdist: Path, wheel: Path, staged: Path) -> bool:
    venv = venv_for(cell.python, cell.pins)
    python = str(venv / "bin/python")
    pin_file = DIST_DIR / f"pins-{cell.pins}.txt"
    installed, digest = venv / ".wheel", hashlib.sha256(wheel.read_bytes()).hexdigest()
    if not (installed.exists() and installed.read_text() == digest):  # hatchling's wheels are reproducible
        pip(python, "--no-deps", "--force-reinstall", wheel)
        installed.write_text(digest)
    env = {**os.environ, "ETCD_BIN": find_etcd(cell.etcd), "LIB_SDIST": str(sdist), "LIB_WHEEL": str(wheel),
           "LIB_PINS": str(pin_file)}
    env.pop("PYTHONPATH", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    started = time.monotonic()
    result = subprocess.run([python, "-m", "pytest", "-q", "-c", str(staged / "pytest.ini"), str(staged)],
                            cwd=staged, env=env, capture_output=True, text=True)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "(no output)"
    print(f"{cell.name}: {summary} [{time.monotonic() - started:.0f}s]", flush=True)
    if result.returncode:
        print(result.stdout[-6000:], result.stderr[-3000:], sep="\n")
    return result.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the cells `make test` runs")
    args = parser.parse_args(argv)
    cells = [Cell(*cell) for cell in QUICK] if args.quick else [
        Cell(python, pins, etcd) for python in PYTHONS for pins in PINS for etcd in ETCDS]
    WORK.mkdir(parents=True, exist_ok=True)
    sdist, wheel = build(WORK / "dist")
    staged = stage()
    failed = [cell.name for cell in cells if not run_cell(cell, sdist, wheel, staged)]
    print(f"library matrix: {len(cells) - len(failed)} of {len(cells)} cells passed", *failed, sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
