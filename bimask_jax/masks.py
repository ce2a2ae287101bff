"""N:M masks of the Bi-Mask paper as pure array functions.

Layout: a kernel is a Flax kernel. The last axis is the output axis ``C``; every other axis is
reduction. A Dense kernel is ``(K, C)``; a conv kernel ``(*window, Cin, C)`` is read as the matrix
``(prod(window) * Cin, C)`` (row-major flatten). Forward groups run along the input-channel axis
(-2); when ``Cin % m == 0`` these are ``m`` consecutive rows of the flattened matrix.

Ranking rule used by every mask here: larger ``|w|`` wins, ties go to the lower index, and NaN ranks
as ``+inf`` (above every finite value). So a NaN weight is always kept by the forward mask and
propagates into the layer output -- a corrupted kernel gives NaN activations and a NaN loss, never a
plausible-looking mask that hides it.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from bimask_jax import cpu_masks
from bimask_jax._checks import (
    check_divisible,
    check_kernel,
    check_mask,
    check_nm,
    check_perm,
)

METHODS = ("dense", "srste", "transposable", "bimask")
IMPLS = ("auto", "xla", "cpu_kernel")

# Group sizes up to this use pairwise comparisons (O(m^2), no sort); larger groups use argsort.
_PAIRWISE_MAX_M = 16


def _magnitude(x):
    """|x| with NaN mapped to +inf, so NaN ranks first and is never silently dropped."""
    a = jnp.abs(x)
    return jnp.where(jnp.isnan(a), jnp.inf, a)


def _topn_along(key, n: int, axis: int):
    """Boolean mask of the ``n`` largest ``key`` entries along ``axis`` (the group of size m).

    Ties: the lower index wins. Small groups compare all pairs element-wise (no sort), which XLA
    fuses into one loop when ``axis`` is not the minor axis.
    """
    axis = axis % key.ndim
    m = key.shape[axis]
    if n == m:
        return jnp.ones(key.shape, bool)
    if m <= _PAIRWISE_MAX_M:
        # rank_i = #{j < i : key_j >= key_i} + #{j > i : key_j > key_i}, unrolled over the m slices.
        # Element-wise compares of whole slices fuse into one vectorized loop; a broadcast (m, m)
        # compare + reduce is 10x slower on XLA:CPU once the result is reshaped.
        sl = [jax.lax.index_in_dim(key, i, axis, keepdims=False) for i in range(m)]
        ranks = []
        for i in range(m):
            r = jnp.zeros(sl[i].shape, jnp.int8)  # m <= 16: ranks fit in int8
            for j in range(m):
                if j != i:
                    r = r + ((sl[j] >= sl[i]) if j < i else (sl[j] > sl[i])).astype(jnp.int8)
            ranks.append(r)
        rank = jnp.stack(ranks, axis=axis)
    else:
        order = jnp.argsort(-key, axis=axis, stable=True)
        rank = jnp.argsort(order, axis=axis, stable=True)
    return rank < n


def nm_mask(x, n: int, m: int, axis: int = -1):
    """Keeps the ``n`` largest ``|x|`` in every group of ``m`` consecutive entries along ``axis``.

    Args:
      x: array of any shape with a floating dtype.
      n, m: Python ints, ``1 <= n <= m``.
      axis: the grouped axis; its size must be divisible by ``m``.

    Returns:
      bool array of ``x.shape``; exactly ``n`` True per group. Ties: the lower index wins; NaN ranks
      as ``+inf``. Deterministic.
    """
    n, m = check_nm(n, m)
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("x must have at least 1 axis, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for x with {x.ndim} axes")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    check_divisible(x.shape[axis], m, f"x axis {axis}")
    axis = axis % x.ndim
    g = x.reshape(*x.shape[:axis], x.shape[axis] // m, m, *x.shape[axis + 1 :])
    return _topn_along(_magnitude(g), n, axis + 1).reshape(x.shape)


def _check_layer_kernel(kernel, m: int, *, need_output: bool):
    check_kernel(kernel)
    check_divisible(kernel.shape[-2], m, "kernel input axis (-2)")
    if need_output:
        check_divisible(kernel.shape[-1], m, "kernel output axis (-1)")


def forward_mask(kernel, n: int, m: int):
    """Forward mask Mf: N:M along the input-channel axis (-2) of ``kernel``.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``; ``Cin % m == 0``.

    Returns:
      bool mask of ``kernel.shape``; ``x @ (kernel * Mf)`` is N:M along its reduction axis.
    """
    n, m = check_nm(n, m)
    kernel = jnp.asarray(kernel)
    _check_layer_kernel(kernel, m, need_output=False)
    return nm_mask(kernel, n, m, axis=-2)


def inverse_permutation(perm):
    """``inv`` with ``inv[perm[i]] = i``; int32 ``(C,)``. Pure, O(C)."""
    perm = jnp.asarray(perm)
    c = perm.shape[0]
    return jnp.zeros((c,), jnp.int32).at[perm].set(jnp.arange(c, dtype=jnp.int32))


def _take_columns(a, idx):
    """``a[:, idx]`` for a 2-D ``a``, as a gather whose output keeps ``a``'s row-major layout."""
    return jnp.take_along_axis(a, jnp.broadcast_to(idx[None, :], a.shape), axis=1, mode="clip")


