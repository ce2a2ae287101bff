import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj
from tests import nm_reference as ref

NM = [(1, 4), (2, 4), (2, 8), (4, 8), (1, 16)]


def _kernel(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_nm_mask_matches_numpy(n, m, axis):
    x = _kernel((32, 48), seed=n * 100 + m)
    got = np.asarray(bj.nm_mask(x, n, m, axis=axis))
    np.testing.assert_array_equal(got, ref.nm_mask(x, n, m, axis=axis))
    groups = np.moveaxis(got, axis, -1).reshape(*np.moveaxis(got, axis, -1).shape[:-1], -1, m)
    assert np.all(groups.sum(-1) == n)


def test_nm_mask_ties_lower_index_wins():
    x = np.array([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    got = np.asarray(bj.nm_mask(x, 2, 4))
    np.testing.assert_array_equal(got, [[1, 1, 0, 0, 1, 1, 0, 0]])


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("shape", [(32, 16), (3, 3, 16, 32), (2, 48, 16)])
def test_forward_mask_is_nm_along_input_axis(n, m, shape):
    k = _kernel(shape, seed=sum(shape))
    got = np.asarray(bj.forward_mask(k, n, m))
    np.testing.assert_array_equal(got, ref.nm_mask(k, n, m, axis=-2))
    assert got.dtype == np.bool_ and got.shape == shape


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("shape", [(32, 16), (3, 3, 16, 32)])
def test_backward_mask_matches_numpy(n, m, shape):
    k = _kernel(shape, seed=7 + n + m)
    fwd = bj.forward_mask(k, n, m)
    perm = np.random.default_rng(n * m).permutation(shape[-1])
    got = np.asarray(bj.backward_mask(k, fwd, perm, n, m))
    want = ref.backward_mask(k, np.asarray(fwd), perm, n, m)
    np.testing.assert_array_equal(got, want)
    assert not np.any(got & ~np.asarray(fwd)), "backward mask must be a subset of fwd"
    # After permuting the columns, every row is N:M along C.
    assert ref.is_nm(got.reshape(-1, shape[-1])[:, perm], n, m, axis=1)


def test_backward_mask_prefers_forward_kept_zero_weights():
    # A forward-kept weight of exactly 0 ties with dropped weights; it must still be kept.
    k = np.array([[0.0, 5.0, 1.0, 2.0]] * 4, np.float32).T.copy()  # (4, 4): column j constant
    k = np.tile(k, (1, 1))
    fwd = np.zeros((4, 4), bool)
    fwd[0, :] = True  # keep only row 0 (value 0) in each column
    got = np.asarray(bj.backward_mask(k, jnp.asarray(fwd), np.arange(4), 2, 4))
    np.testing.assert_array_equal(got, ref.backward_mask(k, fwd, np.arange(4), 2, 4))
    assert got.sum() == 2


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4)])
def test_transposable_mask_is_optimal_per_block(n, m):
    k = _kernel((16, 12), seed=3 * n)
    t = np.asarray(bj.transposable_mask(k, n, m))
    assert ref.is_nm(t, n, m, axis=0) and ref.is_nm(t, n, m, axis=1)
    assert np.all(t.reshape(4, m, 3, m).sum(axis=(1, 3)) == n * m)  # exactly n per row and column
    for bi in range(16 // m):
        for bj_ in range(12 // m):
            blk = k[bi * m : (bi + 1) * m, bj_ * m : (bj_ + 1) * m]
            kept = float(np.abs(blk * t[bi * m : (bi + 1) * m, bj_ * m : (bj_ + 1) * m]).sum())
            assert kept == pytest.approx(ref.best_block_value(blk, n), rel=1e-6)


@pytest.mark.parametrize("n,m", [(2, 8), (4, 8), (1, 16)])
def test_transposable_mask_large_m_is_valid(n, m):
    k = _kernel((3, 3, 32, 32), seed=m)
    t = np.asarray(bj.transposable_mask(k, n, m)).reshape(-1, 32)
    assert ref.is_nm(t, n, m, axis=0) and ref.is_nm(t, n, m, axis=1)
    # The greedy keeps most of the budget: at least half of n per row and column on average.
    assert t.sum() >= 0.5 * n * t.size / m


def test_layer_masks_methods():
    k = _kernel((3, 3, 8, 16), seed=11)
    f = np.asarray(bj.forward_mask(k, 2, 4))
    d = bj.layer_masks(k, 2, 4, "dense")
    assert all(np.asarray(a).all() for a in d)
    s = bj.layer_masks(k, 2, 4, "srste")
    np.testing.assert_array_equal(s[0], f)
    np.testing.assert_array_equal(s[1], f)
    t = bj.layer_masks(k, 2, 4, "transposable")
    np.testing.assert_array_equal(t[0], t[1])
    perm = np.random.default_rng(0).permutation(16)
    b = bj.layer_masks(k, 2, 4, "bimask", perm)
    np.testing.assert_array_equal(b[0], f)
    np.testing.assert_array_equal(b[1], ref.backward_mask(k, f, perm, 2, 4))
    b0 = bj.layer_masks(k, 2, 4, "bimask")
    np.testing.assert_array_equal(b0[1], ref.backward_mask(k, f, np.arange(16), 2, 4))


def test_masks_under_jit_and_vmap():
    ks = _kernel((3, 16, 8), seed=5)
    perm = jnp.arange(8)[::-1]

    @jax.jit
    def both(k):
        f = bj.forward_mask(k, 2, 4)
        return f, bj.backward_mask(k, f, perm, 2, 4)

    fs, bs = jax.vmap(both)(ks)
    for i in range(3):
        f = ref.nm_mask(ks[i], 2, 4, axis=-2)
        np.testing.assert_array_equal(fs[i], f)
        np.testing.assert_array_equal(bs[i], ref.backward_mask(ks[i], f, np.asarray(perm), 2, 4))


def test_bf16_kernel():
    k = _kernel((16, 8), seed=9)
    kb = jnp.asarray(k, jnp.bfloat16)
    got = np.asarray(bj.forward_mask(kb, 2, 4))
    np.testing.assert_array_equal(got, ref.nm_mask(np.asarray(kb, np.float32), 2, 4, axis=0))


def test_nan_and_inf_are_kept_and_propagate():
    k = _kernel((8, 4), seed=1)
    k[1, 2] = np.nan
    k[5, 0] = np.inf
    f = np.asarray(bj.forward_mask(k, 2, 4))
    assert f[1, 2] and f[5, 0]
    b = np.asarray(bj.backward_mask(k, jnp.asarray(f), np.arange(4), 2, 4))
    assert b[1, 2] and b[5, 0]
    y = bj.sparse_dense(np.ones((1, 8), np.float32), k, jnp.asarray(f), jnp.asarray(b))
    assert np.isnan(np.asarray(y)[0, 2]), "a NaN weight must show in the output, not be masked away"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: bj.nm_mask(np.ones((4, 8), np.float32), 0, 4), "n must be >= 1"),
        (lambda: bj.nm_mask(np.ones((4, 8), np.float32), 5, 4), "n must be <= m"),
        (lambda: bj.nm_mask(np.ones((4, 30), np.float32), 2, 4), "size 30 is not divisible by m=4"),
        (
            lambda: bj.forward_mask(np.ones((30, 8), np.float32), 2, 4),
            "kernel input axis \\(-2\\) of size 30 is not divisible by m=4",
        ),
        (lambda: bj.forward_mask(np.ones((8,), np.float32), 2, 4), "at least 2 axes"),
        (lambda: bj.forward_mask(np.ones((8, 8), np.int32), 2, 4), "floating dtype"),
        (
            lambda: bj.backward_mask(
                np.ones((8, 6), np.float32), np.ones((8, 6), bool), np.arange(6), 2, 4
            ),
            "output axis \\(-1\\) of size 6",
        ),
        (
            lambda: bj.backward_mask(
                np.ones((8, 8), np.float32), np.ones((8, 8), bool), np.arange(7), 2, 4
            ),
            "perm must be a 1-D permutation",
        ),
        (
            lambda: bj.backward_mask(
                np.ones((8, 8), np.float32), np.ones((8, 8), bool), np.zeros(8, int), 2, 4
            ),
            "not a permutation",
        ),
        (
            lambda: bj.backward_mask(
                np.ones((8, 8), np.float32), np.ones((8, 4), bool), np.arange(8), 2, 4
            ),
            "fwd must have the kernel's shape",
        ),
        (
            lambda: bj.backward_mask(
                np.ones((8, 8), np.float32), np.ones((8, 8), np.float32), np.arange(8), 2, 4
            ),
            "fwd must be a bool mask",
        ),
        (
            lambda: bj.layer_masks(np.ones((8, 8), np.float32), 2, 4, "nope"),
            "method must be one of",
        ),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
