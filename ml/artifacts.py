"""Model files: ``<dir>/<name>.keras`` plus a JSON model card ``<dir>/<name>.json``.

Both are written to a temporary name and renamed, so a crash never leaves half a model.
Reading cards needs no TensorFlow (the web process lists them); saving and loading do.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def model_path(model_dir: Path | str, name: str) -> Path:
    return Path(model_dir) / f"{name}.keras"


def card_path(model_dir: Path | str, name: str) -> Path:
    return Path(model_dir) / f"{name}.json"


def is_trained(model_dir: Path | str, name: str) -> bool:
    return model_path(model_dir, name).is_file() and card_path(model_dir, name).is_file()


def read_card(model_dir: Path | str, name: str) -> dict[str, Any] | None:
    """The model card, or None when the model has not been trained (or the card is unreadable)."""
    try:
        return json.loads(card_path(model_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _temporary(path: Path) -> Path:
    # Keras insists on the .keras suffix, so the marker goes before it.
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_card(name: str, *, data_source: str, metrics: dict[str, float], started: float,
              **extra: Any) -> dict[str, Any]:
    """A model card: what the model learnt from, how well it does, when and with what."""
    import keras
    import tensorflow as tf

    return {
        "name": name,
        "data_source": data_source,
        "metrics": {key: round(float(value), 4) for key, value in metrics.items()},
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "train_seconds": round(time.monotonic() - started, 1),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        **extra,
    }


def save(model: Any, card: dict[str, Any], model_dir: Path | str) -> Path:
    """Write the .keras file then its card, each atomically; returns the model path."""
    path = model_path(model_dir, card["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(card_path(model_dir, card["name"]), card)
    logger.info("saved %s (%s)", path, card.get("metrics"))
    return path


def load(model_dir: Path | str, name: str) -> Any:
    """Load ``<name>.keras`` for inference (no optimizer state needed)."""
    import keras

    path = model_path(model_dir, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python manage.py train_models --model {name}`")
    return keras.saving.load_model(path, compile=False)
