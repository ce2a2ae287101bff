"""train.checkpoint: checksums verified at restore, fallback to the newest checkpoint that
verifies, damaged metadata named, a model that does not fit named by array and shapes."""

import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from train.checkpoint import Checkpointer, CheckpointError, CorruptCheckpoint, checksums


def _state(value):
    rng = np.random.default_rng(value)
    return {"params": {"w": jnp.asarray(rng.normal(size=(64, 256)).astype(np.float32))},
            "step": jnp.asarray(value, jnp.int32)}


def _two_checkpoints(directory):
    c = Checkpointer(str(directory), keep=3)
    c.save(3, _state(3), {"epoch": 1})
    c.save(6, _state(6), {"epoch": 2})
    c.close()
    return Checkpointer(str(directory), keep=3)


def _largest_data_file(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and "/d/" in f]
    return max(files, key=os.path.getsize)


def test_checksums_are_per_array_and_change_with_one_bit():
    s = _state(1)
    a = checksums(s)
    assert sorted(a) == ["['params']['w']", "['step']"]
    w = np.asarray(s["params"]["w"]).copy()
    w.view(np.uint32)[5, 7] ^= 1
    b = checksums({**s, "params": {"w": jnp.asarray(w)}})
    assert a["['step']"] == b["['step']"] and a["['params']['w']"] != b["['params']['w']"]


def test_flipped_bytes_fall_back_to_the_previous_checkpoint(tmp_path):
    c = _two_checkpoints(tmp_path)
    path = _largest_data_file(c.step_dir(6))
    raw = bytearray(open(path, "rb").read())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(x ^ 0x5A for x in raw[mid:mid + 64])
    open(path, "wb").write(bytes(raw))
    said = []
    state, meta = c.restore(_state(0), report=said.append)
    assert meta["restored_from"] == 3 and int(state["step"]) == 3
    np.testing.assert_array_equal(state["params"]["w"], _state(3)["params"]["w"])
    assert "checkpoint 6" in said[0] and "resuming from checkpoint 3" in said[-1]
    assert os.path.isdir(tmp_path / "corrupt" / "last-6") and c.latest_step() == 3
    # The bytes still decode: only the stored checksum tells (the NaN/5e37 weights of issue 14).
    assert meta["skipped_corrupt"] == [said[0][len("WARNING: "):said[0].index("; moved to")]]
    assert "array ['params']['w'] does not match the checksum" in said[0]
    c.close()


def test_empty_metadata_file_is_named_and_the_last_bad_checkpoint_stops(tmp_path):
    c = _two_checkpoints(tmp_path)
    for step in (6, 3):
        open(os.path.join(c.step_dir(step), "meta", "metadata"), "w").close()
    said = []
    with pytest.raises(CorruptCheckpoint, match=r"no checkpoint verifies:\n.*checkpoint 6.*"
                       r"meta/metadata is unreadable \(empty file\)(.|\n)*checkpoint 3"):
        c.restore(_state(0), report=said.append)
    assert "meta/metadata" in said[0]
    c.close()


def test_a_checkpoint_of_another_shape_names_the_array(tmp_path):
    c = _two_checkpoints(tmp_path)
    other = {"params": {"w": jnp.zeros((64, 128))}, "step": jnp.zeros((), jnp.int32)}
    with pytest.raises(CheckpointError, match=r"array params/w has shape \(64, 256\) "
                                              r"in the checkpoint, \(64, 128\) here"):
        c.restore(other)
    assert c.latest_step() == 6  # not mistaken for corruption: nothing moved
    c.close()


@pytest.mark.parametrize("name", ["_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA",
                                  "state/_sharding", "state/array_metadatas/process_0"])
def test_any_empty_metadata_file_is_named_and_passed_over(tmp_path, name):
    c = _two_checkpoints(tmp_path)
    open(os.path.join(c.step_dir(6), name), "w").close()
    c.close()
    c = Checkpointer(str(tmp_path))  # orbax itself only logs the bad file here
    said = []
    state, meta = c.restore(_state(0), report=said.append)
    assert meta["restored_from"] == 3 and int(state["step"]) == 3
    assert f"last/6/{name} is unreadable (empty file)" in said[0]
    c.close()
