"""train/lm.py end to end on a small generated text file: metrics JSONL, summary, and an exact
resume (stop after step 3, resume, finish) equal to the unbroken run."""

import json

import numpy as np
import pytest
from flax import nnx

from train import lm

WORDS = ("the", "king", "shall", "speak", "now", "and", "we", "go", "to", "war", "fair", "lord")


def _text(path):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, 8)) for _ in range(300)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def _args(data, run_dir, *extra):
    return ["--data", data, "--preset", "gpt2-tiny", "--block-size", "16", "--batch-size", "4",
            "--steps", "6", "--eval-every", "3", "--eval-batches", "1", "--log-every", "2",
            "--refresh-every", "2", "--num-candidates", "4", "--warmup-steps", "2",
            "--run-dir", run_dir, "--no-progress", "--fast-compile", *extra]


def _perms(state):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(state["bimask"])}


@pytest.mark.slow
def test_train_metrics_and_exact_resume(tmp_path):
    data = _text(tmp_path / "words.txt")
    full = lm.main(_args(data, str(tmp_path / "full")))
    recs = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    kinds = {r["type"] for r in recs}
    assert {"train", "eval", "sparsity", "summary"} <= kinds
    train = [r for r in recs if r["type"] == "train"]
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["loss"]) for r in train)
    spars = [r for r in recs if r["type"] == "sparsity"]
    assert all(0.5 < r["retained"] <= 1.0 for r in spars)
    assert (tmp_path / "full" / "sparsity.json").exists()

    part = str(tmp_path / "part")
    first = lm.main(_args(data, part, "--stop-after-steps", "3"))
    assert first["stopped_early"] and first["step"] == 3
    with pytest.raises(ValueError, match="already holds checkpoints"):
        lm.main(_args(data, part))
    resumed = lm.main(_args(data, part, "--resume"))
    assert resumed["step"] == 6
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    a, b = _perms(full["state"]), _perms(resumed["state"])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    for x, y in zip(nnx.to_flat_state(full["state"]["params"]),
                    nnx.to_flat_state(resumed["state"]["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x[1][...]), np.asarray(y[1][...]), rtol=1e-6,
                                   atol=1e-7)
