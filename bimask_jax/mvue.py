"""Unbiased N:M sparsification of the output gradient for the weight-gradient product.

Chmiel et al. (ICLR 2023, "Minimum Variance Unbiased N:M Sparsity for the Neural Gradients",
arXiv:2203.10991v3; only its abstract and introduction could be read here, not its equations) make
the weight-gradient GEMM ``dW = x^T g`` N:M by replacing ``g`` with a random N:M array ``g_hat``
with ``E[g_hat] = g``, so ``E[x^T g_hat] = x^T g``. Hu et al. (ICML 2024) apply this to ``g^T``,
i.e. with the groups of ``m`` consecutive entries running along the *token* (batch) axis of
``g (T, C)``, the reduction axis of ``x^T g``.

The rule implemented here is the one in Hu et al.'s code (huyz2023/2by4-pretrain
``sparse/utils.py::_MVUE24_approx``, used by ``sparse/triton_ops.py::MVUE24_approx_triton`` and by
``v1``/``v2`` ``nanoGPT/sparse_ops.py`` on ``grad_output.t()``); its authors call it an
approximation of the 2:4 MVUE. Per group ``g_1..g_m`` (written for ``n = 2``)::

    a_i = |g_i| + eps   (eps = 1.19209e-07),   S = sum_i a_i,   t_i = a_i / S
    draw i1 with P(i1 = i) = t_i; then i2 != i1 with P(i2 = j | i1) = a_j / (S - a_{i1})
    p_i = P(i in {i1, i2}) = t_i + sum_{j != i} t_j * a_i / (S - a_j)
    g_hat_i = g_i / p_i  if i in {i1, i2},  else 0

i.e. two entries drawn without replacement with probability proportional to magnitude, each kept
value divided by its inclusion probability (a Horvitz-Thompson estimate), which makes it unbiased
for every ``g``. ``n = 1`` is the same with one draw (``p_i = t_i``, ``g_hat_i = sign(g_i) * S``
up to eps), which for 1:2 is Chmiel et al.'s minimum-variance estimator. The draws are made with
the Gumbel-top-``n`` trick (top ``n`` of ``log a_i + Gumbel_i``), which has exactly the distribution
of the successive draws above. Chmiel et al.'s exact 2:4 minimum-variance construction is *not*
implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bimask_jax._checks import check_divisible, check_nm

EPS = 1.19209e-07


def _check_args(g, key, n, m, axis):
    n, m = check_nm(n, m)
    if n > 2:
        raise ValueError(f"n must be 1 or 2 (inclusion probabilities in closed form), got n={n}")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"axis must be a Python int, got {axis!r}")
    g = jnp.asarray(g)
    if g.ndim == 0:
        raise ValueError("g must have at least 1 axis, got a scalar")
    if not -g.ndim <= axis < g.ndim:
        raise ValueError(f"axis={axis} is out of range for g with {g.ndim} axes")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise ValueError(f"g must have a floating dtype, got {g.dtype}")
    axis = axis % g.ndim
    check_divisible(g.shape[axis], m, f"g axis {axis}")
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.ndim != 0:
            raise ValueError(f"key must be a single PRNG key, got shape {key.shape}")
    elif key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"key must be a PRNG key (jax.random.key or a uint32 (2,) PRNGKey), got "
            f"{key.dtype}{tuple(key.shape)}"
        )
    return g, key, n, m, axis


def inclusion_probabilities(a, n: int):
    """``p_i = P(i kept)`` for ``n`` in {1, 2} draws without replacement, probability proportional
    to ``a`` (positive), along the last axis. float32, same shape as ``a``."""
    s = jnp.sum(a, axis=-1, keepdims=True)
    t = a / s
    if n == 1:
        return t
    k_j = t / (s - a)  # t_j / (S - a_j); S - a_j >= (m - 1) * eps > 0
    return t + a * (jnp.sum(k_j, axis=-1, keepdims=True) - k_j)


def _top_n(scores, n: int):
    """bool mask of the ``n`` largest ``scores`` along the last axis (the first index among
    equal ones), by ``n`` successive ``argmax``: the same set as ``lax.top_k``, but a reduction
    that the SPMD partitioner keeps local when the other axes are sharded (``top_k`` gathers them:
    under a batch-sharded mesh that was an all-gather of the whole output gradient)."""
    cols = jnp.arange(scores.shape[-1])
    keep = jnp.zeros(scores.shape, bool)
    for _ in range(n):
        i = jnp.argmax(jnp.where(keep, -jnp.inf, scores), axis=-1)
        keep = keep | (i[..., None] == cols)
    return keep


def mvue_sparsify(g, key, n: int = 2, m: int = 4, axis: int = 0):
    """A random N:M array ``g_hat`` with ``E[g_hat] = g`` (module docstring).

    Args:
      g: floating array (the output gradient, e.g. ``(T, C)`` tokens by outputs);
        ``g.shape[axis] % m == 0``.
      key: a JAX PRNG key; use a fresh one every step (e.g. ``jax.random.fold_in(key, step)``).
      n: 1 or 2 kept entries per group; m: the group size (``n <= m``). Default 2:4.
      axis: the grouped axis: the token/batch axis (0 for ``(T, C)``), the reduction axis of
        ``x^T g``.

    Returns:
      array of ``g.shape`` and ``g.dtype`` (computed in float32) with exactly ``n`` selected
      positions per group (a selected entry can be 0 only where ``g`` is 0). A non-finite ``g`` in a
      group makes that group non-finite (never silently dropped).
    """
    g, key, n, m, axis = _check_args(g, key, n, m, axis)
    gg = jnp.moveaxis(g, axis, -1)
    moved_shape = gg.shape
    gg = gg.reshape(*moved_shape[:-1], moved_shape[-1] // m, m).astype(jnp.float32)
    a = jnp.abs(gg) + EPS
    p = inclusion_probabilities(a, n)
    gumbel = jax.random.gumbel(key, a.shape, jnp.float32)
    keep = _top_n(jnp.log(a) + gumbel, n)  # n distinct draws per group
    out = jnp.where(keep, gg / p, 0.0)
    out = out.reshape(moved_shape)
    return jnp.moveaxis(out, -1, axis).astype(g.dtype)


def mvue_weight_grad(x, g, key, n: int = 2, m: int = 4):
    """``x^T g_hat``: the weight gradient of a Dense layer ``y = x @ W`` from the N:M estimate.

    Args:
      x: floating ``(..., K)``, the layer input.
      g: floating ``(..., C)``, the output cotangent, same leading (token) shape as ``x``.
      key, n, m: as :func:`mvue_sparsify` (groups of ``m`` consecutive flattened tokens). When the
        token count ``T`` is not a multiple of ``m`` the last group is completed with zero tokens
        (zero rows of ``x`` and ``g``): they add nothing to the product and the estimate stays
        unbiased.

    Returns:
      ``(K, C)`` in ``jnp.result_type(x, g)``; an unbiased estimate of ``x^T g``.
    """
    x = jnp.asarray(x)
    g = jnp.asarray(g)
    if x.ndim < 1 or g.ndim < 1 or x.shape[:-1] != g.shape[:-1]:
        raise ValueError(
            f"x (..., K) and g (..., C) must share their leading token axes, got x {x.shape}, "
            f"g {g.shape}"
        )
    x2 = x.reshape(-1, x.shape[-1])
    g2 = g.reshape(-1, g.shape[-1])
    pad = -x2.shape[0] % m
    if pad:
        x2 = jnp.pad(x2, ((0, pad), (0, 0)))
        g2 = jnp.pad(g2, ((0, pad), (0, 0)))
    g2 = mvue_sparsify(g2, key, n, m, axis=0)
    dtype = jnp.result_type(x, g)
    return jnp.matmul(x2.T, g2, preferred_element_type=jnp.float32).astype(dtype)
