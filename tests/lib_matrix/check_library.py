"""The installed wheel, as a user gets it: contents, metadata ranges, entry point, kombu without
Celery, and a Celery worker (prefork) running tasks with the etcd result backend."""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import WorkerProcess

#: The distribution's name on PyPI.
DIST = "celery-etcd-broker"
#: The pins of this run (broker-dist/pins-floor.txt or pins-ceiling.txt) and both pin files.
PINS = Path(os.environ["LIB_PINS"])
PIN_DIR = PINS.parent
#: What the sdist holds at its top: the package and broker-dist/'s files (no deephardway_site, jobs, ml...).
SDIST_TOP = ("etcd_broker", "pyproject.toml", "hatch_build.py", "README.md", "CHANGELOG.md", "PKG-INFO",
             "pins-floor.txt", "pins-ceiling.txt")
#: A result, a group and a worker start on a loaded 2-core machine.
RESULT_TIMEOUT = 120


def pins(path: Path) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return dict(line.split("==") for line in lines if line)


def requirements() -> dict[str, Requirement]:
    """The distribution's own dependencies (extras left out: flower is tested with the site's pins)."""
    required = [Requirement(text) for text in importlib.metadata.requires(DIST)]
    return {requirement.name: requirement for requirement in required if requirement.marker is None}


def test_it_runs_the_installed_wheel_not_the_source_tree():
    import etcd_broker

    assert Path(etcd_broker.__file__).is_relative_to(sysconfig.get_paths()["purelib"])
    assert etcd_broker.__version__ == importlib.metadata.version(DIST)


def test_the_wheel_holds_etcd_broker_and_its_metadata_only():
    names = zipfile.ZipFile(os.environ["LIB_WHEEL"]).namelist()
    dist_info = f"{DIST.replace('-', '_')}-{importlib.metadata.version(DIST)}.dist-info/"
    strays = [name for name in names if not name.startswith(("etcd_broker/", dist_info))]
    assert not strays, f"the wheel holds more than etcd_broker: {strays}"
    assert "etcd_broker/py.typed" in names and "etcd_broker/__init__.py" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_sdist_holds_etcd_broker_and_its_build_files_and_the_wheel_came_from_it():
    # scripts/library_dist.py built LIB_SDIST in broker-dist/, then LIB_WHEEL from it alone
    root = f"{DIST.replace('-', '_')}-{importlib.metadata.version(DIST)}/"
    with tarfile.open(os.environ["LIB_SDIST"]) as sdist:
        files = {member.name.removeprefix(root): sdist.extractfile(member).read()
                 for member in sdist.getmembers() if member.isfile()}
        assert all(member.name.startswith(root) for member in sdist.getmembers())
    assert {name.split("/")[0] for name in files} == set(SDIST_TOP)
    assert not [name for name in files if "__pycache__" in name or name.endswith(".pyc")]
    assert {"etcd_broker/__init__.py", "etcd_broker/py.typed", "etcd_broker/transport/channel.py"} <= set(files)
    with zipfile.ZipFile(os.environ["LIB_WHEEL"]) as wheel:
        package = {name: wheel.read(name) for name in wheel.namelist() if name.startswith("etcd_broker/")}
    assert package == {name: data for name, data in files.items() if name.startswith("etcd_broker/")}


def test_the_metadata_ranges_start_at_the_floor_and_admit_the_ceiling():
    metadata = importlib.metadata.metadata(DIST)
    assert metadata["Requires-Python"] == ">=3.10"
    required = requirements()
    floor, ceiling = pins(PIN_DIR / "pins-floor.txt"), pins(PIN_DIR / "pins-ceiling.txt")
    assert set(required) == set(floor) == set(ceiling)
    for name, requirement in required.items():
        lower = next(spec.version for spec in requirement.specifier if spec.operator == ">=")
        assert Version(floor[name]) == Version(lower), f"{name}: the range starts at {lower}, the floor tested is {floor[name]}"
        assert requirement.specifier.contains(ceiling[name]), f"{name} {ceiling[name]} outside {requirement}"
    for name, version in pins(PINS).items():  # what this venv really has
        assert importlib.metadata.version(name) == version


def test_celery_finds_the_result_backend_by_entry_point_alone():
    (entry,) = importlib.metadata.entry_points(group="celery.result_backends", name="etcdv3")
    assert entry.value == "etcd_broker.backend:EtcdBackend"
    code = ("import sys; from celery.app.backends import by_name; cls = by_name('etcdv3');"
            "print(cls.__module__, cls.__name__)")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert found.stdout.split() == ["etcd_broker.backend.result_backend", "EtcdBackend"]


KOMBU_ONLY = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("celery", "django"):
            raise ImportError(f"{name} is blocked: a kombu-only user has no Celery")
sys.meta_path.insert(0, Block())
import etcd_broker
from kombu import Connection
with Connection(sys.argv[1], transport_options={"prefix": sys.argv[2]}) as connection:
    queue = connection.SimpleQueue("kombu-only")
    queue.put({"n": 1}, priority=1)
    queue.put({"n": 9}, priority=9)
    got = [queue.get(timeout=30) for _ in range(2)]
    for message in got:
        message.ack()
    print([message.payload["n"] for message in got])
    queue.close()
print(sorted(name for name in sys.modules if name.split(".")[0] in ("celery", "django")))
"""


def test_kombu_alone_round_trips_by_priority_with_celery_and_django_blocked(etcd_url, etcd_prefix):
    run = subprocess.run([sys.executable, "-c", KOMBU_ONLY, etcd_url, etcd_prefix],
                         capture_output=True, text=True, timeout=RESULT_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:2] == ["[9, 1]", "[]"]


@pytest.fixture
def worker(etcd_url, etcd_prefix, tmp_path):
    env = {"LIB_ETCD_URL": etcd_url, "LIB_PREFIX": etcd_prefix}
    process = WorkerProcess(app="lib_app", env=env, queues="lib", pool="prefork", concurrency=2,
                            log_dir=tmp_path).start()
    yield process
    process.kill()


def test_a_prefork_worker_runs_tasks_and_stores_results_in_etcd(worker, etcd_url, etcd_prefix, monkeypatch):
    monkeypatch.setenv("LIB_ETCD_URL", etcd_url)
    monkeypatch.setenv("LIB_PREFIX", etcd_prefix)
    import lib_app
    from celery import group

    assert lib_app.add.delay(2, 3).get(timeout=RESULT_TIMEOUT) == 5
    assert group(lib_app.add.s(i, i) for i in range(4))().get(timeout=RESULT_TIMEOUT) == [0, 2, 4, 6]
    assert type(lib_app.app.backend).__name__ == "EtcdBackend"
