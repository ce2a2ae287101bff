"""Bridge from ``bimask_jax.ops`` (``backend="pallas"``) to the 2:4 kernels of ``pallas_kernels``.

``sparse_dense`` here is a ``jax.custom_vjp`` with exactly the rule of the ``"xla"`` backend::

    y  = x @ (W * Mf)                      -> pallas_kernels.spmm on compress(W, axis=0, mask=Mf)
    dx = g @ (W * Mb)^T                    -> pallas_kernels.spmm_bwd_data on
                                              compress((W*Mb)[:, perm].T, axis=0, mask=Mb[:, perm].T)
    dW = x^T g + decay * (1 - Mf) * W      (dense XLA matmul, as in the xla backend; with
                                              wgrad="mvue" of the N:M estimate of g)

The kernels sit inside the ``custom_vjp`` (``jax.grad`` cannot differentiate a ``pallas_call``).
The ops do not know n:m, so each product checks its own mask: the forward product uses the kernel
when ``Mf`` is 2:4 along K, the backward-data product when ``Mb[:, perm]`` is 2:4 along C
(at most 2 True in every group of 4). Otherwise that product falls back to the dense XLA product
(e.g. the all-True masks of ``method="dense"``): a ``lax.cond`` on a count over the mask.

``precision`` goes to the kernels' dots (they always accumulate in fp32; on GPU with fp32 inputs the
default lets Triton use TF32, as XLA does). On CPU the kernels run in Pallas interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from bimask_jax._checks import safe_perm
from bimask_jax.masked_products import dense_weight_grad
from bimask_jax.masked_products import masked_kernel as _masked


def is_24(mask, axis: int) -> jax.Array:
    """bool scalar: at most 2 True in every group of 4 consecutive entries along ``axis``.

    False when the axis length is not divisible by 4.
    """
    mask = jnp.asarray(mask, bool)
    n = mask.shape[axis]
    if n % 4:
        return jnp.asarray(False)
    m = jnp.moveaxis(mask, axis, 0)
    counts = m.reshape(n // 4, 4, -1).sum(axis=1, dtype=jnp.int32)
    return jnp.all(counts <= 2)


def forward_product(x, kernel, fwd, *, precision=None):
    """``x @ (kernel * fwd)`` in ``result_type(x, kernel)``; (..., K) x (K, C) -> (..., C)."""
    import pallas_kernels as pk

    dtype = jnp.result_type(x, kernel)

    def with_kernel(x, kernel, fwd):
        values, meta = pk.compress(kernel.astype(dtype), axis=0, mask=fwd)
        return pk.spmm(x.astype(dtype), values, meta, out_dtype=dtype, precision=precision)

    def with_xla(x, kernel, fwd):
        return jnp.matmul(x.astype(dtype), _masked(kernel, fwd, dtype), precision=precision)

    return lax.cond(is_24(fwd, 0), with_kernel, with_xla, x, kernel, fwd)


def backward_data_product(g, kernel, bwd, perm, *, precision=None):
    """``g @ (kernel * bwd)^T`` in ``g.dtype``; (..., C) x (K, C)^T -> (..., K).

    ``perm`` int (C,): ``bwd[:, perm]`` is expected 2:4 along C (else the XLA fallback is used).
    """
    import pallas_kernels as pk

    dtype = g.dtype

    def with_kernel(g, kernel, bwd, perm):
        bt = kernel[:, perm].T.astype(dtype)
        values, meta = pk.compress(bt, axis=0, mask=bwd[:, perm].T)
        return pk.spmm_bwd_data(g, values, meta, perm, out_dtype=dtype, precision=precision)

    def with_xla(g, kernel, bwd, perm):
        del perm
        return jnp.matmul(g, _masked(kernel, bwd, dtype).T, precision=precision)

    return lax.cond(is_24(bwd[:, perm], 1), with_kernel, with_xla, g, kernel, bwd, perm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _sparse_dense(x, kernel, fwd, bwd, perm, key, decay, precision, wgrad):
    return forward_product(x, kernel, fwd, precision=precision)


def _sparse_dense_fwd(x, kernel, fwd, bwd, perm, key, decay, precision, wgrad):
    y = forward_product(x, kernel, fwd, precision=precision)
    return y, (x, kernel, fwd, bwd, perm, key)


def _sparse_dense_bwd(decay, precision, wgrad, res, g):
    x, kernel, fwd, bwd, perm, key = res
    dx = backward_data_product(g, kernel, bwd, perm, precision=precision).astype(x.dtype)
    # the weight gradient is an XLA matmul (with "mvue", of the N:M estimate of g; no 2:4 kernel
    # for it here)
    dw = dense_weight_grad(x, kernel, fwd, g, decay, precision, wgrad, key)
    return dx, dw, None, None, None, None


_sparse_dense.defvjp(_sparse_dense_fwd, _sparse_dense_bwd)


def sparse_dense(x, kernel, fwd, bwd, decay: float, perm=None, precision=None, wgrad=None,
                 key=None):
    """The ``backend="pallas"`` body of ``bimask_jax.ops.sparse_dense`` (inputs already checked).

    ``perm=None`` means the identity permutation; an invalid traced ``perm`` is replaced by it
    (``_checks.safe_perm``, not reported under ``checkify``: the masks that ``perm`` came with
    are where an invalid one is reported), so the kernels never read outside the kernel's columns.
    """
    c = kernel.shape[1]
    perm = jnp.arange(c, dtype=jnp.int32) if perm is None else safe_perm(perm)
    return _sparse_dense(x, kernel, fwd, bwd, perm, key, decay, precision, wgrad)


def conv_is_matmul(kernel_shape, cfg) -> bool:
    """True when the conv is a strided matmul: 1x1 window, no input dilation, no padding.

    ``cfg`` is ``ops.sparse_conv``'s ``(strides, padding, lhs_dilation, rhs_dilation, precision)``.
    A 1x1 window gives no padding under "SAME", "VALID" and "SAME_LOWER".
    """
    _, padding, lhs_dilation, _, _ = cfg
    window = kernel_shape[:-2]
    no_pad = isinstance(padding, str) or all(lo == 0 and hi == 0 for lo, hi in padding)
    return all(s == 1 for s in window) and all(d == 1 for d in lhs_dilation) and no_pad


def sparse_conv_1x1(x, kernel, fwd, bwd, decay: float, cfg, perm=None, wgrad=None, key=None):
    """``backend="pallas"`` body of ``ops.sparse_conv`` for ``conv_is_matmul`` convs.

    ``x`` (N, *spatial, Cin) is subsampled by the strides and multiplied with the (Cin, C) kernel
    through ``sparse_dense`` (same custom gradients; the strided slice and the reshapes are
    differentiated by JAX).
    """
    strides = cfg[0]
    precision = cfg[4]
    sl = (slice(None), *(slice(None, None, s) for s in strides), slice(None))
    cin, c = kernel.shape[-2:]
    return sparse_dense(
        x[sl],
        kernel.reshape(cin, c),
        fwd.reshape(cin, c),
        bwd.reshape(cin, c),
        decay,
        perm,
        precision,
        wgrad,
        key,
    )
