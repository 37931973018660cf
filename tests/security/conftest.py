"""Fixtures for security tests: a CA made by the test, and an etcd with TLS, client certificates and auth."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from etcd_broker.backend.result_store import close_shared
from etcd_broker.core.client import make_client
from etcd_broker.transport.consumer import close_all_leases
from scripts.etcd_server import EtcdServer, TlsFiles
from tests.reliability import counting_app
from tests.security.certs import Certificates, make_certificates
from tests.security.etcd_auth import enable_auth

#: The application user may read and write under this prefix only.
APP_USER = "deephardway"
APP_PASSWORD = "app-secret-1"
ROOT_PASSWORD = "root-secret-1"
ALLOWED_PREFIX = "/dhw-secure/"


@dataclass
class SecureEtcd:
    server: EtcdServer
    certs: Certificates

    @property
    def url(self) -> str:
        return self.server.url

    def options(self, **overrides: str | None) -> dict[str, str]:
        """Transport/backend options of a correctly configured client; ``None`` drops one."""
        options = {"user": APP_USER, "password": APP_PASSWORD, "ca_cert": self.certs.ca_cert,
                   "cert_cert": self.certs.client_cert, "cert_key": self.certs.client_key, **overrides}
        return {k: v for k, v in options.items() if v is not None}


def start_secure_etcd(certs: Certificates, data_dir: str, tls: bool = True) -> EtcdServer:
    """An etcd with auth enabled (root, and APP_USER read-write on ALLOWED_PREFIX); TLS unless told not."""
    files = TlsFiles(certs.ca_cert, certs.server_cert, certs.server_key) if tls else None
    server = EtcdServer(data_dir=data_dir, tls=files).start()
    admin = make_client(server.url, **(files.client_options() if files else {}))
    try:
        enable_auth(admin, ROOT_PASSWORD, APP_USER, APP_PASSWORD, ALLOWED_PREFIX)
    finally:
        admin.close()
    return server


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secure_etcd(certs, tmp_path_factory):
    """One etcd for the module: https only, client certificates required, authentication on."""
    server = start_secure_etcd(certs, str(tmp_path_factory.mktemp("secure-etcd")))
    yield SecureEtcd(server, certs)
    server.stop()


@pytest.fixture
def secure_prefix() -> str:
    return f"{ALLOWED_PREFIX}t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def release_clients():
    """After a test that used real workers and etcd clients: close what this process still holds."""
    yield
    counting_app.release()
    close_shared()
    close_all_leases()  # this process's consumer leases would keep calling a stopped etcd
