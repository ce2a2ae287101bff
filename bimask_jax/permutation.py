"""Scoring and searching the output-channel permutation of Bi-Mask's backward mask.

The score of a permutation ``p`` is the number of forward-kept weights that survive in the backward
mask. It depends only on the forward mask and on how ``p`` groups the ``C`` output columns into
``C/m`` groups of ``m``: for the flattened ``(K, C)`` forward mask ``F``,

    score(p) = sum over rows k and groups g of min(sum_{j in g} F[k, p[j]], n)

No magnitudes and no sorting are needed, which is what makes scoring many candidates cheap. (With
``k_order="ihw"`` and ``C % m != 0`` a group is ``m`` consecutive entries of the row-major
flattened ``F[:, p]``, straddling two rows; the score is the same sum of ``min(count, n)`` over those
groups, and only the random search applies.)

Like ``bimask_jax.masks``, every public function checks its arguments in Python and then calls a
jitted body (the N:M ratio, counts and options static).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bimask_jax._checks import (
    K_ORDERS,
    as_array,
    check_choice,
    check_count,
    check_mask,
    check_nm,
    check_perm,
    report_perm,
    safe_perm,
)
from bimask_jax.local_search import STRIPE_MAX_M, partition_score, stripe_search, swap_search
from bimask_jax.masks import _as_matrix, _check_layer_kernel, _forward

SEARCH_METHODS = ("random", "swap", "stripe")

# Peak memory budget of one chunk of vmapped candidate scoring, in bytes (see search_permutation).
CHUNK_BYTES = 64 * 2**20


def _kept_by_column(fwd, k_order: str):
    """(C, K) int8: the forward mask's matrix transposed, so that a permutation is a row gather.

    Rows of the matrix are in ``k_order`` only where it matters (``C % m != 0``); callers pass
    ``"hwi"`` otherwise.
    """
    return _as_matrix(fwd, k_order).T.astype(jnp.int8)


def _score(ft, perm, n: int, m: int):
    """Score of ``perm`` from ``ft`` (C, K) int8; groups straddle rows when ``C % m != 0``."""
    c = ft.shape[0]
    if c % m == 0:
        return partition_score(ft, perm, n, m)
    flat = jnp.take(ft, perm, axis=0).T.reshape(-1, m)  # the column-permuted (K, C), row-major
    return jnp.minimum(flat.sum(axis=1, dtype=jnp.int32), n).sum(dtype=jnp.int32)


def _ft(fwd, m: int, k_order: str):
    return _kept_by_column(fwd, k_order if fwd.shape[-1] % m else "hwi")


@functools.partial(jax.jit, static_argnames=("n", "m", "k_order", "report"))
def _score_jit(fwd, perm, n: int, m: int, k_order: str, report: bool):
    return _score(_ft(fwd, m, k_order), safe_perm(perm, report=report), n, m)


def _check_score_args(kernel, fwd, n, m, k_order):
    n, m = check_nm(n, m)
    kernel = as_array(kernel)
    _check_layer_kernel(kernel, m, k_order, need_output=True)
    if fwd is not None:
        check_mask("fwd", fwd, kernel.shape)
    return kernel, n, m


def permutation_score(kernel, fwd, perm, n: int, m: int, *, k_order: str = "hwi",
                      checkify_perm: bool = True):
    """Number of forward-kept weights that survive in ``backward_mask(kernel, fwd, perm, n, m)``.

    Computed without building the backward mask (see the module docstring); equal to
    ``backward_mask(..., k_order=k_order).sum()``, including for an invalid traced ``perm`` (scored
    as the identity, the permutation ``backward_mask`` then uses).

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)`` (only its shape is used).
      fwd: bool forward mask of ``kernel.shape``.
      perm: integer ``(C,)`` permutation (array, list or tuple).
      k_order: ``"hwi"`` (default) or ``"ihw"``; only matters when ``C % m != 0``.
      checkify_perm: with a traced ``perm``, as in ``backward_mask``.

    Returns:
      int32 scalar.
    """
    kernel, n, m = _check_score_args(kernel, fwd, n, m, k_order)
    perm = check_perm(perm, kernel.shape[-1])
    return _score_jit(fwd, perm, n=n, m=m, k_order=k_order,
                      report=report_perm(perm, checkify_perm))


@functools.partial(jax.jit, static_argnames=("n", "m", "k_order"))
def _upper_bound_jit(fwd, n: int, m: int, k_order: str):
    c = fwd.shape[-1]
    if c % m == 0:
        per_row = fwd.reshape(-1, c).sum(axis=1, dtype=jnp.int32)
        return jnp.minimum(per_row, n * c // m).sum(dtype=jnp.int32)
    return jnp.minimum(fwd.sum(dtype=jnp.int32), n * (fwd.size // m))


def retained_upper_bound(fwd, n: int, m: int, *, k_order: str = "hwi"):
    """Upper bound on ``permutation_score`` over all permutations.

    ``C % m == 0``: ``sum over rows of min(forward-kept in the row, n * C / m)`` (a row cannot keep
    more than ``n`` per group). ``k_order="ihw"`` with ``C % m != 0`` (groups straddle rows):
    ``min(forward-kept, n * fwd.size / m)``. int32 scalar.

    ``fwd``: bool ``(K, C)`` or ``(*window, Cin, C)``; ``"hwi"``: ``C % m == 0``; ``"ihw"``:
    ``fwd.size % m == 0``.
    """
    n, m = check_nm(n, m)
    fwd = as_array(fwd)
    check_choice("k_order", k_order, K_ORDERS)
    if fwd.ndim < 2 or fwd.dtype != jnp.bool_ or 0 in fwd.shape:
        raise ValueError(
            f"fwd must be a bool mask with >= 2 axes, none of size 0, got {fwd.dtype}{fwd.shape}"
        )
    size = fwd.shape[-1] if k_order == "hwi" else fwd.size
    if size % m:
        what = "fwd output axis (-1)" if k_order == "hwi" else "fwd (k_order='ihw': all entries)"
        raise ValueError(f"{what} of size {size} is not divisible by m={m}")
    return _upper_bound_jit(fwd, n=n, m=m, k_order=k_order)


@jax.jit
def _efficacy_jit(score, ident, upper):
    score, ident, upper = (jnp.asarray(v, jnp.float32) for v in (score, ident, upper))
    gap = upper - ident
    return jnp.where(gap > 0, (score - ident) / jnp.where(gap > 0, gap, 1.0), 1.0)


def search_efficacy(score, identity_score, upper_bound):
    """Fraction of the gap between the identity permutation and the upper bound that a search
    closed: ``(score - identity) / (upper - identity)``. float32 (broadcast shape of the three
    arguments); 1.0 where there is no gap. Negative when ``score`` is below the identity's, which
    the reference's refresh policy (``keep_incumbent=False``: the best fresh candidate, whatever
    its score) can give; a search that keeps its incumbent from the identity never does."""
    return _efficacy_jit(score, identity_score, upper_bound)


def default_chunk_size(k: int, c: int, num_candidates: int, stack: int = 1) -> int:
    """Candidates scored per vmapped chunk so that one chunk's gathered int8 forward masks
    (``stack`` searches of a ``(K, C)`` layer at once) use at most ``CHUNK_BYTES`` (64 MiB)."""
    return max(1, min(max(num_candidates, 1), CHUNK_BYTES // max(1, stack * k * c)))


def search_permutation(
    key,
    kernel,
    n: int,
    m: int,
    num_candidates: int = 100,
    *,
    fwd=None,
    init=None,
    chunk_size: int | None = None,
    method: str = "random",
    iterations: int = 100,
    kick: int = 0,
    k_order: str = "hwi",
    keep_incumbent: bool = True,
    checkify_perm: bool = True,
):
    """Searches the output-column permutation of the backward mask, starting from an incumbent.

    ``method="random"``: the best of the incumbent and ``num_candidates`` random permutations (the
    paper draws its candidates the same way). The incumbent is kept unless a candidate scores
    strictly higher; ``keep_incumbent=False`` is the reference code's policy instead: the best of
    the ``num_candidates`` fresh candidates alone (the first maximum), even when it scores lower
    than the incumbent. Candidate
    ``i`` is ``jax.random.permutation(jax.random.split(key, num_candidates)[i], C)``; candidates are
    generated and scored with ``vmap`` in chunks of ``chunk_size`` (``lax.map``), so all candidates
    are never held at once. Peak extra memory is about ``chunk_size * K * C`` bytes (one int8
    gathered forward mask per candidate in the chunk) plus ``chunk_size * C * 4`` bytes of
    permutations; the default chunk keeps the first term <= 64 MiB. The incumbent is candidate 0
    and ties keep the earlier candidate, so ``num_candidates=0`` returns ``init`` unchanged (the
    paper's "no permutation" ablation when ``init`` is the identity).

    ``method="stripe"`` and ``method="swap"`` are local searches from the incumbent
    (``bimask_jax.local_search``), ``iterations`` iterations each:

    * ``"stripe"``: each iteration pairs the ``C/m`` groups (a round of a round-robin) and re-splits
      the ``2m`` columns of every pair optimally (all ``C(2m-1, m-1)`` splits). ``O(C K)`` per
      iteration; needs ``m <= 6``.
    * ``"swap"``: each iteration computes the gain of every cross-group exchange of two columns
      (a ``(C, C)`` matrix, ``O(C^2 K)``) and applies the best exchanges of disjoint group pairs.

    Both need ``C % m == 0``. ``iterations`` is an upper bound: both stop early at a proven local
    optimum (no improving exchange / a full round-robin cycle without gain), unless ``kick >= 2``:
    then ``kick`` random positions are rotated there and the search goes on (the best permutation
    seen is returned).

    Every method returns a permutation that scores at least as high as ``init``, and ``init``
    itself when the budget (``num_candidates`` / ``iterations``) is 0. A concrete ``init`` that is
    not a permutation raises ``ValueError``; a traced one is replaced by the identity (see
    ``backward_mask``), so the result is always a permutation.

    Args:
      key: a PRNG key.
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)``, shape rules of ``backward_mask``.
      n, m: the N:M ratio (Python ints).
      num_candidates: ``"random"`` only: number of random permutations (Python int >= 0). Paper: 100.
      fwd: the forward mask, if already computed (bool, ``kernel.shape``); else ``forward_mask``.
      init: int ``(C,)`` incumbent permutation; default ``arange(C)``.
      chunk_size: ``"random"`` only: candidates per vmapped chunk (Python int >= 1); default from
        the 64 MiB budget.
      method: ``"random"`` (default), ``"stripe"`` or ``"swap"``.
      iterations: ``"stripe"``/``"swap"`` only: at most this many iterations (Python int >= 0).
      kick: ``"stripe"``/``"swap"`` only: positions rotated at a local optimum (Python int >= 0;
        0 or 1: stop there instead).
      k_order: ``"hwi"`` (default) or ``"ihw"``: how the forward mask is computed when ``fwd`` is
        None, and the backward groups when ``C % m != 0``.
      keep_incumbent: ``"random"`` only: ``True`` (default) keeps ``init`` unless a candidate is
        strictly better; ``False`` discards it (the reference code; ``num_candidates=0`` still
        returns ``init``). The local searches always start from, and never go below, ``init``.
      checkify_perm: with a traced ``init``, as in ``backward_mask`` (the report names ``init``).

    Returns:
      int32 ``(C,)``, the best permutation found.
    """
    kernel, n, m = _check_score_args(kernel, fwd, n, m, k_order)
    check_choice("method", method, SEARCH_METHODS)
    c = kernel.shape[-1]
    if init is not None:
        init = check_perm(init, c, "init")
    report = report_perm(init, checkify_perm)
    if method == "random":
        num_candidates = check_count("num_candidates", num_candidates, 0)
        if chunk_size is None:
            chunk_size = default_chunk_size(kernel.size // c, c, num_candidates)
        chunk_size = check_count("chunk_size", chunk_size, 1)
        if not isinstance(keep_incumbent, bool):
            raise ValueError(f"keep_incumbent must be a bool, got {keep_incumbent!r}")
        return _random_search(
            key, kernel, fwd, init, n=n, m=m, num_candidates=num_candidates,
            chunk_size=chunk_size, k_order=k_order, keep_incumbent=keep_incumbent, report=report,
        )
    iterations = check_count("iterations", iterations, 0)
    kick = check_count("kick", kick, 0)
    if kick > c:
        raise ValueError(f"kick must be <= the number of output columns C={c}, got {kick}")
    if c % m:
        raise ValueError(
            f"method={method!r} needs C % m == 0 (groups of whole columns), got C={c}, m={m}; "
            "use method='random'"
        )
    if method == "stripe" and m > STRIPE_MAX_M:
        raise ValueError(
            f"method='stripe' needs m <= {STRIPE_MAX_M} (its split table has 2^(2m) rows), "
            f"got m={m}; use method='swap'"
        )
    return _local_search(
        key, kernel, fwd, init, n=n, m=m, method=method, iterations=iterations, kick=kick,
        k_order=k_order, report=report,
    )


def _start(kernel, fwd, init, n: int, m: int, k_order: str, report: bool):
    """The incumbent (safe, int32) and the (C, K) int8 forward mask of a search."""
    c = kernel.shape[-1]
    init = (jnp.arange(c, dtype=jnp.int32) if init is None
            else safe_perm(init, "init", report=report))
    if fwd is None:
        fwd = _forward(kernel, n, m, k_order)
    return init, _ft(fwd, m, k_order)


@functools.partial(
    jax.jit,
    static_argnames=("n", "m", "num_candidates", "chunk_size", "k_order", "keep_incumbent",
                     "report"),
)
def _random_search(key, kernel, fwd, init, *, n, m, num_candidates, chunk_size, k_order,
                   keep_incumbent=True, report=False):
    init, ft = _start(kernel, fwd, init, n, m, k_order, report)
    if num_candidates == 0:
        return init
    c = ft.shape[0]

    def draw(kk):
        return jax.random.permutation(kk, c).astype(jnp.int32)

    keys = jax.random.split(key, num_candidates)
    scores = jax.lax.map(
        lambda kk: _score(ft, draw(kk), n, m), keys, batch_size=min(chunk_size, num_candidates)
    )
    best = jnp.argmax(scores)  # first maximum: earlier candidates win ties
    if not keep_incumbent:
        return draw(keys[best])
    return jnp.where(scores[best] > _score(ft, init, n, m), draw(keys[best]), init)


@functools.partial(
    jax.jit, static_argnames=("n", "m", "method", "iterations", "kick", "k_order", "report")
)
def _local_search(key, kernel, fwd, init, *, n, m, method, iterations, kick, k_order,
                  report=False):
    init, ft = _start(kernel, fwd, init, n, m, k_order, report)
    if iterations == 0:
        return init
    search = stripe_search if method == "stripe" else swap_search
    best = search(ft, init, key, n=n, m=m, iterations=iterations, kick=kick)
    # The searches never lower the score; this guard makes that independent of their bookkeeping.
    return jnp.where(partition_score(ft, best, n, m) >= partition_score(ft, init, n, m), best, init)
