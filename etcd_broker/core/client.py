"""This process's etcd client: made once per configuration, safe across fork, errors by gRPC status.

The transport and the result backend get their client here (:func:`get_client`), so a process holds
one gRPC client per configuration, and every gRPC channel it opens goes through the fork gate, so
a forked child (Celery's prefork pool) gets the same clients on fresh channels. Sections:

- *forking*: the gRPC channel gate (:data:`GATE`), ``os.register_at_fork`` handlers,
  :class:`PerProcess` (the one per-process registry), :class:`ChildLock`, ``inherited``.
- *client*: :class:`EtcdConfig` from a URL plus options, :func:`get_client` (failover, auth, TLS),
  :func:`classify` and ``CONNECTION_ERRORS`` (gRPC errors by status code), :meth:`EtcdClient.call`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from time import monotonic
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import etcd3
import grpc
from etcd3 import exceptions as etcd_exceptions

from etcd_broker.exceptions import EtcdConfigError, EtcdNoSpace, EtcdUnreachable

# -------------------- forking: Fork safety: a process that used etcd can fork, and both sides keep working.
#
# gRPC's C core has fork handlers (on by default in grpcio), but it skips them with
# "Other threads are currently calling into gRPC, skipping fork() handlers" whenever
# another thread is inside a call, and then the child shares the parent's epoll set:
# children segfault or abort in ``ev_epoll1_linux.cc`` (measured: 42 of 150 forked
# children while a parent thread wrote results; docs/transport.md, "Fork safety").
#
# So every channel our clients make goes through :data:`GATE`, a gRPC client
# interceptor that counts the calls in flight. Before ``fork()`` (``os.fork``,
# multiprocessing, billiard: all reach ``os.register_at_fork``) the gate stops new
# calls, cancels the long-lived watch streams (their owners resume them from the next
# revision, nothing is missed) and waits for the rest to finish, so gRPC's own
# handlers run. After the fork the parent reopens the gate; the child gets a fresh
# gate, and :func:`on_child` callbacks give it fresh channels and forget what
# belonged to the parent (its leases, streams and locks). The child never touches a
# channel of the parent's: those objects are kept, unused, so that their finalizers
# never shut down sockets the parent still reads.
#
# A child also runs clean-up on objects it inherited: kombu's and Celery's after-fork hooks
# (``Connection.collect`` of every pooled connection, in each new prefork pool child), atexit.
# Nothing there may wait on a lock, stream or thread of the parent's, or act on what the parent
# holds in etcd: an object that belongs to its process checks :func:`inherited` and, in a child,
# is only forgotten (a transport, its channels, a watch stream); module tables and objects a child
# keeps using are reset (:class:`ChildLock`, :func:`reset_in_child`, :func:`on_child`).

logger = logging.getLogger(__name__)

#: Longest wait before a fork for etcd calls in flight to finish (an RPC's own deadline is 5 s).
FORK_QUIESCE_SECONDS = 5.0
#: Streaming methods that stay open indefinitely; they are cancelled before a fork, not waited for.
LONG_LIVED_METHODS = frozenset({"/etcdserverpb.Watch/Watch"})
#: grpc's connectivity poller thread polls up to 0.2 s more after the last unsubscribe (grpc/_channel.py); slack for a loaded host.
CONNECTIVITY_POLL_SECONDS = 0.5
#: After the last call ends, gRPC's own threads still finish its frames (trailers, window updates):
#: measured, forking without this pause still let gRPC skip its fork handlers about once in 100 forks.
FORK_SETTLE_SECONDS = 0.05

_child_callbacks: list[Callable[[], None]] = []
#: Every ChildLock of this process: each gets a new lock in a forked child.
_locks: weakref.WeakSet[ChildLock] = weakref.WeakSet()
#: Objects whose state was their process's (threads, streams, locks): reset in a forked child.
_resets: weakref.WeakKeyDictionary[Any, Callable[[Any], None]] = weakref.WeakKeyDictionary()


class RpcGate(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Counts etcd calls in flight and holds new ones while a fork is being prepared."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._forking = False
        self._long_lived: set[Any] = set()
        self._in_flight: dict[Any, str] = {}  # call -> method, for the warning below
        self._poller_idle_at = 0.0  # monotonic time when grpc's connectivity poller has stopped
        #: Forks prepared (a watch stream cancelled by one resumes instead of reporting a break).
        self.forks = 0

    # -- the interceptor -----------------------------------------------------------
    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._run(lambda: continuation(client_call_details, request), client_call_details)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return self._run(lambda: continuation(client_call_details, request), client_call_details)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._run(lambda: continuation(client_call_details, request_iterator), client_call_details)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return self._run(lambda: continuation(client_call_details, request_iterator), client_call_details)

    def _enter(self) -> None:
        with self._cond:
            # No new call starts while a fork is prepared; never wait longer than a fork can take.
            if not self._cond.wait_for(lambda: not self._forking, 2 * FORK_QUIESCE_SECONDS):
                logger.warning("an etcd call waited %ss for a fork to be prepared; going ahead",
                               2 * FORK_QUIESCE_SECONDS)
            self._active += 1

    def _run(self, start: Callable[[], Any], details: Any) -> Any:
        self._enter()
        try:
            call = start()
        except BaseException:
            self._finished(None)
            raise
        self._in_flight[call] = details.method
        if details.method in LONG_LIVED_METHODS:
            with self._cond:
                self._long_lived.add(call)
                cancel = self._forking  # began just before a fork was announced
            if cancel:
                call.cancel()
        # A blocking unary call is done already: the callback runs at once.
        call.add_done_callback(self._finished)
        return call

    def _finished(self, call: Any) -> None:
        with self._cond:
            self._long_lived.discard(call)
            self._in_flight.pop(call, None)
            self._active -= 1
            self._cond.notify_all()

    # -- connectivity subscriptions (GatedChannel) ---------------------------------------
    def subscribed(self) -> None:
        self._enter()  # grpc polls connectivity in a thread inside the C core while anyone subscribes

    def unsubscribed(self) -> None:
        with self._cond:
            self._poller_idle_at = time.monotonic() + CONNECTIVITY_POLL_SECONDS
        self._finished(None)

    # -- around fork() ----------------------------------------------------------------
    def before_fork(self) -> None:
        """Stop new calls, cancel watch streams, wait for the calls in flight."""
        with self._cond:
            self._forking = True
            self.forks += 1
            streams = list(self._long_lived)
        for call in streams:
            call.cancel()
        deadline = time.monotonic() + FORK_QUIESCE_SECONDS
        with self._cond:
            quiet = self._cond.wait_for(lambda: self._active == 0, max(0.0, deadline - time.monotonic()))
            idle_at = self._poller_idle_at
        time.sleep(max(FORK_SETTLE_SECONDS, min(idle_at, deadline) - time.monotonic()))
        if not quiet:
            with self._cond:
                logger.warning("fork: %d etcd call(s) still in flight after %ss (%s); gRPC will skip its fork "
                               "handlers and the child may not reach etcd", self._active, FORK_QUIESCE_SECONDS,
                               ", ".join(sorted(set(self._in_flight.values()))) or "connectivity polling")

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        self._reset()  # the parent's calls are not ours; locks may have been held by vanished threads

    @property
    def active(self) -> int:
        """Calls in flight now (watch streams included)."""
        return self._active


#: The one gate: :mod:`etcd_broker.core.client` wraps every channel it makes with it.
GATE = RpcGate()


class GatedChannel(grpc.Channel):
    """A channel whose calls and connectivity subscriptions :data:`GATE` counts."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._raw = channel
        self._intercepted = grpc.intercept_channel(channel, GATE)

    def subscribe(self, callback, try_to_connect=False):
        GATE.subscribed()
        try:
            self._raw.subscribe(callback, try_to_connect=try_to_connect)
        except BaseException:
            GATE.unsubscribed()
            raise

    def unsubscribe(self, callback):
        self._raw.unsubscribe(callback)
        GATE.unsubscribed()

    def unary_unary(self, *args, **kwargs):
        return self._intercepted.unary_unary(*args, **kwargs)

    def unary_stream(self, *args, **kwargs):
        return self._intercepted.unary_stream(*args, **kwargs)

    def stream_unary(self, *args, **kwargs):
        return self._intercepted.stream_unary(*args, **kwargs)

    def stream_stream(self, *args, **kwargs):
        return self._intercepted.stream_stream(*args, **kwargs)

    def close(self):
        self._intercepted.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False


