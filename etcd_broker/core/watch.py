"""The watch hub: one etcd watch stream per process and cluster, shared by every subscriber.

:func:`hub_for` gives this process's :class:`WatchHub` for an etcd configuration;
``hub.subscribe(key, callback, prefix=..., start_revision=...)`` follows a key or a key
prefix, ``hub.unsubscribe(watch)`` stops. Underneath, one :class:`WatchStream` (one gRPC
bidirectional stream) carries every watch. Each :class:`Watch` remembers the revision after
the last event it delivered; when the stream breaks (etcd restart, leader change, failover)
every watch is re-created from that revision. If etcd compacted that revision away, the
watch's ``on_resync`` re-reads state and says where to resume.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from etcd3 import etcdrpc
from etcd3.exceptions import NoServerAvailableError
from etcd3.utils import prefix_range_end, to_bytes

from etcd_broker.core.client import GATE, EtcdConfig, PerProcess, get_client, inherited

logger = logging.getLogger(__name__)

#: Reconnect back-off: first and longest wait between tries (seconds).
RECONNECT_FIRST_DELAY = 0.05
RECONNECT_MAX_DELAY = 1.0
#: What etcd says when it cancels a watch whose stream carries a token it no longer knows (it restarted).
INVALID_TOKEN_REASON = "invalid auth token"
EVENT_PUT = 0
EVENT_DELETE = 1
#: The watch id etcd gives its answer to a progress request (clientv3.InvalidWatchID): no one watch's.
PROGRESS_WATCH_ID = -1
#: Thread name of every hub's stream (one per process and etcd configuration).
HUB_THREAD_NAME = "etcd-watch-hub"

EventsCallback = Callable[[Sequence["etcdrpc.Event"]], None]
ResyncCallback = Callable[[], int]


@dataclass(eq=False)
class Watch:
    """One key or prefix watched on a :class:`WatchStream`."""

    key: bytes
    range_end: bytes | None
    callback: EventsCallback
    next_revision: int | None = None
    prev_kv: bool = False
    on_resync: ResyncCallback | None = None
    on_created: Callable[[], None] | None = None
    filters: tuple[int, ...] = ()
    watch_id: int | None = None
    created: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    label: str = ""  # who subscribed, for counting events (WatchHub.events_delivered)

    def create_request(self) -> etcdrpc.WatchRequest:
        create = etcdrpc.WatchCreateRequest(key=self.key, progress_notify=True, prev_kv=self.prev_kv)
        if self.range_end is not None:
            create.range_end = self.range_end
        if self.filters:
            create.filters.extend(self.filters)
        if self.next_revision:
            create.start_revision = self.next_revision
        return etcdrpc.WatchRequest(create_request=create)


class WatchStream:
    """A background thread holding one watch stream to etcd, re-opened when it breaks.

    It belongs to the process that made it: in a forked child (whose own hub is a new one,
    :func:`hub_for`) cancelling or closing it only marks it, and watching on it raises.
    """

    def __init__(self, client, name: str = "etcd-watch") -> None:
        self.client = client
        self.name = name
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._watches: list[Watch] = []
        self._by_id: dict[int, Watch] = {}
        self._pending: deque[Watch] = deque()
        self._requests: queue.Queue | None = None
        self._call = None
        self._closed = threading.Event()
        self._connected = threading.Event()
        #: Events delivered to callbacks since the stream started, by the watches' labels.
        self.events_delivered: Counter[str] = Counter()
        #: The revision of the last progress answer (:meth:`request_progress`): every event of every
        #: watch on this stream up to it had reached its callback when it arrived.
        self.progress_revision = 0
        #: Progress requests sent (tests count them: one per safety re-check, whatever the watches).
        self.progress_requests = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- public API ---------------------------------------------------------
    def watch(self, key: str | bytes, callback: EventsCallback, *, prefix: bool = False,
              start_revision: int | None = None, prev_kv: bool = False,
              on_resync: ResyncCallback | None = None, on_created: Callable[[], None] | None = None,
              puts_only: bool = False, label: str = "") -> Watch:
        """Start watching ``key`` (or every key under it with ``prefix=True``).

        ``on_created`` runs each time etcd confirms the watch, after a reconnect too;
        ``puts_only`` drops DELETE events at the server; ``label`` names the subscriber in
        the event counts.
        """
        if inherited(self._pid):
            raise RuntimeError(f"{self.name}: this watch stream belongs to process {self._pid}; "
                               "a forked child watches on its own (watch.hub_for)")
        key = to_bytes(key)
        watch = Watch(key=key, range_end=prefix_range_end(key) if prefix else None, callback=callback,
                      next_revision=start_revision, prev_kv=prev_kv, on_resync=on_resync,
                      on_created=on_created, label=label,
                      filters=(etcdrpc.WatchCreateRequest.NODELETE,) if puts_only else ())
        with self._lock:
            self._watches.append(watch)
            self._send_create(watch)
        return watch

    def wait_created(self, watch: Watch, timeout: float | None = None) -> bool:
        """Block until etcd confirmed ``watch`` (events after this point will arrive)."""
        return watch.created.wait(timeout)

    def cancel(self, watch: Watch) -> None:
        watch.cancelled = True
        if inherited(self._pid):  # the parent's stream: its lock may be held for ever here
            return
        with self._lock:
            if watch in self._watches:
                self._watches.remove(watch)
            if watch.watch_id is not None:
                self._by_id.pop(watch.watch_id, None)
                if self._requests is not None:
                    self._requests.put(etcdrpc.WatchRequest(
                        cancel_request=etcdrpc.WatchCancelRequest(watch_id=watch.watch_id)))

    def close(self) -> None:
        self._closed.set()
        if inherited(self._pid):  # the parent's stream and thread: nothing of them is ours
            return
        with self._lock:
            self._stop_call()
        self._thread.join(timeout=5)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def request_progress(self) -> bool:
        """Ask etcd for a progress answer on this stream (one message, no request of its own).

        etcd answers once every watch on the stream has been sent every event up to its current
        revision; :attr:`progress_revision` then holds that revision. False if not sent (no stream).
        """
        if inherited(self._pid):
            return False
        with self._lock:
            if self._requests is None:
                return False
            self.progress_requests += 1
            self._requests.put(etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest()))
            return True

    # -- the stream thread --------------------------------------------------
    def _send_create(self, watch: Watch) -> None:
        if self._requests is not None:
            self._pending.append(watch)
            self._requests.put(watch.create_request())

    def _stop_call(self) -> None:
        if self._requests is not None:
            self._requests.put(None)
            self._requests = None
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _open(self):
        with self._lock:
            requests: queue.Queue = queue.Queue()
            self._requests = requests
            self._pending.clear()
            self._by_id.clear()
            for watch in self._watches:
                watch.watch_id = None
                self._send_create(watch)
            stub = etcdrpc.WatchStub(self.client.channel)
            metadata = tuple(self.client.metadata or ()) + (("hasleader", "true"),)
            self._call = stub.Watch(iter(requests.get, None), metadata=metadata)
            return self._call

    def _run(self) -> None:
        delay = RECONNECT_FIRST_DELAY
        while not self._closed.is_set():
            forks, paused = GATE.forks, False
            try:
                call = self._open()
                for response in call:
                    self._connected.set()
                    self._handle(response)
                    delay = RECONNECT_FIRST_DELAY  # after a response that did not restart the stream
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    break
                # client.py cancels watch streams before a fork(): resume at once, quietly.
                paused = GATE.forks != forks and exc.code() == grpc.StatusCode.CANCELLED
                log = logger.info if delay == RECONNECT_FIRST_DELAY and not paused else logger.debug  # once per outage
                log("%s: watch stream broke (%s); reconnecting", self.name, _describe(exc))
                if not paused:
                    self._mark_endpoint_failed(exc)
            except NoServerAvailableError:  # every endpoint failed a moment ago; retried below
                logger.debug("%s: no etcd endpoint available; reconnecting", self.name)
            except ValueError as exc:  # grpc: "Cannot invoke RPC: Channel closed!"
                logger.debug("%s: client closed (%s); watch stream ends", self.name, exc)
                return
            except Exception:  # noqa: BLE001 - keep watching whatever a callback did
                logger.exception("%s: watch stream failed; reconnecting", self.name)
            self._connected.clear()
            with self._lock:
                self._stop_call()
            if not paused:
                self._closed.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)

    def _mark_endpoint_failed(self, exc: grpc.RpcError) -> None:
        if getattr(exc, "code", lambda: None)() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            try:
                if len(self.client.endpoints) > 1:
                    self.client.fail_over()
            except Exception:  # noqa: BLE001 - a bare etcd3 client has no fail_over; the next open retries
                pass

    def _handle(self, response) -> None:
        if response.watch_id == PROGRESS_WATCH_ID and not response.created and not response.events:
            # etcd's answer to request_progress (no watch's): every event up to it was sent before it
            self.progress_revision = max(self.progress_revision, response.header.revision)
            return
        with self._lock:
            if response.created:
                watch = self._pending.popleft() if self._pending else None
                if watch is None or watch.cancelled:
                    return
                if not response.canceled:  # refused at creation (a token etcd forgot): not created, below
                    watch.watch_id = response.watch_id
                    self._by_id[response.watch_id] = watch
                    if watch.next_revision is None:  # a watch "from now" starts after this revision:
                        watch.next_revision = response.header.revision + 1  # resume there, not "now" again
                    watch.created.set()
            else:
                watch = self._by_id.get(response.watch_id)
        if watch is None:
            return
        if response.created and not response.canceled and watch.on_created is not None:
            watch.on_created()
        if response.compact_revision:
            self._resync(watch, response.compact_revision)
            return
        if response.canceled:
            if not watch.cancelled:
                logger.warning("%s: etcd cancelled watch on %r: %s", self.name, watch.key,
                               response.cancel_reason)
                if INVALID_TOKEN_REASON in response.cancel_reason:
                    self._authenticate()
                raise _StreamRestart()
            return
        if response.events:
            watch.next_revision = response.events[-1].kv.mod_revision + 1
            self.events_delivered[watch.label] += len(response.events)
            watch.callback(response.events)
        elif not response.created:
            # A progress notification: every event up to this revision was sent.
            watch.next_revision = max(watch.next_revision or 0, response.header.revision + 1)

    def _authenticate(self) -> None:
        """etcd restarted and forgot our token: a new one before the stream opens again (the stream sends the
        token it opened with; only a unary call renews it, and an idle process may make none for long)."""
        try:
            self.client.authenticate()
        except Exception as exc:  # noqa: BLE001 - unreachable again: the next open retries, then this again
            logger.info("%s: could not authenticate again (%s)", self.name, exc)

    def _resync(self, watch: Watch, compact_revision: int) -> None:
        logger.warning("%s: revision %s of %r was compacted; resyncing", self.name,
                       watch.next_revision, watch.key)
        revision = watch.on_resync() if watch.on_resync else compact_revision
        with self._lock:
            self._by_id.pop(watch.watch_id, None)
            watch.watch_id = None
            watch.next_revision = revision + 1 if watch.on_resync else compact_revision
            if not watch.cancelled:
                self._send_create(watch)


class WatchHub:
    """Subscriptions to etcd keys and key prefixes, all carried by one :class:`WatchStream`.

    - ``subscribe(key, callback, prefix=False, start_revision=None)``: ``callback(events)``
      gets every change of the key (or of every key under it) with a revision >=
      ``start_revision`` (None: from when etcd confirms the subscription, which
      ``on_created`` reports), in revision order, each once. A ``start_revision`` in the
      past replays etcd's history: right for resuming, but etcd serves such a watch from
      its catch-up loop, which runs every 100 ms, so its first events can come that late.
      To miss nothing on a latency-critical path, subscribe from now and read the key
      in ``on_created`` (as the result consumer does).
    - Reconnects are invisible: the subscription resumes after the last revision it
      delivered (or the last progress notification).
    - Compaction: if etcd no longer has the revision to resume from, ``on_resync()`` is
      called; it re-reads whatever the subscriber follows and returns the revision it
      read at, and events resume after it. Without ``on_resync`` the subscription resumes
      at the oldest revision etcd still has: changes in between are not delivered.
    - Callbacks run on the stream's thread, one at a time: keep them short (fill a queue).
    """

    def __init__(self, client: Any, name: str = HUB_THREAD_NAME) -> None:
        self.client = client
        self._stream = WatchStream(client, name=name)

    def subscribe(self, key: str | bytes, callback: EventsCallback, *, prefix: bool = False,
                  start_revision: int | None = None, puts_only: bool = False, prev_kv: bool = False,
                  on_resync: ResyncCallback | None = None,
                  on_created: Callable[[], None] | None = None, label: str = "") -> Watch:
        """Follow ``key`` (every key under it with ``prefix=True``); returns the handle to unsubscribe.

        ``label`` names the subscriber in :meth:`events_delivered` (e.g. "results").
        """
        if start_revision is not None and start_revision < 0:
            raise ValueError(f"start_revision must be a revision >= 0 (got {start_revision})")
        return self._stream.watch(key, callback, prefix=prefix, start_revision=start_revision or None,
                                  prev_kv=prev_kv, on_resync=on_resync, on_created=on_created,
                                  puts_only=puts_only, label=label)

    def unsubscribe(self, watch: Watch) -> None:
        """Stop delivering to ``watch``'s callback (idempotent)."""
        self._stream.cancel(watch)

    def wait_created(self, watch: Watch, timeout: float | None = None) -> bool:
        """Block until etcd confirmed ``watch`` (events after this point will arrive)."""
        return self._stream.wait_created(watch, timeout)

    def events_delivered(self, label: str | None = None) -> int:
        """Events this process received through the hub: all, or those of subscriptions with ``label``."""
        counts = self._stream.events_delivered
        return sum(counts.values()) if label is None else counts[label]

    def request_progress(self) -> bool:
        """Ask for a progress answer (:meth:`WatchStream.request_progress`); False if not sent."""
        return self._stream.request_progress()

    @property
    def progress_revision(self) -> int:
        """The revision of etcd's last progress answer: every event up to it reached its callback."""
        return self._stream.progress_revision

    @property
    def progress_requests(self) -> int:
        """Progress requests this hub sent (one per safety re-check)."""
        return self._stream.progress_requests

    @property
    def connected(self) -> bool:
        return self._stream.connected

    def close(self) -> None:
        self._stream.close()


_hubs = PerProcess()


def hub_for(config: EtcdConfig) -> WatchHub:
    """This process's one :class:`WatchHub` for ``config`` (a new one in a forked child)."""
    return _hubs.get((config,), lambda: WatchHub(get_client(config)))


def close_hubs() -> None:
    """Close this process's hubs (tests, shutdown); the next :func:`hub_for` opens a new one."""
    for hub in _hubs.take_mine():
        hub.close()


class _StreamRestart(grpc.RpcError):
    """Raised inside the stream loop to re-open the stream and re-create every watch."""

    def code(self):
        return grpc.StatusCode.ABORTED

    def details(self):
        return "watch cancelled by server"


def _describe(exc: grpc.RpcError) -> str:
    try:
        return f"{exc.code().name}: {exc.details()}"
    except Exception:  # noqa: BLE001
        return repr(exc)
