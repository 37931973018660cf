"""The jobs app: every request as a Job, its API, admin and Celery tasks.

Registers system checks for settings that can be wrong in production.
"""
from __future__ import annotations

from django.apps import AppConfig
from django.core import checks

from etcd_broker.core.ops import MAX_PRIORITY

#: The development SECRET_KEY in settings.py starts with this; production must replace it.
DEV_SECRET_PREFIX = "dev-only-insecure"


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        checks.register(check_secret_key, checks.Tags.security, deploy=True)
        checks.register(check_job_limits)
        checks.register(check_etcd_url, checks.Tags.compatibility)
        from jobs import metrics  # noqa: F401 - connects the job metrics' post_save receiver


def check_secret_key(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """The checked-in development key must never sign production sessions."""
    from django.conf import settings

    if settings.SECRET_KEY.startswith(DEV_SECRET_PREFIX):
        return [checks.Error("SECRET_KEY is the development key from settings.py",
                             hint="Set the SECRET_KEY environment variable to 50+ random characters.",
                             id="jobs.E001")]
    return []


def check_job_limits(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    from django.conf import settings

    errors = []
    if settings.JOBS_MAX_QUEUED_PER_OWNER < 1:
        errors.append(checks.Error("JOBS_MAX_QUEUED_PER_OWNER must be at least 1", id="jobs.E002"))
    if not (0 <= settings.JOBS_MAX_PRIORITY_NON_STAFF <= MAX_PRIORITY
            and 0 <= settings.JOBS_DEFAULT_PRIORITY <= MAX_PRIORITY):
        errors.append(checks.Error(f"JOBS_MAX_PRIORITY_NON_STAFF and JOBS_DEFAULT_PRIORITY must be 0-{MAX_PRIORITY}",
                                   id="jobs.E003"))
    if settings.JOBS_DEFAULT_PRIORITY > settings.JOBS_MAX_PRIORITY_NON_STAFF:
        errors.append(checks.Error("JOBS_DEFAULT_PRIORITY is above JOBS_MAX_PRIORITY_NON_STAFF: "
                                   "non-staff callers could not use the default", id="jobs.E004"))
    return errors


def check_etcd_url(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """ETCD_URL and ETCD_OPTIONS must describe a connection (nothing is contacted)."""
    from django.conf import settings

    from etcd_broker.core.client import EtcdConfig
    from etcd_broker.exceptions import EtcdConfigError

    try:
        EtcdConfig.from_url(settings.ETCD_URL, **getattr(settings, "ETCD_OPTIONS", {}))
    except EtcdConfigError as exc:
        return [checks.Error(str(exc), hint="Set ETCD_URL=etcdv3://host:2379[,host2:2379]", id="jobs.E005")]
    return []
