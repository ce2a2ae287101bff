import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj

DECAY = 2e-4


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _masks(k, method="bimask", seed=0):
    perm = np.random.default_rng(seed).permutation(k.shape[-1])
    return bj.layer_masks(k, 2, 4, method, perm)


@pytest.mark.parametrize("batch", [(5,), (2, 3), ()])
def test_sparse_dense_values_and_grads_match_formula(batch):
    k = _rand((16, 12), 0)
    x = _rand(batch + (16,), 1)
    g = _rand(batch + (12,), 2)
    fwd, bwd = _masks(k)
    f, b = np.asarray(fwd), np.asarray(bwd)
    y, vjp = jax.vjp(lambda x_, k_: bj.sparse_dense(x_, k_, fwd, bwd, DECAY), x, k)
    np.testing.assert_allclose(y, x @ (k * f), rtol=1e-5, atol=1e-5)
    dx, dk = vjp(g)
    np.testing.assert_allclose(dx, g @ (k * b).T, rtol=1e-5, atol=1e-5)
    x2, g2 = x.reshape(-1, 16), g.reshape(-1, 12)
    np.testing.assert_allclose(dk, x2.T @ g2 + DECAY * (1 - f) * k, rtol=1e-5, atol=1e-5)


def test_sparse_dense_masks_get_no_gradient_and_grad_works():
    k, x = _rand((8, 8), 0), _rand((4, 8), 1)
    fwd, bwd = _masks(k)
    gk, gf, gb = jax.grad(
        lambda k_, f_, b_: bj.sparse_dense(x, k_, f_, b_).sum(), argnums=(0, 1, 2), allow_int=True
    )(k, fwd, bwd)
    # the masks' cotangents are symbolic zeros (float0), the kernel's is the documented rule
    assert gf.dtype == jax.dtypes.float0 and gf.shape == k.shape
    assert gb.dtype == jax.dtypes.float0 and gb.shape == k.shape
    want = x.T @ np.ones((4, 8), np.float32) + 2e-4 * (1 - np.asarray(fwd)) * k
    np.testing.assert_allclose(gk, want, rtol=1e-5, atol=1e-5)
    assert gk.dtype == jnp.float32


def _np_conv_nhwc(x, w, stride, pad):
    """Direct loop statement of a 2-D NHWC/HWIO cross-correlation with explicit padding."""
    (pt, pb), (pl, pr) = pad
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, c = w.shape
    oh = (xp.shape[1] - kh) // stride + 1
    ow = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, c), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j, :] = np.tensordot(patch, w, axes=([1, 2, 3], [0, 1, 2]))
    return out


@pytest.mark.parametrize(
    "stride,pad", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (1, 0))), (2, ((0, 0), (0, 0)))]
)
def test_sparse_conv_values_and_grads(stride, pad):
    k = _rand((3, 3, 8, 12), 3)
    x = _rand((2, 7, 7, 8), 4)
    fwd, bwd = _masks(k, seed=1)
    f, b = np.asarray(fwd), np.asarray(bwd)

    def op(x_, k_):
        return bj.sparse_conv(x_, k_, fwd, bwd, DECAY, strides=stride, padding=pad)

    y, vjp = jax.vjp(op, x, k)
    np.testing.assert_allclose(y, _np_conv_nhwc(x, k * f, stride, pad), rtol=1e-4, atol=1e-4)
    g = _rand(y.shape, 5)
    dx, dk = vjp(g)

    # Independent statement of the gradients: autodiff of the plain conv (numerically checked by
    # the finite-difference test below), with kernel*bwd for dx and the dense kernel for dW.
    def plain(x_, w_):
        return jax.lax.conv_general_dilated(
            x_, w_, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    dx_ref = jax.vjp(lambda x_: plain(x_, k * b), x)[1](g)[0]
    dk_ref = jax.vjp(lambda w_: plain(x, w_), k)[1](g)[0] + DECAY * (1 - f) * k
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-4)


