"""Scoring and searching the output-channel permutation of Bi-Mask's backward mask.

The score of a permutation ``p`` is the number of forward-kept weights that survive in the backward
mask. It depends only on the forward mask and on how ``p`` groups the ``C`` output columns into
``C/m`` groups of ``m``: for the flattened ``(K, C)`` forward mask ``F``,

    score(p) = sum over rows k and groups g of min(sum_{j in g} F[k, p[j]], n)

No magnitudes and no sorting are needed, which is what makes scoring many candidates cheap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bimask_jax._checks import check_divisible, check_kernel, check_mask, check_nm, check_perm
from bimask_jax.local_search import STRIPE_MAX_M, stripe_search, swap_search
from bimask_jax.masks import forward_mask

SEARCH_METHODS = ("random", "swap", "stripe")

# Peak memory budget of one chunk of vmapped candidate scoring, in bytes (see search_permutation).
_CHUNK_BYTES = 64 * 2**20


def _kept_by_column(fwd, c: int):
    """(C, K) int8: the forward mask transposed so that a permutation is a row gather."""
    return jnp.asarray(fwd).reshape(-1, c).T.astype(jnp.int8)


def _score_columns(ft, perm, n: int, m: int):
    """Score of ``perm`` from the transposed forward mask ``ft`` (C, K) int8. Returns int32."""
    c, k = ft.shape
    counts = jnp.take(ft, perm, axis=0).reshape(c // m, m, k).sum(axis=1, dtype=jnp.int8)
    return jnp.minimum(counts, n).sum(dtype=jnp.int32)


def _check_score_args(kernel, fwd, n, m):
    n, m = check_nm(n, m)
    kernel = jnp.asarray(kernel)
    check_kernel(kernel)
    check_divisible(kernel.shape[-2], m, "kernel input axis (-2)")
    check_divisible(kernel.shape[-1], m, "kernel output axis (-1)")
    if fwd is not None:
        check_mask("fwd", fwd, kernel.shape)
    return kernel, n, m


def permutation_score(kernel, fwd, perm, n: int, m: int):
    """Number of forward-kept weights that survive in ``backward_mask(kernel, fwd, perm, n, m)``.

    Computed without building the backward mask (see the module docstring); equal to
    ``backward_mask(...).sum()``.

    Args:
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)`` (only its shape is used).
      fwd: bool forward mask of ``kernel.shape``.
      perm: integer ``(C,)`` permutation.

    Returns:
      int32 scalar.
    """
    kernel, n, m = _check_score_args(kernel, fwd, n, m)
    c = kernel.shape[-1]
    check_perm(perm, c)
    return _score_columns(_kept_by_column(fwd, c), jnp.asarray(perm), n, m)


def retained_upper_bound(fwd, n: int, m: int):
    """Upper bound on ``permutation_score`` over all permutations.

    ``sum over rows of min(forward-kept in the row, n * C / m)``: a row cannot keep more than ``n``
    per group. int32 scalar. ``fwd``: bool ``(K, C)`` or ``(*window, Cin, C)``.
    """
    n, m = check_nm(n, m)
    fwd = jnp.asarray(fwd)
    if fwd.ndim < 2 or fwd.dtype != jnp.bool_:
        raise ValueError(f"fwd must be a bool mask with >= 2 axes, got {fwd.dtype}{fwd.shape}")
    c = fwd.shape[-1]
    check_divisible(c, m, "fwd output axis (-1)")
    per_row = fwd.reshape(-1, c).sum(axis=1, dtype=jnp.int32)
    return jnp.minimum(per_row, n * c // m).sum(dtype=jnp.int32)


def search_efficacy(score, identity_score, upper_bound):
    """Fraction of the gap between the identity permutation and the upper bound that a search
    closed: ``(score - identity) / (upper - identity)``. float32; 1.0 when there is no gap."""
    score, ident, upper = (
        jnp.asarray(v, jnp.float32) for v in (score, identity_score, upper_bound)
    )
    gap = upper - ident
    return jnp.where(gap > 0, (score - ident) / jnp.where(gap > 0, gap, 1.0), 1.0)


def default_chunk_size(k: int, c: int, num_candidates: int) -> int:
    """Candidates scored per vmapped chunk so that one chunk's gathered masks use <= 64 MiB."""
    return max(1, min(max(num_candidates, 1), _CHUNK_BYTES // max(1, k * c)))


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
    return value


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
):
    """Searches the output-column permutation of the backward mask, starting from an incumbent.

    ``method="random"`` is the paper's procedure: the best of the incumbent and ``num_candidates``
    random permutations. Candidate ``i`` is
    ``jax.random.permutation(jax.random.split(key, num_candidates)[i], C)``; candidates are generated
    and scored with ``vmap`` in chunks of ``chunk_size`` (``lax.map``), so all candidates are never
    held at once. Peak extra memory is about ``chunk_size * K * C`` bytes (one int8 gathered forward
    mask per candidate in the chunk) plus ``chunk_size * C * 4`` bytes of permutations; the default
    chunk keeps the first term <= 64 MiB. The incumbent is candidate 0 and ties keep the earlier
    candidate, so ``num_candidates=0`` returns ``init`` unchanged (the paper's "no permutation"
    ablation when ``init`` is the identity).

    ``method="stripe"`` and ``method="swap"`` are local searches from the incumbent
    (``bimask_jax.local_search``), ``iterations`` iterations each, jit-compiled:

    * ``"stripe"``: each iteration pairs the ``C/m`` groups (a round of a round-robin) and re-splits
      the ``2m`` columns of every pair optimally (all ``C(2m-1, m-1)`` splits). ``O(C K)`` per
      iteration; needs ``m <= 6``.
    * ``"swap"``: each iteration computes the gain of every cross-group exchange of two columns
      (a ``(C, C)`` matrix, ``O(C^2 K)``) and applies the best exchanges of disjoint group pairs.

    ``iterations`` is an upper bound: both stop early at a proven local optimum (no improving
    exchange / a full round-robin cycle without gain), unless ``kick >= 2``: then ``kick`` random
    positions are rotated there and the search goes on (the best permutation seen is returned).

    Every method returns a permutation that scores at least as high as ``init``, and ``init``
    itself when the budget (``num_candidates`` / ``iterations``) is 0.

    Args:
      key: a PRNG key.
      kernel: floating ``(K, C)`` or ``(*window, Cin, C)`` with ``Cin % m == 0`` and ``C % m == 0``.
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

    Returns:
      int32 ``(C,)``, the best permutation found.
    """
    kernel, n, m = _check_score_args(kernel, fwd, n, m)
    if method not in SEARCH_METHODS:
        raise ValueError(f"method must be one of {SEARCH_METHODS}, got {method!r}")
    c = kernel.shape[-1]
    k = kernel.size // c
    if init is None:
        init = jnp.arange(c, dtype=jnp.int32)
    else:
        check_perm(init, c, "init")
        init = jnp.asarray(init, jnp.int32)
    if method != "random":
        return _local_search(key, kernel, fwd, init, n, m, method, iterations, kick)
    _check_count("num_candidates", num_candidates, 0)
    if num_candidates == 0:
        return init
    if chunk_size is None:
        chunk_size = default_chunk_size(k, c, num_candidates)
    _check_count("chunk_size", chunk_size, 1)
    if fwd is None:
        fwd = forward_mask(kernel, n, m)
    ft = _kept_by_column(fwd, c)

    def draw(kk):
        return jax.random.permutation(kk, c).astype(jnp.int32)

    def score_key(kk):
        return _score_columns(ft, draw(kk), n, m)

    keys = jax.random.split(key, num_candidates)
    scores = jax.lax.map(score_key, keys, batch_size=min(chunk_size, num_candidates))
    best = jnp.argmax(scores)  # first maximum: earlier candidates win ties
    incumbent = _score_columns(ft, init, n, m)
    return jnp.where(scores[best] > incumbent, draw(keys[best]), init)


def _local_search(key, kernel, fwd, init, n, m, method, iterations, kick):
    """``search_permutation`` for ``method`` in ("stripe", "swap"); arguments already checked
    except the local-search ones."""
    c = kernel.shape[-1]
    _check_count("iterations", iterations, 0)
    _check_count("kick", kick, 0)
    if kick > c:
        raise ValueError(f"kick must be <= the number of output columns C={c}, got {kick}")
    if method == "stripe" and m > STRIPE_MAX_M:
        raise ValueError(
            f"method='stripe' needs m <= {STRIPE_MAX_M} (its split table has 2^(2m) rows), "
            f"got m={m}; use method='swap'"
        )
    if iterations == 0:
        return init
    if fwd is None:
        fwd = forward_mask(kernel, n, m)
    ft = _kept_by_column(fwd, c)
    search = stripe_search if method == "stripe" else swap_search
    best = search(ft, init, key, n=n, m=m, iterations=iterations, kick=kick)
    # The searches never lower the score; this guard makes that independent of their bookkeeping.
    return jnp.where(_score_columns(ft, best, n, m) >= _score_columns(ft, init, n, m), best, init)
