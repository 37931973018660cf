"""Celery queue names the site routes tasks to (no Django here: settings imports this module)."""
from __future__ import annotations

#: Queue of everything that runs a model (consumed by GPU hosts; a CPU-only host consumes it too).
GPU_QUEUE = "gpu"