def test_sparse_conv_grad_finite_differences():
    k = _rand((3, 3, 4, 4), 6).astype(np.float64)
    x = _rand((1, 5, 5, 4), 7).astype(np.float64)
    ones = jnp.ones(k.shape, bool)
    with jax.enable_x64(True):
        loss = lambda x_: (
            bj.sparse_conv(x_, jnp.asarray(k), ones, ones, 0.0, strides=2) ** 2
        ).sum()
        gx = np.asarray(jax.grad(loss)(jnp.asarray(x)))
        eps = 1e-6
        for idx in [(0, 0, 0, 0), (0, 2, 3, 1), (0, 4, 4, 3)]:
            e = np.zeros_like(x)
            e[idx] = eps
            fd = (float(loss(jnp.asarray(x + e))) - float(loss(jnp.asarray(x - e)))) / (2 * eps)
            assert gx[idx] == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_sparse_conv_1d_and_dilation():
    k = _rand((3, 8, 4), 8)
    x = _rand((2, 9, 8), 9)
    fwd, bwd = bj.layer_masks(k, 2, 4, "srste")
    y = bj.sparse_conv(x, k, fwd, bwd, rhs_dilation=2, padding="VALID")
    want = jax.lax.conv_general_dilated(
        x,
        k * np.asarray(fwd),
        (1,),
        "VALID",
        rhs_dilation=(2,),
        dimension_numbers=("NWC", "WIO", "NWC"),
    )
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_ops_under_jit_vmap_remat():
    k = _rand((16, 8), 0)
    xs = _rand((3, 4, 16), 1)
    fwd, bwd = _masks(k)

    def loss(k_, x_):
        return (bj.sparse_dense(x_, k_, fwd, bwd) ** 2).sum()

    per_ex = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(k, xs)
    rem = jax.jit(jax.grad(jax.checkpoint(loss)))(k, xs[0])
    np.testing.assert_allclose(per_ex[0], jax.grad(loss)(k, xs[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rem, per_ex[0], rtol=1e-5, atol=1e-5)


def test_bf16_inputs():
    k = _rand((16, 8), 0)
    x = _rand((4, 16), 1)
    fwd, bwd = _masks(k)
    kb, xb = jnp.asarray(k, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16)
    y, vjp = jax.vjp(lambda x_, k_: bj.sparse_dense(x_, k_, fwd, bwd), xb, kb)
    assert y.dtype == jnp.bfloat16
    dx, dk = vjp(jnp.ones_like(y))
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32), x @ (k * np.asarray(fwd)), rtol=5e-2, atol=1e-1
    )
    xc = jnp.asarray(_rand((1, 6, 6, 8), 2), jnp.bfloat16)
    kc = jnp.asarray(_rand((3, 3, 8, 8), 3), jnp.bfloat16)
    fc, bc = bj.layer_masks(kc, 2, 4, "bimask")
    gx = jax.grad(lambda x_: bj.sparse_conv(x_, kc, fc, bc).astype(jnp.float32).sum())(xc)
    assert gx.dtype == jnp.bfloat16


def test_op_errors():
    k, x = _rand((16, 8), 0), _rand((4, 16), 1)
    ones = jnp.ones((16, 8), bool)
    with pytest.raises(ValueError, match="x's last axis \\(15\\) must equal kernel's K=16"):
        bj.sparse_dense(x[:, :15], k, ones, ones)
    with pytest.raises(ValueError, match="bwd must have the kernel's shape"):
        bj.sparse_dense(x, k, ones, ones[:8])
    with pytest.raises(ValueError, match="kernel must have a floating dtype"):
        bj.sparse_dense(x, k.astype(np.int32), ones, ones)
    with pytest.raises(ValueError, match="backend must be one of"):
        bj.sparse_dense(x, k, ones, ones, backend="cuda")
    kc = _rand((3, 3, 8, 8), 0)
    onesc = jnp.ones(kc.shape, bool)
    with pytest.raises(ValueError, match="channel axis \\(4\\) must equal kernel's Cin=8"):
        bj.sparse_conv(_rand((1, 5, 5, 4), 0), kc, onesc, onesc)
    with pytest.raises(ValueError, match="strides must be an int >= 1 or a sequence of 2"):
        bj.sparse_conv(_rand((1, 5, 5, 8), 0), kc, onesc, onesc, strides=(1, 1, 1))


_SHARDED_GRADS = r"""
import jax, jax.numpy as jnp, numpy as np
import bimask_jax as bj
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

rng = np.random.default_rng(0)
k = jnp.asarray(rng.standard_normal((3, 3, 8, 8)), jnp.float32)
kd = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
x = jnp.asarray(rng.standard_normal((4, 6, 6, 8)), jnp.float32)
xd = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
fc, bc = bj.layer_masks(k, 2, 4, "bimask", jnp.arange(8)[::-1])
fd, bd = bj.layer_masks(kd, 2, 4, "bimask", jnp.arange(8)[::-1])

def loss(x, k, xd, kd):
    return (bj.sparse_conv(x, k, fc, bc, strides=2) ** 2).sum() + (
        bj.sparse_dense(xd, kd, fd, bd) ** 2).sum()

grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
ref = grad(x, k, xd, kd)
mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Explicit,))
with jax.set_mesh(mesh):
    shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    got = grad(shard(x, P("data")), shard(k, P()), shard(xd, P("data")), shard(kd, P()))
for a, b in zip(got, ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-3)
print("OK")
"""


def test_grads_with_explicit_batch_sharding_match_single_device():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED_GRADS], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
