"""``manage.py purge_queue <queue>``: drop every message waiting in a queue and cancel the
jobs they carried (their rows turn cancelled through watch_jobs, like any cancel)."""
from __future__ import annotations

import logging
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from kombu.exceptions import OperationalError

from jobs import services
from jobs.models import MODEL_QUEUE, Job, Status

logger = logging.getLogger(__name__)


def purge(app: Any, queue: str) -> tuple[int, int]:
    """Purge ``queue``; returns (messages removed, jobs cancelled).

    The waiting jobs are listed before the purge, so a job submitted meanwhile keeps its
    message and is not cancelled.
    """
    waiting = [str(pk) for pk in Job.objects.filter(queue=queue, status=Status.QUEUED).values_list("pk", flat=True)]
    with app.connection_for_write() as connection:
        removed = connection.default_channel.queue_purge(queue) or 0
    Job.objects.filter(pk__in=waiting, cancel_requested_at__isnull=True).update(cancel_requested_at=timezone.now())
    services.cancel_tasks(waiting, queued=True)
    return removed, len(waiting)


class Command(BaseCommand):
    help = "Remove every waiting message from a queue and cancel the jobs they carried."

    def add_arguments(self, parser) -> None:
        parser.add_argument("queue", nargs="?", default=MODEL_QUEUE, help=f"queue name (default {MODEL_QUEUE})")
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    def handle(self, *args: Any, queue: str, yes: bool, **options: Any) -> None:
        from deephardway_site.celery import app

        if not yes and input(f"Purge every waiting message in {queue!r} and cancel its jobs? [y/N] ") != "y":
            raise CommandError("not purged")
        try:
            removed, cancelled = purge(app, queue)
        except OperationalError as exc:
            raise CommandError(f"{exc}. Is etcd running? `make run` prints its URL; set ETCD_URL to it.") from None
        self.stdout.write(f"purged {removed} message(s) from {queue}; cancelled {cancelled} queued job(s)")
