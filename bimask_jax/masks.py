"""N:M masks of the Bi-Mask paper as pure array functions.

Layout: a kernel is a Flax kernel. The last axis is the output axis ``C``; every other axis is
reduction. A Dense kernel is ``(K, C)``; a conv kernel ``(*window, Cin, C)`` is read as a matrix
``(K, C)``, ``K = prod(window) * Cin``, in one of two orders (``k_order``):

* ``"hwi"`` (default): row-major, ``(*window, Cin)``, Cin fastest. Forward groups are ``m``
  consecutive input channels at one tap (axis -2, ``Cin % m == 0``), what an NHWC implicit-GEMM 2:4
  kernel needs.
* ``"ihw"``: the reference implementation's: the kernel read in PyTorch's ``(C, Cin, *window)``
  order. Forward groups are ``m`` consecutive entries of that whole flattened array (a window
  position fastest), so when ``K % m != 0`` (a 3-channel stem, K = 27) groups straddle two output
  channels; backward groups are ``m`` consecutive entries of the row-major flattened
  ``(K, C)`` matrix (rows in ``(Cin, *window)`` order) after its columns are permuted, straddling
  two rows when ``C % m != 0``. Needs only ``K * C % m == 0``.

For a Dense kernel and a 1x1 conv the two orders give the same masks.

Ranking rule used by every mask here: larger ``|w|`` wins, ties go to the lower index, and NaN ranks
as ``+inf`` (above every finite value; so a NaN weight is kept by the forward mask and propagates
into the layer output, never hidden behind a plausible-looking mask); ``-0.0`` and ``0.0`` tie.

Every public function validates its arguments in Python, then calls a ``jax.jit``-compiled body with
the N:M ratio and options as static arguments: an eager call with the same shapes reuses the
compiled body (under an outer ``jit`` the body is inlined).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bimask_jax._checks import (
    K_ORDERS,
    as_array,
    check_choice,
    check_divisible,
    check_kernel,
    check_mask,
    check_nm,
    check_perm,
    report_perm,
    safe_perm,
)

METHODS = ("dense", "srste", "transposable", "bimask", "sste")

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


def _group_topn(x, n: int, m: int, axis: int):
    """``nm_mask`` of a checked ``x`` (``axis`` non-negative)."""
    g = x.reshape(*x.shape[:axis], x.shape[axis] // m, m, *x.shape[axis + 1 :])
    return _topn_along(_magnitude(g), n, axis + 1).reshape(x.shape)


_nm_mask = jax.jit(_group_topn, static_argnames=("n", "m", "axis"))


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
    x = as_array(x)
    if x.ndim == 0:
        raise ValueError("x must have at least 1 axis, got a scalar")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis={axis} is out of range for x with {x.ndim} axes")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must have a floating dtype, got {x.dtype}")
    check_divisible(x.shape[axis], m, f"x axis {axis}")
    return _nm_mask(x, n=n, m=m, axis=axis % x.ndim)


def _check_layer_kernel(kernel, m: int, k_order: str, *, need_output: bool):
    """Shape rules of a kernel read as a matrix with ``k_order`` (see the module docstring)."""
    check_kernel(kernel)
    check_choice("k_order", k_order, K_ORDERS)
    shape = jnp.shape(kernel)
    if k_order == "hwi":
        check_divisible(shape[-2], m, "kernel input axis (-2)")
        if need_output:
            check_divisible(shape[-1], m, "kernel output axis (-1)")
    elif math.prod(shape) % m:
        raise ValueError(
            f"kernel of shape {shape} has {math.prod(shape)} entries, not divisible by m={m} "
            "(k_order='ihw' groups m consecutive entries of the whole flattened kernel)"
        )


def _as_matrix(kernel, k_order: str):
    """The ``(K, C)`` matrix of a kernel, rows in ``k_order`` (see the module docstring)."""
    if k_order == "ihw":
        kernel = jnp.moveaxis(kernel, -2, 0)
    return kernel.reshape(-1, kernel.shape[-1])


def _from_matrix(mat, shape, k_order: str):
    """Inverse of :func:`_as_matrix` for a kernel of ``shape``."""
    if k_order == "ihw":
        return jnp.moveaxis(mat.reshape(shape[-2], *shape[:-2], shape[-1]), 0, -2)
    return mat.reshape(shape)


def _forward(kernel, n: int, m: int, k_order: str):
    if k_order == "hwi":
        return _group_topn(kernel, n, m, kernel.ndim - 2)
    mat = _as_matrix(kernel, k_order)  # (K, C); groups run over the flattened (C, K)
    keep = _topn_along(_magnitude(mat.T.reshape(-1, m)), n, 1).reshape(mat.T.shape).T
    return _from_matrix(keep, kernel.shape, k_order)


_forward_jit = jax.jit(_forward, static_argnames=("n", "m", "k_order"))


def forward_mask(kernel, n: int, m: int, *, k_order: str = "hwi"):
    """Forward mask Mf: the ``n`` largest ``|w|`` of every forward group of ``m`` entries.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``; ``"hwi"``: ``Cin % m == 0`` (groups along
        axis -2); ``"ihw"``: ``kernel.size % m == 0`` (the reference's groups, module docstring).
      k_order: ``"hwi"`` (default) or ``"ihw"``.

    Returns:
      bool mask of ``kernel.shape``. With ``"hwi"``, ``x @ (kernel * Mf)`` is N:M along its
      reduction axis.
    """
    n, m = check_nm(n, m)
    kernel = as_array(kernel)
    _check_layer_kernel(kernel, m, k_order, need_output=False)
    return _forward_jit(kernel, n=n, m=m, k_order=k_order)


def _inverse(perm):
    c = perm.shape[0]
    return jnp.zeros((c,), jnp.int32).at[perm].set(jnp.arange(c, dtype=jnp.int32))


@functools.partial(jax.jit, static_argnames=("report",))
def _inverse_jit(perm, report: bool):
    return _inverse(safe_perm(perm, report=report))


def inverse_permutation(perm, *, checkify_perm: bool = True):
    """``inv`` with ``inv[perm[i]] = i``; int32 ``(C,)``. Pure, O(C).

    ``perm``: integer ``(C,)``, a permutation of ``range(C)`` (``ValueError`` when concrete and not
    one; traced, an invalid ``perm`` is replaced by the identity, see ``backward_mask``, which also
    explains ``checkify_perm``).
    """
    shape = np.shape(perm)
    if len(shape) != 1:
        raise ValueError(f"perm must be 1-D, got shape {shape}")
    perm = check_perm(perm, shape[0])
    return _inverse_jit(perm, report=report_perm(perm, checkify_perm))


def _take_columns(a, idx):
    """``a[:, idx]`` for a 2-D ``a``, as a gather whose output keeps ``a``'s row-major layout."""
    return jnp.take_along_axis(a, jnp.broadcast_to(idx[None, :], a.shape), axis=1, mode="clip")


def _materialize(x, token):
    """``x``, computed into a buffer of its own on XLA:CPU.

    XLA:CPU fuses a column gather into the loop that consumes it and then redoes the gather for
    every read; the ranking reads each gathered entry m times, and the result is gathered again,
    which makes the backward mask ~3x slower than gather + rank + gather as separate loops
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


def _backward_rows(w2, f2, perm, n: int, m: int):
    """Backward mask of the ``(K, C)`` matrix for ``C % m == 0`` (groups within rows)."""
    k, c = w2.shape
    g = c // m
    # Gather the columns so that member j of permuted group q lands at column j * g + q: the m
    # members of every group are then m slabs of shape (k, g), ranked element-wise (no minor-axis
    # shuffles), and one inverse gather maps the result back.
    order = perm.reshape(g, m).T.reshape(c)
    token = (perm[0] < 0).astype(jnp.int32)  # 0 for a permutation; opaque to XLA
    key = _take_columns(_backward_key(w2, f2), order)
    key = _materialize(key, token).reshape(k, m, g)
    keep = (_topn_along(key, n, axis=1) & (key >= 0)).reshape(k, c)
    return _take_columns(_materialize(keep, token), _inverse(order))


def _backward_flat(w2, f2, perm, n: int, m: int):
    """Backward mask of the ``(K, C)`` matrix with groups of ``m`` consecutive entries of the
    row-major flattened column-permuted matrix (they straddle rows when ``C % m != 0``)."""
    key = _take_columns(_backward_key(w2, f2), perm)
    keep = _topn_along(key.reshape(-1, m), n, 1).reshape(key.shape) & (key >= 0)
    return _take_columns(keep, _inverse(perm))


def _backward_key(w2, f2):
    """Rank key: forward-kept entries by |w| (NaN as +inf); forward-dropped ones below all of them."""
    return jax.lax.stop_gradient(jnp.where(f2, _magnitude(w2), -1.0))


def _backward(kernel, fwd, perm, n: int, m: int, k_order: str, report: bool = False):
    c = kernel.shape[-1]
    perm = jnp.arange(c, dtype=jnp.int32) if perm is None else safe_perm(perm, report=report)
    if c % m == 0:  # groups within rows: the row order (k_order) does not matter
        return _backward_rows(kernel.reshape(-1, c), fwd.reshape(-1, c), perm, n, m).reshape(
            kernel.shape
        )
    w2, f2 = _as_matrix(kernel, k_order), _as_matrix(fwd, k_order)
    return _from_matrix(_backward_flat(w2, f2, perm, n, m), kernel.shape, k_order)


_backward_jit = jax.jit(_backward, static_argnames=("n", "m", "k_order", "report"))


def backward_mask(kernel, fwd, perm, n: int, m: int, *, k_order: str = "hwi",
                  checkify_perm: bool = True):
    """Backward mask Mb of Bi-Mask.

    Permutes the output columns of the ``(K, C)`` matrix of ``kernel`` by ``perm``, keeps the ``n``
    largest ``|kernel * fwd|`` of every backward group of ``m`` entries (``m`` consecutive permuted
    columns of a row; with ``k_order="ihw"`` and ``C % m != 0``, ``m`` consecutive entries of the
    row-major flattened permuted matrix), ANDs with ``fwd`` and maps back to the original column
    order. Hence ``(kernel * Mb)[..., perm]`` is N:M along C, so ``g @ (kernel * Mb).T`` is an N:M
    product once ``g``'s columns are permuted.

    Ties: forward-kept entries rank above forward-dropped ones (so a kept weight of exactly 0 is not
    displaced by a dropped one), then the lower permuted index wins. With this rule the number of
    True entries is exactly ``sum over groups of min(forward-kept in group, n)``.

    Invalid permutations: a concrete ``perm`` that is not a permutation of ``range(C)`` raises
    ``ValueError``. Under ``jit`` (a traced ``perm``) it cannot be checked in Python: the mask is then
    computed with the identity permutation instead, so the result is still a valid backward mask
    (N:M after its permutation, a subset of ``fwd``); wrap the call in
    ``jax.experimental.checkify.checkify`` to get an error for it instead (``checkify_perm``).

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``; ``"hwi"``: ``Cin % m == 0`` and
        ``C % m == 0``; ``"ihw"``: ``kernel.size % m == 0``.
      fwd: bool, ``kernel.shape`` (the forward mask).
      perm: integer ``(C,)`` (array, list or tuple), a permutation of ``range(C)``.
      k_order: ``"hwi"`` (default) or ``"ihw"``; only matters when ``C % m != 0``.
      checkify_perm: with a traced ``perm``, also report an invalid one under ``checkify``
        (default ``True``). The report is a ``checkify.debug_check``, a JAX effect: a ``jit`` that
        contains it dispatches through Python on every call (milliseconds for a whole train
        step). ``False``: the identity fallback alone, no effect (what the Flax layers use).

    Returns:
      bool mask of ``kernel.shape``, a subset of ``fwd``.
    """
    n, m = check_nm(n, m)
    kernel = as_array(kernel)
    _check_layer_kernel(kernel, m, k_order, need_output=True)
    check_mask("fwd", fwd, kernel.shape)
    perm = check_perm(perm, kernel.shape[-1])
    return _backward_jit(kernel, fwd, perm, n=n, m=m, k_order=k_order,
                         report=report_perm(perm, checkify_perm))


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


def _transposable(kernel, n: int, m: int, k_order: str):
    mat = _magnitude(_as_matrix(kernel, k_order))
    k, c = mat.shape
    blocks = mat.reshape(k // m, m, c // m, m).transpose(0, 2, 1, 3).reshape(-1, m, m)
    # +inf (from NaN/inf weights) would make pattern scores inf-inf; clip to the dtype's max.
    blocks = jnp.minimum(blocks, jnp.finfo(jnp.float32).max / (m * m))
    if m <= 4:
        keep = _transposable_exact(blocks, n, m)
    else:
        keep = _transposable_greedy(blocks, n, m)
    keep = keep.reshape(k // m, c // m, m, m).transpose(0, 2, 1, 3).reshape(k, c)
    return _from_matrix(keep, kernel.shape, k_order)


_transposable_jit = jax.jit(_transposable, static_argnames=("n", "m", "k_order"))


def _check_transposable(kernel, m: int, k_order: str):
    check_kernel(kernel)
    check_choice("k_order", k_order, K_ORDERS)
    shape = jnp.shape(kernel)
    if k_order == "hwi":
        check_divisible(shape[-2], m, "kernel input axis (-2)")
    else:
        check_divisible(math.prod(shape[:-1]), m, "kernel reduction size K")
    check_divisible(shape[-1], m, "kernel output axis (-1)")


def transposable_mask(kernel, n: int, m: int, *, k_order: str = "hwi"):
    """A single mask that is N:M along both the reduction axis and the output axis.

    The ``(K, C)`` matrix of the kernel (rows in ``k_order``) is cut into ``m x m`` blocks (``m``
    consecutive rows by ``m`` consecutive columns); each block independently gets the pattern with
    at most ``n`` kept entries in every row and column that keeps the largest sum of ``|w|``.

    * ``m <= 4``: exact. Every pattern with exactly ``n`` per row and column (90 for 2:4, 24 for 1:4)
      is scored at once with one matmul; ties take the first pattern in enumeration order.
    * ``m > 4``: a documented approximation (the pattern space is too large to enumerate): a greedy
      pass in order of decreasing ``|w|`` that keeps an entry while its row and column hold fewer than
      ``n``. It always yields a valid pattern (at most ``n`` per row and column of every block, so
      still N:M on both axes) but may keep fewer than ``n`` in some rows.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``, ``C % m == 0`` and (``"hwi"``)
        ``Cin % m == 0`` or (``"ihw"``) ``K % m == 0``.
      k_order: ``"hwi"`` (default) or ``"ihw"``.

    Returns:
      bool mask of ``kernel.shape``.
    """
    n, m = check_nm(n, m)
    kernel = as_array(kernel)
    _check_transposable(kernel, m, k_order)
    return _transposable_jit(kernel, n=n, m=m, k_order=k_order)


@functools.partial(jax.jit, static_argnames=("n", "m", "method", "k_order", "report"))
def _layer_masks_jit(kernel, perm, n: int, m: int, method: str, k_order: str, report: bool):
    fwd = _forward(kernel, n, m, k_order)
    if method in ("srste", "sste"):
        return fwd, fwd
    return fwd, _backward(kernel, fwd, perm, n, m, k_order, report)


def layer_masks(kernel, n: int, m: int, method: str, perm=None, *, k_order: str = "hwi",
                checkify_perm: bool = True):
    """The ``(fwd, bwd)`` mask pair that a sparse layer uses for its forward and backward-data products.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)`` (shape rules: the masks of ``method``).
      method: one of
        * ``"dense"``: all-True masks (no sparsity; any shape).
        * ``"srste"``: ``(Mf, Mf)``; the backward product uses the forward pattern, which is not N:M
          along C, so it gets no sparse speed-up.
        * ``"transposable"``: ``(T, T)`` with ``T = transposable_mask`` (N:M along both axes).
        * ``"bimask"``: ``(Mf, backward_mask(kernel, Mf, perm))``.
        * ``"sste"``: ``(Mf, Mf)``, as ``"srste"``: S-STE (Hu et al., NeurIPS 2024) multiplies the
          continuous weight ``scale * S(w)`` (:func:`bimask_jax.sste.sste_weight`), which is zero
          outside ``Mf`` (inside too where ``|w|`` ties the largest dropped magnitude), so these are
          the masks of its products; the weight itself is not a masked kernel.
      perm: int ``(C,)`` for ``"bimask"`` (as in ``backward_mask``, including its safe fallback under
        ``jit``); ``None`` means the identity permutation.
      k_order: ``"hwi"`` (default) or ``"ihw"``: how a conv kernel is read (module docstring).
      checkify_perm: ``"bimask"`` with a traced ``perm``: as in ``backward_mask``.

    Returns:
      ``(fwd, bwd)``, bool arrays of ``kernel.shape``.
    """
    check_choice("method", method, METHODS)
    report = report_perm(perm, checkify_perm)
    kernel = as_array(kernel)
    if method == "dense":
        check_kernel(kernel)
        check_choice("k_order", k_order, K_ORDERS)
        ones = jnp.ones(kernel.shape, bool)
        return ones, ones
    if method == "transposable":
        t = transposable_mask(kernel, n, m, k_order=k_order)
        return t, t
    n, m = check_nm(n, m)
    _check_layer_kernel(kernel, m, k_order, need_output=method == "bimask")
    if method in ("srste", "sste"):
        perm = None
    elif perm is not None:
        perm = check_perm(perm, kernel.shape[-1])
    return _layer_masks_jit(kernel, perm, n=n, m=m, method=method, k_order=k_order,
                            report=method == "bimask" and report)