def intercept(channel: grpc.Channel) -> grpc.Channel:
    """``channel`` with every call and connectivity subscription counted by :data:`GATE`."""
    return GatedChannel(channel)


def on_child(callback: Callable[[], None]) -> Callable[[], None]:
    """Run ``callback()`` in a forked child, after the gate is reset (usable as a decorator)."""
    _child_callbacks.append(callback)
    return callback


class ChildLock:
    """A mutex (``threading.Lock``'s ``with``, ``acquire``, ``release``; usable by a ``Condition``) that
    a forked child gets back unlocked: a new lock replaces the parent's there, which a thread that
    did not follow may hold for ever. For module tables and registries that a child keeps using."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        _locks.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self._lock.release()

    def _renew(self) -> None:
        self._lock = threading.Lock()


def reset_in_child(obj: Any, reset: Callable[[Any], None]) -> None:
    """Call ``reset(obj)`` in a forked child while ``obj`` lives: for an object that a child keeps
    using (a backend's result consumer, a timer), whose locks and state were the parent's."""
    _resets[obj] = reset


def inherited(pid: int) -> bool:
    """True if an object made in process ``pid`` is seen in another one: a forked child inherited it.

    Such an object (a watch stream, a transport with its channels, parks and lease) is the
    parent's: its threads did not follow, its locks may be held for ever, and what it holds in
    etcd the parent still holds. A child only forgets it: closing it takes no lock, makes no
    etcd call and gives nothing back (kombu's and Celery's after-fork clean-up close them)."""
    return pid != os.getpid()


class PerProcess:
    """One object per key in this process: made on first use, made again in a forked child (the
    pid is part of every key) or when ``usable`` says the one there is spent. The library's one
    per-process registry: shared clients, watch hubs, lease pools, consumer leases, group commits,
    result stores and their shared waits, parked-consumer views. Its lock is unlocked again in a
    forked child."""

    def __init__(self) -> None:
        self._items: dict[tuple, Any] = {}
        self._lock = ChildLock()

    def get(self, key: tuple, make: Callable[[], Any], usable: Callable[[Any], bool] = lambda item: True) -> Any:
        full_key = (os.getpid(), *key)
        with self._lock:
            item = self._items.get(full_key)
            if item is None or not usable(item):
                item = self._items[full_key] = make()
            return item

    def mine(self) -> list[Any]:
        """This process's objects (a forked child's map still holds its parent's)."""
        with self._lock:
            return [item for (pid, *_), item in self._items.items() if pid == os.getpid()]

    def take_mine(self) -> list[Any]:
        """Forget every object and return this process's ones (to close them outside the lock)."""
        with self._lock:
            mine = [item for (pid, *_), item in self._items.items() if pid == os.getpid()]
            self._items.clear()
        return mine

    def adopt(self) -> None:
        """In a forked child: keep the parent's objects as this process's (objects reset in place,
        like clients that get new channels), instead of making new ones."""
        pid = os.getpid()
        with self._lock:
            self._items = {(pid, *key): item for (_, *key), item in self._items.items()}

    def clear(self, each: Callable[[Any], None] | None = None) -> None:
        """Forget every object, calling ``each`` on this process's ones first (under the lock)."""
        with self._lock:
            if each is not None:
                for (pid, *_), item in self._items.items():
                    if pid == os.getpid():
                        each(item)
            self._items.clear()


def _before() -> None:
    GATE.before_fork()


def _after_in_parent() -> None:
    GATE.after_fork_in_parent()


def _after_in_child() -> None:
    GATE.after_fork_in_child()
    for lock in list(_locks):
        lock._renew()
    for obj, reset in list(_resets.items()):
        try:
            reset(obj)
        except Exception:  # noqa: BLE001 - one failing reset must not leave the others undone
            logger.exception("etcd_broker: after-fork reset of %r failed", obj)
    for callback in _child_callbacks:
        try:
            callback()
        except Exception:  # noqa: BLE001 - one failing reset must not leave the others undone
            logger.exception("etcd_broker: after-fork reset %r failed", callback)


os.register_at_fork(before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child)


# -------------------- client: The one etcd client factory: endpoints, failover, auth and TLS from a URL
#   plus options.
#
# The transport and the result backend both get their client here, so a process
# holds one gRPC client per configuration. Every channel goes through the fork gate
# (:mod:`etcd_broker.core.client`): a forked child gets the same clients on fresh channels.
# gRPC errors are mapped by status code (:func:`classify`); :meth:`EtcdClient.call`
# runs a raw KV request with that mapping. Tests point it anywhere by passing another URL.
#
# URL forms::
#
#     etcdv3://127.0.0.1:2379
#     etcdv3://user:secret@h1:2379,h2:2379,h3:2379?ca_cert=/ca.pem&timeout=5
#     etcdv3://h1:2379;etcdv3://h2:2379          (kombu's failover list)


SCHEMES = ("etcdv3", "etcd3")
DEFAULT_PORT = 2379
#: Seconds a failed endpoint is skipped before it is tried again (etcd3's default is 300 s,
#: which would leave a single-endpoint client dead for five minutes after an etcd restart).
ENDPOINT_RETRY_SECONDS = 0.5
#: Default deadline for one unary RPC (seconds).
DEFAULT_TIMEOUT = 5.0
#: gRPC message size limit; above etcd's default 1.5 MiB request limit so etcd, not gRPC, refuses.
GRPC_MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Channel options: message limits above, keepalive pings every 10 s while a call is open (a watch
#: stream, a unary call; a dead peer is noticed in ~15 s), reconnect back-off from 100 ms to 1 s.
#: Never pings without a call: etcd's server (grpc-go, PermitWithoutStream false, min time 5 s) counts a
#: ping on a connection without streams as a strike unless 2 h passed since the last one, and after
#: three it answers GOAWAY "too_many_pings" and closes the connection, failing calls in flight.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Each channel its own connections: a forked child's new channel must never be handed a connection
    # of its parent's from gRPC's process-wide pool (its socket belongs to the parent: "Wrong file
    # descriptor generation", for every call of that child).
    ("grpc.use_local_subchannel_pool", 1),
]

#: Options an etcdv3 URL's transport options may carry for the client (transport and backend read these).
ETCD_OPTIONS = ("user", "password", "ca_cert", "cert_key", "cert_cert", "timeout")

#: Errors that mean "the cluster is unreachable right now"; kombu treats these as connection errors.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    etcd_exceptions.ConnectionFailedError,
    etcd_exceptions.ConnectionTimeoutError,
    etcd_exceptions.NoServerAvailableError,
    etcd_exceptions.InternalServerError,
)


