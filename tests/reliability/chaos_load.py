"""The chaos test's steady mixed load: early-ack, acks-late, batched, countdown, cancellable and chord tasks,
each recorded in the :class:`~tests.reliability.chaos_check.History` once Celery accepted it."""
from __future__ import annotations

import logging
import random
import threading
import time
import uuid

from celery import chord

from tests.reliability import counting_app
from tests.reliability.chaos_check import History
from tests.reliability.counting import PUBLISH_RETRY_POLICY

logger = logging.getLogger(__name__)

#: What is sent, how often (relative weights); "batch" sends a burst, "chord" a header and its callback.
KINDS = {"early": 2, "late": 3, "batch": 2, "countdown": 1, "steps": 1, "chord": 1}
#: Seconds between two sends, drawn uniformly (about 2.5 sends, 5 tasks a second).
SEND_GAP = (0.2, 0.6)
#: Seconds a task takes, drawn uniformly; "steps" tasks run long enough to be terminated.
TASK_SECONDS = (0.1, 1.0)
STEPS_SECONDS = (2.0, 5.0)
#: Countdown drawn uniformly (seconds).
COUNTDOWN = (0.5, 5.0)
BATCH_BURST = (2, 5)
CHORD_PARTS = (3, 5)


class MixedLoad(threading.Thread):
    """Sends a random mix of :data:`KINDS` until :meth:`stop`; publishes retry through etcd outages."""

    def __init__(self, history: History, rng: random.Random) -> None:
        super().__init__(name="chaos-load", daemon=True)
        self.history, self.rng = history, rng
        self._stopped = threading.Event()
        self._chord_parts: list[str] = []

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while not self._stopped.is_set():
            kind = self.rng.choices(kinds, weights)[0]
            getattr(self, f"_send_{kind}")()
            self._stopped.wait(self.rng.uniform(*SEND_GAP))

    def retry_errback(self, exc: Exception, interval: float) -> None:
        """For the app's publish retry policy: a chord's header is published with it (an errback given to
        the chord itself would be serialized into its messages)."""
        if threading.current_thread() is self:
            self.history.publish_retried(self._chord_parts)

    def _retry_policy(self, tasks: list[str]) -> dict:
        """The fault tests' publish retry policy, recording each retry of ``tasks`` in the history."""
        return {**PUBLISH_RETRY_POLICY, "errback": lambda exc, interval: self.history.publish_retried(tasks)}

    def _publish(self, task, kind: str, seconds: float, **options) -> None:
        task_id = uuid.uuid4().hex
        try:
            task.apply_async((seconds,), task_id=task_id, retry=True, retry_policy=self._retry_policy([task_id]),
                             **options)
        except Exception as exc:  # noqa: BLE001 - the caller saw an error: refused, not lost
            logger.warning("publish of %s refused: %r", task_id, exc)
            self.history.refuse(task_id, repr(exc))
        else:
            self.history.accepted(task_id, kind)

    def _seconds(self) -> float:
        return self.rng.uniform(*TASK_SECONDS)

    def _send_early(self) -> None:
        self._publish(counting_app.work_early, "early", self._seconds())

    def _send_late(self) -> None:
        self._publish(counting_app.work, "late", self._seconds())

    def _send_batch(self) -> None:
        for _ in range(self.rng.randint(*BATCH_BURST)):
            self._publish(counting_app.work_batch, "batch", self._seconds())

    def _send_steps(self) -> None:
        self._publish(counting_app.work_steps, "steps", self.rng.uniform(*STEPS_SECONDS))

    def _send_countdown(self) -> None:
        countdown, task_id = self.rng.uniform(*COUNTDOWN), uuid.uuid4().hex
        eta = time.time() + countdown  # Celery's own ETA is computed a moment later
        try:
            counting_app.work.apply_async((self._seconds(),), task_id=task_id, countdown=countdown, retry=True,
                                          retry_policy=self._retry_policy([task_id]))
        except Exception as exc:  # noqa: BLE001
            logger.warning("publish of %s refused: %r", task_id, exc)
            self.history.refuse(task_id, repr(exc))
        else:
            self.history.accepted(task_id, "countdown", eta=eta)

    def _send_chord(self) -> None:
        parts = [uuid.uuid4().hex for _ in range(self.rng.randint(*CHORD_PARTS))]
        callback = uuid.uuid4().hex
        header = [counting_app.work.s(self._seconds()).set(task_id=part) for part in parts]
        try:
            self._chord_parts = parts  # a retry of their publish goes through retry_errback (the app's policy)
            chord(header)(counting_app.collect.s().set(task_id=callback))
        except Exception as exc:  # noqa: BLE001 - some parts may have gone out: none counts as accepted
            logger.warning("publish of chord %s refused: %r", callback, exc)
            for task in [*parts, callback]:
                self.history.refuse(task, repr(exc))
        else:
            for part in parts:
                self.history.accepted(part, "part")
            self.history.accepted(callback, "callback", parts=parts)
