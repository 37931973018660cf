"""``manage.py train_models``: train the models into MODEL_DIR with progress bars.

Prints each model's held-out accuracy or validation loss (also written to its JSON model
card). A model whose data is not installed is reported with the command that installs it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from ml import registry
from ml.errors import ModelUnavailable


class Command(BaseCommand):
    help = "Train the models (all, or --model NAME) into MODEL_DIR and write their model cards."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--model", action="append", choices=list(registry.MODELS), dest="models",
                            help="model to train (repeatable; default: all)")
        parser.add_argument("--epochs", type=int, help="epochs (default: each model's own)")
        parser.add_argument("--missing", action="store_true", help="only models without a trained file")
        parser.add_argument("--model-dir", type=Path, help="output directory (default: settings.MODEL_DIR)")

    def handle(self, *args: Any, models: list[str] | None, epochs: int | None, missing: bool,
               model_dir: Path | None, verbosity: int, **options: Any) -> None:
        if epochs is not None and epochs < 1:
            raise CommandError("--epochs must be at least 1")
        model_dir = Path(model_dir or settings.MODEL_DIR)
        names = models or list(registry.MODELS)
        todo = [n for n in names if not (missing and registry.MODELS[n].is_trained(model_dir))]
        if not todo:
            self.stdout.write(f"all models are trained ({model_dir})")
            return
        failed = [name for name in todo if not self.train_one(name, model_dir, epochs, verbosity)]
        if failed and models:
            raise CommandError(f"not trained: {', '.join(failed)}")

    def train_one(self, name: str, model_dir: Path, epochs: int | None, verbosity: int) -> bool:
        """Train one model and print its card's numbers; False when it is unavailable here."""
        spec = registry.MODELS[name]
        ok, reason = spec.available()
        if not ok:
            self.stderr.write(self.style.WARNING(f"{name}: unavailable - {reason}"))
            return False
        self.stdout.write(self.style.MIGRATE_HEADING(f"==> training {name}: {spec.data_source}"))
        from ml.serving import ModelHost  # imports TensorFlow only now

        keras_verbose = 0 if verbosity == 0 else (1 if sys.stdout.isatty() else 2)
        try:
            card = ModelHost(model_dir).train(name, epochs, verbose=keras_verbose)
        except ModelUnavailable as exc:
            self.stderr.write(self.style.WARNING(f"{name}: unavailable - {exc.reason}"))
            return False
        self.report(card, model_dir)
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