@dataclass(frozen=True)
class EtcdConfig:
    """Everything needed to reach one etcd cluster."""

    endpoints: tuple[tuple[str, int], ...] = (("127.0.0.1", DEFAULT_PORT),)
    user: str | None = None
    password: str | None = None
    ca_cert: str | None = None
    cert_key: str | None = None
    cert_cert: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_url(cls, url: str | Iterable[str], **options: Any) -> EtcdConfig:
        """Parse one URL, a ``;``-separated list, or an iterable of URLs, then apply options."""
        urls = [url] if isinstance(url, str) else list(url)
        urls = [part for item in urls for part in item.split(";") if part.strip()]
        if not urls:
            raise EtcdConfigError("no etcd URL given (expected etcdv3://host:port)")
        endpoints: list[tuple[str, int]] = []
        found: dict[str, Any] = {}
        for item in urls:
            parsed = urlsplit(item.strip())
            if parsed.scheme not in SCHEMES:
                raise EtcdConfigError(f"etcd URL {item!r} must start with etcdv3:// (got {parsed.scheme!r})")
            auth, _, hosts = parsed.netloc.rpartition("@")
            if auth:
                user, _, password = auth.partition(":")
                found.setdefault("user", unquote(user))
                found.setdefault("password", unquote(password))
            for hostport in filter(None, hosts.split(",")):
                endpoints.append(_split_hostport(hostport, item))
            for key, value in parse_qsl(parsed.query):
                found.setdefault(key, value)
        found.update({k: v for k, v in options.items() if v is not None})
        return cls(endpoints=tuple(endpoints) or cls.endpoints, **_coerce(found))

    def with_options(self, **options: Any) -> EtcdConfig:
        return replace(self, **_coerce({k: v for k, v in options.items() if v is not None}))

    @property
    def secure(self) -> bool:
        return self.ca_cert is not None

    def describe(self) -> str:
        """Endpoints for log lines and errors, never the password."""
        scheme = "https" if self.secure else "http"
        return ",".join(f"{scheme}://{h}:{p}" for h, p in self.endpoints)


