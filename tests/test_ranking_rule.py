"""One ranking rule everywhere (issue 13 §4): ``pallas_kernels`` (``top2_mask``, the re-sparsify
kernel's forward and backward top-2) keeps exactly what ``bimask_jax`` keeps on NaN, +-inf, ties
and signed zeros: NaN ranks as +inf, ``-0.0`` ties ``0.0``, ties go to the lower index."""

import numpy as np

import bimask_jax as bj
import pallas_kernels as pk
from pallas_kernels.format import magnitude

nan, inf = np.nan, np.inf

# One group of 4 per row (along axis 1); the comment is the expected kept pair.
SPECIAL = np.array(
    [
        [nan, 1, 2, 3],  # nan, 3
        [1, nan, nan, 2],  # both nans
        [nan, nan, nan, nan],  # positions 0, 1
        [-inf, 1, inf, 2],  # both infs
        [inf, nan, 0, 1],  # inf, nan (tie at +inf: lower index first)
        [1, -1, 1, -1],  # ties: positions 0, 1
        [-0.0, 0.0, -0.0, 0.0],  # signed zeros tie: positions 0, 1
        [0.0, -0.0, 1e-30, -1e-30],  # tiny values beat zeros: positions 2, 3
        [2, -3, 3, -2],  # |-3| ties 3: positions 1, 2
    ],
    np.float32,
)
WANT = np.array(
    [
        [1, 0, 0, 1],
        [0, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 1, 1],
        [0, 1, 1, 0],
    ],
    bool,
)


def test_the_rule_on_special_values():
    np.testing.assert_array_equal(bj.nm_mask(SPECIAL, 2, 4, axis=1), WANT)
    np.testing.assert_array_equal(pk.top2_mask(SPECIAL, axis=1), WANT)
    np.testing.assert_array_equal(pk.top2_mask(SPECIAL.T, axis=0), WANT.T)
    np.testing.assert_array_equal(magnitude(np.float32([nan, -0.0, -inf])), [inf, 0.0, inf])


def _special_kernel(k, c, seed):
    """(K, C) with NaN, inf, ties and signed zeros sprinkled into random values."""
    rng = np.random.default_rng(seed)
    w = rng.choice(np.float32([nan, inf, -inf, 0.0, -0.0, 1.0, -1.0, 2.0]), size=(k, c))
    noise = rng.standard_normal((k, c)).astype(np.float32)
    return np.where(rng.random((k, c)) < 0.5, w, noise).astype(np.float32)


def test_pallas_masks_equal_bimask_jax_masks():
    w = _special_kernel(32, 16, 0)
    perm = np.random.default_rng(1).permutation(16)
    fwd, bwd = bj.layer_masks(w, 2, 4, "bimask", perm)
    fwd, bwd = np.asarray(fwd), np.asarray(bwd)
    np.testing.assert_array_equal(pk.top2_mask(w, axis=0), fwd)
    r = pk.resparsify(w, perm, block_k=16, block_c=16)
    np.testing.assert_array_equal(r.fwd_mask, fwd)
    # The kernel's operands hold exactly the entries the library's masks keep (NaN where NaN is
    # kept; a dropped entry and a kept exact zero both read as 0).
    zero = np.float32(0)
    np.testing.assert_array_equal(pk.decompress(r.fwd_values, r.fwd_meta), np.where(fwd, w, zero))
    want_b = np.where(bwd, w, zero)[:, perm].T
    np.testing.assert_array_equal(pk.decompress(r.bwd_values, r.bwd_meta), want_b)
