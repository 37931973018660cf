"""The one etcd client factory: endpoints, failover, auth and TLS from a URL plus options.

The transport and the result backend both get their client here, so a process
holds one gRPC client per configuration (and per pid: gRPC channels do not
survive ``fork``). Tests point it anywhere by passing another URL.

URL forms::

    etcdv3://127.0.0.1:2379
    etcdv3://user:secret@h1:2379,h2:2379,h3:2379?ca_cert=/ca.pem&timeout=5
    etcdv3://h1:2379;etcdv3://h2:2379          (kombu's failover list)
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import etcd3
import grpc
from etcd3 import exceptions as etcd_exceptions

logger = logging.getLogger(__name__)

SCHEMES = ("etcdv3", "etcd3")
DEFAULT_PORT = 2379
#: Seconds a failed endpoint is skipped before it is tried again (etcd3's default is 300 s,
#: which would leave a single-endpoint client dead for five minutes after an etcd restart).
ENDPOINT_RETRY_SECONDS = 0.5
#: Default deadline for one unary RPC (seconds).
DEFAULT_TIMEOUT = 5.0
#: gRPC message size limit; above etcd's default 1.5 MiB request limit so etcd, not gRPC, refuses.
GRPC_MAX_MESSAGE_BYTES = 8 * 1024 * 1024

#: Errors that mean "the cluster is unreachable right now"; kombu treats these as connection errors.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    etcd_exceptions.ConnectionFailedError,
    etcd_exceptions.ConnectionTimeoutError,
    etcd_exceptions.NoServerAvailableError,
    etcd_exceptions.InternalServerError,
)


class EtcdConfigError(ValueError):
    """A URL or option that cannot describe an etcd connection."""


class EtcdUnreachable(etcd_exceptions.ConnectionFailedError):
    """A connection error that says where and why, in gRPC's words (refused, TLS handshake failed...)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


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
        credentials = None
        if config.secure:
            credentials = etcd3.MultiEndpointEtcd3Client.get_secure_creds(
                config.ca_cert, config.cert_key, config.cert_cert,
            )
        options = [
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
        ]
        endpoints = [
            etcd3.Endpoint(host, port, secure=config.secure, creds=credentials,
                           time_retry=ENDPOINT_RETRY_SECONDS, opts=options)
            for host, port in config.endpoints
        ]
        self._auth_lock = threading.Lock()
        try:
            super().__init__(endpoints=endpoints, timeout=config.timeout, user=config.user,
                             password=config.password, failover=True)
        except grpc.RpcError as exc:
            raise _auth_error(exc, config) from None
        # The token travels in self.metadata, which authenticate() renews. etcd3's call credentials would
        # carry the first token forever, and gRPC refuses them outright on a plain-text channel.
        self.call_credentials = None

    def authenticate(self) -> None:
        """Fetch a fresh token (after an etcd restart or token expiry)."""
        if not (self.config.user and self.config.password):
            return
        with self._auth_lock:
            request = etcd3.etcdrpc.AuthenticateRequest(name=self.config.user, password=self.config.password)
            response = self.authstub.Authenticate(request, self.timeout)
            self.metadata = (("token", response.token),)
            self._clear_old_stubs()
            logger.info("re-authenticated to etcd at %s", self.config.describe())

    def _manage_grpc_errors(self, exc: grpc.RpcError) -> None:
        if _is_token_error(exc):
            self.authenticate()
            raise etcd_exceptions.ConnectionFailedError() from exc
        if _is_dropped_proposal(exc):  # a leader change dropped it unapplied: retry like a lost connection
            raise etcd_exceptions.ConnectionFailedError() from exc
        try:
            super()._manage_grpc_errors(exc)  # marks the endpoint in use as failed, then raises
        except etcd_exceptions.ConnectionFailedError:
            self.fail_over()
            raise EtcdUnreachable(f"etcd at {self.config.describe()} unreachable: {_details(exc)}") from exc
        except (etcd_exceptions.ConnectionTimeoutError, etcd_exceptions.InternalServerError):
            self.fail_over()
            raise

    def fail_over(self) -> None:
        """Move to the next endpoint that has not failed lately (round robin; no-op with one).

        etcd3 marks a failed endpoint but keeps using it once its retry window passes, so a
        caller retrying slower than that window would hit the dead member for ever.
        """
        labels = list(self.endpoints)
        if len(labels) < 2:
            return
        current = labels.index(self._current_endpoint_label)
        for label in labels[current + 1:] + labels[:current]:
            if not self.endpoints[label].is_failed():
                logger.info("etcd endpoint %s failed; using %s", labels[current], label)
                self._current_endpoint_label = label
                return

    def _clear_old_stubs(self) -> None:
        # etcd3's version closes the shared watcher; we use our own watch streams (watch.py).
        self._stubs.clear()


def _is_token_error(exc: grpc.RpcError) -> bool:
    details = (exc.details() or "") if hasattr(exc, "details") else ""
    return "invalid auth token" in details or "token" in details and "expired" in details


def _is_dropped_proposal(exc: grpc.RpcError) -> bool:
    return "raft proposal dropped" in _details(exc)


def _details(exc: grpc.RpcError) -> str:
    return (exc.details() or "") if hasattr(exc, "details") else str(exc)


def _auth_error(exc: grpc.RpcError, config: EtcdConfig) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
        return EtcdConfigError(
            f"etcd at {config.describe()} refused user {config.user!r}: {details}"
        )
    return EtcdUnreachable(f"etcd at {config.describe()} unreachable while authenticating user "
                           f"{config.user!r}: {details}")


def make_client(url: str | Iterable[str] | EtcdConfig, **options: Any) -> EtcdClient:
    """A new client (not shared). Most code wants :func:`get_client`."""
    config = url if isinstance(url, EtcdConfig) else EtcdConfig.from_url(url, **options)
    if isinstance(url, EtcdConfig) and options:
        config = config.with_options(**options)
    return EtcdClient(config)


_clients: dict[tuple[int, EtcdConfig], EtcdClient] = {}
_clients_lock = threading.Lock()


def get_client(url: str | Iterable[str] | EtcdConfig, **options: Any) -> EtcdClient:
    """The shared client for this configuration in this process (one per pid)."""
    config = url if isinstance(url, EtcdConfig) else EtcdConfig.from_url(url, **options)
    if isinstance(url, EtcdConfig) and options:
        config = config.with_options(**options)
    key = (os.getpid(), config)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = EtcdClient(config)
        return client


def forget_clients() -> None:
    """Close and drop every shared client (tests, and after fork in a child)."""
    with _clients_lock:
        for (pid, _), client in list(_clients.items()):
            if pid == os.getpid():
                try:
                    client.close()
                except Exception:  # noqa: BLE001
                    pass
        _clients.clear()
