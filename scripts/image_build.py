"""Build the container image with buildah, without a Docker daemon or a registry (``make image-check``).

- The named base image is used when it can be had; otherwise a stand-in is made here: a Debian
  bookworm root filesystem (debootstrap, from the mirror apt uses) with Debian's python3.11.
- pip inside the build reaches the package index the way this machine's pip does: its settings
  (``pip config list``) go in as the Dockerfile's ``pip.conf`` build secret, local directories and
  ``file://`` indexes served over loopback HTTP for the build's duration, the CA bundle as ``pip-cert``.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

#: The Dockerfile's default base.
NAMED_BASE = "python:3.11-slim-bookworm"
#: The stand-in made here when the named base cannot be pulled.
LOCAL_BASE = "localhost/deephardway-base:bookworm-python3.11"
#: Debian packages the stand-in base gets (python:3.11-slim has the same: Python with venv, CA certificates).
LOCAL_BASE_PACKAGES = ("python3.11", "python3.11-venv", "ca-certificates")
#: Seconds a pull of the named base may take before the stand-in is made instead.
PULL_TIMEOUT = 90
#: pip settings that travel into the build (``pip config list`` keys, without the section).
PIP_KEYS = ("index-url", "extra-index-url", "find-links", "timeout", "default-timeout")
#: Those of them that name places (URLs or local directories).
LOCATION_KEYS = ("index-url", "extra-index-url", "find-links")
#: Where the Dockerfile mounts the pip-cert secret (pip.conf's ``cert =`` points there).
SECRET_CERT_PATH = "/run/secrets/pip-cert"


def run(cmd: list[str], log: Path | None = None, timeout: float | None = None,
        check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; its output goes to ``log`` (appended) or is captured as text."""
    if log is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kwargs)
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=check, **kwargs)


