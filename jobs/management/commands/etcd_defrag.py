"""``manage.py etcd_defrag``: give the space etcd's compaction freed back to the file system,
one member at a time (etcd_broker/core/maintenance.py; docs/operators.md "etcd upkeep")."""
from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from etcd_broker.core.client import CONNECTION_ERRORS, get_client
from etcd_broker.core.maintenance import defragment_members
from etcd_broker.core.ops import KeySpace


class Command(BaseCommand):
    help = "Defragment every etcd member in turn (each is unavailable for the seconds it takes)."

    def handle(self, *args: Any, **options: Any) -> None:
        client = get_client(settings.ETCD_URL, **settings.ETCD_OPTIONS)
        try:
            done = defragment_members(client, KeySpace(settings.ETCD_PREFIX))
        except CONNECTION_ERRORS as exc:
            raise CommandError(f"{exc}. Is etcd running? Set ETCD_URL to it.") from None
        for before, after in done:
            self.stdout.write(f"{after.endpoint}: DB {before.db_size / 1e6:.1f} MB -> {after.db_size / 1e6:.1f} MB")
            if after.alarms:
                self.stdout.write(f"  alarms still raised: {', '.join(after.alarms)} (after freeing space: "
                                  "etcdctl alarm disarm)")
