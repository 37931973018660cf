"""Training progress as the site shows it (epoch k of n, running loss/accuracy, time left), and
trainings in one worker process taking turns, first come first served, the waiting one saying so."""
from __future__ import annotations

import threading

import pytest

from ml import training
from ml.errors import Cancelled
from ml.progress import describe, duration, eta
from ml.serving import ModelHost
from ml.training import ProgressCallback

#: Epochs of the real digits model trained here (1,437 images: about a second each on 2 cores).
EPOCHS = 3


def test_each_epoch_reports_its_number_metrics_and_time_left(tmp_path):
    reports: list[tuple[float, dict]] = []
    card = ModelHost(tmp_path).train("digits", EPOCHS, on_progress=lambda p, meta: reports.append((p, meta)))
    assert all(meta["stage"] == "training" and meta["epochs"] == EPOCHS for _, meta in reports)
    epoch_ends = {meta["epoch"]: (percent, meta) for percent, meta in reports
                  if percent == round(100 * meta["epoch"] / EPOCHS, 1)}
    assert sorted(epoch_ends) == list(range(1, EPOCHS + 1))
    assert all(meta["eta_seconds"] > 0 for _, meta in list(epoch_ends.values())[:-1])
    last_percent, last = reports[-1]
    assert last_percent == 100.0 and last["eta_seconds"] == 0.0
    assert {"loss", "accuracy"} <= set(last["metrics"]) and 0 <= last["metrics"]["accuracy"] <= 1
    line = describe(last)
    assert line.startswith(f"epoch {EPOCHS} of {EPOCHS} · ") and "loss " in line and line.endswith("about 0 s left")
    assert card["epochs"] == EPOCHS and (tmp_path / "digits.keras").is_file()


def test_every_point_of_progress_is_reported_once(monkeypatch):
    """A mid-epoch report on an epoch's last batch would repeat the epoch end's (cc2 at fc62d6e: under
    load the first epoch's last batch came 2 s after the previous report: epoch 1 at 33.3% twice)."""
    monkeypatch.setattr(training, "MID_EPOCH_REPORT_SECONDS", 0.0)  # a report after every batch
    reports: list[tuple[float, int]] = []
    callback = ProgressCallback(lambda percent, meta: reports.append((percent, meta["epoch"])), epochs=2,
                                steps_per_epoch=4)
    callback.on_train_begin()
    for epoch in range(2):
        callback.on_epoch_begin(epoch)
        for batch in range(4):
            callback.on_train_batch_end(batch, {"loss": 1.0})
        callback.on_epoch_end(epoch, {"loss": 1.0})
    assert reports == [(12.5, 1), (25.0, 1), (37.5, 1), (50.0, 1), (62.5, 2), (75.0, 2), (87.5, 2), (100.0, 2)]


def test_time_left_follows_the_pace_and_reads_as_words():
    assert eta(0.5, 10.0) == 10.0
    assert eta(0.6, 10.0, since_fraction=0.1) == 8.0  # the start-up before 10% done is left out
    assert eta(0.1, 5.0, since_fraction=0.1) is None
    assert [duration(s) for s in (None, 8.4, 200, 7300)] == ["?", "8 s", "3 min", "2 h 2 min"]
    assert describe({"stage": "waiting", "behind": "digits"}) == "waiting for digits to finish training"
    assert describe({"stage": "training", "epoch": 2, "epochs": 8, "metrics": {"accuracy": 0.9312, "loss": 0.21},
                     "eta_seconds": 95}) == "epoch 2 of 8 · accuracy 93.1% · loss 0.2100 · about 2 min left"


def test_a_second_training_waits_its_turn_and_says_for_whom(tmp_path):
    host = ModelHost(tmp_path)
    first_started, events = threading.Event(), []

    def first(percent, meta):
        events.append(("first", meta.get("stage")))
        first_started.set()

    thread = threading.Thread(target=host.train, args=("digits", EPOCHS), kwargs={"on_progress": first})
    thread.start()
    assert first_started.wait(120)
    second = host.train("digits", 1, on_progress=lambda p, meta: events.append(("second", meta.get("stage"))),
                        only_missing=False)
    thread.join(120)
    assert ("second", "waiting") in events
    assert events.index(("second", "waiting")) < events.index(("second", "training"))
    second_training = events.index(("second", "training"))
    assert ("first", "training") not in events[second_training:]  # never interleaved
    assert second["epochs"] == 1


def test_only_missing_keeps_a_trained_model(tmp_path):
    trained = ModelHost(tmp_path).train("digits", 1)
    calls = []
    again = ModelHost(tmp_path).train("digits", 5, on_progress=lambda p, m: calls.append(m), only_missing=True)
    assert again == trained and calls == []


def test_a_waiting_training_that_is_cancelled_leaves_the_line(tmp_path):
    host = ModelHost(tmp_path)
    started = threading.Event()
    thread = threading.Thread(target=host.train, args=("digits", EPOCHS),
                              kwargs={"on_progress": lambda p, m: started.set()})
    thread.start()
    assert started.wait(120)

    def cancel(percent, meta):
        raise Cancelled("job")

    with pytest.raises(Cancelled):
        host.train("digits", 1, on_progress=cancel)
    thread.join(120)
    assert host.train("digits", 1)["epochs"] == 1  # the line is free again


def test_train_models_prints_the_progress_the_pages_show(tmp_path):
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("train_models", "--model", "digits", "--epochs", "2", "--model-dir", str(tmp_path),
                 stdout=out, stderr=io.StringIO(), verbosity=1)
    lines = out.getvalue().splitlines()
    assert "digits: [100.0%] epoch 2 of 2 · " in "\n".join(lines)
    assert any(line.startswith("digits: [ 50.0%] epoch 1 of 2 · ") and line.endswith(" left") for line in lines)
    assert any(line.startswith("digits: test_accuracy ") for line in lines)