def _split_hostport(hostport: str, url: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    try:
        return host.strip("[]"), int(port or DEFAULT_PORT)
    except ValueError:
        raise EtcdConfigError(f"bad port {port!r} in etcd URL {url!r}") from None


def _coerce(options: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(EtcdConfig)} - {"endpoints"}
    unknown = set(options) - known
    if unknown:
        raise EtcdConfigError(f"unknown etcd option(s) {sorted(unknown)}; known: {sorted(known)}")
    if "timeout" in options:
        options["timeout"] = float(options["timeout"])
    return options


def kombu_url(url: str) -> str:
    """The same endpoints as kombu's failover list (``etcdv3://h1:p1;etcdv3://h2:p2``), no credentials.

    kombu cannot parse several hosts in one URL; credentials travel as transport options.
    """
    config = EtcdConfig.from_url(url)
    return ";".join(f"etcdv3://{host}:{port}" for host, port in config.endpoints)


def url_credentials(url: str) -> dict[str, str]:
    """``user`` and ``password`` written in an etcd URL, if any."""
    config = EtcdConfig.from_url(url)
    return {k: v for k, v in (("user", config.user), ("password", config.password)) if v}


class EtcdClient(etcd3.MultiEndpointEtcd3Client):
    """python3-etcd3's client with fast endpoint retry and re-authentication.

    etcd's simple auth tokens live in server memory: after an etcd restart every
    token is invalid, so on ``invalid auth token`` we authenticate again once.
    """

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        endpoints = _endpoints(config)
        self._auth_lock = threading.Lock()
        self._rpc_stubs: dict[type, tuple[grpc.Channel, Any]] = {}  # stub class -> (its channel, stub)
        try:
            super().__init__(endpoints=endpoints, timeout=config.timeout, user=config.user,
                             password=config.password, failover=True)
        except grpc.RpcError as exc:
            raise _auth_error(exc, config) from None
        # The token travels in self.metadata, which authenticate() renews. etcd3's call credentials would
        # carry the first token forever, and gRPC refuses them outright on a plain-text channel.
        self.call_credentials = None
        _made.add(self)

    def authenticate(self) -> None:
        """Fetch a fresh token (after an etcd restart or token expiry)."""
        if not (self.config.user and self.config.password):
            return
        with self._auth_lock:
            request = etcd3.etcdrpc.AuthenticateRequest(name=self.config.user, password=self.config.password)
            response = self.authstub.Authenticate(request, self.timeout)
            self.metadata = (("token", response.token),)  # sent with every call: the stubs stay
            logger.info("re-authenticated to etcd at %s", self.config.describe())

    def call(self, method: str, request: Any, *, service: str = "KV", stream: bool = False) -> Any:
        """Run one raw RPC (``call("Txn", TxnRequest(...))``) with our deadline, token and error mapping.

        ``service`` names the stub: ``KV`` (Range, Put, DeleteRange, Txn, Compact), ``Lease``,
        ``Maintenance``, ``Cluster``. A gRPC error comes back as a ``CONNECTION_ERRORS`` member
        when a retry can succeed, else as the ``grpc.RpcError`` itself (see :func:`classify`).
        ``stream``: the RPC answers with a stream (``LeaseKeepAlive``), read to its end into a list
        under the same deadline and error mapping.
        """
        stub = getattr(self, f"{service.lower()}stub")
        try:
            response = getattr(stub, method)(request, self.timeout, credentials=self.call_credentials,
                                             metadata=self.metadata)
            return list(response) if stream else response
        except grpc.RpcError as exc:
            self._manage_grpc_errors(exc)
            raise

    def _manage_grpc_errors(self, exc: grpc.RpcError) -> None:
        # compat.py: etcd3's public methods send every gRPC error to this private hook; we map by code.
        kind = classify(exc)
        if kind == INVALID_TOKEN:
            self.authenticate()
            raise etcd_exceptions.ConnectionFailedError() from exc
        if kind == PROPOSAL_DROPPED:  # a leader change dropped it unapplied: retry, the member is alive
            raise etcd_exceptions.ConnectionFailedError() from exc
        if kind in _ENDPOINT_FAILURES:
            self.endpoint_in_use.fail()
            self.fail_over()
            if kind == UNREACHABLE:
                raise EtcdUnreachable(f"etcd at {self.config.describe()} unreachable: "
                                      f"{_unreachable_details(exc, self.config)}") from exc
            raise _ENDPOINT_FAILURES[kind]() from exc
        if kind == PRECONDITION:
            raise etcd_exceptions.PreconditionFailedError() from exc
        if kind == NO_SPACE:
            raise EtcdNoSpace(self._no_space_message()) from exc
        raise exc  # request too large, no space, lease not found...: the caller reads it (classify)

    def _no_space_message(self) -> str:
        """What a refused write tells its caller: the quota flag, the database's size, the way out."""
        try:
            size = f"{self.maintenancestub.Status(etcd3.etcdrpc.StatusRequest(), self.timeout).dbSize:,} bytes"
        except grpc.RpcError:
            size = "unknown size"
        return (f"etcd at {self.config.describe()} is out of space: its database ({size}) reached the "
                f"backend quota (--quota-backend-bytes) and etcd raised the NOSPACE alarm, so it refuses "
                f"every write until an operator compacts, defragments and disarms the alarm "
                f"(etcdctl compact, etcdctl defrag, etcdctl alarm disarm)")

    def fail_over(self) -> None:
        """The endpoint in use failed: mark it, and move now to the next one that has not failed
        lately (round robin; no-op with one endpoint).

        etcd3 marks a failed endpoint but moves off it only on the next call, and only while the
        mark lasts (its retry window): a caller retrying slower than that would hit the dead member
        for ever. Public etcd3 API only: ``Endpoint.fail()``, then the ``endpoints`` in round-robin
        order from the failed one, then ``channel``, which takes the first endpoint not failed.
        """
        labels = list(self.endpoints)
        if len(labels) < 2:
            return
        current = self.endpoint_in_use
        current.fail()
        at = labels.index(current.netloc)
        self.endpoints = {label: self.endpoints[label] for label in labels[at + 1:] + labels[:at + 1]}
        try:
            self.channel  # noqa: B018 - etcd3 moves to the first endpoint not failed
        except etcd_exceptions.NoServerAvailableError:
            return  # every member failed lately: the next call says so, or finds one back
        logger.info("etcd endpoint %s failed; using %s", current.netloc, self.endpoint_in_use.netloc)

    def _stub(self, stub_class: type) -> Any:
        """``stub_class`` on the channel in use, made again when that channel changes (failover, fork)."""
        channel = self.channel
        cached = self._rpc_stubs.get(stub_class)
        if cached is None or cached[0] is not channel:
            cached = self._rpc_stubs[stub_class] = (channel, stub_class(channel))
        return cached[1]

    # etcd3's own methods call these; cached by channel, so nothing has to clear them.
    authstub = property(lambda self: self._stub(etcd3.etcdrpc.AuthStub))
    kvstub = property(lambda self: self._stub(etcd3.etcdrpc.KVStub))
    clusterstub = property(lambda self: self._stub(etcd3.etcdrpc.ClusterStub))
    leasestub = property(lambda self: self._stub(etcd3.etcdrpc.LeaseStub))
    maintenancestub = property(lambda self: self._stub(etcd3.etcdrpc.MaintenanceStub))

    def reset_after_fork(self) -> None:
        """In a forked child: the same endpoints on new channels; the parent's are never touched."""
        _inherited.append(self.endpoints)  # kept referenced: their finalizers would close the parent's sockets
        self.endpoints = {ep.netloc: ep for ep in _endpoints(self.config)}  # same labels: the one in use stays
        self._auth_lock = threading.Lock()
        self._rpc_stubs = {}


# -- gRPC errors, by status code ------------------------------------------------------------
# etcd's errors (api/v3rpc/rpctypes/error.go, identical in 3.4 and 3.5) share few codes, so the
# status code decides, and where one code carries several errors the rpctypes message is the
# second key: INVALID_ARGUMENT is "request is too large", "too many operations in txn request",
# "authentication failed" (and more), told apart by message; UNAVAILABLE ("no leader", "leader
# changed", "server stopped", "request timed out", or gRPC's own "connection refused") all mean
# retry elsewhere; RESOURCE_EXHAUSTED is "database space exceeded" or "too many requests".
# "raft proposal dropped" has no rpctypes entry: etcd sends it as UNKNOWN with that text.
UNREACHABLE = "unreachable"
TIMEOUT = "timeout"
INTERNAL = "internal"
INVALID_TOKEN = "invalid_token"
PROPOSAL_DROPPED = "proposal_dropped"
PRECONDITION = "precondition"
REQUEST_TOO_LARGE = "request_too_large"
TOO_MANY_OPS = "too_many_ops"
NO_SPACE = "no_space"
TOO_MANY_REQUESTS = "too_many_requests"
REPLY_TOO_LARGE = "reply_too_large"
LEASE_NOT_FOUND = "lease_not_found"
COMPACTED = "compacted"
PERMISSION_DENIED = "permission_denied"
AUTH_FAILED = "auth_failed"

_BY_CODE = {
    grpc.StatusCode.UNAVAILABLE: UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: TIMEOUT,
    grpc.StatusCode.INTERNAL: INTERNAL,
    grpc.StatusCode.UNAUTHENTICATED: INVALID_TOKEN,  # ErrGRPCInvalidAuthToken (simple and JWT tokens)
    grpc.StatusCode.FAILED_PRECONDITION: PRECONDITION,
    grpc.StatusCode.NOT_FOUND: LEASE_NOT_FOUND,  # ErrGRPCLeaseNotFound: the KV API's only NOT_FOUND
    grpc.StatusCode.PERMISSION_DENIED: PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE: COMPACTED,  # ErrGRPCCompacted (ErrGRPCFutureRev: a revision not yet written)
}
#: (code, rpctypes message fragment) -> kind, for codes that several etcd errors share.
_BY_CODE_AND_MESSAGE = {
    (grpc.StatusCode.INVALID_ARGUMENT, "request is too large"): REQUEST_TOO_LARGE,
    (grpc.StatusCode.INVALID_ARGUMENT, "too many operations"): TOO_MANY_OPS,
    (grpc.StatusCode.INVALID_ARGUMENT, "authentication failed"): AUTH_FAILED,
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "database space exceeded"): NO_SPACE,
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests"): TOO_MANY_REQUESTS,
    # gRPC's own, client side: a reply over GRPC_MAX_MESSAGE_BYTES (a range read with too many values)
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"): REPLY_TOO_LARGE,
    (grpc.StatusCode.UNKNOWN, "raft proposal dropped"): PROPOSAL_DROPPED,
}
_ENDPOINT_FAILURES: dict[str, type[Exception]] = {
    UNREACHABLE: etcd_exceptions.ConnectionFailedError,
    TIMEOUT: etcd_exceptions.ConnectionTimeoutError,
    INTERNAL: etcd_exceptions.InternalServerError,
}


