"""ops.sparse_dense(backend="pallas") equals backend="xla" in values and gradients (interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj
from bimask_jax import pallas_backend
from bimask_jax.ops import sparse_dense

# fp32 on CPU (interpret mode) is exact up to summation order; on a GPU Triton (and XLA) may use TF32
F32_TOL = 1e-5 if jax.default_backend() != "gpu" else 1e-2


def bimask_setup(k, c, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (k, c)) * rng.choice([-1.0, 1.0], (k, c)), dtype)
    x = jnp.asarray(rng.uniform(-1.0, 1.0, (2, 3, k)), dtype)
    fwd = bj.forward_mask(w, 2, 4)
    perm = jnp.asarray(rng.permutation(c), jnp.int32)
    bwd = bj.backward_mask(w, fwd, perm, 2, 4)
    return x, w, fwd, bwd, perm


def loss(x, w, fwd, bwd, perm, backend):
    y = sparse_dense(x, w, fwd, bwd, 1e-2, perm=perm, backend=backend)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, 3e-2)])
def test_pallas_equals_xla_values_and_grads(dtype, tol):
    x, w, fwd, bwd, perm = bimask_setup(40, 24, 0, dtype)
    assert bool(pallas_backend.is_24(fwd, 0)) and bool(pallas_backend.is_24(bwd[:, perm], 1))
    y_x = sparse_dense(x, w, fwd, bwd, perm=perm, backend="xla")
    y_p = sparse_dense(x, w, fwd, bwd, perm=perm, backend="pallas")
    assert y_p.dtype == y_x.dtype == dtype
    np.testing.assert_allclose(np.asarray(y_p, np.float32), np.asarray(y_x, np.float32),
                               rtol=tol, atol=tol)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=5)
    gx_x, gw_x = grad(x, w, fwd, bwd, perm, "xla")
    gx_p, gw_p = grad(x, w, fwd, bwd, perm, "pallas")
    assert gx_p.dtype == dtype and gw_p.dtype == dtype
    np.testing.assert_allclose(np.asarray(gx_p, np.float32), np.asarray(gx_x, np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(gw_p, np.float32), np.asarray(gw_x, np.float32),
                               rtol=tol, atol=tol)


def test_pallas_path_really_runs_the_kernels():
    x, w, fwd, bwd, perm = bimask_setup(16, 8, 1)
    jaxpr = str(jax.make_jaxpr(
        jax.grad(lambda x_: loss(x_, w, fwd, bwd, perm, "pallas")))(x))
    assert jaxpr.count("pallas_call") == 2  # forward spmm + backward-data spmm


def test_non_24_masks_fall_back_to_xla_also_under_jit():
    x, w, _, _, perm = bimask_setup(16, 8, 2)
    ones = jnp.ones(w.shape, bool)  # "dense" method: not 2:4, the products must fall back
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=5)
    (v_x, (gx_x, gw_x)) = f(x, w, ones, ones, perm, "xla")
    (v_p, (gx_p, gw_p)) = f(x, w, ones, ones, perm, "pallas")
    for a, b in ((v_p, v_x), (gx_p, gx_x), (gw_p, gw_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_backend_names_are_checked():
    x, w, fwd, bwd, perm = bimask_setup(16, 8, 3)
    with pytest.raises(ValueError, match="backend must be one of \\('xla', 'pallas'\\)"):
        sparse_dense(x, w, fwd, bwd, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of \\('xla', 'pallas'\\)"):
        bj.sparse_conv(jnp.ones((1, 4, 4, 16)), jnp.ones((1, 1, 16, 8)), jnp.ones((1, 1, 16, 8),
                       bool), jnp.ones((1, 1, 16, 8), bool), backend="triton")


def conv_loss(x, w, fwd, bwd, perm, backend, strides, padding):
    y = bj.sparse_conv(x, w, fwd, bwd, 1e-2, strides=strides, padding=padding, perm=perm,
                       backend=backend)
    return jnp.sum(jnp.sin(y)), y


@pytest.mark.parametrize("window,strides,padding,kernels", [
    ((1, 1), (2, 1), "SAME", 2),            # 1x1, strided: through the 2:4 kernels
    ((3, 3), (1, 1), "SAME", 0),            # 3x3: the XLA conv
])
@pytest.mark.slow
def test_sparse_conv_pallas_equals_xla(window, strides, padding, kernels):
    rng = np.random.default_rng(6)
    cin, c = 16, 8
    w = jnp.asarray(rng.uniform(0.1, 1.0, (*window, cin, c)) * rng.choice([-1.0, 1.0],
                                                                        (*window, cin, c)),
                    jnp.float32)
    x = jnp.asarray(rng.uniform(-1, 1, (2, 5, 6, cin)), jnp.float32)
    perm = jnp.asarray(rng.permutation(c), jnp.int32)
    fwd = bj.forward_mask(w, 2, 4)
    bwd = bj.backward_mask(w, fwd, perm, 2, 4)
    grad = jax.grad(conv_loss, argnums=(0, 1), has_aux=True)
    (gx_x, gw_x), y_x = grad(x, w, fwd, bwd, perm, "xla", strides, padding)
    (gx_p, gw_p), y_p = grad(x, w, fwd, bwd, perm, "pallas", strides, padding)
    for a, b in ((y_p, y_x), (gx_p, gx_x), (gw_p, gw_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=F32_TOL, atol=F32_TOL)
    jaxpr = str(jax.make_jaxpr(
        lambda x_: grad(x_, w, fwd, bwd, perm, "pallas", strides, padding))(x))
    assert jaxpr.count("pallas_call") == kernels


@pytest.mark.slow
def test_resparsify_agrees_with_the_bimask_masks():
    """The kernel's Mf / Mb equal bimask_jax.forward_mask / backward_mask (n:m = 2:4)."""
    from pallas_kernels import decompress, resparsify

    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (20, 12)) * rng.choice([-1.0, 1.0], (20, 12)),
                    jnp.float32)
    perm = jnp.asarray(rng.permutation(12), jnp.int32)
    fwd = bj.forward_mask(w, 2, 4)
    bwd = bj.backward_mask(w, fwd, perm, 2, 4)
    out = resparsify(w, perm, interpret=True, block_k=8, block_c=8, poison=True)
    np.testing.assert_array_equal(np.asarray(out.fwd_mask), np.asarray(fwd))
    np.testing.assert_array_equal(np.asarray(decompress(out.fwd_values, out.fwd_meta, 0)),
                                  np.asarray(jnp.where(fwd, w, 0.0)))
    np.testing.assert_array_equal(np.asarray(decompress(out.bwd_values, out.bwd_meta, 0)),
                                  np.asarray(jnp.where(bwd, w, 0.0)[:, perm].T))


