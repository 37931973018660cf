"""``make image-check``: build the container image here and run every role it serves (not in ``make test``).

Builds the Dockerfile with buildah (scripts/image_build.py: no Docker daemon, no registry), then runs
the roles from it with ``buildah run --isolation chroot`` on this machine's loopback, beside an etcd
and a SQLite file in a directory they share: ``manage migrate`` and ``check --deploy`` (a real key), web
(``/healthz`` over plain HTTP as a proxy asks, a page through the image's own health check, gunicorn's
control socket), a worker running a digits job, ``watch_jobs`` recording it, ``manage etcd``, and the
unprivileged user. One line per check, then ``image-check: N of N``. ``--gpu`` also builds the GPU
variant's stages as far as a machine without a CUDA base can (docs/deploy.md says what that covers).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from scripts import image_build
from scripts.etcd_server import EtcdServer, free_port
from scripts.processes import log_tail

#: The image built and checked.
IMAGE = "localhost/deephardway:check"
#: The GPU variant's builder stage, built against the local base (no CUDA base here).
GPU_IMAGE = "localhost/deephardway:check-gpu-builder"
#: Logs, the shared directory and the pip.conf handed to the build (var/ is git-ignored).
WORK = Path("var/image-check")
#: Where every role's container mounts WORK/shared.
SHARED = "/shared"
#: The image's unprivileged user (Dockerfile: useradd --uid 10001).
APP_UID = 10001
#: The Host the site is served under in the check (ALLOWED_HOSTS), as behind a proxy.
SITE_HOST = "deephardway.example"
#: Seconds a role gets to come up (TensorFlow imports take a while on a loaded 2-core machine).
START_TIMEOUT = 240.0
#: Seconds a digits job gets from submit to a recorded result.
JOB_TIMEOUT = 300.0
#: Seconds a one-off command in a container may take (training digits for one epoch included).
COMMAND_TIMEOUT = 600.0
#: A digit "1" on the model's 8x8 grid (1 = ink, row by row).
DIGIT_ONE = [0, 0, 0, 1, 1, 0, 0, 0] * 8


class Report:
    """One printed line per check; the summary counts them."""

    def __init__(self) -> None:
        self.results: list[bool] = []
        self.started = time.monotonic()

    def progress(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", flush=True)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append(ok)
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok

    def summary(self) -> int:
        passed = sum(self.results)
        print(f"image-check: {passed} of {len(self.results)}", flush=True)
        return 0 if passed == len(self.results) and self.results else 1


class Container:
    """A buildah working container of IMAGE: one per role, as one ``docker run`` would be."""

    def __init__(self, role: str, env: dict[str, str], volumes: dict[Path, str]) -> None:
        self.role, self.env, self.volumes = role, env, volumes
        self.name = f"deephardway-check-{role}"
        image_build.run(["buildah", "rm", self.name], check=False)
        image_build.run(["buildah", "from", "--name", self.name, IMAGE])
        self.log = WORK / f"{role}.log"
        self.process: subprocess.Popen | None = None

    def command(self, args: list[str]) -> list[str]:
        cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
        for host, inside in self.volumes.items():
            cmd += ["--mount", f"type=bind,src={host.resolve()},dst={inside},rw=true"]
        for key, value in self.env.items():
            cmd += ["--env", f"{key}={value}"]
        return [*cmd, self.name, "--", *args]

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
        """Run one command in the container and wait (``docker exec``)."""
        return subprocess.run(self.command(list(args)), capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str) -> None:
        """Start the role in the background; its output goes to WORK/<role>.log."""
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(self.command(list(args)), stdout=out, stderr=subprocess.STDOUT)

    def pids(self) -> list[int]:
        """The role's processes: below the buildah run, in the container's root, not buildah's own helper."""
        if self.process is None:
            return []
        return [pid for pid in descendants(self.process.pid)
                if os.readlink(f"/proc/{pid}/root") != "/"
                and not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"buildah-")]

    def stop(self) -> int | None:
        """SIGTERM the role's top process (buildah itself would SIGKILL it); its exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        for pid in self.pids()[:1]:
            os.kill(pid, signal.SIGTERM)
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def remove(self) -> None:
        self.stop()
        image_build.run(["buildah", "rm", self.name], check=False)


def descendants(root: int) -> list[int]:
    """Every process below ``root``, parents before children."""
    children: dict[int, list[int]] = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        children.setdefault(int(fields["PPid"]), []).append(int(status.parent.name))
    found, todo = [], [root]
    while todo:
        for child in sorted(children.get(todo.pop(0), [])):
            found.append(child)
            todo.append(child)
    return found


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ValueError(pid)


def wait_for(condition, timeout: float, interval: float = 1.0):
    """Poll ``condition`` until it returns something truthy or ``timeout`` passes (its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET that does not follow redirects; (0, error) when nothing answers."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def build_image(report: Report) -> bool:
    """Build IMAGE (the CPU variant) from this checkout; one check with its time and size."""
    base = image_build.base_image(WORK, report.progress)
    report.progress(f"building {IMAGE} on {base} (log: {WORK / 'build.log'})")
    try:
        with image_build.pip_secrets(WORK) as secret_args:
            seconds = image_build.build(Path.cwd(), IMAGE, WORK / "build.log", {"BASE_IMAGE": base},
                                        secret_args, report.progress)
    except subprocess.CalledProcessError:
        return report.check("image builds", False, f"see {WORK / 'build.log'}:\n{log_tail(WORK / 'build.log')}")
    config = json.loads(image_build.run(["buildah", "inspect", "--type", "image", IMAGE]).stdout)["Docker"]["config"]
    report.check("image builds", True, f"{seconds:.0f} s on {base}, {image_size(IMAGE)}")
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    report.check("runtime environment has no DEBIAN_FRONTEND", "DEBIAN_FRONTEND" not in env,
                 ", ".join(sorted(env)))
    report.check("image runs as the unprivileged user", config.get("User") == "app", f"User={config.get('User')!r}")
    return True


def image_size(image: str) -> str:
    listed = image_build.run(["buildah", "images", "--format", "{{.Size}}", image]).stdout.split("\n")[0]
    return f"image {listed.strip()}"


def role_env(etcd_url: str, port: int) -> dict[str, str]:
    """What every role is given, as docs/deploy.md's table says (a real key, DEBUG=0 from the image)."""
    return {
        "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": SITE_HOST, "CSRF_TRUSTED_ORIGINS": f"https://{SITE_HOST}", "BEHIND_TLS_PROXY": "1",
        "ETCD_URL": etcd_url, "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{SHARED}/db.sqlite3", "MODEL_DIR": f"{SHARED}/models",
        "MEDIA_ROOT": f"{SHARED}/media",
        "WEB_WORKERS": "1", "WEB_THREADS": "8", "WORKER_QUEUES": "gpu", "WORKER_CONCURRENCY": "4",
    }


def shared_volume() -> dict[Path, str]:
    """One directory every role mounts at SHARED (the SQLite file, models, media), owned by the image's user.

    Not at the image's VOLUME paths: there `buildah run` can mount a volume of its own over a bind mount."""
    host = WORK / "shared"
    shutil.rmtree(host, ignore_errors=True)
    for path in (host, host / "models", host / "media"):
        path.mkdir(parents=True)
        os.chown(path, APP_UID, APP_UID)
    return {host: SHARED}


def one_off_checks(report: Report, manage: Container) -> bool:
    """migrate, check --deploy, training the digits model, `manage etcd`: one-off containers' work."""
    whoami = manage.run("id", "-u")
    report.check("a command runs as uid 10001", whoami.stdout.strip() == str(APP_UID), whoami.stdout.strip())
    migrate = manage.run("/app/docker/entrypoint.sh", "manage", "migrate", "--noinput")
    if not report.check("manage migrate", migrate.returncode == 0, migrate.stderr[-500:]):
        return False
    deploy = manage.run("/app/docker/entrypoint.sh", "manage", "check", "--deploy", "--fail-level", "WARNING")
    report.check("manage check --deploy (a real key, DEBUG=0)", deploy.returncode == 0,
                 (deploy.stdout + deploy.stderr).strip()[-500:])
    train = manage.run("/app/docker/entrypoint.sh", "manage", "train_models", "--model", "digits", "--epochs", "1")
    report.check("manage train_models --model digits", train.returncode == 0,
                 (train.stdout + train.stderr).strip().splitlines()[-1][:200] if train.stdout + train.stderr else "")
    return train.returncode == 0


def manage_etcd_check(report: Report, manage: Container) -> None:
    """`manage etcd` imports scripts/ and serves (it failed with ModuleNotFoundError before)."""
    manage.start("/app/docker/entrypoint.sh", "manage", "etcd", "--port", "0")
    serving = wait_for(lambda: "etcd is serving" in manage.log.read_text() or manage.process.poll() is not None,
                       START_TIMEOUT)
    text = manage.log.read_text()
    status = manage.stop()
    report.check("manage etcd serves and stops on SIGTERM", bool(serving) and "etcd is serving" in text
                 and status == 0, (re.findall(r"etcd is serving \S+", text) or [text[-300:]])[0])


def manage_dev_check(report: Report, dev: Container) -> None:
    """`manage dev` (etcd, worker, watch_jobs, runserver in one container) comes up and stops on SIGTERM."""
    dev.start("/app/docker/entrypoint.sh", "manage", "dev", "--no-train", "--addr", f"127.0.0.1:{free_port()}")
    running = wait_for(lambda: "deephardway is running" in dev.log.read_text() or dev.process.poll() is not None,
                       START_TIMEOUT, interval=2.0)
    text = dev.log.read_text()
    status = dev.stop()
    report.check("manage dev brings up etcd, worker, watch_jobs and the site, and stops on SIGTERM",
                 bool(running) and "deephardway is running" in text and status == 0,
                 (re.findall(r"deephardway is running: \S+ +\(up in \d+ s\)", text) or [text[-300:]])[0])


def web_checks(report: Report, web: Container, port: int) -> bool:
    """gunicorn serves: the image's health check, /healthz as a proxy asks it, a page, gunicornc."""
    web.start("/app/docker/entrypoint.sh", "web")
    healthy = wait_for(lambda: web.process.poll() is not None
                       or web.run("/app/docker/entrypoint.sh", "healthcheck", timeout=30).returncode == 0,
                       START_TIMEOUT, interval=2.0)
    health = web.run("/app/docker/entrypoint.sh", "healthcheck", timeout=30)
    if not report.check("web: the image's health check (GET /api/models as the proxy sends it) passes",
                        bool(healthy) and health.returncode == 0,
                        health.stderr.strip() or log_tail(web.log, 5) if health.returncode else "exit 0"):
        return False
    base = f"http://127.0.0.1:{port}"
    status, body = http_get(f"{base}/healthz", {"Host": SITE_HOST})
    report.check("web: GET /healthz over plain HTTP (a proxy's check) answers 200, database and etcd ok",
                 status == 200 and json.loads(body or "{}").get("ok") is True, f"{status} {body[:120]}")
    plain, _ = http_get(f"{base}/", {"Host": SITE_HOST})
    status, page = http_get(f"{base}/", {"Host": SITE_HOST, "X-Forwarded-Proto": "https"})
    report.check("web: a page: 301 to https over plain HTTP, 200 through the proxy's header",
                 plain == 301 and status == 200 and "<html" in page.lower(), f"{plain}, then {status}")
    control = web.run("gunicornc", "-c", "show workers", "-j", timeout=30)
    errors = [line for line in web.log.read_text().splitlines() if "Control server error" in line]
    workers = json.loads(control.stdout).get("count") if control.returncode == 0 else None
    report.check("web: gunicorn's control socket answers gunicornc, no control server error",
                 workers is not None and not errors,
                 (errors or [f"show workers: {workers} worker(s)" if workers is not None else control.stderr[-200:]])[0])
    return True


def job_checks(report: Report, manage: Container, worker: Container, watcher: Container) -> None:
    """A digits job: submitted, run by the worker through etcd, recorded by watch_jobs."""
    worker.start("/app/docker/entrypoint.sh", "worker")
    watcher.start("/app/docker/entrypoint.sh", "watch_jobs")
    ready = wait_for(lambda: " ready." in worker.log.read_text() or worker.process.poll() is not None,
                     START_TIMEOUT)
    if not report.check("worker: celery worker is ready on the gpu queue",
                        bool(ready) and worker.process.poll() is None, log_tail(worker.log, 3).strip()[-300:]):
        return
    health = worker.run("/app/docker/entrypoint.sh", "healthcheck", timeout=120)
    report.check("worker: the image's health check (manage check) passes", health.returncode == 0,
                 (health.stdout + health.stderr).strip()[-200:])
    submit = manage.run("/app/docker/entrypoint.sh", "manage", "submit", "digits",
                        "--input", json.dumps({"pixels": DIGIT_ONE}), "--no-follow")
    match = re.search(r"job ([0-9a-f-]{36}) submitted", submit.stdout)
    if not report.check("manage submit digits", match is not None, (submit.stdout + submit.stderr).strip()[-300:]):
        return
    job_id = match.group(1)
    row = wait_for(lambda: finished_job(job_id), JOB_TIMEOUT, interval=2.0)
    received = re.search(rf"Task jobs\.tasks\.run_model\[{job_id}\] received", worker.log.read_text())
    report.check("worker: took the job from etcd and ran it", received is not None and bool(row)
                 and row[2].startswith("worker@"), f"ran by {row[2]!r}" if row else log_tail(worker.log, 5))
    report.check("watch_jobs: recorded it on the Job row", bool(row) and row[0] == "succeeded",
                 f"status {row[0]}, result {row[1][:100]}" if row else f"not finished in {JOB_TIMEOUT:.0f} s")


def finished_job(job_id: str) -> tuple[str, str, str] | None:
    """(status, result, worker) of the Job row once final, read from the shared SQLite file here."""
    path = (WORK / "shared/db.sqlite3").resolve()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        row = db.execute("SELECT status, result, worker FROM jobs_job WHERE id = ?",
                         (job_id.replace("-", ""),)).fetchone()
    return (row[0], str(row[1]), row[2]) if row and row[0] in ("succeeded", "failed", "cancelled") else None


def uid_checks(report: Report, roles: list[Container]) -> None:
    """Every process of the long-running roles runs as the image's user, not root."""
    for container in roles:
        uids = {uid_of(pid) for pid in container.pids()}
        report.check(f"{container.role}: every process runs as uid {APP_UID}", uids == {APP_UID},
                     f"{len(container.pids())} processes, uids {sorted(uids)}")


def role_checks(report: Report) -> None:
    """Run the roles beside an etcd started here, on loopback."""
    etcd = EtcdServer().start()
    port = free_port()
    env, mounts = role_env(etcd.url, port), shared_volume()
    containers = {role: Container(role, env, mounts) for role in ("manage", "web", "worker", "watch_jobs", "dev")}
    try:
        if one_off_checks(report, containers["manage"]):
            manage_etcd_check(report, containers["manage"])
            if web_checks(report, containers["web"], port):
                job_checks(report, containers["manage"], containers["worker"], containers["watch_jobs"])
                uid_checks(report, [containers[role] for role in ("web", "worker", "watch_jobs")])
            for role in ("web", "worker", "watch_jobs"):
                containers[role].stop()
            manage_dev_check(report, containers["dev"])
    finally:
        for container in containers.values():
            container.remove()
        etcd.stop()


#: setuptools that Ubuntu 22.04's python3.11-venv puts in a new venv (the GPU base's distribution).
JAMMY_SETUPTOOLS = "59.6.0"
#: The local base with that setuptools in place of Debian's (as a venv made on the CUDA base gets it).
OLD_SETUPTOOLS_BASE = "localhost/deephardway-base:bookworm-python3.11-setuptools59"


def old_setuptools_base() -> str:
    """LOCAL_BASE whose new venvs get setuptools 59.6 (Debian's ensurepip takes /usr/share/python-wheels)."""
    if image_build.image_exists(OLD_SETUPTOOLS_BASE):
        return OLD_SETUPTOOLS_BASE
    wheels = WORK / "wheels"
    image_build.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                     f"setuptools=={JAMMY_SETUPTOOLS}"])
    container = image_build.run(["buildah", "from", image_build.LOCAL_BASE]).stdout.strip()
    try:
        image_build.run(["buildah", "run", "--isolation", "chroot", container, "--", "sh", "-c",
                         "rm /usr/share/python-wheels/setuptools-*.whl"])
        image_build.run(["buildah", "copy", container, str(next(wheels.glob("setuptools-*.whl"))),
                         "/usr/share/python-wheels/"])
        image_build.run(["buildah", "commit", "-q", container, OLD_SETUPTOOLS_BASE])
    finally:
        image_build.run(["buildah", "rm", container], check=False)
    return OLD_SETUPTOOLS_BASE


