"""The Bi-Mask state of the Flax wrapper (issue 14): a state that does not fit its layer (a perm
from a wider model, or not a permutation) is rejected where it is used or refreshed, naming the
layer and the rule; under jit a refresh never returns an invalid permutation; when no layer can be
sparse, init / sparse say so per layer and ``layers`` gives each layer's reason."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bimask_jax.flax as bf


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="out")(nn.relu(nn.Dense(16, name="fc")(x)))


X = jnp.ones((2, 8))


def _linen():
    model = bf.sparse(Two())
    v = model.init(jax.random.key(0), X)
    v["params"]["fc"]["kernel"] = jax.random.normal(jax.random.key(1), (8, 16))
    return model, v


def test_linen_state_from_wider_model_is_rejected_by_refresh_and_apply():
    model, v = _linen()
    v["bimask"]["fc"]["perm"] = jnp.arange(32, dtype=jnp.int32)  # a 32-column layer's perm
    for call in (lambda: bf.refresh(jax.random.key(2), model, v),
                 lambda: jax.jit(bf.refresh, static_argnums=1)(jax.random.key(2), model, v),
                 lambda: bf.summary(model, v, print_fn=None),
                 lambda: bf.export(model, v)):
        with pytest.raises(ValueError, match=r"'fc'.*\(32,\).*does not fit its kernel \(8, 16\)"):
            call()
    for apply in (model.apply, jax.jit(model.apply)):  # a static check, also under jit
        with pytest.raises(ValueError, match=r"'fc'.*int32\[32\].*\(8, 16\) matrix.*int32\[16\]"):
            apply(v, X)


def test_linen_perm_that_is_not_a_permutation_is_rejected_when_concrete():
    model, v = _linen()
    bad = np.arange(16, dtype=np.int32)
    bad[3] = 5  # 5 twice, 3 missing
    v["bimask"]["fc"]["perm"] = jnp.asarray(bad)
    with pytest.raises(ValueError, match=r"'fc'.*permutation of 0\.\.15"):
        bf.refresh(jax.random.key(2), model, v)
    with pytest.raises(ValueError, match=r"'fc'.*permutation of 0\.\.15"):
        model.apply(v, X)  # eager: the values are concrete
    # Under jit the values cannot be checked: the refresh replaces the invalid incumbent by the
    # identity, so what it returns is a permutation.
    new = jax.jit(bf.refresh, static_argnums=1)(jax.random.key(2), model, v)
    assert sorted(np.asarray(new["fc"]["perm"]).tolist()) == list(range(16))
    v["bimask"]["fc"]["refreshes"] = jnp.zeros((3,), jnp.int32)  # another field, wrong shape
    v["bimask"]["fc"]["perm"] = jnp.arange(16, dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"'fc'.*'refreshes' is int32\[3\]"):
        bf.refresh(jax.random.key(2), model, v)


class MLP(nnx.Module):
    def __init__(self, rngs, width=16):
        self.fc = nnx.Linear(8, width, rngs=rngs)
        self.out = nnx.Linear(width, 8, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.fc(x)))


def test_nnx_state_from_wider_model_or_not_a_permutation_is_rejected():
    model = bf.sparse(MLP(nnx.Rngs(0)))
    wide = bf.sparse(MLP(nnx.Rngs(0), width=32))
    small = model.fc.dot_general.perm
    model.fc.dot_general.perm = wide.fc.dot_general.perm  # fc: a (32,) perm for 16 columns
    with pytest.raises(ValueError, match=r"'fc'.*\(32,\).*does not fit its kernel \(8, 16\)"):
        bf.refresh(jax.random.key(0), model)
    with pytest.raises(ValueError, match=r"'fc'.*int32\[32\].*int32\[16\]"):
        nnx.jit(lambda mdl, x: mdl(x))(model, X)
    model.fc.dot_general.perm = small
    model.fc.dot_general.perm[...] = jnp.zeros(16, jnp.int32)
    with pytest.raises(ValueError, match=r"'fc'.*permutation of 0\.\.15"):
        model(X)
    with pytest.raises(ValueError, match=r"'fc'.*permutation of 0\.\.15"):
        bf.refresh(jax.random.key(0), model)


class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(5, (3, 3), name="conv")(x)
        return nn.Dense(10, name="head")(x.mean((1, 2)))


@pytest.mark.parametrize("m", [3, 64])
def test_linen_no_sparse_layer_says_why_per_layer(m):
    model = bf.sparse(Odd(), n=1, m=m)
    x = jnp.ones((1, 4, 4, 4))
    with pytest.raises(ValueError, match=rf"makes no layer of this model sparse(.|\n)*"
                                         rf"conv \(Conv\): input channels 4 not divisible by m={m}"
                                         rf"(.|\n)*head \(Dense\): input channels 5"):
        model.init(jax.random.key(0), x)
    layers = bf.layers(model, sample_args=(x,))
    assert [(y.path, y.sparse) for y in layers] == [("conv", False), ("head", False)]
    assert all(f"not divisible by m={m}" in y.note for y in layers)
    printed = []
    rows = bf.summary(model, {"params": {}}, sample_args=(x,), print_fn=printed.append)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert printed[0].startswith("no layer is sparse")
    v = Odd().init(jax.random.key(0), x)  # variables without Bi-Mask state
    for fn in (lambda: bf.refresh(jax.random.key(0), model, v), lambda: bf.export(model, v),
               lambda: bf.summary(model, v, print_fn=None)):
        with pytest.raises(ValueError, match="no layer of this model has Bi-Mask state"):
            fn()


def test_nnx_no_sparse_layer_says_why_and_leaves_model_unchanged():
    net = MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"fc \(Linear\): input channels 8 not divisible by m=64"
                                         r"(.|\n)*out \(Linear\): input channels 16"):
        bf.sparse(net, n=2, m=64)
    assert not jax.tree.leaves(nnx.state(net, bf.BimaskState))
    bf.sparse(net)  # the failed call did not mark the layers as handled
    assert [(y.path, y.sparse, y.method) for y in bf.layers(net)] == [
        ("fc", True, "bimask"), ("out", True, "bimask")]


def test_a_new_record_field_is_one_definition(monkeypatch):
    """A field added to ``new_record`` alone (here a float32 ``scale`` per layer) is created by
    linen init and nnx sparse, checked against its layer, and kept by the refresh."""
    from bimask_jax.flax import layer

    base = layer.new_record
    monkeypatch.setattr(layer, "new_record", lambda cfg, method, stack, c: {
        **base(cfg, method, stack, c), "scale": jnp.ones(stack, jnp.float32)})
    model = bf.sparse(Two(), n=1, m=4)  # a fresh config: nothing cached from other tests
    v = model.init(jax.random.key(0), X)
    assert v["bimask"]["fc"]["scale"].dtype == jnp.float32 and v["bimask"]["fc"]["scale"].shape == ()
    new = bf.refresh(jax.random.key(1), model, v)
    assert float(new["fc"]["scale"]) == 1.0 and int(new["fc"]["refreshes"]) == 1
    v["bimask"]["fc"]["scale"] = jnp.ones((2,), jnp.float32)
    with pytest.raises(ValueError, match=r"'fc'.*'scale' is float32\[2\].*needs float32\[\]"):
        model.apply(v, X)
    net = bf.sparse(MLP(nnx.Rngs(0)), n=1, m=4)
    assert net.fc.dot_general.scale[...].dtype == jnp.float32
    assert "scale" in nnx.to_pure_dict(bf.refresh(jax.random.key(1), net))["fc"]["dot_general"]