def classify(exc: BaseException) -> str | None:
    """What an etcd gRPC error means (one of this module's kinds), by status code first.

    None for something that is not a gRPC error or that etcd does not document.
    """
    code = _code(exc)
    if code is None:
        return None
    details = _details(exc)
    for (shared_code, fragment), kind in _BY_CODE_AND_MESSAGE.items():
        if code == shared_code and fragment in details:
            return kind
    return _BY_CODE.get(code)


def is_request_too_large(exc: BaseException) -> bool:
    """etcd refused a request over its ``--max-request-bytes``."""
    return classify(exc) == REQUEST_TOO_LARGE


def is_reply_too_large(exc: BaseException) -> bool:
    """A reply was over gRPC's receive limit (``GRPC_MAX_MESSAGE_BYTES``): read fewer keys at once."""
    return classify(exc) == REPLY_TOO_LARGE


def is_lease_not_found(exc: BaseException) -> bool:
    """A request named a lease etcd no longer knows."""
    return classify(exc) == LEASE_NOT_FOUND


def _code(exc: BaseException) -> grpc.StatusCode | None:
    try:
        return exc.code() if isinstance(exc, grpc.RpcError) and hasattr(exc, "code") else None
    except Exception:  # noqa: BLE001 - an RpcError that is not a Call has no code
        return None


