"""Fork safety: a process that used etcd can fork, and both sides keep working.

gRPC's C core has fork handlers (on by default in grpcio), but it skips them with
"Other threads are currently calling into gRPC, skipping fork() handlers" whenever
another thread is inside a call, and then the child shares the parent's epoll set:
children segfault or abort in ``ev_epoll1_linux.cc`` (measured: 42 of 150 forked
children while a parent thread wrote results; docs/transport.md, "Fork safety").

So every channel our clients make goes through :data:`GATE`, a gRPC client
interceptor that counts the calls in flight. Before ``fork()`` (``os.fork``,
multiprocessing, billiard: all reach ``os.register_at_fork``) the gate stops new
calls, cancels the long-lived watch streams (their owners resume them from the next
revision, nothing is missed) and waits for the rest to finish, so gRPC's own
handlers run. After the fork the parent reopens the gate; the child gets a fresh
gate, and :func:`on_child` callbacks give it fresh channels and forget what
belonged to the parent (its leases, streams and locks). The child never touches a
channel of the parent's: those objects are kept, unused, so that their finalizers
never shut down sockets the parent still reads.

A child also runs clean-up on objects it inherited: kombu's and Celery's after-fork hooks
(``Connection.collect`` of every pooled connection, in each new prefork pool child), atexit.
Nothing there may wait on a lock, stream or thread of the parent's, or act on what the parent
holds in etcd: an object that belongs to its process checks :func:`inherited` and, in a child,
is only forgotten (a transport, its channels, a watch stream); module tables and objects a child
keeps using are reset (:class:`ChildLock`, :func:`reset_in_child`, :func:`on_child`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc

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
