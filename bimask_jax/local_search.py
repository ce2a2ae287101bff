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
* :func:`stripe_search`: every iteration pairs the groups (one round of a round-robin
  tournament, so ``G - 1`` iterations (``G`` for odd ``G``) meet every pair of groups once) and
  replaces the columns of each pair of groups by the best of all ``C(2m-1, m-1)`` ways to split
  those ``2m`` columns into two groups (35 for ``m = 4``), scored by a per-pair histogram of the
  ``2^(2m)`` row patterns times a lookup table. Costs ``O(C K)`` per iteration; needs ``m <= 6``
  (table size).

Both never lower the score (a move is taken only when it strictly improves its groups) and return
the incumbent unchanged for ``iterations == 0``. ``iterations`` is an upper bound: a search stops
early at a proven local optimum (swap: no improving exchange; stripe: a full round-robin cycle
without gain, i.e. no pair of groups can be re-split better). With ``kick >= 2`` it instead rotates
``kick`` random positions there and goes on (iterated local search), returning the best partition
seen.
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


def partition_score(ft, perm, n: int, m: int):
    """The score of ``perm``: ``sum over groups g and rows k of min(cnt[g, k], n)``, int32 scalar.

    Args:
      ft: ``(C, K)`` int8/bool, the transposed ``(K, C)`` forward mask; ``C % m == 0``.
      perm: int ``(C,)``; position ``i`` holds column ``perm[i]``.
    """
    c, k = ft.shape
    count_dtype = jnp.int8 if m < 128 else jnp.int32  # a group count is at most m
    rows = jnp.take(ft.astype(jnp.int8), perm, axis=0).reshape(c // m, m, k)
    return jnp.minimum(rows.sum(axis=1, dtype=count_dtype), n).sum(dtype=jnp.int32)


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


def _round_robin_pairs(labels, r):
    """Round ``r`` of the circle-method round-robin on ``labels`` (int ``(L,)``, ``L`` even):
    ``(L/2, 2)`` pairs ``(labels[s[j]], labels[s[L-1-j]])`` for ``j < L/2``, where slot order
    ``s = [0, 1 + (r % (L-1)), 1 + ((r+1) % (L-1)), ...]`` keeps slot 0 fixed and rotates the
    rest. Any ``L - 1`` consecutive rounds meet every pair of labels exactly once."""
    size = labels.shape[0]
    rest = (jnp.arange(size - 1) + r) % (size - 1) + 1
    slots = jnp.concatenate([jnp.zeros((1,), rest.dtype), rest])
    return jnp.stack([labels[slots[: size // 2]], labels[slots[::-1][: size // 2]]], axis=1)


def _stripe_step(ft, perm, labels, r, n: int, m: int):
    """One stripe iteration: round ``r`` of the pairing, each pair of groups re-split optimally.

    ``labels``: int ``(G + G % 2,)``, a permutation of the group ids plus, for odd ``G``, a dummy id
    ``G`` whose partner sits out. Returns ``(new_perm, score gain)``."""
    c, k = ft.shape
    g = c // m
    npair = g // 2
    if npair == 0:
        return perm, jnp.int32(0)
    pairs = _round_robin_pairs(labels, r)
    if g % 2:  # drop the pair holding the dummy id
        real = jnp.argsort(jnp.any(pairs >= g, axis=1), stable=True)[:npair]
        pairs = pairs[real]
    groups = perm.reshape(g, m)
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


def _iterate(step, ft, init, key, n: int, m: int, iterations: int, cycle: int, kick: int):
    """Shared loop. ``step(ft, perm, i) -> (perm, gain)``; ``cycle`` consecutive iterations without
    gain prove a local optimum, where the loop stops (``kick < 2``) or rotates ``kick`` random
    positions (key ``fold_in(key, i)``) and goes on. At most ``iterations`` iterations; returns the
    best permutation seen."""
    if iterations == 0:
        return init
    score0 = partition_score(ft, init, n, m)
    kicks = kick >= 2

    def cond(state):
        i, _, _, _, _, _, done = state
        return (i < iterations) & ~done

    def body(state):
        i, cur, cur_s, best, best_s, stall, _ = state
        cur, gain = step(ft, cur, i)
        cur_s = cur_s + gain
        stall = jnp.where(gain > 0, 0, stall + 1)
        best = jnp.where(cur_s > best_s, cur, best)
        best_s = jnp.maximum(cur_s, best_s)
        converged = stall >= cycle
        if kicks:

            def do_kick(_):
                p = _kick(cur, jax.random.fold_in(key, i), kick)
                return p, partition_score(ft, p, n, m), jnp.int32(0)

            cur, cur_s, stall = jax.lax.cond(
                converged, do_kick, lambda _: (cur, cur_s, stall), None
            )
            converged = jnp.array(False)
        return i + 1, cur, cur_s, best, best_s, stall, converged

    state = (jnp.int32(0), init, score0, init, score0, jnp.int32(0), jnp.array(False))
    return jax.lax.while_loop(cond, body, state)[3]


@functools.partial(jax.jit, static_argnames=("n", "m", "iterations", "kick"))
def swap_search(ft, init, key, *, n: int, m: int, iterations: int, kick: int = 0):
    """Best-improvement exchange search from ``init`` (see the module docstring).

    Args:
      ft: ``(C, K)`` int8/bool transposed forward mask; ``C % m == 0``.
      init: int32 ``(C,)`` incumbent permutation.
      key: PRNG key (used only by kicks).
      n, m: the N:M ratio.
      iterations: at most this many gain-matrix evaluations (>= 0); stops at the first one without
        an improving exchange unless ``kick >= 2``.
      kick: at a local optimum rotate ``kick`` random positions and go on (``< 2``: stop there).

    Returns:
      int32 ``(C,)``, scoring ``>=`` ``init``.
    """

    def step(ft_, perm, _):
        return _swap_step(ft_, perm, n, m)

    return _iterate(step, ft, init, key, n, m, iterations, 1, kick)


@functools.partial(jax.jit, static_argnames=("n", "m", "iterations", "kick"))
def stripe_search(ft, init, key, *, n: int, m: int, iterations: int, kick: int = 0):
    """Round-robin stripe-group search from ``init`` (see the module docstring).

    Args:
      ft: ``(C, K)`` int8/bool transposed forward mask; ``C % m == 0``, ``m <= STRIPE_MAX_M``.
      init: int32 ``(C,)`` incumbent permutation.
      key: PRNG key, split into ``(label_key, kick_key)``. The round-robin runs over the labels
        ``jax.random.permutation(label_key, G + G % 2)`` (label ``G``, for odd ``G``, is a dummy
        whose partner sits out); iteration ``i`` plays round ``i`` of the circle method (see
        ``_round_robin_pairs``). A kick in iteration ``i`` uses ``fold_in(kick_key, i)``.
      n, m: the N:M ratio.
      iterations: at most this many rounds (>= 0); each costs about one gather of the ``(C, K)``
        mask plus a histogram of ``C K / (2m)`` entries. Stops after a full cycle of
        ``G + G % 2 - 1`` rounds without gain unless ``kick >= 2``.
      kick: as in :func:`swap_search`.

    Returns:
      int32 ``(C,)``, scoring ``>=`` ``init``.
    """
    g = init.shape[0] // m
    size = g + g % 2
    label_key, kick_key = jax.random.split(key)
    labels = jax.random.permutation(label_key, size)

    def step(ft_, perm, i):
        return _stripe_step(ft_, perm, labels, i, n, m)

    return _iterate(step, ft, init, kick_key, n, m, iterations, max(size - 1, 1), kick)
