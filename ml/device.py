"""Pick the device TensorFlow runs on, once per process, and say which in the log.

GPUs get memory growth (so several workers can share one card); mixed precision is
optional (``DEEPHARDWAY_MIXED_PRECISION=1``) and applies to models built afterwards.
"""
from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)

#: Environment switch for float16 compute on GPUs (training; saved float32 models load as float32).
MIXED_PRECISION_ENV = "DEEPHARDWAY_MIXED_PRECISION"

_lock = threading.Lock()
_description: str | None = None


def configure(mixed_precision: bool | None = None) -> str:
    """Configure TensorFlow's devices (idempotent) and return what it will run on."""
    global _description
    with _lock:
        if _description is None:
            if mixed_precision is None:
                mixed_precision = os.environ.get(MIXED_PRECISION_ENV, "0").lower() in ("1", "true", "yes", "on")
            _description = _setup(mixed_precision)
            logger.info(_description)
        return _description


def _setup(mixed_precision: bool) -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"no GPU visible; running on CPU ({os.cpu_count()} cores)"
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # raised when the GPU was initialised before us
            logger.warning("could not enable memory growth on %s: %s", gpu.name, exc)
    names = ", ".join(_gpu_name(tf, gpu) for gpu in gpus)
    if mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    return f"using GPU {names} (memory growth on, mixed precision {'on' if mixed_precision else 'off'})"


def _gpu_name(tf, gpu) -> str:
    try:
        return tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
    except (RuntimeError, ValueError):
        return gpu.name
