import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bimask_jax import mvue

EPS = 1.19209e-07


def _np_inclusion(g, n):
    """NumPy statement: draw n entries of a group without replacement, probability proportional to
    a = |g| + eps; P(i kept), by enumerating every ordered draw sequence."""
    a = np.abs(np.asarray(g, np.float64)) + EPS
    m = a.shape[-1]
    p = np.zeros_like(a)
    for seq in itertools.permutations(range(m), n):
        prob = np.ones(a.shape[:-1])
        rest = a.sum(-1)
        for i in seq:
            prob = prob * a[..., i] / rest
            rest = rest - a[..., i]
        for i in seq:
            p[..., i] += prob
    return p


def _groups(x, m, axis=0):
    x = np.moveaxis(np.asarray(x), axis, -1)
    return x.reshape(*x.shape[:-1], -1, m)


def _ungroup(x, shape, axis=0):
    moved = np.moveaxis(np.empty(shape), axis, -1).shape
    return np.moveaxis(x.reshape(moved), -1, axis)


def _g(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (2, 8)])
def test_inclusion_probabilities_match_enumeration(n, m):
    g = _groups(_g((4 * m, 3), seed=m + n), m)
    a = jnp.abs(jnp.asarray(g)) + EPS
    got = np.asarray(mvue.inclusion_probabilities(a, n))
    want = _np_inclusion(g, n)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got.sum(-1), n, rtol=1e-5)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4)])
def test_unbiased_and_keep_frequency_by_averaging_keys(n, m):
    g = _g((8, 3), seed=11)
    g[2, 1] = 0.0  # an exact zero stays an exact zero in every sample
    num = 20000
    keys = jax.random.split(jax.random.key(0), num)
    samples = np.asarray(jax.jit(jax.vmap(lambda k: mvue.mvue_sparsify(g, k, n, m)))(keys))
    p = _ungroup(_np_inclusion(_groups(g, m), n), g.shape)
    var = g.astype(np.float64) ** 2 * (1.0 / p - 1.0)  # Horvitz-Thompson variance per entry
    tol = 5.0 * np.sqrt(var / num) + 1e-6
    assert np.all(np.abs(samples.mean(0) - g) <= tol), (samples.mean(0) - g, tol)
    freq = (samples != 0).mean(0)
    ftol = 5.0 * np.sqrt(p * (1 - p) / num) + 1e-3
    nonzero = g != 0
    assert np.all(np.abs(freq - p)[nonzero] <= ftol[nonzero])
    assert np.all(samples[:, 2, 1] == 0)
    # the sample variance agrees with the formula
    np.testing.assert_allclose(samples.var(0), var, rtol=0.1, atol=1e-4)


@pytest.mark.parametrize("n,m,axis", [(2, 4, 0), (2, 4, 1), (1, 4, 0), (2, 8, -1)])
def test_exactly_n_of_m_along_axis(n, m, axis):
    g = _g((16, 24), seed=3)
    out = np.asarray(jax.jit(mvue.mvue_sparsify, static_argnums=(2, 3, 4))(
        g, jax.random.key(5), n, m, axis))
    assert out.shape == g.shape and out.dtype == np.float32
    assert np.all((_groups(out, m, axis) != 0).sum(-1) == n)
    # kept values are g / p (same sign, never smaller in magnitude)
    kept = out != 0
    assert np.all(np.sign(out[kept]) == np.sign(g[kept]))
    assert np.all(np.abs(out[kept]) >= np.abs(g[kept]) * (1 - 1e-6))


def test_variance_below_naive_uniform_estimator():
    # naive unbiased 2:4: keep 2 of 4 uniformly at random, times 2 (inclusion probability 1/2)
    g = _g((64, 32), seed=21)
    p = _np_inclusion(_groups(g, 4), 2)
    gg = _groups(g, 4).astype(np.float64)
    var_mvue = float((gg**2 * (1 / p - 1)).sum())
    var_naive = float((gg**2 * (2 - 1)).sum())
    assert var_mvue < 0.8 * var_naive, (var_mvue, var_naive)
    # and the estimator's empirical variance follows the formula (a few hundred keys)
    keys = jax.random.split(jax.random.key(1), 200)
    s = np.asarray(jax.jit(jax.vmap(lambda k: mvue.mvue_sparsify(g, k)))(keys), np.float64)
    emp = float(((s - g) ** 2).mean(0).sum())
    assert emp == pytest.approx(var_mvue, rel=0.1)


