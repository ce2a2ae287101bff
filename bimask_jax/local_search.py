"""Local searches over the output-column partition that Bi-Mask's backward mask is scored on.

The score of a permutation ``p`` (see ``bimask_jax.permutation``) depends only on the transposed
forward mask ``ft`` (``(C, K)`` int8, ``ft[j, k] = F[k, j]``) and on how ``p`` cuts the ``C`` output
columns into ``G = C/m`` groups of ``m`` consecutive *positions*: position ``i`` of ``p`` holds
column ``p[i]`` and belongs to group ``i // m``. With ``cnt[g, k]`` the forward-kept entries of row
``k`` in group ``g``,

    score(p) = sum over groups g and rows k of min(cnt[g, k], n).

Two searches improve an incumbent partition, both jit-compiled loops with no Python loop per move:

* :func:`swap_search`: every iteration computes the score change of *every* cross-group exchange of
  two positions at once, as a ``(C, C)`` matrix from the per-row group counts (two matmuls, see
  :func:`swap_gains`), then applies the best improving exchanges of a set of disjoint group pairs
  (one exchange per group, so the gains add up exactly). Works for any ``m``; costs
  ``O(C^2 K)`` per iteration.
* :func:`stripe_search`: every iteration pairs the groups at random and replaces the columns of each
  pair of groups by the best of all ``C(2m-1, m-1)`` ways to split those ``2m`` columns into two
  groups (35 for ``m = 4``), scored by a per-pair histogram of the ``2^(2m)`` row patterns times a
  lookup table. Costs ``O(C K)`` per iteration; needs ``m <= 6`` (table size).

Both never lower the score (a move is taken only when it strictly improves its groups), return the
incumbent unchanged for ``iterations == 0``, and can escape a local optimum with random kicks: after
``patience`` iterations without improvement, ``kick`` random positions are rotated and the search
continues from there; the best partition seen is returned.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

# Largest group size for the stripe search: its lookup table is 2^(2m) x C(2m-1, m-1) entries
# (m = 6: 4096 x 462); m = 8 would need 65536 x 6435.
STRIPE_MAX_M = 6


def group_counts(ft, perm, m: int):
    """``(G, K)`` int32: forward-kept entries of every row in every group of ``m`` positions.

    Args:
      ft: ``(C, K)`` int8/bool, the transposed flattened forward mask.
      perm: int ``(C,)``; position ``i`` holds column ``perm[i]``.
    """
    c, k = ft.shape
    rows = jnp.take(ft, perm, axis=0).astype(jnp.int32)
    return rows.reshape(c // m, m, k).sum(axis=1)


def partition_score(ft, perm, n: int, m: int):
    """``sum min(group_counts, n)`` as an int32 scalar (= ``permutation_score``)."""
    return jnp.minimum(group_counts(ft, perm, m), n).sum(dtype=jnp.int32)


def swap_gains(ft, perm, n: int, m: int):
    """Score change of exchanging the columns at positions ``a`` and ``b`` of ``perm``, for all pairs.

    Exchanging ``a`` (group ``A``) and ``b`` (group ``B != A``) changes a row ``k`` only where
    ``F_a != F_b`` (``F_x = ft[perm[x], k]``). If ``b`` brings a kept entry into ``A`` and takes one
    from ``B``, the row gains ``[cnt_A < n] - [cnt_B <= n]``; the other way round,
    ``[cnt_B < n] - [cnt_A <= n]``. With ``u_x = [cnt_{group(x)} < n]`` and
    ``v_x = [cnt_{group(x)} <= n]`` per row, the gain is ``T[a, b] + T[b, a]`` where

        T[a, b] = sum_k (1 - F_a) u_a F_b  -  (1 - F_a) F_b v_b,

    i.e. two ``(C, K) x (K, C)`` matmuls (exact in float32 for ``K < 2^23``).

    Args:
      ft: ``(C, K)`` int8/bool transposed forward mask.
      perm: int ``(C,)``.

    Returns:
      int32 ``(C, C)``, symmetric; 0 for two positions of the same group.
    """
    c, k = ft.shape
    fp = jnp.take(ft, perm, axis=0).astype(jnp.float32)  # (C, K) in position order
    cnt = fp.reshape(c // m, m, k).sum(axis=1)
    u = jnp.repeat((cnt < n).astype(jnp.float32), m, axis=0)
    v = jnp.repeat((cnt <= n).astype(jnp.float32), m, axis=0)
    nf = 1.0 - fp
    lhs = jnp.concatenate([nf * u, -nf], axis=1)  # (C, 2K)
    rhs = jnp.concatenate([fp, fp * v], axis=1)  # (C, 2K)
    t = jnp.dot(lhs, rhs.T, precision=jax.lax.Precision.HIGHEST)
    gain = jnp.round(t + t.T).astype(jnp.int32)
    group = jnp.arange(c) // m
    return jnp.where(group[:, None] == group[None, :], 0, gain)


def _match_groups(best):
    """Disjoint pairs of groups by repeated mutual best choice.

    ``best``: ``(G, G)`` int32, the best exchange gain between two groups (symmetric). Every round,
    each unmatched group picks the unmatched partner of largest positive gain (first on ties); the
    pairs that pick each other are matched. The first row that holds the largest remaining gain is
    always matched, so every round with a positive gain left matches at least one pair.
    Returns ``partner`` int32 ``(G,)``: the matched group, or -1.
    """
    g = best.shape[0]
    ids = jnp.arange(g)

    def round_(state):
        free, partner, _ = state
        gm = jnp.where(free[:, None] & free[None, :], best, 0)
        choice = jnp.argmax(gm, axis=1)
        ok = free & (gm[ids, choice] > 0) & (choice[choice] == ids)
        return free & ~ok, jnp.where(ok, choice, partner), jnp.any(ok)

    init = (jnp.ones((g,), bool), jnp.full((g,), -1, jnp.int32), jnp.array(True))
    _, partner, _ = jax.lax.while_loop(lambda s: s[2], round_, init)
    return partner


def _swap_step(ft, perm, n: int, m: int):
    """One swap iteration: returns ``(new_perm, score gain)``."""
    c = perm.shape[0]
    g = c // m
    gain = swap_gains(ft, perm, n, m)
    blocks = gain.reshape(g, m, g, m).transpose(0, 2, 1, 3).reshape(g, g, m * m)
    best = blocks.max(axis=-1)
    where = blocks.argmax(axis=-1)
    partner = _match_groups(best)
    ids = jnp.arange(g)
    other = jnp.maximum(partner, 0)
    take = partner > ids  # each matched pair once, from its lower group
    flat = where[ids, other]
    pos_a = ids * m + flat // m
    pos_b = other * m + flat % m
    out_a = jnp.where(take, pos_a, c)  # c: out of bounds, dropped
    out_b = jnp.where(take, pos_b, c)
    src = jnp.arange(c).at[out_a].set(pos_b, mode="drop").at[out_b].set(pos_a, mode="drop")
    total = jnp.sum(jnp.where(take, best[ids, other], 0), dtype=jnp.int32)
    return perm[src], total


@functools.cache
def _splits(m: int):
    """All ways to split positions ``0..2m-1`` into two groups of ``m``, the first holding 0.

    Returns ``(orders, masks)``: ``orders`` int32 ``(S, 2m)`` lists the first group then the second
    (split 0 is the identity ``0..2m-1``); ``masks`` int64 ``(S,)`` has bit ``i`` set when position
    ``i`` is in the first group.
    """
    firsts = [c for c in itertools.combinations(range(2 * m), m) if c[0] == 0]
    orders = [list(f) + [i for i in range(2 * m) if i not in f] for f in firsts]
    masks = [sum(1 << i for i in f) for f in firsts]
    return np.asarray(orders, np.int32), np.asarray(masks, np.int64)


@functools.cache
def _split_table(n: int, m: int) -> np.ndarray:
    """float32 ``(2^(2m), S)``: the score of one row with kept-pattern ``code`` (bit ``i``: position
    ``i`` of the pair is forward-kept) under split ``s``: ``min(kept in 1st, n) + min(kept in 2nd, n)``."""
    _, masks = _splits(m)
    codes = np.arange(2 ** (2 * m), dtype=np.int64)
    bits = (codes[:, None] >> np.arange(2 * m)) & 1  # (codes, 2m)
    total = bits.sum(axis=1, keepdims=True)
    first = np.stack([bits[:, [i for i in range(2 * m) if mk >> i & 1]].sum(1) for mk in masks], 1)
    return (np.minimum(first, n) + np.minimum(total - first, n)).astype(np.float32)


def _stripe_step(ft, perm, key, n: int, m: int):
    """One stripe iteration: random pairs of groups, each re-split optimally.
    Returns ``(new_perm, score gain)``."""
    c, k = ft.shape
    g = c // m
    npair = g // 2
    if npair == 0:
        return perm, jnp.int32(0)
    groups = perm.reshape(g, m)
    pairs = jax.random.permutation(key, g)[: 2 * npair].reshape(npair, 2)
    cols = groups[pairs].reshape(npair, 2 * m)
    x = jnp.take(ft, cols, axis=0).astype(jnp.int32)  # (P, 2m, K)
    code = jnp.sum(x << jnp.arange(2 * m, dtype=jnp.int32)[None, :, None], axis=1)  # (P, K)
    hist = jnp.zeros((npair, 2 ** (2 * m)), jnp.float32)
    hist = hist.at[jnp.arange(npair)[:, None], code].add(1.0)
    scores = jnp.dot(hist, jnp.asarray(_split_table(n, m)), precision=jax.lax.Precision.HIGHEST)
    scores = jnp.round(scores).astype(jnp.int32)  # (P, S), exact: integers < 2^24
    choice = jnp.argmax(scores, axis=1)  # split 0 (unchanged) wins ties
    gain = jnp.sum(scores[jnp.arange(npair), choice] - scores[:, 0], dtype=jnp.int32)
    orders = jnp.asarray(_splits(m)[0])
    new_cols = jnp.take_along_axis(cols, orders[choice], axis=1)
    groups = groups.at[pairs].set(new_cols.reshape(npair, 2, m))
    return groups.reshape(c), gain


def _kick(perm, key, size: int):
    """Rotates the contents of ``size`` random positions of ``perm`` by one place."""
    c = perm.shape[0]
    pos = jax.random.permutation(key, c)[:size]
    return perm.at[pos].set(perm[jnp.roll(pos, 1)])


def _iterate(step, ft, init, key, n: int, m: int, iterations: int, patience: int, kick: int):
    """Shared loop: ``step(ft, perm, key) -> (perm, gain)`` for ``iterations`` iterations, with a
    kick after ``patience`` iterations without gain (0: never); returns the best perm seen."""
    if iterations == 0:
        return init
    score0 = partition_score(ft, init, n, m)

    def body(i, state):
        cur, cur_s, best, best_s, stall = state
        kk = jax.random.fold_in(key, i)
        cur, gain = step(ft, cur, kk)
        cur_s = cur_s + gain
        stall = jnp.where(gain > 0, 0, stall + 1)
        better = cur_s > best_s
        best = jnp.where(better, cur, best)
        best_s = jnp.maximum(cur_s, best_s)
        if patience > 0 and kick > 1:

            def do_kick(_):
                p = _kick(cur, jax.random.fold_in(kk, 1), kick)
                return p, partition_score(ft, p, n, m), jnp.int32(0)

            cur, cur_s, stall = jax.lax.cond(
                stall >= patience, do_kick, lambda _: (cur, cur_s, stall), None
            )
        return cur, cur_s, best, best_s, stall

    state = (init, score0, init, score0, jnp.int32(0))
    _, _, best, _, _ = jax.lax.fori_loop(0, iterations, body, state)
    return best


@functools.partial(jax.jit, static_argnames=("n", "m", "iterations", "patience", "kick"))
def swap_search(ft, init, key, *, n: int, m: int, iterations: int, patience: int = 0, kick: int = 0):
    """Best-improvement exchange search from ``init`` (see the module docstring).

    Args:
      ft: ``(C, K)`` int8/bool transposed forward mask; ``C % m == 0``.
      init: int32 ``(C,)`` incumbent permutation.
      key: PRNG key (used only by kicks).
      n, m: the N:M ratio. iterations: number of gain-matrix evaluations (>= 0).
      patience, kick: after ``patience`` iterations without gain rotate ``kick`` random positions
        (``patience=0`` or ``kick < 2``: no kicks).

    Returns:
      int32 ``(C,)``, scoring ``>=`` ``init``.
    """

    def step(ft_, perm, _):
        return _swap_step(ft_, perm, n, m)

    return _iterate(step, ft, init, key, n, m, iterations, patience, kick)


@functools.partial(jax.jit, static_argnames=("n", "m", "iterations", "patience", "kick"))
def stripe_search(
    ft, init, key, *, n: int, m: int, iterations: int, patience: int = 0, kick: int = 0
):
    """Random-pairing stripe-group search from ``init`` (see the module docstring).

    Args:
      ft: ``(C, K)`` int8/bool transposed forward mask; ``C % m == 0``, ``m <= STRIPE_MAX_M``.
      init: int32 ``(C,)`` incumbent permutation.
      key: PRNG key. Iteration ``i`` pairs the groups as consecutive entries of
        ``jax.random.permutation(jax.random.fold_in(key, i), G)`` (with an odd ``G`` the last one
        sits out); a kick in iteration ``i`` uses ``fold_in(fold_in(key, i), 1)``.
      n, m: the N:M ratio. iterations: number of pairings (>= 0); each costs about one gather of
        the ``(C, K)`` mask plus a histogram of ``C K / (2m)`` entries.
      patience, kick: as in :func:`swap_search`.

    Returns:
      int32 ``(C,)``, scoring ``>=`` ``init``.
    """

    def step(ft_, perm, kk):
        return _stripe_step(ft_, perm, kk, n, m)

    return _iterate(step, ft, init, key, n, m, iterations, patience, kick)
