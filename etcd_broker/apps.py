"""Django integration: the ``etcd`` management command and a settings check."""
from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class EtcdBrokerConfig(AppConfig):
    name = "etcd_broker"
    verbose_name = "etcd broker"

    def ready(self) -> None:
        checks.register(check_etcd_url, checks.Tags.compatibility)


def check_etcd_url(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """ETCD_URL and ETCD_OPTIONS must describe a connection (nothing is contacted)."""
    from django.conf import settings

    from etcd_broker.client import EtcdConfig, EtcdConfigError

    try:
        EtcdConfig.from_url(settings.ETCD_URL, **getattr(settings, "ETCD_OPTIONS", {}))
    except EtcdConfigError as exc:
        return [checks.Error(str(exc), hint="Set ETCD_URL=etcdv3://host:2379[,host2:2379]", id="etcd_broker.E001")]
    return []
