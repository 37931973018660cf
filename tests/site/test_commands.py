"""manage.py submit, queues and purge_queue against the real etcd broker and backend."""
from __future__ import annotations

import io
import re
import threading
import time

import pytest
from django.core.management import CommandError, call_command

from jobs.models import Job, Status

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_submit_queues_a_job_and_prints_it(site_celery, queued_messages, user):
    output = run("submit", "text", "--input", '{"prompt": "KING:"}', "--user", "alice", "--priority", "8",
                 "--no-follow")
    job = Job.objects.get()
    assert output.strip() == f"job {job.id} submitted: text, priority 8"
    assert (job.owner, job.status, job.priority) == (user, Status.QUEUED, 8)
    assert [m["id"] for m in queued_messages()] == [str(job.id)]


@pytest.mark.django_db(transaction=True)
def test_submit_streams_progress_until_the_job_finishes(site_celery, user):
    def worker_writes():
        deadline = time.monotonic() + 10
        while not Job.objects.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        task = str(Job.objects.get().id)
        time.sleep(0.3)
        for state, meta in [("STARTED", {"pid": 1, "hostname": "w@h"}), ("PROGRESS", {"progress": 50, "text": "Now is"}),
                            ("PROGRESS", {"progress": 90, "text": "Now is the winter"}),
                            ("SUCCESS", {"text": "Now is the winter"})]:
            site_celery.backend.store_result(task, meta, state)
            time.sleep(0.1)

    writer = threading.Thread(target=worker_writes)
    writer.start()
    output = run("submit", "text", "--input", '{"prompt": "GLOUCESTER:"}', "--user", "alice", "--timeout", "20")
    writer.join()
    assert "running\nNow is the winter\nsucceeded:" in output
    assert '"text": "Now is the winter"' in output


def test_submit_refuses_bad_input_naming_the_field(site_celery):
    with pytest.raises(CommandError, match=r"refused \(400\): input.length: is 5000; must be from 1 to 1000"):
        run("submit", "text", "--input", '{"prompt": "x", "length": 5000}', "--no-follow")
    assert Job.objects.count() == 0


def test_queues_shows_waiting_messages_by_priority(site_celery, user):
    run("submit", "text", "--input", '{"prompt": "A"}', "--priority", "9", "--no-follow")
    run("submit", "text", "--input", '{"prompt": "B"}', "--priority", "2", "--no-follow")
    run("submit", "text", "--input", '{"prompt": "C"}', "--priority", "2", "--no-follow")
    output = run("queues")
    gpu = [line for line in output.splitlines() if line.startswith("gpu ")][0]
    assert gpu.split()[:5] == ["gpu", "3", "0", "0", "-"]  # ready, unacked, delayed, next due
    assert "p9:1 p2:2" in gpu and gpu.rstrip().endswith("3/0")
    assert "live consumers:" in output
    etcd_line = [line for line in output.splitlines() if line.startswith("etcd ")][0]
    assert " MB" in etcd_line and "compacted at " in etcd_line and etcd_line.endswith("alarms: none"), etcd_line


def test_etcd_defrag_defragments_each_member_and_says_how_big_it_is(site_celery):
    output = run("etcd_defrag")
    assert re.fullmatch(r"\S+:\d+: DB \d+\.\d MB -> \d+\.\d MB", output.strip()), output


def test_purge_queue_empties_the_queue_and_cancels_its_jobs(site_celery, queued_messages):
    from jobs.management.commands.watch_jobs import JobWatcher

    run("submit", "text", "--input", '{"prompt": "A"}', "--no-follow")
    run("submit", "text", "--input", '{"prompt": "B"}', "--no-follow")
    watcher = JobWatcher(site_celery).start()
    try:
        assert run("purge_queue", "gpu", "--yes").strip() == "purged 2 message(s) from gpu; cancelled 2 queued job(s)"
        assert queued_messages() == []
        deadline = time.monotonic() + 10
        while Job.objects.filter(status=Status.CANCELLED).count() < 2 and time.monotonic() < deadline:
            watcher.apply_pending(timeout=0.2)
    finally:
        watcher.stop()
    assert list(Job.objects.values_list("status", flat=True)) == [Status.CANCELLED, Status.CANCELLED]
