"""``manage.py etcd``: run a local etcd (auto-compaction on) until Ctrl-C."""
from __future__ import annotations

import signal
import time

from django.core.management.base import BaseCommand, CommandError

from scripts.etcd_server import EtcdNotFound, EtcdServer, EtcdStartError


class Command(BaseCommand):
    help = "Run a local etcd server for development (auto-compaction on). Ctrl-C stops it."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=2379, help="client port (0: any free port)")
        parser.add_argument("--data-dir", default="var/etcd", help="kept between runs")

    def handle(self, *args, host: str, port: int, data_dir: str, **options) -> None:
        server = self.start(host, port, data_dir)
        self.stdout.write(f"etcd is serving {server.url} (data in {server.data_dir}); Ctrl-C stops it")
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while server.running and not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
        if not stop and server.process and server.process.returncode not in (0, -15, None):
            raise CommandError(f"etcd exited with {server.process.returncode}:\n{server.log_tail()}")

    def start(self, host: str, port: int, data_dir: str) -> EtcdServer:
        from pathlib import Path

        Path(data_dir).mkdir(parents=True, exist_ok=True)
        try:
            return EtcdServer(host=host, port=port, data_dir=data_dir).start()
        except (EtcdNotFound, EtcdStartError) as exc:
            raise CommandError(str(exc)) from None
