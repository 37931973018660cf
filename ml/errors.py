"""Errors the model layer raises; TensorFlow-free so the web process can catch them.

``InvalidInput`` names the field and the limit, ``ModelUnavailable`` carries the command
that fixes it, ``Cancelled`` unwinds a training or generation loop when its job is cancelled.
"""
from __future__ import annotations


class MLError(Exception):
    """Base class of everything ml/ raises on purpose."""


class InvalidInput(MLError, ValueError):
    """A request payload that the model cannot take; ``str()`` names the field and the limit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)  # both args, so Celery can rebuild it from JSON
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class ModelUnavailable(MLError):
    """The model cannot run here: its data or its trained file is missing."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"model {self.name!r} is unavailable: {self.reason}"


class Cancelled(MLError):
    """Raised from a progress callback to stop a long-running loop within one step."""