def ensure_tools(*tools: str) -> None:
    """apt-get install the Debian packages named like the tools that are missing (root only)."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"image-check needs {', '.join(missing)}: sudo apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env)


def image_exists(name: str) -> bool:
    return run(["buildah", "inspect", "--type", "image", name], check=False).returncode == 0


def base_image(work: Path, progress) -> str:
    """The named base if present or pullable, else the local stand-in (made if missing)."""
    if image_exists(NAMED_BASE):
        return NAMED_BASE
    try:
        if run(["buildah", "pull", "-q", NAMED_BASE], timeout=PULL_TIMEOUT, check=False).returncode == 0:
            return NAMED_BASE
    except subprocess.TimeoutExpired:
        pass
    if not image_exists(LOCAL_BASE):
        progress(f"{NAMED_BASE} cannot be pulled here: making {LOCAL_BASE} with debootstrap")
        make_local_base(work)
    return LOCAL_BASE


def make_local_base(work: Path) -> None:
    """Debian bookworm (minbase) + Debian's python3.11 with venv, committed as LOCAL_BASE."""
    ensure_tools("debootstrap")
    rootfs, log = work / "base-rootfs", work / "base.log"
    shutil.rmtree(rootfs, ignore_errors=True)
    run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), debian_mirror()], log=log)
    shutil.copy("/etc/resolv.conf", rootfs / "etc/resolv.conf")
    apt = ["chroot", str(rootfs), "/usr/bin/env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    run([*apt, "update", "-qq"], log=log)
    run([*apt, "install", "-y", "-qq", "--no-install-recommends", *LOCAL_BASE_PACKAGES], log=log)
    run([*apt, "clean"], log=log)
    for leftover in ("var/lib/apt/lists", "debootstrap"):
        shutil.rmtree(rootfs / leftover, ignore_errors=True)
    (rootfs / "etc/resolv.conf").write_text("")
    container = run(["buildah", "from", "scratch"]).stdout.strip()
    try:
        mount = run(["buildah", "mount", container]).stdout.strip()
        run(["cp", "-a", f"{rootfs}/.", mount])
        run(["buildah", "umount", container])
        run(["buildah", "config", "--env", "LANG=C.UTF-8", "--env",
             "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "--cmd", "python3.11", container])
        run(["buildah", "commit", "-q", container, LOCAL_BASE])
    finally:
        run(["buildah", "rm", container], check=False)
        shutil.rmtree(rootfs, ignore_errors=True)


def debian_mirror() -> str:
    """The Debian mirror apt is configured with here (deb822 or one-line sources)."""
    for source in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if not source.is_file():
            continue
        for line in source.read_text(errors="replace").splitlines():
            words = line.replace("URIs:", " ").split()
            for word in words:
                if word.startswith("http") and "/debian" in word and "security" not in word:
                    return word
    return "http://deb.debian.org/debian"


def host_pip_settings() -> dict[str, str]:
    """This machine's effective pip settings (files and PIP_* environment), later ones winning."""
    listed = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout
    settings: dict[str, str] = {}
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return settings


class LoopbackFiles:
    """Serves local directories over HTTP on 127.0.0.1 while the build runs (the build sees the host's
    loopback; its file system does not hold the host's paths)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="deephardway-pip-"))
        handler = functools.partial(QuietHandler, directory=str(self.root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url_for(self, path: str) -> str:
        """An http URL that serves ``path`` (a directory) through a link under the root."""
        link = self.root / f"d{len(list(self.root.iterdir()))}"
        link.symlink_to(Path(path).resolve())
        return f"http://127.0.0.1:{self.server.server_port}/{link.name}/"

    def __enter__(self) -> LoopbackFiles:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.root, ignore_errors=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        logger.debug(format, *args)


def reachable(value: str, files: LoopbackFiles) -> str:
    """An index URL or find-links entry as the build can reach it: local ones through ``files``."""
    parsed = urlparse(value)
    if parsed.scheme not in ("", "file"):
        return value
    path = Path(parsed.path if parsed.scheme else value)
    if not path.is_dir():
        return ""
    if path.name == "simple":  # its pages link "../../files/...": serve the parent so those resolve
        return files.url_for(str(path.parent)) + "simple/"
    return files.url_for(str(path))


@contextlib.contextmanager
def pip_secrets(work: Path) -> Iterator[list[str]]:
    """``--secret`` arguments carrying this machine's pip settings into the build."""
    settings = host_pip_settings()
    with LoopbackFiles() as files:
        lines = ["[global]"]
        for key in PIP_KEYS:
            if key in LOCATION_KEYS:
                values = [reachable(value, files) for value in settings.get(key, "").split()]
                if any(values):
                    lines.append(f"{key} = {' '.join(value for value in values if value)}")
            elif key in settings:
                lines.append(f"{key} = {settings[key]}")
        lines.append("trusted-host = 127.0.0.1" + (f" {settings['trusted-host']}" if "trusted-host" in settings else ""))
        args = []
        cert = settings.get("cert") or os.environ.get("PIP_CERT")
        if cert and os.path.isfile(cert):
            lines.append(f"cert = {SECRET_CERT_PATH}")
            args += ["--secret", f"id=pip-cert,src={cert}"]
        conf = work / "pip.conf"
        conf.write_text("\n".join(lines) + "\n")
        yield ["--secret", f"id=pip.conf,src={conf}", *args]


def build(context: Path, tag: str, log: Path, build_args: dict[str, str], secrets: list[str],
          progress, target: str | None = None) -> float:
    """``buildah bud`` the Dockerfile in ``context`` as ``tag``; its STEP lines go to ``progress``.

    Returns the seconds it took; raises CalledProcessError (the log has the output)."""
    cmd = ["buildah", "bud", "--isolation", "chroot", "--format", "docker", "--layers", "-t", tag, *secrets]
    for name, value in build_args.items():
        cmd += ["--build-arg", f"{name}={value}"]
    if target:
        cmd += ["--target", target]
    started = time.monotonic()
    with open(log, "w") as out:
        out.write(f"$ {' '.join(cmd)} {context}\n")
        process = subprocess.Popen([*cmd, str(context)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            out.write(line)
            out.flush()
            if "STEP " in line[:12]:
                progress(f"  {line.strip()[:140]}")
        if process.wait():
            raise subprocess.CalledProcessError(process.returncode, cmd)
    return time.monotonic() - started