def _materialize(x, token):
    """``x``, computed into a buffer of its own on XLA:CPU.

    XLA:CPU fuses a column gather into the loop that consumes it and then redoes the gather for
    every read; the ranking reads each gathered entry m times, and the result is gathered again,
    which made the backward mask ~3x slower than gather + rank + gather as separate loops
    (``benchmarks/masks.py``). Optimization barriers are stripped before fusion on CPU, so the
    value is routed through a ``while_loop`` whose trip count ``token`` is 0 for valid input but
    unknown to the compiler. On other platforms this is the identity (a GPU while loop would sync
    with the host).
    """

    def through_loop(x, token):
        def body(state):
            i, v = state
            return i + 1, (~v if v.dtype == jnp.bool_ else v + v)

        return jax.lax.while_loop(lambda s: s[0] < token, body, (jnp.int32(0), x))[1]

    return jax.lax.platform_dependent(x, token, cpu=through_loop, default=lambda x, _: x)


def _backward_mask_2d(w2, f2, perm, n: int, m: int):
    k, c = w2.shape
    g = c // m
    # Gather the columns so that member j of permuted group q lands at column j * g + q: the m
    # members of every group are then m slabs of shape (k, g), ranked element-wise (no minor-axis
    # shuffles), and one inverse gather maps the result back.
    order = perm.reshape(g, m).T.reshape(c)
    token = (perm[0] < 0).astype(jnp.int32)  # 0 for a valid permutation; opaque to XLA
    # Rank key: forward-kept entries by |w| (NaN as +inf); forward-dropped entries below all of them.
    key = jax.lax.stop_gradient(jnp.where(f2, _magnitude(w2), -1.0))
    key = _materialize(_take_columns(key, order), token).reshape(k, m, g)
    keep = (_topn_along(key, n, axis=1) & (key >= 0)).reshape(k, c)
    return _take_columns(_materialize(keep, token), inverse_permutation(order))


def backward_mask(kernel, fwd, perm, n: int, m: int):
    """Backward mask Mb of Bi-Mask.

    Permutes the output columns of the flattened kernel ``(K, C)`` by ``perm``, keeps in every row the
    ``n`` largest ``|kernel * fwd|`` of every ``m`` consecutive permuted columns, ANDs with ``fwd``
    and maps back to the original column order. Hence ``(kernel * Mb)[:, perm]`` is N:M along C, so
    ``g @ (kernel * Mb).T`` is an N:M product once ``g``'s columns are permuted.

    Ties: forward-kept entries rank above forward-dropped ones (so a kept weight of exactly 0 is not
    displaced by a dropped one), then the lower permuted index wins. With this rule the number of
    True entries is exactly ``sum over rows and groups of min(forward-kept in group, n)``.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``, ``Cin % m == 0`` and ``C % m == 0``.
      fwd: bool, ``kernel.shape`` (the forward mask).
      perm: integer ``(C,)``, a permutation of ``range(C)``.

    Returns:
      bool mask of ``kernel.shape``, a subset of ``fwd``.
    """
    n, m = check_nm(n, m)
    kernel = jnp.asarray(kernel)
    _check_layer_kernel(kernel, m, need_output=True)
    check_mask("fwd", fwd, kernel.shape)
    c = kernel.shape[-1]
    check_perm(perm, c)
    w2 = kernel.reshape(-1, c)
    f2 = jnp.asarray(fwd).reshape(-1, c)
    return _backward_mask_2d(w2, f2, jnp.asarray(perm), n, m).reshape(kernel.shape)


