"""``manage.py train_models``: prints held-out numbers, writes model + card, and reports a
model whose data is missing with the command that installs it while the others still train."""
from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from ml import datasets


def train(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("train_models", *args, stdout=out, stderr=err, verbosity=0)
    return out.getvalue(), err.getvalue()


def test_it_trains_prints_and_records_held_out_accuracy(tmp_path):
    out, _ = train("--model", "digits", "--epochs", "2", "--model-dir", str(tmp_path))
    card = json.loads((tmp_path / "digits.json").read_text())
    assert (tmp_path / "digits.keras").is_file()
    assert f"digits: test_accuracy {card['metrics']['test_accuracy']}" in out
    assert card["epochs"] == 2 and card["test_examples"] == 360
    again, _ = train("--missing", "--model", "digits", "--model-dir", str(tmp_path))
    assert "all models are trained" in again


def test_a_missing_dataset_is_reported_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path / "not-installed")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="not trained: fashion"):
        call_command("train_models", "--model", "digits", "--model", "fashion", "--epochs", "1",
                     "--model-dir", str(tmp_path), stdout=out, stderr=err, verbosity=0)
    assert "fashion: unavailable" in err.getvalue()
    assert "sudo apt-get install dataset-fashion-mnist" in err.getvalue()
    assert "digits: test_accuracy" in out.getvalue()  # everything else still ran
    assert (tmp_path / "digits.keras").is_file() and not (tmp_path / "fashion.keras").exists()


def test_it_refuses_zero_epochs(tmp_path):
    with pytest.raises(CommandError, match="--epochs must be at least 1"):
        train("--epochs", "0", "--model-dir", str(tmp_path))