def _details(exc: BaseException) -> str:
    try:
        return (exc.details() or "") if hasattr(exc, "details") else str(exc)
    except Exception:  # noqa: BLE001
        return str(exc)


def _auth_error(exc: grpc.RpcError, config: EtcdConfig) -> Exception:
    if _code(exc) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                      grpc.StatusCode.FAILED_PRECONDITION):
        return EtcdConfigError(f"etcd at {config.describe()} refused user {config.user!r}: {_details(exc)}")
    return EtcdUnreachable(f"etcd at {config.describe()} unreachable while authenticating user "
                           f"{config.user!r}: {_unreachable_details(exc, config)}")


#: What gRPC says when a TLS connection fails: "Handshake failed" (TLS 1.2), or, where etcd refuses our
#: certificate only after a TLS 1.3 handshake (etcd 3.5.16), "Unwrap failed (TSI_DATA_CORRUPTED)".
TLS_FAILURES = ("handshake failed", "tsi_data_corrupted", "ssl_error", "certificate")


def _unreachable_details(exc: BaseException, config: EtcdConfig) -> str:
    """gRPC's details, plus what a failed TLS handshake usually means (gRPC's own words do not say)."""
    details = _details(exc)
    if config.secure and any(fragment in details.lower() for fragment in TLS_FAILURES):
        return (f"{details}: the TLS handshake failed: etcd refused our client certificate (cert_cert, "
                f"cert_key: missing, or not signed by a CA it trusts), or we do not trust its certificate (ca_cert)")
    return details


