"""The pieces of Bi-Mask's sparse products that every backend shares: the masked kernel and the
weight-gradient rule ``dW = x^T g + decay * (1 - Mf) * W``, with ``g`` optionally replaced by its
unbiased N:M estimate along the token axis (``wgrad="mvue"``, :mod:`bimask_jax.mvue`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bimask_jax.mvue import mvue_sparsify

WGRADS = ("dense", "mvue")


def masked_kernel(kernel, mask, dtype):
    """``kernel * mask`` cast to ``dtype`` (a select: a NaN in a dropped entry does not leak)."""
    return jnp.where(mask, kernel, jnp.zeros((), kernel.dtype)).astype(dtype)


def srste_term(kernel, fwd, decay):
    """``decay * (1 - fwd) * kernel`` (SR-STE's decay of the dropped weights), in fp32."""
    return (decay * jnp.where(fwd, jnp.zeros((), kernel.dtype), kernel)).astype(jnp.float32)


def mvue_tokens(g, key, n: int, m: int):
    """``g (..., C)`` with its flattened token axis ``T = prod(...)`` replaced by the unbiased N:M
    estimate of :func:`bimask_jax.mvue.mvue_sparsify` (groups of ``m`` consecutive tokens, per
    output column). A token count not divisible by ``m`` is completed with zero tokens, which are
    dropped again (the real tokens' estimate is still unbiased). Same shape and dtype as ``g``."""
    c = g.shape[-1]
    g2 = g.reshape(-1, c)
    t = g2.shape[0]
    pad = -t % m
    if pad:
        g2 = jnp.pad(g2, ((0, pad), (0, 0)))
    return mvue_sparsify(g2, key, n, m, axis=0)[:t].reshape(g.shape)


def wgrad_cotangent(g, wgrad, key):
    """The cotangent that the weight-gradient product uses: ``g`` itself (``wgrad=None``) or its
    MVUE estimate (``wgrad=("mvue", n, m)``, ``key`` a PRNG key)."""
    if wgrad is None:
        return g
    _, n, m = wgrad
    return mvue_tokens(g, key, n, m)


def dense_weight_grad(x, kernel, fwd, g, decay, precision=None, wgrad=None, key=None):
    """``x^T g + decay * (1 - fwd) * kernel`` over all batch axes of ``x (..., K)``, ``g (..., C)``;
    in ``kernel.dtype``, accumulated in fp32. With ``wgrad=("mvue", n, m)`` the product uses
    :func:`wgrad_cotangent` (N:M along the flattened token axis, unbiased) instead of ``g``.

    ``x^T g`` is taken as the transpose of ``x @ w`` in ``w`` (``jax.vjp`` carries the arguments'
    sharding types: with a batch-sharded ``x`` the contraction is a cross-device sum).
    """
    dtype = g.dtype
    _, vjp_w = jax.vjp(
        lambda w_: jnp.matmul(x.astype(dtype), w_, precision=precision), kernel.astype(dtype)
    )
    (dw,) = vjp_w(wgrad_cotangent(g, wgrad, key))
    return (dw.astype(jnp.float32) + srste_term(kernel, fwd, decay)).astype(kernel.dtype)
