"""``manage.py dev``: the whole system in one terminal (what ``make run`` calls).

Starts a local etcd, migrates, then runs the Celery worker, the job watcher and the web
site as child processes and prints the URL as soon as the site answers. Missing models are
then trained as ``train_model`` jobs on that worker (``train_models --queue --missing``:
deduplicated, shown live on the pages and in My jobs). Ctrl-C stops everything.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from scripts.etcd_server import EtcdNotFound, EtcdPortTaken, EtcdServer, EtcdStartError, free_port

#: Exit codes of a child that was asked to stop (Ctrl-C reaches the whole process group).
STOPPED_CODES = (0, -signal.SIGINT, -signal.SIGTERM)
#: Preferred etcd client port for development; a free one is used if it is taken.
DEV_ETCD_PORT = 2379
#: Worker threads: enough concurrent requests for the micro-batcher to fill batches.
DEV_WORKER_THREADS = 16
#: Seconds to wait for the site to answer before printing its URL anyway.
SITE_START_TIMEOUT = 60.0


class Command(BaseCommand):
    help = "Run etcd, a Celery worker, the job watcher and the web site together. Ctrl-C stops all."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000", help="web address (host:port)")
        parser.add_argument("--no-train", action="store_true", help="skip training missing models")

    def handle(self, *args, addr: str, no_train: bool, **options) -> None:
        # Ctrl-C must stop everything even when started from a shell that ignores SIGINT.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        etcd = self.start_etcd()
        env = {**os.environ, "ETCD_URL": etcd.url, "CELERY_BROKER_URL": etcd.url,
               "CELERY_RESULT_BACKEND": etcd.url, "PYTHONUNBUFFERED": "1"}
        children: list[subprocess.Popen] = []
        helpers: list[subprocess.Popen] = []  # may finish on their own (the training follower)
        try:
            call_command("migrate", interactive=False, verbosity=0)
            self.stdout.write("database migrated")
            children = [self.spawn(cmd, env) for cmd in self.commands(addr)]
            waited = self.wait_for_site(addr, children)
            self.stdout.write(self.style.SUCCESS(f"\n  deephardway is running: http://{addr}/   (up in {waited:.0f} s)\n"
                                                 f"  etcd {etcd.url}   Ctrl-C stops everything\n"))
            missing = [] if no_train else self.untrained_models()
            if missing:
                self.stdout.write(f"  not trained yet: {', '.join(missing)}. They train now, as jobs on the worker; "
                                  "their pages show the progress and switch to the model when it is ready\n")
                helpers.append(self.spawn(self.training_command(), env))
            self.supervise(children, helpers)
        except KeyboardInterrupt:
            pass
        finally:
            self.stdout.write("stopping...")
            self.stop(helpers + children)
            etcd.stop()
            self.stdout.write("stopped")

    def stop(self, processes: list[subprocess.Popen]) -> None:
        for child in processes:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in processes:
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()

    def start_etcd(self) -> EtcdServer:
        data_dir = Path(settings.VAR_DIR) / "etcd"
        data_dir.mkdir(parents=True, exist_ok=True)
        port = int(os.environ.get("ETCD_PORT", DEV_ETCD_PORT))
        try:
            try:
                server = EtcdServer(port=port, data_dir=str(data_dir)).start()
            except EtcdPortTaken:  # only a real clash: any other failure is reported as it is
                self.stderr.write(f"port {port} is taken; using a free one")
                server = EtcdServer(port=free_port(), data_dir=str(data_dir)).start()
        except (EtcdNotFound, EtcdStartError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"etcd serving {server.url}")
        return server

    def untrained_models(self) -> list[str]:
        from ml.registry import MODELS

        return [name for name, spec in MODELS.items() if not spec.is_trained(settings.MODEL_DIR)]

    def training_command(self) -> list[str]:
        """Missing models as train_model jobs on the worker, followed in this terminal."""
        return [sys.executable, "manage.py", "train_models", "--queue", "--missing"]

    def wait_for_site(self, addr: str, children: list[subprocess.Popen]) -> float:
        """Seconds until the site answered (a child that dies meanwhile is an error)."""
        started = time.monotonic()
        while time.monotonic() - started < SITE_START_TIMEOUT:
            self.check_children(children)
            try:
                with urllib.request.urlopen(f"http://{addr}/healthz", timeout=2):
                    break
            except urllib.error.HTTPError:
                break  # it answers (a 503 names what is not up yet; the page still serves)
            except OSError:
                time.sleep(0.3)
        return time.monotonic() - started

    def commands(self, addr: str) -> list[list[str]]:
        from django.core.management import get_commands

        python = sys.executable
        cmds = [
            [python, "-m", "celery", "-A", "deephardway_site", "worker", "-l", "INFO",
             "-Q", "gpu,default", "-P", "threads", "-c", str(DEV_WORKER_THREADS), "-n", "dev@%h"],
            [python, "manage.py", "runserver", addr, "--noreload"],
        ]
        if "watch_jobs" in get_commands():
            cmds.append([python, "manage.py", "watch_jobs"])
        return cmds

    def spawn(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        # Children run `manage.py` from the directory of the one that started us: the checkout, or
        # /app in the container image (whose packages are installed in site-packages, BASE_DIR there).
        return subprocess.Popen(cmd, env=env, cwd=Path(sys.argv[0]).resolve().parent)

    def supervise(self, children: list[subprocess.Popen], helpers: list[subprocess.Popen]) -> None:
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            if self.check_children(children):
                return  # Ctrl-C reached the children first: a normal stop
            for helper in [h for h in helpers if h.poll() is not None]:
                helpers.remove(helper)
                if helper.returncode not in STOPPED_CODES:
                    self.stderr.write(f"{' '.join(helper.args[1:4])} exited with {helper.returncode}; "
                                      "the site goes on")
            time.sleep(0.5)

    def check_children(self, children: list[subprocess.Popen]) -> bool:
        """True when a child stopped normally (Ctrl-C); CommandError when one failed."""
        for child in children:
            if child.poll() is None:
                continue
            if child.returncode in STOPPED_CODES:
                return True
            raise CommandError(f"{' '.join(child.args[:4])} exited with {child.returncode}")
        return False
