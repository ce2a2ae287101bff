"""Transposable N:M training as in Hu et al. (ICML 2024), as pure functions.

Sources: the authors' code. The paper is arXiv:2404.01847v3 (its abstract names the flip rate,
the masked decay on gradients, the dense fine-tuning near the end of pre-training and the
transposable 2:4 masks computed by convolution); only its abstract and introduction could be read
here, not the equations, so the rules cite files/functions, not equation numbers:

* Mask: huyz2023/2by4-pretrain ``sparse/transposable_semi_structured.py``
  (``TransposableSparse``): the weight is cut into 4x4 blocks; the 90 4x4 0/1 patterns with exactly
  two ones in every row and every column are scored at once as a matmul
  ``(90, 16) @ |block| (16, B)`` and each block takes the pattern of largest kept ``|w|`` sum. The
  mask is then 2:4 along both axes, so the forward product and the backward-data product (with the
  transposed weight) are both 2:4. :func:`optimal_transposable_mask` does that for any ``n:m`` whose
  pattern count is small (``m <= 5``).
* Periodic update: thu-ml/2by4-pretrain-acc-examples ``v1/nanoGPT/sparse_ops.py``
  (``SparseLinearTranspose.forward``): the mask is recomputed when the optimizer-step counter is a
  multiple of ``freq = 40`` (including step 0) and reused in between: :func:`periodic_mask`; in
  the Flax wrapper, ``bimask_jax.sparse(..., method="transposable", mask_update="refresh")``.
* Masked decay: ``sparse/decay.py::masked_add_`` ("equivalent to
  ``grad.add_(p.data * (1 - p.mask), alpha=decay)``"), called in ``v1/nanoGPT/train.py`` on every
  optimizer step while the layer is sparse, after gradient clipping and before the optimizer step,
  with ``alpha = 6e-5`` (GPT-2 124M/774M) or ``2e-4`` (350M/1558M) per the repository README::

      grad <- grad + alpha * w * (1 - mask)                        (mask = the kept entries)

  i.e. a decay on the gradient of the *pruned* weights only (the ones the current mask drops),
  which then passes through the optimizer (AdamW there): :func:`masked_decay`.
* Dense finish: the same ``train.py`` switches every sparse layer to dense at iteration 250000 of
  300000 (the last 1/6 of training); see :mod:`bimask_jax.dense_finish`.

Layout as in :mod:`bimask_jax.masks`: a Flax kernel ``(K, C)`` or ``(*window, Cin, C)`` read as the
matrix ``(prod(window) * Cin, C)``; blocks are ``m`` consecutive rows by ``m`` consecutive columns.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from bimask_jax._checks import (
    check_divisible,
    check_kernel,
    check_mask,
    check_nm,
)

# Enumerating patterns is exact but their number grows fast: 90 (2:4), 2040 (2:5), 297200 (3:6).
MAX_PATTERNS = 4096


@functools.cache
def _patterns(n: int, m: int) -> np.ndarray:
    """All ``m x m`` 0/1 matrices with ``n`` ones per row and per column, ``(P, m, m)`` bool.

    Built row by row, pruning any prefix whose column sums already exceed ``n``; the order is the
    lexicographic order of the rows' kept-column tuples.
    """
    rows = list(itertools.combinations(range(m), n))
    out = []

    def extend(prefix, colsum):
        if len(prefix) == m:
            if all(c == n for c in colsum):
                out.append(prefix)
            return
        for r in rows:
            cs = list(colsum)
            for j in r:
                cs[j] += 1
            if max(cs) <= n:
                extend(prefix + [r], cs)

    extend([], [0] * m)
    pats = np.zeros((len(out), m, m), bool)
    for p, choice in enumerate(out):
        for i, r in enumerate(choice):
            pats[p, i, list(r)] = True
    return pats


def transposable_patterns(n: int = 2, m: int = 4) -> np.ndarray:
    """The admissible block patterns: ``(P, m, m)`` bool NumPy array, ``n`` ones in every row and
    column (``P = 90`` for 2:4). Raises ValueError when ``P`` would exceed ``MAX_PATTERNS``."""
    n, m = check_nm(n, m)
    if m > 5:
        raise ValueError(
            f"m must be <= 5 for exact pattern enumeration (more than {MAX_PATTERNS} patterns), "
            f"got m={m}; bimask_jax.transposable_mask has a greedy approximation for larger m"
        )
    return _patterns(n, m)


def _magnitude(x):
    a = jnp.abs(x).astype(jnp.float32)
    return jnp.where(jnp.isnan(a), jnp.inf, a)


def optimal_transposable_mask(kernel, n: int = 2, m: int = 4):
    """The mask, N:M along both axes of every ``m x m`` block, that keeps the most ``|w|``.

    Each block's ``|w|`` (float32) is scored against every admissible pattern at once,
    ``(blocks, m*m) @ (m*m, P)``, and the argmax is taken; ties go to the first pattern of
    :func:`transposable_patterns`. NaN ranks as ``+inf``; non-finite weights are always kept (as
    many as the pattern allows, so they show up in the output) and the rest of such a block is
    still chosen by the kept sum of its finite entries.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``; ``Cin % m == 0`` and ``C % m == 0``.
      n, m: Python ints, ``1 <= n <= m <= 5``. Default 2:4 (90 patterns).

    Returns:
      bool mask of ``kernel.shape``, exactly ``n`` True in every row and column of every block.
    """
    n, m = check_nm(n, m)
    pats = transposable_patterns(n, m)
    kernel = jnp.asarray(kernel)
    check_kernel(kernel)
    check_divisible(kernel.shape[-2], m, "kernel input axis (-2)")
    check_divisible(kernel.shape[-1], m, "kernel output axis (-1)")
    c = kernel.shape[-1]
    w2 = _magnitude(kernel.reshape(-1, c))
    k = w2.shape[0]
    blocks = w2.reshape(k // m, m, c // m, m).transpose(0, 2, 1, 3).reshape(-1, m * m)
    p = jnp.asarray(pats.reshape(len(pats), m * m))
    pf = p.T.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    # Lexicographic score: first the number of non-finite (NaN/inf) entries kept, then the kept sum
    # of the finite ones (clipped so that a sum of m*m of them cannot overflow).
    nonfinite = jnp.isinf(blocks)
    finite = jnp.minimum(jnp.where(nonfinite, 0.0, blocks), jnp.finfo(jnp.float32).max / (m * m))
    n_inf = jnp.matmul(nonfinite.astype(jnp.float32), pf, precision=hi)  # (B, P), small ints
    scores = jnp.matmul(finite, pf, precision=hi)  # (B, P)
    scores = jnp.where(n_inf == jnp.max(n_inf, axis=-1, keepdims=True), scores, -jnp.inf)
    best = jnp.argmax(scores, axis=-1)
    keep = p[best].reshape(k // m, c // m, m, m).transpose(0, 2, 1, 3)
    return keep.reshape(kernel.shape)


def periodic_mask(kernel, prev_mask, step, every: int = 40, n: int = 2, m: int = 4):
    """Hu et al.'s periodic update: a fresh :func:`optimal_transposable_mask` when
    ``step % every == 0`` (``step`` counts optimizer steps from 0), else ``prev_mask``.

    Args:
      kernel: as :func:`optimal_transposable_mask`.
      prev_mask: bool, ``kernel.shape`` (the mask in use; any value at step 0).
      step: int scalar (may be traced). every: Python int >= 1 (40 in the authors' code).

    Returns:
      bool mask of ``kernel.shape``. Under ``jit`` only the taken branch runs (``lax.cond``).
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a Python int >= 1, got {every!r}")
    kernel = jnp.asarray(kernel)
    check_mask("prev_mask", prev_mask, kernel.shape)
    step = jnp.asarray(step)
    if step.ndim != 0 or not jnp.issubdtype(step.dtype, jnp.integer):
        raise ValueError(f"step must be an integer scalar, got {step.dtype}{tuple(step.shape)}")
    return jax.lax.cond(
        step % every == 0,
        lambda: optimal_transposable_mask(kernel, n, m),
        lambda: jnp.asarray(prev_mask),
    )


def masked_decay(grad, w, mask, alpha):
    """``grad + alpha * w * (1 - mask)``: Hu et al.'s masked decay (``sparse/decay.py::masked_add_``).

    Apply it to the gradient after clipping and before the optimizer step, on every step a layer is
    sparse (not during a dense finish).

    Args:
      grad: floating array, the (clipped) gradient of ``w``.
      w: floating array of ``grad.shape``, the dense weight.
      mask: bool array of ``grad.shape``, True = kept by the current forward mask.
      alpha: float scalar >= 0 (6e-5 or 2e-4 in the authors' GPT-2 runs); may be traced.

    Returns:
      array of ``grad.shape`` and ``grad.dtype``; equal to ``grad`` on kept entries.
    """
    grad = jnp.asarray(grad)
    w = jnp.asarray(w)
    if not jnp.issubdtype(grad.dtype, jnp.floating):
        raise ValueError(f"grad must have a floating dtype, got {grad.dtype}")
    if w.shape != grad.shape:
        raise ValueError(f"w must have grad's shape {grad.shape}, got {w.shape}")
    check_mask("mask", mask, grad.shape)
    alpha = jnp.asarray(alpha)
    if alpha.ndim != 0:
        raise ValueError(f"alpha must be a scalar, got shape {alpha.shape}")
    if not jnp.issubdtype(alpha.dtype, jnp.floating) and not jnp.issubdtype(alpha.dtype, jnp.integer):
        raise ValueError(f"alpha must be a real scalar, got dtype {alpha.dtype}")
    if not isinstance(alpha, jax.core.Tracer):  # a traced alpha is not checked
        if not float(alpha) >= 0:
            raise ValueError(f"alpha must be >= 0 (and not NaN), got {float(alpha)}")
    decay = jnp.where(mask, 0.0, alpha.astype(jnp.float32) * w.astype(jnp.float32))
    return (grad.astype(jnp.float32) + decay).astype(grad.dtype)
