"""pallas_kernels.format: compress / decompress against a NumPy statement of the 2:4 format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compress, decompress, top2_mask
from tests.nm_reference import top2_of_4

np_top2 = top2_of_4


def np_compress(w, axis):
    """NumPy statement of the documented layout (loops, no shared code with the package)."""
    a = np.moveaxis(np.asarray(w), axis, 0)
    k = a.shape[0]
    flat = a.reshape(k, -1)
    vals = np.zeros((k // 2, flat.shape[1]), flat.dtype)
    meta = np.zeros((-(-k // 8), flat.shape[1]), np.uint8)
    for col in range(flat.shape[1]):
        for g in range(k // 4):
            grp = flat[4 * g : 4 * g + 4, col]
            pos = [p for p in range(4) if grp[p] != 0]
            pos += [p for p in range(4) if p not in pos][: 2 - len(pos)]
            i0, i1 = sorted(pos)
            vals[2 * g, col], vals[2 * g + 1, col] = grp[i0], grp[i1]
            meta[g // 2, col] |= (i0 | (i1 << 2)) << (4 * (g % 2))
        if (k // 4) % 2:
            meta[-1, col] |= 0b0100 << 4
    rest = a.shape[1:]
    return (
        np.moveaxis(vals.reshape(k // 2, *rest), 0, axis),
        np.moveaxis(meta.reshape(-1, *rest), 0, axis),
    )


def sparse_random(rng, shape, axis, dtype=np.float32):
    w = rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)  # never zero
    return (w * np_top2(w, axis)).astype(dtype)


@pytest.mark.parametrize(
    "shape,axis", [((12, 5), 0), ((3, 20), 1), ((16, 2, 3), 0), ((2, 3, 8), -1)]
)
def test_compress_matches_numpy_layout_and_roundtrips(shape, axis):
    rng = np.random.default_rng(0)
    w = sparse_random(rng, shape, axis)
    values, meta = compress(w, axis)
    ref_v, ref_m = np_compress(w, axis)
    assert values.dtype == w.dtype and meta.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(values), ref_v)
    np.testing.assert_array_equal(np.asarray(meta), ref_m)
    np.testing.assert_array_equal(np.asarray(decompress(values, meta, axis)), w)


def test_bf16_bytes_at_most_0_5625_of_dense():
    rng = np.random.default_rng(1)
    w = jnp.asarray(sparse_random(rng, (64, 48), 0), jnp.bfloat16)
    values, meta = compress(w, 0)
    ratio = (values.nbytes + meta.nbytes) / w.nbytes
    assert ratio == pytest.approx(0.5625)
    np.testing.assert_array_equal(
        np.asarray(decompress(values, meta, 0), np.float32), np.asarray(w, np.float32)
    )


def test_groups_with_fewer_than_two_nonzeros_get_distinct_padded_slots():
    w = np.zeros((8, 3), np.float32)
    w[3, 0] = 2.0  # one nonzero at position 3 -> slots (0, 3)
    w[4:8, 1] = 0.0  # column 1 all zero -> slots (0, 1) in both groups
    w[1, 2], w[2, 2] = 1.5, -0.5  # two nonzeros at (1, 2)
    values, meta = compress(w, 0)
    meta = np.asarray(meta)
    nib = np.stack([meta & 15, meta >> 4], 1).reshape(2, 3)
    assert nib[0, 0] == (0 | 3 << 2) and nib[0, 1] == (0 | 1 << 2) and nib[0, 2] == (1 | 2 << 2)
    assert ((nib & 3) < (nib >> 2)).all()  # i0 < i1 always: never an undefined nibble
    np.testing.assert_array_equal(np.asarray(values)[:2, 0], [0.0, 2.0])
    np.testing.assert_array_equal(np.asarray(decompress(values, meta, 0)), w)


def test_mask_selects_positions_even_where_w_is_zero():
    rng = np.random.default_rng(2)
    w = rng.uniform(0.5, 1.0, (8, 4)).astype(np.float32)
    mask = np_top2(w, 0)
    w[mask] = 0.0  # zeros under the mask, nonzeros outside it
    values, meta = compress(w, 0, mask=mask)
    assert not np.asarray(values).any()
    i0 = np.asarray(meta) & 3
    np.testing.assert_array_equal(i0, np.argmax(mask.reshape(2, 4, 4), axis=1)[0:1])


def test_rejects_non_24_input_and_bad_shapes():
    with pytest.raises(ValueError, match="not 2:4 sparse along axis 0.*3 nonzeros"):
        compress(np.array([[1.0], [1.0], [1.0], [0.0]]), 0)
    with pytest.raises(ValueError, match="not divisible by m=4"):
        compress(np.ones((6, 2)), 0)
    with pytest.raises(ValueError, match="3 True mask entries"):
        compress(np.ones((4, 1)), 0, mask=np.array([[1], [1], [1], [0]], bool))
    with pytest.raises(ValueError, match="out of range"):
        compress(np.ones((4, 1)), 2)
    v, m = compress(np.zeros((8, 2), np.float32), 0)
    with pytest.raises(ValueError, match="metadata shape"):
        decompress(v, m[:, :1], 0)


def test_compress_under_jit_and_top2_mask():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(top2_mask(w, 0)), np_top2(w, 0))
    w[0:4, 0] = [1.0, -1.0, 1.0, 0.5]  # tie: the lower indices 0 and 1 win
    np.testing.assert_array_equal(np.asarray(top2_mask(w, 0))[0:4, 0], [1, 1, 0, 0])
    ws = w * np_top2(w, 0)
    values, meta = jax.jit(lambda a: compress(a, 0))(ws)
    np.testing.assert_array_equal(np.asarray(decompress(values, meta, 0)), ws)
