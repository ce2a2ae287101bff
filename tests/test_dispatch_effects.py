"""No JAX effect in a sparse model's train step, so that its ``jit`` keeps JAX's C++ dispatch path.

A ``checkify.debug_check`` (the optional report of an invalid traced permutation) is an effect, and
a jitted function whose graph has one is dispatched through Python on every call, which costs a
``gpt2-tiny`` train step more than its masks do (``train/LM.md``).
The public mask/search functions add it only for a traced ``perm`` with ``checkify_perm=True``
(their default); the Flax layers and ``train/lm.py`` never do. Invalid traced permutations still
fall back to the identity without it (tests/test_invalid_inputs.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import bimask_jax as bj
import bimask_jax.flax as bf

N, M = 2, 4
W = jax.random.normal(jax.random.key(0), (16, 8))
FWD = bj.forward_mask(W, N, M)
GOOD = jnp.asarray([3, 1, 2, 0, 7, 6, 5, 4], jnp.int32)
BAD = jnp.asarray([0, 0, 2, 3, 4, 5, 6, 7], jnp.int32)

# Each public function that takes a permutation, called with it as ``p`` (traced or concrete).
CALLS = {
    "backward_mask": lambda p, **kw: bj.backward_mask(W, FWD, p, N, M, **kw),
    "layer_masks": lambda p, **kw: bj.layer_masks(W, N, M, "bimask", p, **kw)[1],
    "permutation_score": lambda p, **kw: bj.permutation_score(W, FWD, p, N, M, **kw),
    "inverse_permutation": lambda p, **kw: bj.inverse_permutation(p, **kw),
    "search_permutation": lambda p, **kw: bj.search_permutation(
        jax.random.key(1), W, N, M, 3, init=p, **kw),
    "search_permutation_stripe": lambda p, **kw: bj.search_permutation(
        jax.random.key(1), W, N, M, init=p, method="stripe", iterations=2, **kw),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_concrete_perm_has_no_effect(name):
    """A concrete perm is checked in Python, so the jitted body carries no in-graph report."""
    assert not jax.make_jaxpr(lambda: CALLS[name](GOOD))().effects


@pytest.mark.parametrize("name", sorted(CALLS))
def test_traced_perm_reports_unless_asked_not_to(name):
    f = CALLS[name]
    assert jax.make_jaxpr(f)(GOOD).effects  # the default: reported under checkify
    assert not jax.make_jaxpr(lambda p: f(p, checkify_perm=False))(GOOD).effects
    err, _ = checkify.checkify(jax.jit(f))(BAD)
    with pytest.raises(checkify.JaxRuntimeError, match="is not a permutation of range\\(8\\)"):
        err.throw()
    # Without the report the invalid perm falls back to the identity: the same result as it.
    quiet = jax.jit(lambda p: f(p, checkify_perm=False))
    jax.tree.map(np.testing.assert_array_equal, quiet(BAD), quiet(jnp.arange(8, dtype=jnp.int32)))


def test_checkify_perm_must_be_a_bool():
    with pytest.raises(ValueError, match="checkify_perm must be a bool"):
        bj.backward_mask(W, FWD, GOOD, N, M, checkify_perm="no")
    with pytest.raises(ValueError, match="checkify_perm must be a bool"):
        bj.layer_masks(W, N, M, "srste", checkify_perm=1)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x)))


@pytest.mark.parametrize("search", ["random", "stripe"])
def test_linen_train_step_has_no_effect(search):
    model = bf.sparse(Mlp(), num_candidates=4, search=search, search_iterations=2)
    x = jnp.ones((4, 8))
    v = model.init(jax.random.key(0), x)

    def step(v, x, step):
        grads = jax.grad(lambda p: model.apply({**v, "params": p}, x).sum())(v["params"])
        params = jax.tree.map(lambda a, g: a - 0.1 * g, v["params"], grads)
        new = bf.maybe_refresh(jax.random.key(1), model, {**v, "params": params}, step,
                               refresh_every=2)
        return {**v, "params": params, "bimask": new}

    jaxpr = jax.make_jaxpr(step)(v, x, jnp.int32(0))
    assert not jaxpr.effects, jaxpr.effects


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_train_step_has_no_effect():
    model = bf.sparse(NnxMlp(nnx.Rngs(0)), num_candidates=4)
    graphdef, state = nnx.split(model)

    def step(state, x, step):
        m = nnx.merge(graphdef, state)
        grads = nnx.grad(lambda m: m(x).sum())(m)
        nnx.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(m, nnx.Param), grads))
        nnx.update(m, bf.maybe_refresh(jax.random.key(1), m, None, step, refresh_every=2))
        return nnx.state(m)

    jaxpr = jax.make_jaxpr(step)(state, jnp.ones((4, 8)), jnp.int32(0))
    assert not jaxpr.effects, jaxpr.effects


@pytest.mark.parametrize("flags", [["--method", "bimask"], ["--method", "bimask", "--search",
                                   "stripe"], ["--method", "transposable", "--mask-update",
                                   "refresh"]])
def test_lm_train_step_has_no_effect(flags):
    from train import lm, text_data
    from train.models import gpt

    gcfg = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    tokens = np.random.default_rng(0).integers(0, 64, 2000).astype(np.uint16)
    args = lm.build_parser().parse_args(["--data", "unused", "--batch-size", "4", "--steps", "4",
                                         "--num-candidates", "4", *flags])
    tr = lm.Trainer(args, gcfg, lm.make_mesh((1, 1, 1)))
    batch = tr.put_batch(text_data.batch_at(tokens, seed=0, step=0, batch_size=4, block_size=16))
    jaxpr = jax.make_jaxpr(tr.train_step)(tr.init_state, batch)
    assert not jaxpr.effects, jaxpr.effects