def test_same_key_same_draw_and_dtype():
    g = _g((8, 8), seed=2).astype(jnp.bfloat16)
    a = mvue.mvue_sparsify(g, jax.random.key(3))
    b = mvue.mvue_sparsify(g, jax.random.key(3))
    c = mvue.mvue_sparsify(g, jax.random.key(4))
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert not np.array_equal(np.asarray(a != 0), np.asarray(c != 0))
    # a raw uint32 PRNGKey works too
    mvue.mvue_sparsify(g, jax.random.PRNGKey(0))


def test_weight_grad_unbiased():
    x = _g((2, 4, 6), seed=4)  # (batch, seq, K): 8 tokens
    g = _g((2, 4, 5), seed=5)
    exact = x.reshape(-1, 6).T.astype(np.float64) @ g.reshape(-1, 5)
    keys = jax.random.split(jax.random.key(9), 4000)
    est = np.asarray(jax.jit(jax.vmap(lambda k: mvue.mvue_weight_grad(x, g, k)))(keys), np.float64)
    assert est.shape == (4000, 6, 5)
    se = est.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(est.mean(0) - exact) <= 5 * se + 1e-5)
    # a single draw is the product with a 2:4 (along tokens) gradient
    k = jax.random.key(1)
    np.testing.assert_allclose(
        np.asarray(mvue.mvue_weight_grad(x, g, k)),
        x.reshape(-1, 6).T @ np.asarray(mvue.mvue_sparsify(g.reshape(-1, 5), k)),
        rtol=1e-5, atol=1e-6,
    )


def test_weight_grad_pads_ragged_token_count():
    x = _g((6, 3), seed=12)  # 6 tokens: padded to 8 with zero tokens
    g = _g((6, 2), seed=13)
    k = jax.random.key(2)
    got = np.asarray(mvue.mvue_weight_grad(x, g, k))
    xp = np.concatenate([x, np.zeros((2, 3), np.float32)])
    gp = np.asarray(mvue.mvue_sparsify(np.concatenate([g, np.zeros((2, 2), np.float32)]), k))
    np.testing.assert_allclose(got, xp.T @ gp, rtol=1e-5, atol=1e-6)
    keys = jax.random.split(jax.random.key(7), 3000)
    est = np.asarray(jax.jit(jax.vmap(lambda k: mvue.mvue_weight_grad(x, g, k)))(keys), np.float64)
    se = est.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(est.mean(0) - x.T.astype(np.float64) @ g) <= 5 * se + 1e-5)


def test_nonfinite_gradient_is_not_hidden():
    g = _g((4, 2))
    g[1, 0] = np.inf
    out = np.asarray(mvue.mvue_sparsify(g, jax.random.key(0)))
    assert not np.all(np.isfinite(out[:, 0]))
    assert np.all(np.isfinite(out[:, 1]))


def test_errors_name_parameters():
    g = _g((8, 4))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match="n must be 1 or 2"):
        mvue.mvue_sparsify(g, k, 3, 4)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        mvue.mvue_sparsify(g, k, axis=2)
    with pytest.raises(ValueError, match="g axis 0 of size 6 is not divisible by m=4"):
        mvue.mvue_sparsify(_g((6, 4)), k)
    with pytest.raises(ValueError, match="key must be"):
        mvue.mvue_sparsify(g, jnp.zeros(3, jnp.uint32))
    with pytest.raises(ValueError, match="g must have a floating dtype"):
        mvue.mvue_sparsify(np.ones((8, 4), np.int32), k)
    with pytest.raises(ValueError, match="leading token axes"):
        mvue.mvue_weight_grad(_g((8, 3)), _g((4, 5)), k)
