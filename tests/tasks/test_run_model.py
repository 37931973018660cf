"""run_model and train_model in a real worker over our etcd broker and result backend:
results, streamed progress, bad input, cancellation while running and while queued."""
from __future__ import annotations

import re
import threading

import pytest

from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from jobs.queues import GPU_QUEUE
from tests.helpers import wait_until
from tests.ml.tiny import drawing_of, png_data_url

#: Real worker processes importing TensorFlow, and tiny models trained for them.
pytestmark = pytest.mark.slow

RUN = "jobs.tasks.run_model"
#: What the worker logs when it stops a cancelled task (jobs.tasks, or the backend at a progress write).
STOPPED = re.compile(r"cancelled[;:] stopping")
TRAIN = "jobs.tasks.train_model"


def a_drawn_digit() -> str:
    from ml import datasets

    return png_data_url(drawing_of(datasets.digits().x_test[3, :, :, 0], 25, (280, 280), (30, 40)))


def follow(result, timeout: float = 60) -> list[dict]:
    """Wait for the task to finish, collecting every PROGRESS meta pushed on the way."""
    seen: list[dict] = []
    result.get(timeout=timeout, propagate=False,
               on_message=lambda message: message["status"] == "PROGRESS" and seen.append(message["result"]))
    return seen


def test_a_worker_classifies_concurrent_drawings(client, model_worker, etcd_url, etcd_prefix):
    worker = model_worker()
    results = [client.send_task(RUN, args=["digits", {"image": a_drawn_digit()}]) for _ in range(12)]
    for result in results:
        answer = result.get(timeout=60)
        probabilities = [entry["probability"] for entry in answer["top"]]
        assert len(answer["top"]) == 5 and probabilities == sorted(probabilities, reverse=True)
        assert len(answer["seen"]) == 8
    assert "no GPU visible; running on CPU" in worker.log()
    assert worker.log().count("loaded digits from") == 1  # loaded once, then kept warm
    warm = [client.send_task(RUN, args=["digits", {"image": a_drawn_digit()}]) for _ in range(3)]
    assert all(len(result.get(timeout=60)["top"]) == 5 for result in warm)
    keys, etcd = KeySpace(etcd_prefix), get_client(etcd_url)
    writes = []
    for result in results + warm:
        _, meta = etcd.get(keys.result(result.id))
        writes.append(meta.version)
        left = etcd.call("Range", ops.range_request(keys.unacked(GPU_QUEUE), prefix=True, revision=meta.mod_revision))
        assert not any(result.id.encode() in kv.value for kv in left.kvs)  # acked by the SUCCESS write itself
    # A warm job is shorter than started_delay: SUCCESS is its one result write (no STARTED).
    assert 1 in writes[-3:]


def test_bad_input_fails_the_task_naming_the_field(client, model_worker):
    model_worker()
    blank = client.send_task(RUN, args=["digits", {"pixels": [0.0] * 64}])
    with pytest.raises(Exception, match="pixels: no drawing found"):
        blank.get(timeout=60)
    assert blank.state == "FAILURE"
    unknown = client.send_task(RUN, args=["poetry", {"prompt": "x"}])
    with pytest.raises(Exception, match="unknown model 'poetry'"):
        unknown.get(timeout=60)


def test_text_generation_streams_progress_then_the_whole_text(client, model_worker):
    model_worker()
    result = client.send_task(RUN, args=["text", {"prompt": "ROMEO.\n", "length": 300, "seed": 4}])
    progress = follow(result)
    final = result.get(timeout=1)
    assert result.state == "SUCCESS" and len(final["text"]) == 300 and final["seed"] == 4
    assert progress, "no PROGRESS was pushed"
    percents = [meta["progress"] for meta in progress]
    assert percents == sorted(percents) and 0 < percents[0] < 100
    assert all(final["text"].startswith(meta["text"]) for meta in progress)


def cancel_on_first_progress(client, result, cancel) -> dict:
    """Follow ``result``; at its first PROGRESS call ``cancel()``; count what came after."""
    seen: dict = {"before": [], "after": []}
    cancelled = threading.Event()

    def on_message(message: dict) -> None:
        if message["status"] != "PROGRESS":
            return
        seen["after" if cancelled.is_set() else "before"].append(message["result"])
        if not cancelled.is_set():
            cancel()
            cancelled.set()

    result.get(timeout=60, propagate=False, on_message=on_message)
    return seen


def test_a_running_generation_stops_at_its_next_step_when_cancelled(client, model_worker):
    worker = model_worker()
    result = client.send_task(RUN, args=["text", {"prompt": "KING.\n", "length": 1000, "seed": 1}])
    seen = cancel_on_first_progress(client, result, lambda: client.backend.request_cancel(result.id))
    assert result.state == "REVOKED"
    assert len(seen["before"][-1]["text"]) < 1000
    # The marker is in etcd when request_cancel returns; the worker checks it before every step.
    assert len(seen["after"]) <= 3, [len(meta["text"]) for meta in seen["after"]]
    wait_until(lambda: STOPPED.search(worker.log()), timeout=10, message="worker logged the cancel")


def test_a_revoke_broadcast_stops_a_running_generation(client, model_worker):
    # One character per step: the generation outlasts the broadcast's trip through the broker.
    worker = model_worker(TEXT_CHUNK_CHARS="1")
    result = client.send_task(RUN, args=["text", {"prompt": "KING.\n", "length": 1000, "seed": 1}])
    seen = cancel_on_first_progress(client, result, lambda: client.control.revoke(result.id))
    assert result.state == "REVOKED"
    assert len((seen["after"] or seen["before"])[-1]["text"]) < 1000, "the generation ran to the end"
    wait_until(lambda: STOPPED.search(worker.log()), timeout=10, message="worker logged the cancel")


def test_a_job_cancelled_while_queued_never_starts(client, model_worker):
    result = client.send_task(RUN, args=["text", {"prompt": "A", "length": 1000}])
    client.control.revoke(result.id)  # no worker is listening: this broadcast is lost
    client.backend.request_cancel(result.id)  # ... but the marker in etcd is not
    worker = model_worker()
    wait_until(lambda: f"{result.id}" in worker.log(), timeout=30, message="worker received the task")
    assert follow(result, timeout=30) == []  # not one PROGRESS: it never ran
    assert result.state == "REVOKED"
    assert "loaded text" not in worker.log()


def test_an_admin_retrains_a_model_through_the_queue(client, model_worker, tmp_path, task_models):
    import shutil

    for name in ("digits.keras", "digits.json"):
        shutil.copy(task_models / name, tmp_path / name)
    model_worker(model_dir=tmp_path)
    before = client.send_task(RUN, args=["digits", {"image": a_drawn_digit()}]).get(timeout=60)
    result = client.send_task(TRAIN, args=["digits", 3])
    progress = follow(result, timeout=120)
    card = result.get(timeout=1)
    epochs = [meta["epoch"] for meta in progress if meta["progress"] == round(100 * meta["epoch"] / 3, 1)]
    assert epochs == [1, 2, 3] and progress[-1]["progress"] == 100.0
    # sklearn's 1437 training digits less a validation tenth, plus augmented and pen-stroke digits (ml/digits.py)
    assert card["epochs"] == 3 and card["train_examples"] > 1437 and card["metrics"]["test_accuracy"] > 0.5
    after = client.send_task(RUN, args=["digits", {"image": a_drawn_digit()}]).get(timeout=60)
    assert after["top"] != before["top"]  # the worker now serves the retrained model
