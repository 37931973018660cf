"""What the site puts in the Celery messages it sends (no Django here: benchmarks send the same)."""
from __future__ import annotations

from typing import Any

#: Longest text shown as is in a task's argsrepr; longer ones are shown by their length.
ARGSREPR_TEXT_CHARS = 80


def run_model_argsrepr(model: str, payload: Any) -> str:
    """What logs, events and Flower show of a ``run_model`` call: the model and the payload's
    shape, not thousands of pixel values (Celery would build that repr for every task, in the
    web process and again in the worker's log lines)."""
    if isinstance(payload, dict):
        fields = ", ".join(f"{key!r}: {_describe(value)}" for key, value in payload.items())
        return f"[{model!r}, {{{fields}}}]"
    return f"[{model!r}, {_describe(payload)}]"


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return f"<{len(value)} items>"
    if isinstance(value, str) and len(value) > ARGSREPR_TEXT_CHARS:
        return f"<{len(value)} characters>"
    return repr(value)
