"""``manage.py train_models``: train the models into MODEL_DIR and print their progress.

By default the models train in this process (operators); ``--queue`` submits them as
``train_model`` jobs to the workers instead, as ``make run`` does, and follows them. Either
way each model prints the same lines the site shows (epoch k of n, loss/accuracy, time left),
then its held-out numbers (also in its JSON model card). A model whose data is not installed
is reported with the command that installs it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ml import registry
from ml.errors import ModelUnavailable
from ml.progress import describe

#: Seconds between progress lines of one model (epoch ends always print).
PRINT_EVERY_SECONDS = 10.0
#: Seconds ``--queue`` waits for a worker to consume the gpu queue before submitting anyway.
WORKER_WAIT_SECONDS = 120.0
#: Seconds without news of a queued training job before ``--queue`` stops following it.
FOLLOW_TIMEOUT = 900.0


class ProgressPrinter:
    """Prints one model's progress lines: at each epoch's end and change of stage, else every
    PRINT_EVERY_SECONDS."""

    def __init__(self, write: Any, name: str) -> None:
        self.write, self.name = write, name
        self.stage: Any = None
        self.printed_at = 0.0

    def __call__(self, percent: float, meta: dict[str, Any]) -> None:
        now = time.monotonic()
        epoch_end = bool(meta.get("epochs")) and percent >= round(100 * meta.get("epoch", 0) / meta["epochs"], 1)
        if not epoch_end and meta.get("stage") == self.stage and now - self.printed_at < PRINT_EVERY_SECONDS:
            return
        self.stage, self.printed_at = meta.get("stage"), now
        self.write(f"{self.name}: [{percent:5.1f}%] {describe(meta)}")


class Command(BaseCommand):
    help = ("Train the models (all, or --model NAME) into MODEL_DIR and write their model cards; "
            "--queue trains them on the workers as jobs.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--model", action="append", choices=list(registry.MODELS), dest="models",
                            help="model to train (repeatable; default: all)")
        parser.add_argument("--epochs", type=int, help="epochs (default: each model's own)")
        parser.add_argument("--missing", action="store_true", help="only models without a trained file")
        parser.add_argument("--model-dir", type=Path, help="output directory (default: settings.MODEL_DIR)")
        parser.add_argument("--queue", action="store_true",
                            help="submit train_model jobs to the workers (as `make run` does) and follow them")
        parser.add_argument("--worker-wait", type=float, default=WORKER_WAIT_SECONDS,
                            help="--queue: seconds to wait for a worker before submitting anyway "
                                 f"(default {WORKER_WAIT_SECONDS:.0f})")
        parser.add_argument("--no-follow", action="store_true", help="--queue: submit and return")

    def handle(self, *args: Any, models: list[str] | None, epochs: int | None, missing: bool,
               model_dir: Path | None, queue: bool, worker_wait: float, no_follow: bool, verbosity: int,
               **options: Any) -> None:
        if epochs is not None and epochs < 1:
            raise CommandError("--epochs must be at least 1")
        if queue and model_dir is not None:
            raise CommandError("--model-dir is for training here; queued jobs train into the workers' MODEL_DIR")
        model_dir = Path(model_dir or settings.MODEL_DIR)
        names = models or sorted(registry.MODELS, key=lambda n: registry.MODELS[n].expected_train_seconds)
        todo = [n for n in names if not (missing and registry.MODELS[n].is_trained(model_dir))]
        if not todo:
            self.stdout.write(f"all models are trained ({model_dir})")
            return
        if queue:
            self.wait_for_worker(worker_wait)
            failed = self.train_queued(todo, epochs, missing, follow=not no_follow)
        else:
            failed = [name for name in todo if not self.train_one(name, model_dir, epochs, verbosity)]
        if failed and models:
            raise CommandError(f"not trained: {', '.join(failed)}")

    def train_one(self, name: str, model_dir: Path, epochs: int | None, verbosity: int) -> bool:
        """Train one model here and print its progress and card; False when it is unavailable."""
        spec = registry.MODELS[name]
        ok, reason = spec.available()
        if not ok:
            self.stderr.write(self.style.WARNING(f"{name}: unavailable - {reason}"))
            return False
        self.stdout.write(self.style.MIGRATE_HEADING(f"==> training {name}: {spec.data_source}"))
        from ml.serving import ModelHost  # imports TensorFlow only now

        progress = ProgressPrinter(self.stdout.write, name) if verbosity > 0 else None
        try:
            card = ModelHost(model_dir).train(name, epochs, on_progress=progress)
        except ModelUnavailable as exc:
            self.stderr.write(self.style.WARNING(f"{name}: unavailable - {exc.reason}"))
            return False
        self.report(card, model_dir)
        return True

    # -- --queue: the same training as jobs on the workers -------------------------------
    def train_queued(self, names: list[str], epochs: int | None, only_missing: bool, follow: bool) -> list[str]:
        """Submit one deduplicated training job per model, then follow them in order."""
        from jobs.training import submit_training
        from jobs.validation import RequestRefused

        jobs, failed = [], []
        for name in names:
            ok, reason = registry.MODELS[name].available()
            if not ok:
                self.stderr.write(self.style.WARNING(f"{name}: unavailable - {reason}"))
                failed.append(name)
                continue
            try:
                job, created = submit_training(name, epochs, only_missing=only_missing)
            except RequestRefused as exc:
                raise CommandError(exc.message) from None
            if job is None:
                self.stdout.write(f"{name}: already trained")
                continue
            self.stdout.write(f"{name}: training job {job.id} {'queued' if created else 'already queued'}")
            jobs.append(job)
        return failed + [job.model for job in jobs if follow and not self.follow(job)]

    def wait_for_worker(self, seconds: float) -> None:
        """Wait until a worker consumes the gpu queue, so training starts as it is queued."""
        from deephardway_site.celery import app
        from jobs.management.commands.queues import broker_report
        from jobs.queues import GPU_QUEUE

        deadline = time.monotonic() + seconds
        while True:
            try:
                _queues, consumers = broker_report(app)
            except Exception:  # noqa: BLE001 - etcd may still be starting: ask again
                consumers = []
            if any(GPU_QUEUE in c.get("queues", [GPU_QUEUE]) for c in consumers):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        self.stderr.write(self.style.WARNING(f"no worker consumes the {GPU_QUEUE} queue yet; "
                                             "the training jobs wait there for one"))

    def follow(self, job: Any) -> bool:
        """Print the job's progress until it ends; True when the model was trained."""
        from deephardway_site.celery import app
        from etcd_broker.backend.result_backend import watch_task
        from jobs import services

        show = ProgressPrinter(self.stdout.write, job.model)
        try:
            for event in watch_task(str(job.id), app=app, timeout=FOLLOW_TIMEOUT):
                if event.state == "PROGRESS":
                    show(event.progress or 0.0, services.partial_of(event.result) or {})
                if event.final:
                    break
        except TimeoutError:
            self.stderr.write(self.style.WARNING(f"{job.model}: no news for {FOLLOW_TIMEOUT:.0f} s; "
                                                 "the job goes on (see My jobs)"))
            return False
        if event.state != "SUCCESS":
            self.stderr.write(self.style.ERROR(f"{job.model}: training {event.state.lower()}: "
                                               f"{services.describe_error(event.result)}"))
            return False
        self.report(event.result, Path(settings.MODEL_DIR))
        return True

    def report(self, card: dict[str, Any], model_dir: Path) -> None:
        metrics = ", ".join(f"{key} {value}" for key, value in card["metrics"].items())
        self.stdout.write(self.style.SUCCESS(
            f"{card['name']}: {metrics} ({card['epochs']} epochs, {card['train_seconds']} s) "
            f"-> {model_dir / (card['name'] + '.keras')}"))
        sample = card.get("sample")
        if sample:
            self.stdout.write(f"sample (prompt {sample['prompt']!r}, temperature {sample['temperature']}):\n"
                              f"{sample['prompt']}{sample['text']}")
