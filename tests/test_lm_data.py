"""train/text_data.py: byte tokenizer, .bin files, the 90/10 split, deterministic windows."""

import numpy as np
import pytest

from train import text_data as td


def test_encode_decode_round_trip_utf8():
    text = "Hark! Ünïcödé — 字\n"
    tok = td.encode(text)
    assert tok.dtype == np.uint16 and len(tok) == len(text.encode("utf-8"))
    assert td.decode(tok) == text
    with pytest.raises(ValueError, match="byte tokens"):
        td.decode(np.array([300]))


def test_load_text_and_bin(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello world", encoding="utf-8")
    tok, vocab = td.load_tokens(str(p))
    assert vocab == 256 and td.decode(tok) == "hello world"
    b = tmp_path / "t.bin"
    arr = np.array([5, 50000, 7, 1], np.uint16)
    arr.tofile(b)
    tok, vocab = td.load_tokens(str(b))
    np.testing.assert_array_equal(tok, arr)
    assert vocab == 50001
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        td.load_tokens(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        td.load_tokens(str(tmp_path / "missing.txt"))


def test_split_is_last_ten_percent():
    tok = np.arange(1000, dtype=np.uint16)
    train, val = td.split(tok, 8)
    np.testing.assert_array_equal(train, tok[:900])
    np.testing.assert_array_equal(val, tok[900:])
    with pytest.raises(ValueError, match="validation split has 100 tokens"):
        td.split(tok, 200)


def test_batches_are_windows_deterministic_and_split_by_process():
    tok = np.arange(5000, dtype=np.uint16)
    b = td.batch_at(tok, seed=3, step=7, batch_size=8, block_size=16)
    assert b["x"].shape == (8, 16) and b["x"].dtype == np.int32
    np.testing.assert_array_equal(b["y"], b["x"] + 1)  # y is x shifted by one token
    assert np.all(np.diff(b["x"], axis=1) == 1)  # contiguous windows
    again = td.batch_at(tok, seed=3, step=7, batch_size=8, block_size=16)
    np.testing.assert_array_equal(again["x"], b["x"])
    other = td.batch_at(tok, seed=3, step=8, batch_size=8, block_size=16)
    assert not np.array_equal(other["x"], b["x"])
    parts = [td.batch_at(tok, seed=3, step=7, batch_size=8, block_size=16, process_index=i,
                         process_count=2)["x"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), b["x"])
    v1 = [x["x"] for x in td.val_batches(tok, seed=0, num_batches=2, batch_size=4, block_size=8)]
    v2 = [x["x"] for x in td.val_batches(tok, seed=0, num_batches=2, batch_size=4, block_size=8)]
    np.testing.assert_array_equal(v1, v2)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        td.batch_at(tok, seed=0, step=0, batch_size=8, block_size=4, process_count=3)
