"""``manage.py queues``: what waits in each queue (by priority), what is being worked on
(unacknowledged), ETA tasks not due yet (delayed, and when the next is due), and which workers
are alive (their etcd leases), next to the Job table."""
from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count
from kombu.exceptions import OperationalError

from jobs.models import ACTIVE_STATUSES, Job

logger = logging.getLogger(__name__)


def broker_report(app: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(queue rows, live consumers) straight from the transport's keys in etcd."""
    from etcd_broker.stats import live_consumers, queue_stats, stats_for_connection

    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)
        client, keys = stats_for_connection(connection)
        return queue_stats(client, keys), live_consumers(client, keys)


def etcd_report(app: Any) -> Any:
    """etcd's own status: DB size, compaction lag, alarms (etcd_broker/core/maintenance.py)."""
    from etcd_broker.core.maintenance import etcd_status
    from etcd_broker.stats import stats_for_connection

    with app.connection_for_read() as connection:
        return etcd_status(*stats_for_connection(connection))


def job_counts() -> dict[str, dict[str, int]]:
    """Unfinished jobs per queue and status, from the database."""
    counts: dict[str, dict[str, int]] = {}
    rows = Job.objects.filter(status__in=ACTIVE_STATUSES).values("queue", "status").annotate(n=Count("pk"))
    for row in rows:
        counts.setdefault(row["queue"], {})[row["status"]] = row["n"]
    return counts


class Command(BaseCommand):
    help = "Queue lengths per priority, unacknowledged messages and live workers (from etcd)."

    def handle(self, *args: Any, **options: Any) -> None:
        from deephardway_site.celery import app

        try:
            queues, consumers = broker_report(app)
            status = etcd_report(app)
        except OperationalError as exc:
            raise CommandError(f"{exc}. Is etcd running? `make run` prints its URL; set ETCD_URL to it.") from None
        self.write_queues(queues, job_counts())
        self.write_consumers(consumers)
        self.stdout.write(f"\n{status.describe()}")

    def write_queues(self, queues: list[dict[str, Any]], jobs: dict[str, dict[str, int]]) -> None:
        self.stdout.write(f"{'queue':<24} {'ready':>6} {'unacked':>8} {'delayed':>8} {'next due (UTC)':>15}"
                          f"  {'ready by priority (9 = urgent)':<34} {'jobs queued/running':>20}")
        for row in queues:
            by_priority = " ".join(f"p{p}:{n}" for p, n in sorted(row["ready_by_priority"].items(),
                                                                  key=lambda item: -int(item[0])))
            db = jobs.get(row["queue"], {})
            db_text = f"{db.get('queued', 0)}/{db.get('running', 0)}" if row["queue"] in jobs else "-"
            due = row.get("next_due")
            due_text = datetime.fromtimestamp(due, UTC).strftime("%H:%M:%S") if due is not None else "-"
            self.stdout.write(f"{row['queue']:<24} {row['ready']:>6} {row['unacked']:>8} {row.get('delayed', 0):>8}"
                              f" {due_text:>15}  {by_priority or '-':<34} {db_text:>20}")
        if not queues:
            self.stdout.write("(no queues declared yet: start a worker or submit a job)")

    def write_consumers(self, consumers: list[dict[str, Any]]) -> None:
        self.stdout.write(f"\nlive consumers: {len(consumers)}")
        for item in consumers:
            queues = ",".join(item.get("queues") or []) or "-"
            self.stdout.write(f"  {item.get('hostname', '?')} pid {item.get('pid', '?')}  queues {queues}  "
                              f"lease {item['lease']} (ttl {item.get('ttl')} s)")
