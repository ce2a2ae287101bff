"""train/models/gpt.py: shapes, causality, which layers bimask_jax.sparse makes sparse, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bimask_jax as bj
from train.models import gpt

CFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=32)


def test_logits_shape_and_causality():
    model = gpt.create(CFG, seed=0)
    idx = np.random.default_rng(0).integers(0, 32, (2, 12)).astype(np.int32)
    out = model(jnp.asarray(idx))
    assert out.shape == (2, 12, 32) and out.dtype == jnp.float32
    idx2 = idx.copy()
    idx2[:, 7:] = (idx2[:, 7:] + 1) % 32  # change the future only
    out2 = model(jnp.asarray(idx2))
    np.testing.assert_allclose(out[:, :7], out2[:, :7], rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[:, 7:], out2[:, 7:])
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(jnp.zeros((1, 13), jnp.int32))


def test_attention_and_mlp_linears_sparse_head_dense():
    model = bj.sparse(gpt.create(CFG, seed=0), exclude=gpt.DENSE_LAYERS)
    rows = {r["path"]: r for r in bj.summary(model, print_fn=None)}
    sparse = {p for p, r in rows.items() if r["status"] == "sparse"}
    assert sparse == {f"h{i}/{n}" for i in range(2)
                      for n in ("attn/qkv", "attn/out", "mlp/up", "mlp/down")}
    assert rows["lm_head"]["status"] == "skipped"
    assert all(rows[p]["fwd_density"] == 0.5 for p in sparse)


def test_presets_and_layout_metadata():
    n = sum(x.size for x in jax.tree.leaves(nnx.state(
        nnx.eval_shape(lambda: gpt.create(gpt.preset("gpt2-small"))), nnx.Param)))
    d, v, t, layers = 768, 50304, 1024, 12
    expect = v * d + t * d + layers * (12 * d * d + 13 * d) + 2 * d + d * v
    assert n == expect == 163_109_376
    specs = nnx.get_partition_spec(nnx.state(gpt.create(CFG), nnx.Param))
    P = jax.sharding.PartitionSpec
    assert specs["h0"]["attn"]["qkv"]["kernel"].get_value() == P("fsdp", "model")
    assert specs["h0"]["mlp"]["down"]["kernel"].get_value() == P("model", "fsdp")
    with pytest.raises(ValueError, match="preset must be one of"):
        gpt.preset("gpt5")
    with pytest.raises(ValueError, match="divisible by n_head"):
        gpt.GPTConfig(n_layer=1, n_head=3, n_embd=16, block_size=4)
