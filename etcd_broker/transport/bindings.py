"""Exchange bindings kept in etcd, mirrored in memory by a watch.

Bindings must be shared by every process (a worker binds its pidbox queue, the
``celery inspect`` process publishes to it), so they live in etcd. Publishing
must not pay a read per message, so each process keeps a copy that a prefix
watch keeps current: one read at start, then pushed changes.

A watch lags a little behind etcd (more while its stream is resumed, e.g. around every fork
of a prefork pool), so a binding made just now by another process may be missing here. A
control reply is exactly that: the client binds a fresh reply queue, then sends the request,
and the worker replies through the direct exchange at once; routed on the stale copy the
reply found no queue and was dropped (1 in 20 ``revoke`` replies with ``--max-tasks-per-child
1``). So a publish to a direct exchange that matches nothing reads that exchange's bindings
from etcd before giving up (:meth:`BindingTable.refresh`): one read per such miss.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict

from etcd_broker.core import ops
from etcd_broker.core.client import EtcdClient
from etcd_broker.core.ops import KeySpace
from etcd_broker.core.watch import EVENT_PUT, Watch, WatchHub

logger = logging.getLogger(__name__)

Binding = tuple[str, str, str]  # (routing_key, pattern, queue), kombu's table row


class BindingTable:
    """Every exchange's bindings under one key space, kept current by a watch."""

    def __init__(self, client: EtcdClient, keys: KeySpace, hub: WatchHub) -> None:
        self.client = client
        self.keys = keys
        self._hub = hub
        self._watch: Watch | None = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._rows: dict[str, dict[bytes, Binding]] = defaultdict(dict)
        # binding key -> revision a refresh read it at, until the watch catches up (older events are ignored)
        self._revisions: dict[bytes, int] = {}
        self._loaded = threading.Event()

    def _load(self) -> None:
        if self._loaded.is_set():
            return
        with self._load_lock:
            if self._loaded.is_set():
                return
            revision = self._read_all()
            self._watch = self._hub.subscribe(self.keys.all_bindings(), self._on_events, prefix=True,
                                              start_revision=revision + 1, on_resync=self._read_all)
            self._hub.wait_created(self._watch, timeout=self.client.timeout)
            self._loaded.set()

    def close(self) -> None:
        """Stop following etcd (the process's watch hub carries on for its other subscribers)."""
        with self._load_lock:
            if self._watch is not None:
                self._hub.unsubscribe(self._watch)
                self._watch = None
            self._loaded.clear()

    def _read_all(self) -> int:
        response = ops.get(self.client, self.keys.all_bindings(), prefix=True)
        rows: dict[str, dict[bytes, Binding]] = defaultdict(dict)
        for kv in response.kvs:
            rows[self.keys.exchange_of_binding(kv.key)][kv.key] = _row(kv.value)
        with self._lock:
            self._rows = rows
        return response.header.revision

    def refresh(self, exchange: str) -> None:
        """Read ``exchange``'s bindings from etcd now (a publish found none: the watch may lag)."""
        response = ops.get(self.client, self.keys.bindings(exchange), prefix=True)
        rows = {kv.key: _row(kv.value) for kv in response.kvs}
        with self._lock:
            for key in self._rows[exchange].keys() - rows.keys():
                self._revisions[key] = response.header.revision  # gone by then: an older put is stale
            for kv in response.kvs:
                self._revisions[kv.key] = kv.mod_revision
            self._rows[exchange] = rows

    def _on_events(self, events) -> None:
        with self._lock:
            for event in events:
                read = self._revisions.get(event.kv.key)
                if read is not None and event.kv.mod_revision >= read:
                    del self._revisions[event.kv.key]  # the watch caught up with the refresh: in order again
                if read is not None and event.kv.mod_revision <= read:
                    continue  # a refresh already read this binding as of a later revision
                exchange = self.keys.exchange_of_binding(event.kv.key)
                if event.type == EVENT_PUT:
                    self._rows[exchange][event.kv.key] = _row(event.kv.value)
                else:
                    self._rows[exchange].pop(event.kv.key, None)

    def table(self, exchange: str) -> list[Binding]:
        self._load()
        with self._lock:
            return list(self._rows.get(exchange, {}).values())

    def bind(self, exchange: str, routing_key: str, pattern: str, queue: str, lease: int | None = None) -> None:
        key = self.keys.binding(exchange, queue, routing_key)
        value = json.dumps({"routing_key": routing_key, "pattern": pattern, "queue": queue})
        ops.run(self.client, ops.put(key, value, lease or 0))
        with self._lock:
            self._rows[exchange][key.encode()] = (routing_key, pattern, queue)

    def unbind(self, exchange: str, queue: str, routing_key: str) -> None:
        key = self.keys.binding(exchange, queue, routing_key)
        ops.run(self.client, ops.delete(key))
        with self._lock:
            self._rows[exchange].pop(key.encode(), None)

    def unbind_queue(self, queue: str) -> None:
        """Remove every binding that routes to ``queue``, whatever the exchange."""
        for kv in ops.get(self.client, self.keys.all_bindings(), prefix=True).kvs:
            if _row(kv.value)[2] == queue:
                ops.run(self.client, ops.delete(kv.key))
                with self._lock:
                    self._rows[self.keys.exchange_of_binding(kv.key)].pop(kv.key, None)


def _row(value: bytes) -> Binding:
    data = json.loads(value)
    return data["routing_key"], data["pattern"], data["queue"]
