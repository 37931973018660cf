"""The library's distributions (broker-dist/): its sdist, and its wheel built from that sdist.

    python -m scripts.library_dist dist/    # make dist: celery_etcd_broker-<v>.tar.gz and -py3-none-any.whl

The sdist is built by hatchling's PEP 517 hook in broker-dist/ (hatch_build.py puts ../etcd_broker
in it); the wheel by ``pip wheel --no-deps --no-build-isolation`` from that sdist alone, in an
empty temporary dir, so the wheel shipped is the one a user's pip builds from the sdist. Both run
in one builder venv (var/matrix/build, hatchling pinned), made once: no index lookup after that.
scripts/lib_matrix.py tests what this builds.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The library's build config, pins and changelog.
DIST_DIR = REPO / "broker-dist"
#: The builder venv (gitignored), made again when BUILD_BACKEND changes.
BUILDER = REPO / "var" / "matrix" / "build"
#: The build backend (broker-dist/pyproject.toml asks for hatchling>=1.26), pinned for our builds.
BUILD_BACKEND = "hatchling==1.33.0"


def pip(python: str | Path, *args: str | Path, command: str = "install", cwd: Path | None = None) -> None:
    """``pip install`` (or ``command``) quietly (the index's warnings about absent local mirrors dropped);
    raise on failure."""
    done = subprocess.run([str(python), "-m", "pip", command, "-q", "--disable-pip-version-check", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        raise SystemExit(f"pip {command} {' '.join(map(str, args))} failed:\n{done.stdout}{done.stderr}")


def builder() -> Path:
    """The builder venv's python: hatchling at BUILD_BACKEND (the venv is made once)."""
    stamp = BUILDER / ".backend"
    if not (stamp.exists() and stamp.read_text() == BUILD_BACKEND):
        shutil.rmtree(BUILDER, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(BUILDER)], check=True)
        pip(BUILDER / "bin/python", "--only-binary", ":all:", BUILD_BACKEND)
        stamp.write_text(BUILD_BACKEND)
    return BUILDER / "bin/python"


def build_sdist(out: Path) -> Path:
    """The library's sdist in ``out``, built in broker-dist/."""
    built = subprocess.run([builder(), "-c", "import sys; from hatchling.build import build_sdist; "
                            "print(build_sdist(sys.argv[1]))", out], cwd=DIST_DIR, capture_output=True, text=True)
    if built.returncode:
        raise SystemExit(f"building the sdist failed:\n{built.stdout}{built.stderr}")
    return out / built.stdout.split()[-1]


def wheel_from(sdist: Path, out: Path) -> Path:
    """The wheel pip builds from ``sdist`` alone, run in an empty dir (nothing of the repository helps)."""
    with tempfile.TemporaryDirectory(prefix="library-wheel-") as empty:
        pip(builder(), "--no-deps", "--no-build-isolation", "-w", empty, sdist.resolve(), command="wheel",
            cwd=Path(empty))
        (wheel,) = Path(empty).glob("*.whl")
        return Path(shutil.move(wheel, out / wheel.name))


def build(out: Path) -> tuple[Path, Path]:
    """The sdist, then the wheel built from it, in ``out`` (older builds of this version replaced)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("celery_etcd_broker-*.tar.gz"), *out.glob("celery_etcd_broker-*.whl")]:
        old.unlink()
    sdist = build_sdist(out)
    return sdist, wheel_from(sdist, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where the sdist and the wheel go")
    sdist, wheel = build(parser.parse_args(argv).out)
    print(sdist, wheel, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
