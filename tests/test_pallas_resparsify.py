"""pallas_kernels.resparsify (interpret mode) against a NumPy statement of the Bi-Mask 2:4 rules."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decompress, resparsify
from tests.nm_reference import top2_of_4

np_top2 = top2_of_4


def np_positions_bytes(keep, axis):
    """Metadata bytes from a keep mask with exactly 2 True per group (layout of format.py)."""
    a = np.moveaxis(keep, axis, 0)
    k = a.shape[0]
    pos = np.argsort(~a.reshape(k // 4, 4, -1), axis=1, kind="stable")[:, :2]  # ascending
    nib = (pos[:, 0] | (pos[:, 1] << 2)).astype(np.uint8)
    if nib.shape[0] % 2:
        nib = np.concatenate([nib, np.full((1, nib.shape[1]), 0b0100, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize(
    "k,c,dtype,blocks",
    [
        (20, 12, jnp.float32, dict(block_k=8, block_c=8)),  # K % 8 == 4, C % 8 == 4, 3x2 grid
        (32, 24, jnp.bfloat16, {}),
    ],
)
def test_resparsify_matches_numpy_rules(k, c, dtype, blocks):
    rng = np.random.default_rng(k * c)
    w = rng.uniform(0.1, 1.0, (k, c)) * rng.choice([-1.0, 1.0], (k, c))
    w[0:4, 0] = [0.5, -0.5, 0.5, 0.25]  # a tie: the lower rows 0 and 1 must win
    w = np.asarray(jnp.asarray(w, dtype), np.float32)  # the values the kernel sees
    perm = rng.permutation(c).astype(np.int32)

    mf = np_top2(w, 0)
    wf = w * mf
    keep_b = np_top2(wf[:, perm], 1)  # top-2 along permuted C of W*Mf
    mb_perm = keep_b & mf[:, perm]  # AND Mf: the Bi-Mask backward mask
    out = resparsify(
        jnp.asarray(w, dtype), jnp.asarray(perm), interpret=True, poison=True, **blocks
    )

    np.testing.assert_array_equal(np.asarray(out.fwd_mask), mf)
    assert mf[0:4, 0].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(
        np.asarray(decompress(out.fwd_values, out.fwd_meta, 0), np.float32), wf
    )
    np.testing.assert_array_equal(np.asarray(out.fwd_meta), np_positions_bytes(mf, 0))
    np.testing.assert_array_equal(
        np.asarray(decompress(out.bwd_values, out.bwd_meta, 0), np.float32),
        (w[:, perm] * mb_perm).T,
    )
    np.testing.assert_array_equal(np.asarray(out.bwd_meta), np_positions_bytes(keep_b.T, 0))
    assert out.fwd_values.dtype == dtype and out.bwd_values.dtype == dtype
    assert out.fwd_meta.shape == (-(-k // 8), c) and out.bwd_meta.shape == (-(-c // 8), k)


def test_resparsify_rejects_bad_inputs():
    with pytest.raises(ValueError, match="divisible by m=4"):
        resparsify(jnp.ones((6, 8)), jnp.arange(8))
    with pytest.raises(ValueError, match="perm must be an int array of shape \\(8,\\)"):
        resparsify(jnp.ones((8, 8)), jnp.arange(4))
    with pytest.raises(ValueError, match="permutation of range\\(8\\)"):
        resparsify(jnp.ones((8, 8)), jnp.zeros(8, jnp.int32))
    with pytest.raises(ValueError, match="block_c must be a positive multiple of 8"):
        resparsify(jnp.ones((8, 8)), jnp.arange(8), block_c=12)
