"""The three models, trained tiny: a saved file predicts exactly what the trained model did,
the model card says what it learnt from and how well, and the text generator's compiled
stateful steps agree with re-running the whole window."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from ml import artifacts, datasets, digits, fashion, text
from ml.serving import ModelHost
from tests.ml.tiny import drawing_of, png_data_url


def assert_card(card: dict, name: str, metric: str, model_dir) -> None:
    on_disk = json.loads(artifacts.card_path(model_dir, name).read_text())
    assert on_disk == card
    assert card["name"] == name and card["tensorflow"] == tf.__version__
    assert 0 <= card["metrics"][metric] and card["trained_at"] and card["data_source"]
    assert not list(model_dir.glob(".*tmp*"))  # nothing half-written left behind


@pytest.mark.parametrize("module", [digits, fashion], ids=["digits", "fashion"])
def test_it_saves_loads_and_predicts_the_same_classifier(module, model_dir, request):
    card = request.getfixturevalue(f"{module.NAME}_card")
    assert_card(card, module.NAME, "test_accuracy", model_dir)
    split = datasets.digits() if module is digits else datasets.fashion()
    loaded = module.load(model_dir)
    again = module.load(model_dir)
    batch = split.x_test[:16]
    probabilities = module.predict(loaded, batch)
    assert probabilities.shape == (16, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(probabilities, module.predict(again, batch))
    # One at a time gives the batch's answers: batching changes nothing for a caller.
    singles = np.concatenate([module.predict(loaded, batch[i:i + 1]) for i in range(4)])
    assert np.allclose(singles, probabilities[:4], atol=1e-5)


def test_it_serves_a_drawing_through_the_host(digits_card, model_dir):
    host = ModelHost(model_dir, batch_window_ms=1)
    drawing = drawing_of(datasets.digits().x_test[0, :, :, 0], 20, (280, 280), (40, 60))
    result = host.run("digits", {"image": png_data_url(drawing)})
    probabilities = [entry["probability"] for entry in result["top"]]
    assert len(result["top"]) == 5 and probabilities == sorted(probabilities, reverse=True)
    assert {entry["label"] for entry in result["top"]} <= set("0123456789")
    assert np.array(result["seen"]).shape == (8, 8)
    json.dumps(result)
    host.close()


def test_it_says_how_to_get_an_untrained_model(tmp_path):
    from ml.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="train_models --model digits"):
        ModelHost(tmp_path).run("digits", {"pixels": [1.0] * 64})


def test_it_saves_loads_and_generates_the_same_text(text_card, model_dir):
    assert_card(text_card, "text", "validation_loss_nats_per_char", model_dir)
    assert text_card["alphabet"] == text.ALPHABET and isinstance(text_card["sample"]["text"], str)
    first, second = text.load(model_dir), text.load(model_dir)
    ids = text.encode("Who's there?\nNay, answer me")[None]
    assert np.array_equal(text.predict(first, ids), text.predict(second, ids))
    a = "".join(text.generate(first, "To be", 60, 0.9, seed=7))
    b = "".join(text.generate(second, "To be", 60, 0.9, seed=7))
    assert a == b and len(a) == 60


def test_the_stateful_generator_matches_rerunning_the_whole_window(text_card, model_dir):
    model = text.load(model_dir)
    prompt, steps, temperature, seed = "Friends to this ground", 12, 1.3, 11
    ids = list(text.encode(prompt))
    gen = text.generator(model)
    logits, _ = gen.prime(tf.constant([ids]), gen.zero_state(1))
    reference_logits = text.predict(model, np.array([ids]))[0, -1]
    assert np.allclose(logits.numpy()[0], reference_logits, atol=1e-4)
    expected = []
    for i in range(steps):  # the slow way: the whole window through the model for every character
        last = text.predict(model, np.array([ids]))[0, -1]
        draw = tf.random.stateless_categorical(tf.constant([last]) / temperature, 1, tf.constant([seed, i]),
                                               dtype=tf.int32)
        ids.append(int(draw[0, 0]))
        expected.append(ids[-1])
    streamed = list(text.generate(model, prompt, steps, temperature, seed=seed, chunk=5))
    assert [len(chunk) for chunk in streamed] == [5, 5, 2]
    assert "".join(streamed) == text.decode(expected)


def test_it_streams_generation_progress_and_suggests_words(text_card, model_dir):
    host = ModelHost(model_dir)
    reports = []
    result = host.run("text", {"prompt": "ROMEO.", "length": 60, "temperature": 0.5, "seed": 3},
                      on_progress=lambda percent, meta: reports.append((percent, meta["text"])))
    assert len(result["text"]) == 60 and result["seed"] == 3
    assert [p for p, _ in reports] == [41.7, 83.3, 100.0]
    assert reports[-1][1] == result["text"] and result["text"].startswith(reports[0][1])
    suggestions = host.run("text", {"mode": "suggest", "prompt": "What is the "})["suggestions"]
    assert 1 <= len(suggestions) <= 5
    assert all(s["word"] and set(s["word"]) <= text.WORD_CHARS for s in suggestions)
    probabilities = [s["probability"] for s in suggestions]
    assert probabilities == sorted(probabilities, reverse=True)
    host.close()


def test_higher_temperature_gives_more_varied_text(text_card, model_dir):
    model = text.load(model_dir)
    cold = "".join(text.generate(model, "The ", 300, 0.1, seed=1))
    hot = "".join(text.generate(model, "The ", 300, 2.0, seed=1))
    assert len(set(hot)) > len(set(cold))
