"""A loopback TCP proxy in front of etcd that misbehaves on demand.

``swallow``: requests still reach etcd, answers never come back (the ambiguous failure a
client meets when a connection breaks mid-request: the write may have been applied, yet
the caller sees a timeout). ``cut``: nothing is forwarded either way and the bytes wait in
the proxy, as TCP retransmits across a network partition; clearing it heals the partition.
``latency``: every chunk is forwarded that many seconds after it arrived (each direction).
"""
from __future__ import annotations

import logging
import queue
import socket
import threading
import time

from scripts.etcd_server import free_port

logger = logging.getLogger(__name__)

CHUNK = 65536
#: How often a pump held by ``cut`` looks again (seconds).
CUT_POLL = 0.05


class BlackholeProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream``; ``swallow``, ``cut`` and ``latency`` as above."""

    def __init__(self, upstream_port: int, latency: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.latency = latency
        self.port = free_port()
        self.swallow = threading.Event()
        self.cut = threading.Event()
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
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # upstream down (a killed member): refuse this one, keep accepting
                client.close()
                continue
            for source, target, replies in ((client, upstream, False), (upstream, client, True)):
                chunks: queue.Queue = queue.Queue()
                threading.Thread(target=self._read, args=(source, chunks), daemon=True).start()
                threading.Thread(target=self._send, args=(chunks, source, target, replies), daemon=True).start()

    def _read(self, source: socket.socket, chunks: queue.Queue) -> None:
        """Queue each chunk with the time it may leave (None at end of stream)."""
        try:
            while data := source.recv(CHUNK):
                chunks.put((time.monotonic() + self.latency, data))
        except OSError:
            pass
        chunks.put((0.0, None))

    def _send(self, chunks: queue.Queue, source: socket.socket, target: socket.socket, replies: bool) -> None:
        try:
            while True:
                due, data = chunks.get()
                if data is None:
                    break
                while self.cut.is_set() or time.monotonic() < due:
                    time.sleep(CUT_POLL if self.cut.is_set() else max(due - time.monotonic(), 0))
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
