"""refresh / refresh_due / maybe_refresh: the permutation schedule of a sparse model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax.flax as bf
from tests import nm_reference as ref


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, name="head")(nn.relu(nn.Conv(16, (3, 3), name="conv")(x)).mean((1, 2)))


def _model(**kw):
    model = bf.sparse(Two(), **kw)
    v = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4, 4, 8)))
    v["params"]["conv"]["kernel"] = jax.random.normal(jax.random.key(1), (3, 3, 8, 16))
    return model, v


def _retained(kernel, perm):
    w = np.asarray(kernel).reshape(-1, np.shape(perm)[-1])
    f = ref.nm_mask(w, 2, 4, axis=0)
    return int(ref.backward_mask(w, f, np.asarray(perm), 2, 4).sum())


def test_refresh_improves_keeps_incumbent_and_is_pure():
    model, v = _model(num_candidates=50)
    kernel = v["params"]["conv"]["kernel"]
    refresh = jax.jit(bf.refresh, static_argnums=1)
    new = refresh(jax.random.key(2), model, v)
    again = refresh(jax.random.key(2), model, v)
    jax.tree.map(np.testing.assert_array_equal, new, again)
    p0, p1 = v["bimask"]["conv"]["perm"], new["conv"]["perm"]
    assert sorted(np.asarray(p1).tolist()) == list(range(16))
    assert _retained(kernel, p1) > _retained(kernel, p0)  # 50 candidates beat the identity here
    # the incumbent is candidate 0: a second refresh never scores below the first
    v2 = {**v, "bimask": new}
    for s in range(3):
        p2 = refresh(jax.random.key(10 + s), model, v2)["conv"]["perm"]
        assert _retained(kernel, p2) >= _retained(kernel, p1)
    # head (C=10) falls back to srste: no search, counter still counts the refresh
    np.testing.assert_array_equal(new["head"]["perm"], np.arange(10))
    assert int(new["head"]["refreshes"]) == int(new["conv"]["refreshes"]) == 1


@pytest.mark.slow
def test_num_candidates_zero_is_the_no_permutation_ablation():
    model, v = _model(num_candidates=0)
    new = bf.refresh(jax.random.key(2), model, v)
    np.testing.assert_array_equal(new["conv"]["perm"], np.arange(16))
    # the layer then trains with the identity-permutation backward mask
    rows = {r["path"]: r for r in bf.summary(model, {**v, "bimask": new}, print_fn=None)}
    w = np.asarray(v["params"]["conv"]["kernel"]).reshape(-1, 16)
    f = ref.nm_mask(w, 2, 4, axis=0)
    want = ref.backward_mask(w, f, np.arange(16), 2, 4).sum() / f.sum()
    assert rows["conv"]["bwd_retained"] == pytest.approx(want)


@pytest.mark.slow
def test_refresh_due_and_maybe_refresh_host_and_jit_agree():
    assert [bf.refresh_due(s, 3) for s in range(7)] == [True, False, False, True, False, False, True]
    assert [bool(bf.refresh_due(jnp.int32(s), 2)) for s in range(4)] == [True, False, True, False]
    with pytest.raises(ValueError, match="refresh_every"):
        bf.refresh_due(1, 0)
    with pytest.raises(ValueError, match="step"):
        bf.refresh_due(-1, 2)
    model, v = _model(refresh_every=4)
    jitted = jax.jit(lambda k, v, s: bf.maybe_refresh(k, model, v, s))
    key = jax.random.key(5)
    for step in (0, 1, 4):
        host = bf.maybe_refresh(key, model, v, step)
        dev = jitted(key, v, jnp.int32(step))
        jax.tree.map(np.testing.assert_array_equal, host, dev)
        due = step % 4 == 0
        assert int(dev["conv"]["refreshes"]) == int(due)
        assert (np.asarray(dev["conv"]["perm"]) != np.arange(16)).any() == due


@pytest.mark.slow
@pytest.mark.parametrize("search", ["swap"])
def test_local_search_option(search):
    model, v = _model(search=search, search_iterations=8)
    new = bf.refresh(jax.random.key(2), model, v)
    kernel = v["params"]["conv"]["kernel"]
    assert sorted(np.asarray(new["conv"]["perm"]).tolist()) == list(range(16))
    assert _retained(kernel, new["conv"]["perm"]) > _retained(kernel, np.arange(16))
    with pytest.raises(ValueError, match="search"):
        bf.sparse(Two(), search="annealing")


def test_default_search_is_stripe_for_small_m_and_random_otherwise():
    from bimask_jax.flax import SparseConfig

    assert SparseConfig().search == "stripe"
    assert SparseConfig(n=4, m=8).search == "random"
    assert SparseConfig(search="random").search == "random"
    with pytest.raises(ValueError, match="search must be 'auto' or one of"):
        SparseConfig(search="greedy")


@pytest.mark.slow
def test_summary_reports_search_efficacy():
    model, v = _model(num_candidates=50)
    new = bf.refresh(jax.random.key(2), model, v)
    rows = {r["path"]: r for r in bf.summary(model, {**v, "bimask": new}, print_fn=None)}
    w = np.asarray(v["params"]["conv"]["kernel"]).reshape(-1, 16)
    f = ref.nm_mask(w, 2, 4, axis=0)
    ident = ref.backward_mask(w, f, np.arange(16), 2, 4).sum()
    got = ref.backward_mask(w, f, np.asarray(new["conv"]["perm"]), 2, 4).sum()
    upper = np.minimum(f.sum(1), 2 * 16 // 4).sum()
    assert got > ident
    assert rows["conv"]["efficacy"] == pytest.approx((got - ident) / (upper - ident))
    assert rows["head"]["efficacy"] is None  # srste fallback: no permutation


@pytest.mark.slow
def test_discard_policy_takes_the_best_fresh_candidate():
    """sparse(..., keep_incumbent=False): the reference's refresh, the best of the fresh candidates
    (layer 0 of the searched layers uses fold_in(key, 0)), even below the incumbent."""
    model, v = _model(num_candidates=2, keep_incumbent=False)
    assert model.config.search == "random"  # "auto" with the discard policy
    kernel = v["params"]["conv"]["kernel"]
    w = np.asarray(kernel).reshape(-1, 16)
    best = bf.refresh(jax.random.key(0), bf.sparse(Two(), search="random", num_candidates=300),
                      v)["conv"]["perm"]
    v = {**v, "bimask": {**v["bimask"], "conv": {**v["bimask"]["conv"], "perm": best}}}
    key = jax.random.key(2)
    new = bf.refresh(key, model, v)["conv"]["perm"]
    cands = [np.asarray(jax.random.permutation(kk, 16))
             for kk in jax.random.split(jax.random.fold_in(key, 0), 2)]
    scores = [_retained(kernel, p) for p in cands]
    np.testing.assert_array_equal(new, cands[int(np.argmax(scores))])
    assert _retained(w, best) > max(scores)
    with pytest.raises(ValueError, match="keep_incumbent must be a bool"):
        bf.sparse(Two(), keep_incumbent="no")
    with pytest.raises(ValueError, match="keep_incumbent=False is a policy of search='random'"):
        bf.sparse(Two(), keep_incumbent=False, search="stripe")
