"""Token data for ``train/lm.py``: a byte-level tokenizer for any UTF-8 text file (no download, no
vocabulary file: token = byte, vocabulary 256) and pre-tokenized ``uint16`` ``.bin`` files (the
nanoGPT / GPT-2 pretraining layout: a flat little-endian array of token ids, read by ``np.memmap``).

Split: the first 90% of the tokens train, the last 10% validate (:func:`split`).

Batches are random contiguous windows: the ``B`` windows of step ``s`` start at positions drawn by
``np.random.default_rng([seed, s])``, so a batch is a function of ``(seed, step)`` alone and a run
resumed at step ``s`` reads exactly what an unbroken run reads. Each process takes its own rows of
the global batch (multi-host). Validation uses a fixed set of windows (the same at every
evaluation), drawn from the rng streams ``VAL_STREAM - i``, which no training step uses.
"""

from __future__ import annotations

import os

import numpy as np

BYTE_VOCAB = 256
VAL_FRACTION = 0.1
VAL_STREAM = 2**31 - 1  # the rng stream of the validation windows (never a training step)


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of ``text`` as uint16 token ids ``(len,)``."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)


def decode(tokens) -> str:
    """Inverse of :func:`encode` (invalid UTF-8 sequences, e.g. a cut multi-byte character, are
    replaced by U+FFFD)."""
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= BYTE_VOCAB):
        raise ValueError(f"byte tokens must lie in [0, {BYTE_VOCAB}), got [{t.min()}, {t.max()}]")
    return t.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def load_tokens(path: str) -> tuple[np.ndarray, int]:
    """``(tokens, vocab_size)`` of ``path``: a ``.bin`` file -> its uint16 tokens (memory-mapped)
    and vocab ``max + 1``; any other file -> UTF-8 text as bytes and vocab 256."""
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    if path.endswith(".bin"):
        size = os.path.getsize(path)
        if size % 2:
            raise ValueError(f"{path!r} has an odd size ({size} bytes): not a uint16 token file")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
        return tokens, int(tokens.max()) + 1 if tokens.size else 0
    with open(path, "rb") as f:
        raw = f.read()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text ({e}); pass a uint16 .bin token file "
                         "for pre-tokenized data") from None
    return np.frombuffer(raw, np.uint8).astype(np.uint16), BYTE_VOCAB


def split(tokens: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): the first 90% and the last 10% of ``tokens``; each must hold more than one
    window of ``block_size + 1`` tokens."""
    n = len(tokens)
    cut = int(n * (1 - VAL_FRACTION))
    train, val = tokens[:cut], tokens[cut:]
    for name, part in (("train", train), ("validation", val)):
        if len(part) <= block_size + 1:
            raise ValueError(f"the {name} split has {len(part)} tokens, not more than one window "
                             f"of block_size + 1 = {block_size + 1}; use more data or a smaller "
                             "--block-size")
    return train, val


def _windows(tokens, starts, block_size):
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]
    w = np.asarray(tokens[idx.reshape(-1)], np.int32).reshape(len(starts), block_size + 1)
    return w[:, :-1], w[:, 1:]


def batch_at(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, block_size: int,
             process_index: int = 0, process_count: int = 1) -> dict:
    """This process's rows of the global training batch of ``step``: ``{"x", "y"}`` int32
    ``(batch_size / process_count, block_size)``, ``y`` = ``x`` shifted by one token."""
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    local = batch_size // process_count
    x, y = _windows(tokens, starts[process_index * local:(process_index + 1) * local], block_size)
    return {"x": x, "y": y}


def val_batches(tokens: np.ndarray, *, seed: int, num_batches: int, batch_size: int,
                block_size: int, process_index: int = 0, process_count: int = 1):
    """The fixed validation windows: ``num_batches`` batches (this process's rows), the same at
    every call with the same arguments."""
    for i in range(num_batches):
        yield batch_at(tokens, seed=seed, step=VAL_STREAM - i, batch_size=batch_size,
                       block_size=block_size, process_index=process_index,
                       process_count=process_count)
