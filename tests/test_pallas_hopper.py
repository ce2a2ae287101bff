"""Hopper sparse-MMA path (pallas_kernels.hopper_sparse): metadata packing and cuda lowering.

Nothing here runs a GPU: the word layout is checked against a NumPy statement of the *derived*
layout (not against hardware), and the Mosaic GPU kernel is only lowered.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compress, top2_mask
from pallas_kernels.hopper_sparse import (
    pack_sm90_metadata,
    spmm_bwd_data_sm90,
    spmm_sm90,
    spmm_t_sm90,
    unpack_sm90_metadata,
)

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16


def np_words(pos, m, k):
    """Derived layout, stated per thread: pos (M, K/4, 2) ascending positions of A's groups."""
    words = np.zeros((m // 64, k // 32, 128), np.uint64)
    for mi in range(m // 64):
        for ks in range(k // 32):
            for t in range(128):
                w, lane = divmod(t, 32)
                g, h = lane // 4, lane % 2
                val = 0
                for half in range(2):
                    row = 64 * mi + 16 * w + g + 8 * half
                    for c in range(4):
                        grp = (32 * ks + 16 * h + 4 * c) // 4
                        i0, i1 = pos[row, grp]
                        val |= (int(i0) | int(i1) << 2) << (16 * half + 4 * c)
                words[mi, ks, t] = val
    return words.astype(np.uint32)


def test_pack_sm90_metadata_matches_the_derived_layout_and_roundtrips():
    rng = np.random.default_rng(0)
    m, k = 128, 64
    a = rng.uniform(0.1, 1.0, (m, k)).astype(np.float32)
    a = a * np.asarray(top2_mask(a, axis=1))
    _, meta = compress(a, axis=1)
    keep = (a != 0).reshape(m, k // 4, 4)
    pos = np.stack([np.argmax(keep, -1), 3 - np.argmax(keep[..., ::-1], -1)], -1)
    words = pack_sm90_metadata(meta)
    assert words.dtype == jnp.uint32 and words.shape == (m // 64, k // 32, 128)
    np.testing.assert_array_equal(np.asarray(words), np_words(pos, m, k))
    np.testing.assert_array_equal(np.asarray(unpack_sm90_metadata(words)), np.asarray(meta))
    with pytest.raises(ValueError, match="M % 64 == 0"):
        pack_sm90_metadata(meta[:32])


def lower_cuda(f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("tiles", [dict(tile_m=128, tile_n=128, tile_k=128),
                                   dict(tile_m=64, tile_n=128, tile_k=256)])
def test_sparse_wgmma_kernel_lowers_for_cuda(tiles):
    m, n, k = 256, 256, 512
    text = lower_cuda(lambda a, w, b: spmm_t_sm90(a, w, b, **tiles),
                      S((m, k // 2), BF16), S((m // 64, k // 32, 128), jnp.uint32), S((n, k), BF16))
    assert "mosaic_gpu" in text and "wgmma.mma_async.sp.sync.aligned.m64n128k32.f32.bf16.bf16" in text


def test_sparse_wgmma_wrappers_lower_for_cuda():
    m, k, c = 256, 512, 256
    fwd = lower_cuda(spmm_sm90, S((m, k), BF16), S((k // 2, c), BF16), S((k // 8, c), jnp.uint8))
    bwd = lower_cuda(spmm_bwd_data_sm90, S((m, c), BF16), S((c // 2, k), BF16),
                     S((c // 8, k), jnp.uint8), S((c,), jnp.int32))
    for text in (fwd, bwd):  # each wrapper reaches the sparse wgmma kernel
        assert "mosaic_gpu" in text and "wgmma.mma_async.sp.sync.aligned" in text


def test_sparse_wgmma_lowering_catches_shared_memory_overflow():
    with pytest.raises(ValueError, match="exceeds available shared memory"):
        lower_cuda(lambda a, w, b: spmm_t_sm90(a, w, b, tile_m=64, tile_n=256, tile_k=256),
                   S((256, 256), BF16), S((4, 16, 128), jnp.uint32), S((256, 512), BF16))


def test_sparse_wgmma_rejects_bad_tiles():
    with pytest.raises(ValueError, match="must divide by tiles"):
        spmm_t_sm90(jnp.zeros((64, 64), BF16), jnp.zeros((1, 4, 128), jnp.uint32),
                    jnp.zeros((8, 128), BF16), tile_m=64, tile_n=16, tile_k=128)


def test_sm90_wrappers_transpose_correctly_with_a_reference_kernel(monkeypatch):
    """spmm_sm90 / spmm_bwd_data_sm90 around a jnp stand-in for the (GPU-only) kernel."""
    from pallas_kernels import decompress, hopper_sparse

    def reference_kernel(a_values, words, b, **tiles):
        a = decompress(a_values, unpack_sm90_metadata(words), axis=1)
        return jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32).T)

    monkeypatch.setattr(hopper_sparse, "spmm_t_sm90", reference_kernel)
    rng = np.random.default_rng(1)
    m, k, c = 8, 64, 64
    w = rng.uniform(0.1, 1.0, (k, c)).astype(np.float32)
    wf = w * np.asarray(top2_mask(w, 0))
    x = rng.uniform(-1, 1, (m, k)).astype(np.float32)
    values, meta = compress(wf, 0)
    np.testing.assert_allclose(np.asarray(hopper_sparse.spmm_sm90(x, values, meta)), x @ wf,
                               rtol=1e-5, atol=1e-5)
    perm = rng.permutation(c).astype(np.int32)
    wb = np.zeros_like(w)
    wb[:, perm] = w[:, perm] * np.asarray(top2_mask(w[:, perm], 1))
    g = rng.uniform(-1, 1, (m, c)).astype(np.float32)
    values_t, meta_t = compress(wb[:, perm].T, 0)
    np.testing.assert_allclose(
        np.asarray(hopper_sparse.spmm_bwd_data_sm90(g, values_t, meta_t, perm)), g @ wb.T,
        rtol=1e-5, atol=1e-5)
