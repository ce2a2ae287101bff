"""Compiled kernels on a real GPU (skipped without one): the first checks for a GPU session.

Run: ``pytest tests/test_pallas_gpu.py -rs``. On CPU every test here is skipped.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (
    compress,
    decompress,
    resparsify,
    resparsify_reference,
    spmm,
    spmm_bwd_data,
    top2_mask,
)

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def operands(m, k, n, seed=0):
    key = jax.random.PRNGKey(seed)
    kw, kx, kp = jax.random.split(key, 3)
    w = jax.random.normal(kw, (k, n), jnp.float32).astype(jnp.bfloat16)
    perm = jax.random.permutation(kp, n).astype(jnp.int32)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    return w, perm, x


@pytest.mark.parametrize("loads", ["strided", "split"])
@pytest.mark.parametrize("m,k,n", [(1000, 1152, 128), (256, 384, 1000)])
def test_compiled_spmm_and_bwd_data(m, k, n, loads):
    w, perm, x = operands(m, k, n)
    out = resparsify(w, perm, interpret=False)
    wf = decompress(out.fwd_values, out.fwd_meta, 0)
    y = spmm(x, out.fwd_values, out.fwd_meta, interpret=False, loads=loads)
    assert rel_err(y, jnp.dot(x, wf, preferred_element_type=jnp.float32)) < 1e-2
    g = jax.random.normal(jax.random.PRNGKey(9), (m, n), jnp.float32).astype(jnp.bfloat16)
    wb_t = decompress(out.bwd_values, out.bwd_meta, 0)  # ((W*Mb)[:, perm]).T
    ref = jnp.dot(jnp.take(g, perm, axis=1), wb_t, preferred_element_type=jnp.float32)
    for gather in ("xla", "kernel"):
        dx = spmm_bwd_data(g, out.bwd_values, out.bwd_meta, perm, gather=gather,
                           interpret=False, loads=loads)
        assert rel_err(dx, ref) < 1e-2, gather


def test_compiled_resparsify_is_exact():
    w, perm, _ = operands(8, 576, 256, seed=1)
    got = resparsify(w, perm, interpret=False)
    want = resparsify_reference(w, perm)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _sm90_case(meta_fn):
    from pallas_kernels.hopper_sparse import spmm_sm90

    w, _, x = operands(256, 512, 256, seed=2)
    w = jnp.where(top2_mask(w, 0), w, 0)
    values, meta = compress(w, 0)
    meta = meta_fn(meta)
    dense = decompress(values, meta, 0)
    y = spmm_sm90(x, values, meta)
    return rel_err(y, jnp.dot(x, dense, preferred_element_type=jnp.float32))


def test_sm90_sparse_wgmma_probe01():
    """Positions (0, 1) everywhere: independent of the metadata layout (descriptors, PTX)."""
    assert _sm90_case(lambda m: jnp.full(m.shape, 0x44, jnp.uint8)) < 1e-2


def test_sm90_sparse_wgmma_random_pattern():
    """Random 2:4 pattern: checks the derived per-thread metadata layout."""
    assert _sm90_case(lambda m: m) < 1e-2
