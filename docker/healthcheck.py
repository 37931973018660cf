"""The web role's container health check: gunicorn and Django answer a page, as the proxy reaches it.

``GET /api/models`` on the container's own port, with the ``Host`` the site is served under (the first
of ``ALLOWED_HOSTS``) and ``X-Forwarded-Proto: https`` as the TLS proxy sends it (honoured with
``BEHIND_TLS_PROXY=1``). Healthy only on a 200: a redirect (``SECURE_SSL_REDIRECT`` without the proxy
header) or a 400 (a Host outside ``ALLOWED_HOSTS``) proves only that a middleware answered. The view
reads the model cards on disk and asks the database which models are training; etcd is not asked
(docs/deploy.md says why).
Run by ``docker/entrypoint.sh healthcheck``; exit 0 healthy, 1 not.
"""
from __future__ import annotations

import http.client
import os
import sys

#: The page asked for: Django's view of the model cards (one database query, no etcd).
HEALTH_PATH = "/api/models"
#: Seconds the whole request may take (the image's HEALTHCHECK --timeout is 10 s).
TIMEOUT = 5.0


def served_host(allowed_hosts: str) -> str:
    """A Host header Django accepts: the first ALLOWED_HOSTS entry ('.example.com' -> 'example.com')."""
    for entry in allowed_hosts.split(","):
        host = entry.strip().lstrip(".")
        if host and host != "*":
            return host
    return "localhost"


def main() -> int:
    port = int(os.environ.get("PORT", "8000"))
    host = served_host(os.environ.get("ALLOWED_HOSTS", "localhost"))
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        connection.request("GET", HEALTH_PATH, headers={"Host": host, "X-Forwarded-Proto": "https"})
        status = connection.getresponse().status
    except OSError as exc:
        print(f"healthcheck: no answer on port {port}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: GET {HEALTH_PATH} (Host {host}) answered {status}, not 200", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
