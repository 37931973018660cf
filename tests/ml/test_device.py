"""Device selection: the CPU path for real, the GPU path with TensorFlow's device list faked
(no GPU here): memory growth on every GPU, optional mixed precision, and a log line saying which."""
from __future__ import annotations

import logging

import keras
import pytest
import tensorflow as tf

from ml import device


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(device, "_description", None)
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_without_a_gpu_it_runs_on_the_cpu_and_says_so(fresh, caplog):
    caplog.set_level(logging.INFO, logger="ml.device")
    assert device.configure().startswith("no GPU visible; running on CPU")
    assert "no GPU visible; running on CPU" in caplog.text


def test_with_a_gpu_it_turns_on_memory_growth_and_optional_mixed_precision(fresh, monkeypatch, caplog):
    gpus = [tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")]
    growth = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "set_memory_growth", lambda gpu, on: growth.append((gpu.name, on)))
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda gpu: {"device_name": "NVIDIA H100"})
    monkeypatch.setenv(device.MIXED_PRECISION_ENV, "1")
    caplog.set_level(logging.INFO, logger="ml.device")
    description = device.configure()
    assert description == "using GPU NVIDIA H100 (memory growth on, mixed precision on)"
    assert growth == [("/physical_device:GPU:0", True)]
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert description in caplog.text
    assert device.configure() == description  # once per process
