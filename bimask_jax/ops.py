"""Sparse Dense and Conv products with Bi-Mask's custom gradients (``jax.custom_vjp``).

For a layer with kernel ``W``, forward mask ``Mf`` and backward mask ``Mb``:

    y       = x @ (W * Mf)
    dx      = g @ (W * Mb)^T                      (conv: the transposed conv with W * Mb)
    dW      = x^T @ g + decay * (1 - Mf) * W      (dense straight-through + the SR-STE term)
    dMf = dMb = 0

Only the two bool masks are saved as residuals beside ``x`` and ``W`` (no float copies). Both ops
work under ``jit``, ``vmap``, ``grad`` and ``remat``, with fp32 or bf16 inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bimask_jax import pallas_backend
from bimask_jax._checks import (
    as_array,
    check_choice,
    check_decay,
    check_floating,
    check_mask,
    check_perm,
)
from bimask_jax.masked_products import dense_weight_grad, masked_kernel, srste_term

BACKENDS = ("xla", "pallas")


# ----------------------------------------------------------------------------------------- dense


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sparse_dense(x, kernel, fwd, bwd, decay, precision):
    dtype = jnp.result_type(x, kernel)
    return jnp.matmul(x.astype(dtype), masked_kernel(kernel, fwd, dtype), precision=precision)


def _sparse_dense_fwd(x, kernel, fwd, bwd, decay, precision):
    return _sparse_dense(x, kernel, fwd, bwd, decay, precision), (x, kernel, fwd, bwd)


def _sparse_dense_bwd(decay, precision, res, g):
    x, kernel, fwd, bwd = res
    dtype = g.dtype
    dx = jnp.matmul(g, masked_kernel(kernel, bwd, dtype).T, precision=precision).astype(x.dtype)
    dw = dense_weight_grad(x, kernel, fwd, g, decay, precision)
    return dx, dw, None, None


_sparse_dense.defvjp(_sparse_dense_fwd, _sparse_dense_bwd)


def sparse_dense(
    x, kernel, fwd, bwd, decay: float = 2e-4, *, perm=None, precision=None, backend: str = "xla"
):
    """``x @ (kernel * fwd)`` with Bi-Mask's gradients.

    Args:
      x: floating ``(..., K)``; any number of batch axes.
      kernel: floating ``(K, C)``.
      fwd: bool ``(K, C)``, the forward mask.
      bwd: bool ``(K, C)``, the mask of the backward-data product ``dx = g @ (kernel * bwd)^T``.
      decay: the SR-STE coefficient lambda of ``decay * (1 - fwd) * kernel`` added to ``dkernel``:
        a concrete Python number, finite and >= 0 (a static argument; a traced value is refused).
      perm: optional int ``(C,)``, the permutation under which ``bwd^T`` is N:M along C. Unused by
        the ``"xla"`` backend (checked when given, as in ``backward_mask``).
      precision: passed to the matmuls.
      backend: ``"xla"``, or ``"pallas"``: the forward and backward-data products run the 2:4
        kernels of ``pallas_kernels`` when ``fwd`` is 2:4 along K and ``bwd[:, perm]`` is 2:4 along
        C (each product falls back to XLA otherwise); see ``bimask_jax.pallas_backend``.

    Returns:
      ``(..., C)`` in ``result_type(x, kernel)``. Gradients: ``dx`` in ``x.dtype``, ``dkernel`` in
      ``kernel.dtype`` (accumulated in fp32), none for the masks.
    """
    check_choice("backend", backend, BACKENDS)
    decay = check_decay(decay)
    x, kernel = as_array(x), as_array(kernel)
    check_floating("x", x)
    check_floating("kernel", kernel)
    if kernel.ndim != 2:
        raise ValueError(f"kernel must be 2-D (K, C), got shape {kernel.shape}")
    if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"x's last axis ({x.shape[-1] if x.ndim else None}) must equal kernel's K={kernel.shape[0]}"
        )
    if 0 in kernel.shape:
        raise ValueError(f"kernel must not have an axis of size 0, got shape {kernel.shape}")
    check_mask("fwd", fwd, kernel.shape)
    check_mask("bwd", bwd, kernel.shape)
    if perm is not None:
        perm = check_perm(perm, kernel.shape[1])
    return _sparse_dense_jit(x, kernel, fwd, bwd, perm, decay, precision, backend)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _sparse_dense_jit(x, kernel, fwd, bwd, perm, decay, precision, backend):
    if backend == "pallas":
        return pallas_backend.sparse_dense(x, kernel, fwd, bwd, decay, perm, precision)
    return _sparse_dense(x, kernel, fwd, bwd, decay, precision)


# ------------------------------------------------------------------------------------------ conv


def _conv(x, w, strides, padding, lhs_dilation, rhs_dilation, precision):
    nd = x.ndim
    spatial = tuple(range(1, nd - 1))
    dn = jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, nd - 1, *spatial),
        rhs_spec=(nd - 1, nd - 2, *range(nd - 2)),
        out_spec=(0, nd - 1, *spatial),
    )
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dn,
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sparse_conv(x, kernel, fwd, bwd, decay, cfg):
    dtype = jnp.result_type(x, kernel)
    return _conv(x.astype(dtype), masked_kernel(kernel, fwd, dtype), *cfg)


def _sparse_conv_fwd(x, kernel, fwd, bwd, decay, cfg):
    return _sparse_conv(x, kernel, fwd, bwd, decay, cfg), (x, kernel, fwd, bwd)


def _sparse_conv_bwd(decay, cfg, res, g):
    x, kernel, fwd, bwd = res
    dtype = g.dtype
    # The transposed convolutions, by autodiff of the (linear) conv in each argument; under jit the
    # primal convs that jax.vjp also builds are dead code. (jax.vjp rather than linear_transpose:
    # it carries the arguments' sharding types, which Explicit mesh axes require.)
    _, vjp_x = jax.vjp(
        lambda x_: _conv(x_, masked_kernel(kernel, bwd, dtype), *cfg), x.astype(dtype)
    )
    _, vjp_w = jax.vjp(lambda w_: _conv(x.astype(dtype), w_, *cfg), kernel.astype(dtype))
    (dx,) = vjp_x(g)
    (dw,) = vjp_w(g)
    dw = dw.astype(jnp.float32) + srste_term(kernel, fwd, decay)
    return dx.astype(x.dtype), dw.astype(kernel.dtype), None, None


_sparse_conv.defvjp(_sparse_conv_fwd, _sparse_conv_bwd)


def _positive_ints(name, v, nsp):
    """``v`` (an int or ``nsp`` ints, each >= 1) as a tuple of ``nsp`` Python ints."""
    try:
        t = (int(v),) * nsp if isinstance(v, (int, np.integer)) else tuple(int(i) for i in v)
    except TypeError:
        t = ()
    if len(t) != nsp or any(i < 1 for i in t):
        raise ValueError(f"{name} must be an int >= 1 or a sequence of {nsp} such ints, got {v!r}")
    return t


def sparse_conv(
    x,
    kernel,
    fwd,
    bwd,
    decay: float = 2e-4,
    *,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    lhs_dilation: int | Sequence[int] = 1,
    rhs_dilation: int | Sequence[int] = 1,
    perm=None,
    precision=None,
    backend: str = "xla",
):
    """Channels-last convolution with ``kernel * fwd`` and Bi-Mask's gradients.

    Dimension numbers are Flax's: ``x`` is ``(N, *spatial, Cin)`` (NHWC for 2-D), ``kernel`` is
    ``(*window, Cin, C)`` (HWIO), the output is ``(N, *spatial', C)``. Any number of spatial axes.

    Gradients: ``dx`` is the transposed convolution of ``g`` with ``kernel * bwd``; ``dkernel`` is the
    usual (dense, straight-through) weight gradient plus ``decay * (1 - fwd) * kernel``; none for the
    masks.

    Args:
      x: floating ``(N, *spatial, Cin)``.
      kernel: floating ``(*window, Cin, C)``.
      fwd, bwd: bool masks of ``kernel.shape``.
      decay: SR-STE coefficient (as in :func:`sparse_dense`: a Python number, finite, >= 0).
      strides, padding, lhs_dilation (input dilation), rhs_dilation (kernel dilation): as in
        ``jax.lax.conv_general_dilated``; strides and dilations are ints >= 1; padding is
        ``"SAME"``, ``"VALID"`` or per-axis pairs.
      perm: optional int ``(C,)`` (for the ``"pallas"`` backend; checked when given).
      backend: ``"xla"``, or ``"pallas"``: a 1x1 conv without padding or input dilation runs as
        ``sparse_dense(backend="pallas")`` on the stride-subsampled input (2:4 kernels where the
        masks allow); any other conv uses the XLA path. See ``bimask_jax.pallas_backend``.
    """
    check_choice("backend", backend, BACKENDS)
    decay = check_decay(decay)
    x, kernel = as_array(x), as_array(kernel)
    check_floating("x", x)
    check_floating("kernel", kernel)
    if kernel.ndim < 3:
        raise ValueError(
            f"kernel must be (*window, Cin, C) with >= 1 window axis, got {kernel.shape}"
        )
    if x.ndim != kernel.ndim:
        raise ValueError(
            f"x must be (N, *spatial, Cin) with {kernel.ndim - 2} spatial axes to match kernel "
            f"{kernel.shape}, got shape {x.shape}"
        )
    if x.shape[-1] != kernel.shape[-2]:
        raise ValueError(
            f"x's channel axis ({x.shape[-1]}) must equal kernel's Cin={kernel.shape[-2]}"
        )
    if 0 in kernel.shape:
        raise ValueError(f"kernel must not have an axis of size 0, got shape {kernel.shape}")
    check_mask("fwd", fwd, kernel.shape)
    check_mask("bwd", bwd, kernel.shape)
    if perm is not None:
        perm = check_perm(perm, kernel.shape[-1])
    nsp = kernel.ndim - 2
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(
                f"padding must be 'SAME', 'VALID', 'SAME_LOWER' or pairs, got {padding!r}"
            )
        pad = padding.upper()
    else:
        pad = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(pad) != nsp:
            raise ValueError(f"padding must have {nsp} (low, high) pairs, got {padding}")
    cfg = (
        _positive_ints("strides", strides, nsp),
        pad,
        _positive_ints("lhs_dilation", lhs_dilation, nsp),
        _positive_ints("rhs_dilation", rhs_dilation, nsp),
        precision,
    )
    return _sparse_conv_jit(x, kernel, fwd, bwd, perm, decay, cfg, backend)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _sparse_conv_jit(x, kernel, fwd, bwd, perm, decay, cfg, backend):
    if backend == "pallas" and pallas_backend.conv_is_matmul(kernel.shape, cfg):
        return pallas_backend.sparse_conv_1x1(x, kernel, fwd, bwd, decay, cfg, perm)
    return _sparse_conv(x, kernel, fwd, bwd, decay, cfg)