def _endpoints(config: EtcdConfig) -> list[etcd3.Endpoint]:
    """One etcd3 endpoint per configured member, each channel counted by the fork gate."""
    credentials = None
    if config.secure:
        credentials = etcd3.MultiEndpointEtcd3Client.get_secure_creds(
            config.ca_cert, config.cert_key, config.cert_cert)
    endpoints = [etcd3.Endpoint(host, port, secure=config.secure, creds=credentials,
                                time_retry=ENDPOINT_RETRY_SECONDS, opts=CHANNEL_OPTIONS)
                 for host, port in config.endpoints]
    for endpoint in endpoints:
        endpoint.channel = intercept(endpoint.channel)
    return endpoints


def make_client(url: str | Iterable[str] | EtcdConfig, **options: Any) -> EtcdClient:
    """A new client (not shared). Most code wants :func:`get_client`."""
    config = url if isinstance(url, EtcdConfig) else EtcdConfig.from_url(url, **options)
    if isinstance(url, EtcdConfig) and options:
        config = config.with_options(**options)
    return EtcdClient(config)


_clients = PerProcess()
#: Every client made in this process (a forked child resets them all).
_made: weakref.WeakSet[EtcdClient] = weakref.WeakSet()
#: In a forked child: the parent's endpoints (channels), never used and never closed.
_inherited: list[Any] = []


