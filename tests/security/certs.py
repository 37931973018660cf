"""A throw-away certificate authority for TLS tests, made with the ``openssl`` command line.

Makes a CA, a server certificate for 127.0.0.1 (usable as a client certificate too,
as etcd's readiness probe presents it), a client certificate, and a client
certificate signed by a *different* CA that etcd must refuse.
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Certificates live one day: long enough for a test run.
DAYS = "1"
EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Certificates:
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    foreign_client_cert: str
    foreign_client_key: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", DAYS,
             "-subj", f"/CN={name}", cwd=directory)


def _sign(directory: Path, ca: str, name: str, common_name: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={common_name}",
             cwd=directory)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", DAYS, "-extfile", f"{name}.ext", cwd=directory)


def make_certificates(directory: Path) -> Certificates:
    """Create every file under ``directory`` and return their paths."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make test certificates (apt-get install openssl)")
    directory.mkdir(parents=True, exist_ok=True)
    _make_ca(directory, "ca")
    _make_ca(directory, "foreign-ca")
    _sign(directory, "ca", "server", "127.0.0.1",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    _sign(directory, "ca", "client", "deephardway-client", "extendedKeyUsage=clientAuth\n")
    _sign(directory, "foreign-ca", "foreign-client", "deephardway-client", "extendedKeyUsage=clientAuth\n")
    path = {name: str(directory / name) for name in
            ("ca.pem", "server.pem", "server.key", "client.pem", "client.key", "foreign-client.pem",
             "foreign-client.key")}
    return Certificates(path["ca.pem"], path["server.pem"], path["server.key"], path["client.pem"],
                        path["client.key"], path["foreign-client.pem"], path["foreign-client.key"])
