"""Tiny trained models in a session temp dir, trained once and shared by tests/ml."""
from __future__ import annotations

import pytest

from tests.ml.tiny import skip_without_fashion, train_tiny


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def digits_card(model_dir) -> dict:
    return train_tiny("digits", model_dir)


@pytest.fixture(scope="session")
def fashion_card(model_dir) -> dict:
    skip_without_fashion()
    return train_tiny("fashion", model_dir)


@pytest.fixture(scope="session")
def text_card(model_dir) -> dict:
    return train_tiny("text", model_dir)