def get_client(url: str | Iterable[str] | EtcdConfig, **options: Any) -> EtcdClient:
    """The shared client for this configuration in this process (the same object after a fork)."""
    config = url if isinstance(url, EtcdConfig) else EtcdConfig.from_url(url, **options)
    if isinstance(url, EtcdConfig) and options:
        config = config.with_options(**options)
    return _clients.get((config,), lambda: EtcdClient(config))


def forget_clients() -> None:
    """Close and drop every shared client of this process (tests, shutdown)."""
    for client in _clients.take_mine():
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


@on_child
def _adopt_clients_after_fork() -> None:
    """Every client of the parent's works in the child, on new channels; shared ones stay shared."""
    for client in list(_made):
        client.reset_after_fork()
    _clients.adopt()


def wait_connected(client, timeout: float | None) -> None:
    """Raise a connection error unless one endpoint's gRPC channel is ready within ``timeout``.

    A port that accepts and never answers would otherwise hold the first call for the whole
    request timeout; a refused endpoint is skipped at once for the next one.
    """
    if not timeout:
        return
    deadline = monotonic() + timeout
    for _ in range(len(client.endpoints)):
        if channel_ready(client.channel, deadline - monotonic()):
            return
        client.fail_over()
    raise EtcdUnreachable(f"etcd at {client.config.describe()} did not complete a connection within "
                          f"connect_timeout={timeout} s")


def channel_ready(channel: grpc.Channel, timeout: float) -> bool:
    """Wait until ``channel`` connects (True) or fails to (False), at most ``timeout`` seconds."""
    settled: list[grpc.ChannelConnectivity] = []
    done = threading.Event()

    def on_change(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                     grpc.ChannelConnectivity.SHUTDOWN):
            settled.append(state)
            done.set()

    channel.subscribe(on_change, try_to_connect=True)
    try:
        done.wait(max(timeout, 0.0))
    finally:
        channel.unsubscribe(on_change)
    return bool(settled) and settled[0] is grpc.ChannelConnectivity.READY
