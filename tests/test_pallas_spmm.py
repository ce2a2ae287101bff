"""pallas_kernels.spmm / spmm_bwd_data in interpret mode, against NumPy and decompress + jnp.dot."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import compress, decompress, spmm, spmm_bwd_data, spmm_reference
from tests.nm_reference import top2_of_4

np_top2 = top2_of_4


def nonzero_uniform(rng, shape):
    return rng.uniform(0.1, 1.0, shape) * rng.choice([-1.0, 1.0], shape)


def as_f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize(
    "lead,k,n,dtype,blocks,loads",
    [
        ((5,), 40, 24, jnp.float32, {}, "strided"),  # ragged M, K % 8 == 4, N
        ((2, 3), 64, 20, jnp.bfloat16, {}, "split"),  # batch axes, bf16
        ((33,), 136, 70, jnp.float32, dict(block_m=16, block_n=32, block_k=32), "strided"),
        ((33,), 136, 70, jnp.float32, dict(block_m=16, block_n=32, block_k=32), "split"),
    ],
)
def test_spmm_matches_numpy_and_decompress_dot(lead, k, n, dtype, blocks, loads):
    rng = np.random.default_rng(k + n)
    w = nonzero_uniform(rng, (k, n))
    w = jnp.asarray(w * np_top2(w, 0), dtype)
    x = jnp.asarray(nonzero_uniform(rng, (*lead, k)), dtype)
    values, meta = compress(w, 0)
    poison = jnp.full((*lead, n), jnp.nan, dtype)
    y = spmm(x, values, meta, out_init=poison, interpret=True, loads=loads, **blocks)
    assert y.shape == (*lead, n) and y.dtype == dtype
    assert not np.isnan(as_f32(y)).any()
    ref_np = as_f32(x) @ as_f32(w)  # independent: NumPy on the dense masked kernel
    np.testing.assert_allclose(as_f32(y), ref_np, **TOL[dtype])
    ref_pk = spmm_reference(x, values, meta)
    np.testing.assert_allclose(as_f32(y), as_f32(ref_pk), **TOL[dtype])


@pytest.mark.parametrize(
    "gather,dtype,loads",
    [
        ("xla", jnp.float32, "strided"),
        ("xla", jnp.bfloat16, "split"),
        ("kernel", jnp.float32, "split"),
        ("kernel", jnp.bfloat16, "strided"),
    ],
)
def test_bwd_data_is_g_times_masked_kernel_transposed(gather, dtype, loads):
    rng = np.random.default_rng(7)
    k, c, m = 36, 24, 7
    w = nonzero_uniform(rng, (k, c))
    perm = rng.permutation(c).astype(np.int32)
    mb_perm = np_top2(w[:, perm], 1)  # 2:4 along the permuted output axis
    mb = np.zeros_like(mb_perm)
    mb[:, perm] = mb_perm
    wb = jnp.asarray(w * mb, dtype)
    g = jnp.asarray(nonzero_uniform(rng, (m, c)), dtype)
    values_t, meta_t = compress(wb[:, perm].T, 0)
    np.testing.assert_array_equal(as_f32(decompress(values_t, meta_t, 0)), as_f32(wb)[:, perm].T)
    dx = spmm_bwd_data(
        g,
        values_t,
        meta_t,
        perm,
        gather=gather,
        interpret=True,
        loads=loads,
        out_init=jnp.full((m, k), jnp.nan, dtype),
    )
    assert dx.shape == (m, k) and dx.dtype == dtype
    np.testing.assert_allclose(as_f32(dx), as_f32(g) @ as_f32(wb).T, **TOL[dtype])


def test_spmm_rejects_bad_inputs():
    x = jnp.ones((2, 16))
    v, m = compress(jnp.zeros((16, 8)), 0)
    with pytest.raises(ValueError, match="equal 2 \\* values.shape"):
        spmm(jnp.ones((2, 12)), v, m)
    with pytest.raises(ValueError, match="metadata must be uint8"):
        spmm(x, v, m.astype(jnp.int32))
    with pytest.raises(ValueError, match="block_k=12 must be a multiple of 8"):
        spmm(x, v, m, block_k=12)
    with pytest.raises(ValueError, match="loads must be"):
        spmm(x, v, m, loads="tma")
    with pytest.raises(ValueError, match="gather must be"):
        spmm_bwd_data(jnp.ones((2, 16)), v, m, jnp.arange(16), gather="loop")
    with pytest.raises(ValueError, match="perm must have shape"):
        spmm_bwd_data(jnp.ones((2, 16)), v, m, jnp.arange(8))