@functools.cache
def _block_patterns(n: int, m: int) -> np.ndarray:
    """All ``m x m`` 0/1 matrices with exactly ``n`` ones in every row and column, as ``(P, m*m)``."""
    rows = [r for r in itertools.product((0, 1), repeat=m) if sum(r) == n]
    pats = []
    for choice in itertools.product(rows, repeat=m):
        a = np.array(choice, np.int8)
        if np.all(a.sum(axis=0) == n):
            pats.append(a.reshape(-1))
    return np.stack(pats).astype(np.float32)


def _transposable_exact(blocks, n: int, m: int):
    """blocks: (B, m, m) magnitudes -> (B, m, m) bool, the best pattern of each block."""
    pats = jnp.asarray(_block_patterns(n, m))  # (P, m*m)
    scores = blocks.reshape(blocks.shape[0], m * m).astype(jnp.float32) @ pats.T  # (B, P)
    best = jnp.argmax(scores, axis=-1)  # ties: first pattern in enumeration order
    return (pats[best] > 0).reshape(blocks.shape)


def _transposable_greedy(blocks, n: int, m: int):
    """Greedy approximation for m > 4: visit entries by decreasing magnitude (ties: lower flat
    index), keep one while its row and its column each hold fewer than n kept entries."""
    b = blocks.shape[0]
    flat = blocks.reshape(b, m * m)
    order = jnp.argsort(-flat, axis=-1, stable=True)  # (B, m*m)

    def body(t, carry):
        keep, rows, cols = carry
        idx = order[:, t]
        r, c = idx // m, idx % m
        ar = jnp.arange(b)
        ok = (rows[ar, r] < n) & (cols[ar, c] < n)
        keep = keep.at[ar, idx].set(ok)
        rows = rows.at[ar, r].add(ok.astype(jnp.int32))
        cols = cols.at[ar, c].add(ok.astype(jnp.int32))
        return keep, rows, cols

    init = (
        jnp.zeros((b, m * m), bool),
        jnp.zeros((b, m), jnp.int32),
        jnp.zeros((b, m), jnp.int32),
    )
    keep, _, _ = jax.lax.fori_loop(0, m * m, body, init)
    return keep.reshape(blocks.shape)


