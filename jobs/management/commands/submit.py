"""``manage.py submit <model>``: submit a job from the shell and stream its progress.

    manage.py submit text --input '{"prompt": "ROMEO:", "length": 120}'
    manage.py submit digits --image seven.png
    manage.py submit fashion --image shirt.jpg --user alice --priority 7

The job goes through the same checks, deduplication and queue as the API's; its
progress comes straight from the result backend's watch (watch_jobs need not run).
"""
from __future__ import annotations

import getpass
import json
import logging
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from jobs import services
from jobs.models import CELERY_STATES, Job, Status, owner_key_for
from jobs.validation import RequestRefused, lookup_model, parse_priority, prepare, upload_data_url

logger = logging.getLogger(__name__)

#: Seconds without any state change before ``submit`` stops following (the job goes on).
FOLLOW_TIMEOUT = 600.0


class Command(BaseCommand):
    help = "Submit a job from the shell and stream its progress until it finishes."

    def add_arguments(self, parser) -> None:
        parser.add_argument("model", help="model name (see GET /api/models)")
        parser.add_argument("--input", default="{}", help="the input as a JSON object")
        parser.add_argument("--image", type=Path, help="an image file for the digits or fashion model")
        parser.add_argument("--priority", default=None, help="0-9, 9 most urgent (default: site default)")
        parser.add_argument("--user", help="owner's username (default: a shell owner only staff can see)")
        parser.add_argument("--no-follow", action="store_true", help="print the job and return at once")
        parser.add_argument("--timeout", type=float, default=FOLLOW_TIMEOUT,
                            help=f"stop following after this many quiet seconds (default {FOLLOW_TIMEOUT:.0f})")

    def handle(self, *args: Any, model: str, input: str, image: Path | None, priority: str | None,
               user: str | None, no_follow: bool, timeout: float, **options: Any) -> None:
        try:
            job, created = self.submit(model, input, image, priority, user)
        except RequestRefused as exc:
            raise CommandError(f"refused ({exc.status}): {exc.message}") from None
        verb = "submitted" if created else "already running, following"
        ahead = job.jobs_ahead()
        self.stdout.write(f"job {job.id} {verb}: {job.model}, priority {job.priority}"
                          + (f", {ahead} job(s) ahead" if ahead else ""))
        if not no_follow:
            self.follow(job, timeout)

    def submit(self, model: str, raw_input: str, image: Path | None, priority: str | None,
               username: str | None) -> tuple[Job, bool]:
        owner = self.owner(username)
        spec = lookup_model(model)
        payload = self.payload(raw_input, image)
        submission = prepare(spec, payload, parse_priority(priority, _Staff()),
                             original=image.read_bytes() if image else None,
                             image_name=image.name if image else "")
        key = owner_key_for(owner) if owner else f"shell:{getpass.getuser()}"
        return services.submit(submission, owner_key=key, user=owner)

    def owner(self, username: str | None) -> Any:
        if not username:
            return None
        try:
            return get_user_model().objects.get_by_natural_key(username)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user {username!r}") from None

    def payload(self, raw_input: str, image: Path | None) -> dict[str, Any]:
        try:
            payload = json.loads(raw_input)
        except json.JSONDecodeError as exc:
            raise CommandError(f"--input is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise CommandError("--input must be a JSON object")
        if image is not None:
            if not image.is_file():
                raise CommandError(f"--image {image}: no such file")
            if image.stat().st_size > settings.JOBS_MAX_REQUEST_BYTES:
                raise CommandError(f"--image {image}: {image.stat().st_size} bytes; the limit is "
                                   f"{settings.JOBS_MAX_REQUEST_BYTES} bytes")
            payload["image"] = upload_data_url("image", image.read_bytes())
        return payload

    def follow(self, job: Job, timeout: float = FOLLOW_TIMEOUT) -> None:
        """Print each state change until the job finishes; CommandError if it did not succeed."""
        from deephardway_site.celery import app
        from etcd_broker.backend.result_backend import watch_task

        shown = ""
        try:
            for event in watch_task(str(job.id), app=app, timeout=timeout):
                shown = self.show(event, shown)
                if event.final:
                    break
        except TimeoutError:
            raise CommandError(f"no news of job {job.id} for {timeout:.0f} s; is a worker running?") from None
        status = CELERY_STATES.get(event.state)
        if status != Status.SUCCEEDED:
            raise CommandError(f"job {job.id} {status}: {services.describe_error(event.result)}")

    def show(self, event: Any, shown: str) -> str:
        """Print one event; returns the partial text printed so far (generation streams)."""
        status = CELERY_STATES.get(event.state, event.state)
        partial = services.partial_of(event.result) if event.state == "PROGRESS" else None
        text = (partial or {}).get("text")
        if isinstance(text, str) and text.startswith(shown):
            self.stdout.write(text[len(shown):], ending="")
            self.stdout.flush()
            return text
        if event.state == "SUCCESS":
            self.stdout.write(("\n" if shown else "") + f"succeeded: {json.dumps(event.result, indent=2)}")
        elif event.state == "PROGRESS":
            self.stdout.write(f"[{event.progress or 0:>3}%] {status}")
        elif event.state in ("PENDING", "STARTED"):
            self.stdout.write(status)
        return shown


class _Staff:
    """Whoever runs manage.py may use every priority, whoever owns the job."""

    is_staff = True
