"""Production settings from the environment: ``manage.py check --deploy`` is clean, and the
web process (URLs, views, admin, settings) never imports TensorFlow."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO_ROOT

PRODUCTION = {
    "SECRET_KEY": "k8#Vq2!r9Lm@x4Tz7Wb1Yn6Hc3Jf0Pd5Sg8Ua2Qe4Ro7Ki9Xl1Zv3Bn6Mw0Ct5Dy",
    "DEBUG": "0",
    "ALLOWED_HOSTS": "models.example.com",
    "DATABASE_URL": "postgres://site:secret@db.example.com:5432/deephardway",
    "ETCD_URL": "etcdv3://etcd1:2379,etcd2:2379,etcd3:2379",
    "ETCD_CA_CERT": "/etc/etcd/ca.pem",
    "ETCD_USER": "site",
    "ETCD_PASSWORD": "secret",
    "MODEL_DIR": "/srv/models",
}


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # The browser tests' session sets DJANGO_ALLOW_ASYNC_UNSAFE (Playwright's loop); no deployment does.
    clean = {k: v for k, v in os.environ.items() if k not in PRODUCTION and k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=REPO_ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_check_deploy_is_clean_with_production_settings():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_refuses_the_development_secret_key():
    env = {k: v for k, v in PRODUCTION.items() if k != "SECRET_KEY"}
    result = manage("check", "--deploy", env=env)
    assert result.returncode != 0
    assert "jobs.E001" in result.stderr and "SECRET_KEY is the development key" in result.stderr


def test_the_web_process_never_imports_tensorflow(tmp_path):
    code = (
        "import sys, django; django.setup();"
        "from django.core.management import call_command; call_command('migrate', verbosity=0);"
        "from django.urls import resolve, reverse;"
        "import deephardway_site.urls, deephardway_site.wsgi, jobs.admin, jobs.api.views, jobs.api.events;"
        "import jobs.services, jobs.validation, frontend.views;"
        "from jobs.validation import models, describe_model;"
        "[describe_model(s) for s in models().values()];"
        "from django.test import Client; c = Client(HTTP_HOST='localhost');"
        "assert c.get('/api/models').status_code == 200; assert c.get('/').status_code == 200;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'));"
        "print('LOADED', bad)"
    )
    env = {**{k: v for k, v in os.environ.items()}, "DJANGO_SETTINGS_MODULE": "deephardway_site.settings",
           "VAR_DIR": str(tmp_path)}  # its own SQLite file: /api/models reads the training jobs
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


def test_production_redirects_pages_to_https_but_not_the_proxys_health_check(tmp_path):
    """A proxy health-checks /healthz over plain HTTP without X-Forwarded-Proto (docs/deploy.md): it
    must reach the view (200 or 503), while every page still redirects to https."""
    code = (
        "import django; django.setup();"
        "from django.core.management import call_command; call_command('migrate', verbosity=0);"
        "from django.test import Client; c = Client(HTTP_HOST='models.example.com');"
        "print('STATUS', c.get('/healthz').status_code, c.get('/api/models').status_code,"
        " c.get('/api/models', headers={'X-Forwarded-Proto': 'https'}).status_code)"
    )
    env = {**{k: v for k, v in os.environ.items() if k not in PRODUCTION and k != "DJANGO_ALLOW_ASYNC_UNSAFE"},
           **PRODUCTION, "BEHIND_TLS_PROXY": "1", "DJANGO_SETTINGS_MODULE": "deephardway_site.settings",
           "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "ETCD_URL": "etcdv3://127.0.0.1:9",
           "VAR_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "STATUS 503 301 200" in result.stdout, result.stdout + result.stderr[-2000:]
