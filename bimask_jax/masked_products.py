"""The pieces of Bi-Mask's sparse products that every backend shares: the masked kernel and the
weight-gradient rule ``dW = x^T g + decay * (1 - Mf) * W``."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_kernel(kernel, mask, dtype):
    """``kernel * mask`` cast to ``dtype`` (a select: a NaN in a dropped entry does not leak)."""
    return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype)).astype(dtype)


def srste_term(kernel, fwd, decay):
    """``decay * (1 - fwd) * kernel`` (SR-STE's decay of the dropped weights), in fp32."""
    return (decay * jnp.where(fwd, jnp.zeros((), kernel.dtype), kernel)).astype(jnp.float32)


def dense_weight_grad(x, kernel, fwd, g, decay, precision=None):
    """``x^T g + decay * (1 - fwd) * kernel`` over all batch axes of ``x (..., K)``, ``g (..., C)``;
    in ``kernel.dtype``, accumulated in fp32.

    ``x^T g`` is taken as the transpose of ``x @ w`` in ``w`` (``jax.vjp`` carries the arguments'
    sharding types: with a batch-sharded ``x`` the contraction is a cross-device sum).
    """
    dtype = g.dtype
    _, vjp_w = jax.vjp(
        lambda w_: jnp.matmul(x.astype(dtype), w_, precision=precision), kernel.astype(dtype)
    )
    (dw,) = vjp_w(g)
    return (dw.astype(jnp.float32) + srste_term(kernel, fwd, decay)).astype(kernel.dtype)
