"""Count the etcd requests a process makes, by gRPC method and by the code that made them.

    python -m benchmarks.etcd_calls -A deephardway_site worker ...   # a Celery worker, counted

Used by benchmarks/profile_main.py, in its own client process (``install()``) and in the worker
(this module as the ``python -m`` entry point, then Celery's own main). etcd3's KV and Lease stubs
are wrapped when created; each unary call is counted under "Method <- callers", the callers being
the innermost etcd_broker functions on the stack (below the client/ops plumbing). On SIGUSR2 a
worker writes its counts so far as JSON to ``$ETCD_CALLS_OUT.<n>.json`` (n = 1, 2, ...).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import Counter
from typing import Any

#: Unary methods counted (streams such as Watch and LeaseKeepAlive are not requests of their own).
COUNTED = {"KVStub": ("Range", "Put", "DeleteRange", "Txn", "Compact"),
           "LeaseStub": ("LeaseGrant", "LeaseRevoke", "LeaseTimeToLive")}
#: etcd_broker modules that only carry a call (their frames are not named as callers).
PLUMBING = ("client.py", "ops.py", "compat.py")
#: How many etcd_broker callers name a call site.
CALLER_DEPTH = 3

COUNTS: Counter[str] = Counter()
_lock = threading.Lock()
_dumps = 0


def callers() -> str:
    """The innermost etcd_broker functions on the calling thread's stack, innermost first."""
    names: list[str] = []
    frame = sys._getframe(2)
    while frame is not None and len(names) < CALLER_DEPTH:
        path = frame.f_code.co_filename
        if "/etcd_broker/" in path and not path.endswith(PLUMBING):
            name = f"{os.path.basename(path)[:-3]}.{frame.f_code.co_name}"
            if name not in names:
                names.append(name)
        frame = frame.f_back
    return " < ".join(names) or "(outside etcd_broker)"


class Counted:
    """A gRPC multi-callable that counts its direct calls and passes everything through."""

    def __init__(self, inner: Any, method: str) -> None:
        self._inner, self._method = inner, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = f"{self._method} <- {callers()}"
        with _lock:
            COUNTS[key] += 1
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install() -> None:
    """Wrap etcd3's KV and Lease stubs (every stub created after this is counted)."""
    from etcd3 import etcdrpc

    for stub_name, methods in COUNTED.items():
        stub = getattr(etcdrpc, stub_name)
        original = stub.__init__
        if getattr(original, "counted", False):
            continue

        def init(self: Any, channel: Any, _original=original, _methods=methods) -> None:
            _original(self, channel)
            for method in _methods:
                setattr(self, method, Counted(getattr(self, method), method))

        init.counted = True  # type: ignore[attr-defined]
        init.original = original  # type: ignore[attr-defined]
        stub.__init__ = init


def uninstall() -> None:
    """Stop wrapping stubs created from now on (tests); counts are kept."""
    from etcd3 import etcdrpc

    for stub_name in COUNTED:
        stub = getattr(etcdrpc, stub_name)
        original = getattr(stub.__init__, "original", None)
        if original is not None:
            stub.__init__ = original


def snapshot() -> dict[str, int]:
    with _lock:
        return dict(COUNTS)


def dump(*_: Any) -> None:
    """Write the counts so far to ``$ETCD_CALLS_OUT.<n>.json`` (a SIGUSR2 handler)."""
    global _dumps
    _dumps += 1
    path = f"{os.environ['ETCD_CALLS_OUT']}.{_dumps}.json"
    with open(f"{path}.tmp", "w") as out:
        json.dump(snapshot(), out)
    os.replace(f"{path}.tmp", path)


if __name__ == "__main__":
    install()
    signal.signal(signal.SIGUSR2, dump)
    from celery.__main__ import main

    sys.argv[0] = "celery"
    sys.exit(main())