def gpu_checks(report: Report) -> None:
    """The GPU variant's builder stage (requirements-gpu.txt, the install steps) on a base whose venv
    brings setuptools 59.6 as the CUDA base's does. The CUDA base itself is out of reach here."""
    image_build.base_image(WORK, report.progress)  # LOCAL_BASE exists from here on when it was needed
    base = old_setuptools_base()
    report.progress(f"building the GPU variant's builder stage on {base} (log: {WORK / 'build-gpu.log'})")
    try:
        with image_build.pip_secrets(WORK) as secret_args:
            seconds = image_build.build(Path.cwd(), GPU_IMAGE, WORK / "build-gpu.log",
                                        {"BASE_IMAGE": base, "REQUIREMENTS": "requirements-gpu.txt"},
                                        secret_args, report.progress, target="builder")
    except subprocess.CalledProcessError:
        report.check("GPU variant: builder stage builds", False, log_tail(WORK / "build-gpu.log"))
        return
    report.check("GPU variant: builder stage builds (venv setuptools 59.6 before the pin)", True,
                 f"{seconds:.0f} s, {image_size(GPU_IMAGE)}")
    container = image_build.run(["buildah", "from", GPU_IMAGE]).stdout.strip()
    try:
        probe = image_build.run(["buildah", "run", "--isolation", "chroot", container, "--", "python", "-c",
                                 "import tensorflow as tf, etcd_broker, deephardway_site; "
                                 "print(tf.__version__, tf.sysconfig.get_build_info()['is_cuda_build'])"],
                                check=False, timeout=COMMAND_TIMEOUT)
    finally:
        image_build.run(["buildah", "rm", container], check=False)
    words = probe.stdout.split()
    report.check("GPU variant: TensorFlow built for CUDA imports beside the project", words[-1:] == ["True"],
                 probe.stdout.strip()[-120:] or probe.stderr.strip()[-300:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gpu", action="store_true", help="also build the GPU variant's builder stage (~7 GB)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C: the roles' containers and the etcd are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    report = Report()
    image_build.ensure_tools("buildah")
    if build_image(report):
        role_checks(report)
    if args.gpu:
        gpu_checks(report)
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())
