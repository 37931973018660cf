"""Django settings, read from environment variables.

Defaults make a fresh checkout run on SQLite and a local etcd; production sets
SECRET_KEY, DEBUG=0, ALLOWED_HOSTS, DATABASE_URL, ETCD_URL and MODEL_DIR.
"""
from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

from etcd_broker.core.client import kombu_url, url_credentials
from etcd_broker.core.ops import MAX_PRIORITY
from jobs.queues import GPU_QUEUE

BASE_DIR = Path(__file__).resolve().parent.parent


def envstr(name: str, default: str) -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: str) -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def envint(name: str, default: str) -> int:
    return int(os.environ.get(name, default))


def envlist(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


SECRET_KEY = envstr("SECRET_KEY", "dev-only-insecure-key-change-me-in-production-0123456789")
DEBUG = envbool("DEBUG", "1")
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "jobs",
    "frontend",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "deephardway_site.urls"
WSGI_APPLICATION = "deephardway_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

VAR_DIR = Path(envstr("VAR_DIR", str(BASE_DIR / "var")))
DATABASES = {
    "default": dj_database_url.parse(
        envstr("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"), conn_max_age=60,
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Several processes (web, watch_jobs) write the same file: wait for the lock.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 20

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
MEDIA_URL = "/media/"
MEDIA_ROOT = Path(envstr("MEDIA_ROOT", str(VAR_DIR / "media")))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}

# --- etcd, Celery -----------------------------------------------------------
#: One or more endpoints: etcdv3://h1:2379,h2:2379 or etcdv3://h1:2379;etcdv3://h2:2379.
ETCD_URL = envstr("ETCD_URL", "etcdv3://127.0.0.1:2379")
#: TLS and auth for etcd (used by the transport and the result backend alike).
ETCD_OPTIONS = {
    "ca_cert": os.environ.get("ETCD_CA_CERT"),
    "cert_key": os.environ.get("ETCD_CERT_KEY"),
    "cert_cert": os.environ.get("ETCD_CERT_CERT"),
    "user": os.environ.get("ETCD_USER"),
    "password": os.environ.get("ETCD_PASSWORD"),
}
ETCD_OPTIONS = {k: v for k, v in ETCD_OPTIONS.items() if v}
# Credentials written in the URL (etcdv3://user:pass@host:2379) count as options too.
ETCD_OPTIONS = {**url_credentials(ETCD_URL), **ETCD_OPTIONS}
#: Every key lives under this prefix (several deployments can share one cluster).
ETCD_PREFIX = envstr("ETCD_PREFIX", "/deephardway")

# kombu cannot parse "h1:2379,h2:2379" in one URL: hand it the failover-list form instead.
CELERY_BROKER_URL = envstr("CELERY_BROKER_URL", kombu_url(ETCD_URL))
CELERY_RESULT_BACKEND = envstr("CELERY_RESULT_BACKEND", ETCD_URL)
CELERY_BROKER_TRANSPORT_OPTIONS = {"prefix": ETCD_PREFIX, **ETCD_OPTIONS}
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"prefix": ETCD_PREFIX, **ETCD_OPTIONS}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXTENDED = True
CELERY_RESULT_EXPIRES = envint("CELERY_RESULT_EXPIRES", "86400")
CELERY_TASK_TRACK_STARTED = True
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_QUEUE_MAX_PRIORITY = MAX_PRIORITY
CELERY_TASK_DEFAULT_PRIORITY = 5
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
#: Worker-side Prometheus metrics (tasks, failures, batch sizes), served when WORKER_METRICS_PORT is set.
CELERY_IMPORTS = ("jobs.worker_metrics",)

# --- metrics (jobs/metrics.py, docs/metrics.md) -------------------------------
#: When set, GET /metrics needs ``Authorization: Bearer <token>``; otherwise keep /metrics off the
#: public proxy. Several web processes: set PROMETHEUS_MULTIPROC_DIR (an empty directory) for all.
METRICS_TOKEN = envstr("METRICS_TOKEN", "")

# --- models -----------------------------------------------------------------
MODEL_DIR = Path(envstr("MODEL_DIR", str(VAR_DIR / "models")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": envstr("LOG_LEVEL", "INFO")},
}

# --- jobs, API and browser pages (jobs/, frontend/) ---------------------------
#: Queued jobs one owner (user or anonymous session) may have waiting at once; more gets 429.
JOBS_MAX_QUEUED_PER_OWNER = envint("JOBS_MAX_QUEUED_PER_OWNER", "5")
#: Queued anonymous jobs from one client address (sessions are free to make); more gets 429.
JOBS_MAX_QUEUED_PER_ADDRESS = envint("JOBS_MAX_QUEUED_PER_ADDRESS", "20")
#: Request header holding the client address behind a proxy, e.g. HTTP_X_FORWARDED_FOR (last hop).
JOBS_CLIENT_ADDRESS_HEADER = envstr("JOBS_CLIENT_ADDRESS_HEADER", "")
#: Largest request body POST /api/jobs accepts (bytes); larger gets 413. Photos fit in 4 MiB.
JOBS_MAX_REQUEST_BYTES = envint("JOBS_MAX_REQUEST_BYTES", str(4 * 1024 * 1024))
DATA_UPLOAD_MAX_MEMORY_SIZE = JOBS_MAX_REQUEST_BYTES
#: Highest priority a non-staff caller may ask for (0-9, 9 most urgent); staff may use 9.
JOBS_MAX_PRIORITY_NON_STAFF = envint("JOBS_MAX_PRIORITY_NON_STAFF", "5")
JOBS_DEFAULT_PRIORITY = envint("JOBS_DEFAULT_PRIORITY", "5")
#: Jobs per page in GET /api/jobs.
JOBS_PAGE_SIZE = envint("JOBS_PAGE_SIZE", "20")
#: Seconds between SSE heartbeat comments (keeps proxies from closing idle streams).
JOBS_SSE_HEARTBEAT_SECONDS = envint("JOBS_SSE_HEARTBEAT_SECONDS", "15")
#: While a job waits, its event stream re-counts the jobs ahead of it this often (seconds).
JOBS_SSE_POSITION_SECONDS = envint("JOBS_SSE_POSITION_SECONDS", "3")
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Many web threads and watch_jobs write one SQLite file: WAL lets readers and a writer work
    # at once, and IMMEDIATE transactions wait for the write lock up front (busy timeout)
    # instead of failing when a read transaction tries to become a write one.
    DATABASES["default"]["OPTIONS"].update(
        transaction_mode="IMMEDIATE", init_command="PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
if not DEBUG:
    # Production (DEBUG=0): `manage.py check --deploy` is clean with these defaults.
    SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", "1")
    # The proxy's health check asks for /healthz over plain HTTP, without X-Forwarded-Proto (docs/deploy.md).
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    if envbool("BEHIND_TLS_PROXY", "0"):  # only when the proxy sets X-Forwarded-Proto itself
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", "31536000")
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", "1")
    SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", "1")  # the header only consents; listing is manual
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

# --- model serving (ml/, jobs/tasks.py) -------------------------------------
#: Model tasks run on the gpu queue (GPU hosts: `worker -Q gpu -P threads -c 64`; CPU hosts: `-Q gpu,default`).
CELERY_TASK_ROUTES = {"jobs.tasks.run_model": {"queue": GPU_QUEUE}, "jobs.tasks.train_model": {"queue": GPU_QUEUE}}
#: Micro-batching of concurrent classify requests in one worker: at most this many per forward pass...
BATCH_MAX_SIZE = envint("BATCH_MAX_SIZE", "64")
#: ...collected for at most this long (ms) once callers are queueing; a lone caller never waits.
BATCH_WINDOW_MS = envint("BATCH_WINDOW_MS", "5")
#: Set BATCHING=0 to run every request on its own (for comparisons).
BATCHING = envbool("BATCHING", "1")
#: Text generation publishes PROGRESS (and checks for cancel) every this many characters.
TEXT_CHUNK_CHARS = envint("TEXT_CHUNK_CHARS", "25")
