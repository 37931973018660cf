"""``manage.py dev``: the whole system in one terminal (what ``make run`` calls).

Starts a local etcd, migrates, then runs the Celery worker, the job watcher and
the web site as child processes, prints the URL, and stops everything on Ctrl-C.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from scripts.etcd_server import EtcdNotFound, EtcdServer, EtcdStartError, free_port

#: Exit codes of a child that was asked to stop (Ctrl-C reaches the whole process group).
STOPPED_CODES = (0, -signal.SIGINT, -signal.SIGTERM)
#: Preferred etcd client port for development; a free one is used if it is taken.
DEV_ETCD_PORT = 2379
#: Worker threads: enough concurrent requests for the micro-batcher to fill batches.
DEV_WORKER_THREADS = 16


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
        try:
            call_command("migrate", interactive=False, verbosity=0)
            self.stdout.write("database migrated")
            if not no_train:
                self.train_missing(env)
            children = [self.spawn(cmd, env) for cmd in self.commands(addr)]
            self.stdout.write(self.style.SUCCESS(f"\n  deephardway is running: http://{addr}/\n"
                                                 f"  etcd {etcd.url}   Ctrl-C stops everything\n"))
            self.supervise(children)
        except KeyboardInterrupt:
            pass
        finally:
            self.stdout.write("stopping...")
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(20)
                except subprocess.TimeoutExpired:
                    child.kill()
            etcd.stop()
            self.stdout.write("stopped")

    def start_etcd(self) -> EtcdServer:
        data_dir = Path(settings.VAR_DIR) / "etcd"
        data_dir.mkdir(parents=True, exist_ok=True)
        port = int(os.environ.get("ETCD_PORT", DEV_ETCD_PORT))
        try:
            try:
                server = EtcdServer(port=port, data_dir=str(data_dir)).start()
            except EtcdStartError:
                self.stderr.write(f"port {port} is taken; using a free one")
                server = EtcdServer(port=free_port(), data_dir=str(data_dir)).start()
        except (EtcdNotFound, EtcdStartError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"etcd serving {server.url}")
        return server

    def train_missing(self, env: dict[str, str]) -> None:
        from django.core.management import get_commands

        if "train_models" in get_commands():
            subprocess.run([sys.executable, "manage.py", "train_models", "--missing"], env=env, check=False)

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
        return subprocess.Popen(cmd, env=env, cwd=settings.BASE_DIR)

    def supervise(self, children: list[subprocess.Popen]) -> None:
        stop: list[int] = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            for child in children:
                if child.poll() is None:
                    continue
                if child.returncode in STOPPED_CODES:
                    return  # Ctrl-C reached the children first: a normal stop
                raise CommandError(f"{' '.join(child.args[:4])} exited with {child.returncode}")
            time.sleep(0.5)
