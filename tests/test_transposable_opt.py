import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj
from bimask_jax import transposable as tr


def _np_patterns(n, m):
    """Independent enumeration: every m x m 0/1 matrix, filtered by row and column sums."""
    bits = np.array(list(itertools.product((0, 1), repeat=m * m)), np.int8).reshape(-1, m, m)
    ok = np.all(bits.sum(1) == n, axis=1) & np.all(bits.sum(2) == n, axis=1)
    return bits[ok].astype(bool)


def _np_best_mask(w, n, m):
    """Brute force: for each m x m block of |w| (K, C), the admissible pattern of largest kept sum;
    a block with NaN/inf entries first keeps as many of them as possible (lexicographic score)."""
    pats = _np_patterns(n, m)
    a = np.abs(np.asarray(w, np.float64))
    bad = ~np.isfinite(a)
    a = np.where(bad, 0.0, a)
    out = np.zeros(a.shape, bool)
    for i in range(0, a.shape[0], m):
        for j in range(0, a.shape[1], m):
            blk, nb = a[i : i + m, j : j + m], bad[i : i + m, j : j + m]
            scores = [((nb & p).sum(), (blk * p).sum()) for p in pats]
            out[i : i + m, j : j + m] = pats[max(range(len(pats)), key=lambda q: scores[q])]
    return out


def _w(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n,m,count", [(2, 4, 90), (1, 4, 24), (1, 2, 2), (2, 2, 1), (3, 4, 24)])
def test_patterns_are_all_admissible_ones(n, m, count):
    got = tr.transposable_patterns(n, m)
    assert got.shape == (count, m, m) and got.dtype == bool
    want = _np_patterns(n, m)
    assert {p.tobytes() for p in got} == {p.tobytes() for p in want}


def test_pattern_count_2_5():
    got = tr.transposable_patterns(2, 5)
    assert got.shape == (2040, 5, 5)
    assert np.all(got.sum(1) == 2) and np.all(got.sum(2) == 2)
    assert len({p.tobytes() for p in got}) == 2040


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4)])
def test_matches_brute_force(n, m):
    w = _w((32, 24), seed=n)
    got = np.asarray(jax.jit(tr.optimal_transposable_mask, static_argnums=(1, 2))(w, n, m))
    want = _np_best_mask(w, n, m)
    np.testing.assert_array_equal(got, want)  # random normal: no ties
    for ax in (0, 1):
        g = np.moveaxis(got, ax, -1).reshape(-1, m)
        assert np.all(g.sum(-1) == n)


def test_retained_magnitude_equals_existing_transposable_mask_and_below_forward_only():
    # bimask_jax.masks.transposable_mask is already exact for m <= 4, so the two must agree
    for seed in range(2):
        w = _w((32, 32), seed=seed)
        a = np.abs(w.astype(np.float64))
        opt = a[np.asarray(tr.optimal_transposable_mask(w))].sum()
        old = a[np.asarray(bj.transposable_mask(w, 2, 4))].sum()
        fwd = a[np.asarray(bj.forward_mask(w, 2, 4))].sum()
        assert opt == pytest.approx(old, rel=1e-12)
        assert opt <= fwd


def test_conv_kernel_and_nan_is_kept():
    w = _w((3, 3, 8, 16), seed=4)
    w[1, 1, 2, 3] = np.nan
    got = np.asarray(tr.optimal_transposable_mask(w))
    assert got.shape == w.shape
    assert got[1, 1, 2, 3]
    flat = got.reshape(-1, 16)
    want = _np_best_mask(w.reshape(-1, 16), 2, 4)
    np.testing.assert_array_equal(flat, want)


def test_periodic_mask_under_jit():
    w = _w((8, 8), seed=5)
    fresh = np.asarray(tr.optimal_transposable_mask(w))
    prev = jnp.asarray(~fresh)
    f = jax.jit(lambda w, prev, step: tr.periodic_mask(w, prev, step, every=40))
    for step, want in [(0, fresh), (1, ~fresh), (39, ~fresh), (40, fresh), (80, fresh)]:
        np.testing.assert_array_equal(np.asarray(f(w, prev, jnp.int32(step))), want)


def test_masked_decay_matches_numpy():
    grad = _w((8, 12), seed=6)
    w = _w((8, 12), seed=7)
    mask = np.asarray(tr.optimal_transposable_mask(w))
    got = np.asarray(jax.jit(tr.masked_decay)(grad, w, mask, 6e-5))
    want = grad.astype(np.float64) + 6e-5 * w * (1 - mask)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(got[mask], grad[mask])  # kept weights: gradient untouched
    assert not np.array_equal(got[~mask], grad[~mask])
    bf = tr.masked_decay(grad.astype(jnp.bfloat16), w, mask, 2e-4)
    assert bf.dtype == jnp.bfloat16


def test_errors_name_parameters():
    w = _w((8, 8))
    mask = np.ones((8, 8), bool)
    with pytest.raises(ValueError, match="m must be <= 5"):
        tr.optimal_transposable_mask(_w((8, 8)), 4, 8)
    with pytest.raises(ValueError, match="output axis"):
        tr.optimal_transposable_mask(_w((8, 6)))
    with pytest.raises(ValueError, match="input axis"):
        tr.optimal_transposable_mask(_w((6, 8)))
    with pytest.raises(ValueError, match="every must be"):
        tr.periodic_mask(w, mask, 0, every=0)
    with pytest.raises(ValueError, match="prev_mask"):
        tr.periodic_mask(w, mask[:4], 0)
    with pytest.raises(ValueError, match="step must be an integer scalar"):
        tr.periodic_mask(w, mask, 1.5)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        tr.masked_decay(w, w, mask, -1.0)
    with pytest.raises(ValueError, match="w must have grad's shape"):
        tr.masked_decay(w, w[:4], mask, 1e-4)
    with pytest.raises(ValueError, match="mask must be a bool mask"):
        tr.masked_decay(w, w, mask.astype(np.float32), 1e-4)


def test_vmap_over_stacked_layers():
    ws = _w((3, 8, 8), seed=8)
    got = np.asarray(jax.vmap(tr.optimal_transposable_mask)(ws))
    for i in range(3):
        np.testing.assert_array_equal(got[i], _np_best_mask(ws[i], 2, 4))