def test_pallas_backend_under_vmap_and_remat():
    x, w, fwd, bwd, perm = bimask_setup(16, 8, 5)

    def f(backend):
        g = jax.checkpoint(lambda xb: sparse_dense(xb, w, fwd, bwd, perm=perm, backend=backend))
        return jax.vmap(g)(x)

    np.testing.assert_allclose(np.asarray(f("pallas")), np.asarray(f("xla")), rtol=F32_TOL,
                               atol=F32_TOL)


@pytest.mark.slow
def test_flax_wrapper_with_pallas_backend_equals_xla():
    """bimask_jax.sparse(..., backend="pallas"): Dense and the 1x1 conv run the kernels."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3))(x))       # 3x3: XLA conv
            x = nn.Conv(16, (1, 1), strides=2)(x)     # 1x1: 2:4 kernels
            return nn.Dense(8)(x.reshape(x.shape[0], -1))  # 2:4 kernels

    x = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (2, 6, 6, 8)), jnp.float32)
    results = {}
    for backend in ("xla", "pallas"):
        model = bj.sparse(Net(), 2, 4, "bimask", backend=backend, num_candidates=4)
        variables = model.init(jax.random.PRNGKey(0), x)
        rest = {k: v for k, v in variables.items() if k != "params"}

        def loss(p, model=model, rest=rest):
            return jnp.sum(jnp.sin(model.apply({"params": p, **rest}, x)))

        results[backend] = jax.jit(jax.value_and_grad(loss))(variables["params"])
        calls = str(jax.make_jaxpr(jax.grad(loss))(variables["params"])).count("pallas_call")
        assert calls == (4 if backend == "pallas" else 0)
    (v_x, g_x), (v_p, g_p) = results["xla"], results["pallas"]
    np.testing.assert_allclose(float(v_p), float(v_x), rtol=F32_TOL, atol=F32_TOL)
    for a, b in zip(jax.tree.leaves(g_p), jax.tree.leaves(g_x), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=F32_TOL, atol=F32_TOL)