def transposable_mask(kernel, n: int, m: int):
    """A single mask that is N:M along both the reduction axis and the output axis.

    The flattened kernel ``(K, C)`` is cut into ``m x m`` blocks (``m`` consecutive rows by ``m``
    consecutive columns); each block independently gets the pattern with at most ``n`` kept entries
    in every row and column that keeps the largest sum of ``|w|``.

    * ``m <= 4``: exact. Every pattern with exactly ``n`` per row and column (90 for 2:4, 24 for 1:4)
      is scored at once with one matmul; ties take the first pattern in enumeration order.
    * ``m > 4``: a documented approximation (the pattern space is too large to enumerate): a greedy
      pass in order of decreasing ``|w|`` that keeps an entry while its row and column hold fewer than
      ``n``. It always yields a valid pattern (at most ``n`` per row and column of every block, so
      still N:M on both axes) but may keep fewer than ``n`` in some rows.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``, ``Cin % m == 0`` and ``C % m == 0``.

    Returns:
      bool mask of ``kernel.shape``.
    """
    n, m = check_nm(n, m)
    kernel = jnp.asarray(kernel)
    _check_layer_kernel(kernel, m, need_output=True)
    c = kernel.shape[-1]
    w2 = _magnitude(kernel.reshape(-1, c))
    k = w2.shape[0]
    blocks = w2.reshape(k // m, m, c // m, m).transpose(0, 2, 1, 3).reshape(-1, m, m)
    # +inf (from NaN/inf weights) would make pattern scores inf-inf; clip to the dtype's max.
    blocks = jnp.minimum(blocks, jnp.finfo(jnp.float32).max / (m * m))
    if m <= 4:
        keep = _transposable_exact(blocks, n, m)
    else:
        keep = _transposable_greedy(blocks, n, m)
    keep = keep.reshape(k // m, c // m, m, m).transpose(0, 2, 1, 3).reshape(kernel.shape)
    return keep


def _use_cpu_kernel(impl: str, kernel, m: int) -> bool:
    """Whether ``layer_masks`` computes a forward/backward mask with :mod:`bimask_jax.cpu_masks`
    (for ``impl="cpu_kernel"`` always: :mod:`bimask_jax.cpu_masks` says why it cannot)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl == "cpu_kernel"
    return (
        cpu_masks.supports(m, kernel.dtype)
        and jax.default_backend() == "cpu"
        and cpu_masks.available()
    )


def layer_masks(kernel, n: int, m: int, method: str, perm=None, *, impl: str = "auto"):
    """The ``(fwd, bwd)`` mask pair that a sparse layer uses for its forward and backward-data products.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``.
      method: one of
        * ``"dense"``: all-True masks (no sparsity; any shape).
        * ``"srste"``: ``(Mf, Mf)``; the backward product uses the forward pattern, which is not N:M
          along C, so it gets no sparse speed-up.
        * ``"transposable"``: ``(T, T)`` with ``T = transposable_mask`` (N:M along both axes).
        * ``"bimask"``: ``(Mf, backward_mask(kernel, Mf, perm))``.
      perm: int ``(C,)`` for ``"bimask"``; ``None`` means the identity permutation.
      impl: how ``"srste"`` and ``"bimask"`` masks are computed; the result is the same bit for bit.
        * ``"auto"`` (default): the CPU kernel of :mod:`bimask_jax.cpu_masks` when JAX's default
          backend is the CPU, the kernel is available (built on first use) and supports ``m`` (a
          divisor of 16) and the dtype (float32/bfloat16/float16); otherwise ``"xla"``.
        * ``"xla"``: plain XLA ops (any platform).
        * ``"cpu_kernel"``: the CPU kernel, or an error saying why it cannot be used.

    Returns:
      ``(fwd, bwd)``, bool arrays of ``kernel.shape``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kernel = jnp.asarray(kernel)
    if method == "dense":
        check_kernel(kernel)
        ones = jnp.ones(kernel.shape, bool)
        return ones, ones
    if method == "transposable":
        t = transposable_mask(kernel, n, m)
        return t, t
    n, m = check_nm(n, m)
    if _use_cpu_kernel(impl, kernel, m):
        _check_layer_kernel(kernel, m, need_output=method == "bimask")
        w2 = kernel.reshape(-1, kernel.shape[-1])
        if method == "srste":
            fwd = cpu_masks.forward_mask_2d(w2, n, m).reshape(kernel.shape)
            return fwd, fwd
        if perm is None:
            perm = jnp.arange(w2.shape[1], dtype=jnp.int32)
        check_perm(perm, w2.shape[1])
        fwd, bwd = cpu_masks.fused_masks(w2, perm, n, m)
        return fwd.reshape(kernel.shape), bwd.reshape(kernel.shape)
    fwd = forward_mask(kernel, n, m)
    if method == "srste":
        return fwd, fwd
    if perm is None:
        perm = jnp.arange(kernel.shape[-1], dtype=jnp.int32)
    return fwd, backward_mask(kernel, fwd, perm, n, m)
