"""A loopback TCP proxy that can swallow replies: requests still reach etcd, answers never come back.

That is the ambiguous failure a client meets when a connection breaks mid-request: the
write may have been applied, yet the caller sees a timeout.
"""
from __future__ import annotations

import logging
import socket
import threading

from scripts.etcd_server import free_port

logger = logging.getLogger(__name__)

CHUNK = 65536


class BlackholeProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; while ``swallow`` is set, drops etcd's replies."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.swallow = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="blackhole-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"etcdv3://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, replies: bool) -> None:
        try:
            while data := source.recv(CHUNK):
                if not (replies and self.swallow.is_set()):
                    target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
