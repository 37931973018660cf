"""Django admin for jobs (staff only): list, filters, search, cancel and retry actions,
readable results and errors, the queues in etcd above the list; and API tokens, whose secret
is shown once on creation."""
from __future__ import annotations

import json
import logging
from datetime import timedelta

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from jobs import metrics, services
from jobs.models import ApiToken, Job
from jobs.validation import RequestRefused

logger = logging.getLogger(__name__)


def _pretty(value) -> str:
    if value in (None, "", {}):
        return "-"
    return format_html("<pre style='white-space:pre-wrap;margin:0'>{}</pre>",
                       json.dumps(value, indent=2, ensure_ascii=False))


def queue_panel() -> dict:
    """The Job list's header (admin/jobs/job/change_list.html): each queue's depth in etcd now."""
    try:
        rows = metrics.broker_queues()
    except Exception as exc:  # noqa: BLE001 - the job list still shows; the panel says why it is empty
        logger.warning("admin: etcd did not answer: %s", exc)
        return {"broker_error": f"etcd did not answer ({type(exc).__name__}: {exc})"}
    for row in rows:
        row["by_priority"] = " ".join(f"p{p}:{n}" for p, n in sorted(row["ready_by_priority"].items(), reverse=True))
    return {"broker_queues": rows}


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("short_id", "model", "status", "owner_label", "progress_bar", "priority", "duration_text",
                    "worker", "created_at")
    list_filter = ("status", "model", "priority", "queue", ("owner", admin.RelatedOnlyFieldListFilter))
    search_fields = ("id", "owner__username", "session_key", "fingerprint", "error", "worker")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_per_page = 50
    actions = ("cancel_jobs", "retry_jobs")
    readonly_fields = ("id", "model", "status", "progress", "priority", "queue", "owner", "session_key",
                       "owner_key", "worker", "created_at", "started_at", "finished_at", "cancel_requested_at",
                       "duration_text", "fingerprint", "revision", "input_pretty", "input_file",
                       "partial_pretty", "result_pretty", "error_text")
    fieldsets = (
        (None, {"fields": ("id", "model", "status", "progress", "priority", "queue", "worker")}),
        ("Owner", {"fields": ("owner", "session_key", "owner_key")}),
        ("Times", {"fields": ("created_at", "started_at", "finished_at", "cancel_requested_at",
                              "duration_text")}),
        ("Input", {"fields": ("input_pretty", "input_file", "fingerprint")}),
        ("Outcome", {"fields": ("result_pretty", "partial_pretty", "error_text", "revision")}),
    )

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None):
        return super().changelist_view(request, {**(extra_context or {}), **queue_panel()})

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # jobs are made by the API, the UI and `manage.py submit`

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False if obj is not None else super().has_change_permission(request)

    @admin.display(description="id", ordering="id")
    def short_id(self, job: Job) -> str:
        return str(job.id)[:8]

    @admin.display(description="owner", ordering="owner_key")
    def owner_label(self, job: Job) -> str:
        return job.owner.get_username() if job.owner_id else f"anonymous {job.session_key[:6]}"

    @admin.display(description="progress", ordering="progress")
    def progress_bar(self, job: Job) -> str:
        return format_html("<progress max='100' value='{}' title='{}%'></progress> {}%",
                           job.progress, job.progress, job.progress)

    @admin.display(description="duration")
    def duration_text(self, job: Job) -> str:
        duration = job.duration
        if duration is None:
            return "-"
        return f"{duration / timedelta(seconds=1):.1f} s"

    @admin.display(description="input")
    def input_pretty(self, job: Job) -> str:
        return _pretty(job.input)

    @admin.display(description="partial result")
    def partial_pretty(self, job: Job) -> str:
        return _pretty(job.partial)

    @admin.display(description="result")
    def result_pretty(self, job: Job) -> str:
        return _pretty(job.result)

    @admin.display(description="error")
    def error_text(self, job: Job) -> str:
        return format_html("<pre style='white-space:pre-wrap;margin:0'>{}</pre>", job.error) if job.error else "-"

    @admin.action(description="Cancel selected jobs")
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._each(request, queryset, services.cancel, "cancel requested for")

    @admin.action(description="Retry selected jobs (as new jobs)")
    def retry_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        self._each(request, queryset, services.retry, "retried")

    def _each(self, request: HttpRequest, queryset: QuerySet[Job], action, verb: str) -> None:
        done = 0
        for job in queryset:
            try:
                action(job)
                done += 1
            except RequestRefused as exc:
                self.message_user(request, f"{str(job.id)[:8]}: {exc.message}", messages.WARNING)
        if done:
            self.message_user(request, f"{verb} {done} job(s)", messages.SUCCESS)


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("user", "name", "created_at", "last_used_at")
    search_fields = ("user__username", "name")
    fields = ("user", "name", "created_at", "last_used_at")
    readonly_fields = ("created_at", "last_used_at")

    def save_model(self, request: HttpRequest, obj: ApiToken, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        token, key = ApiToken.issue(obj.user, obj.name)
        obj.pk, obj.key_hash = token.pk, token.key_hash
        self.message_user(request, f"Token created. Copy it now, it is not shown again: {key}", messages.WARNING)
