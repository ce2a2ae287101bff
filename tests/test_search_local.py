"""The local permutation searches (method="stripe" / "swap") against independent NumPy statements."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj
from bimask_jax import local_search as ls


def _kernel(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _np_score(f2, perm, n, m):
    """sum over rows and groups of m consecutive permuted columns of min(forward-kept, n)."""
    c = f2.shape[1]
    f = f2[:, np.asarray(perm)]
    return int(np.minimum(f.reshape(f.shape[0], c // m, m).sum(-1), n).sum())


def _np_swapped(perm, a, b):
    p = np.array(perm)
    p[a], p[b] = p[b], p[a]
    return p


def _np_best_splits(f2, perm, pairs, n, m):
    """One stripe iteration restated: each pair of groups (i, j) gets the best of all ways to split
    its 2m columns into two groups of m; the first group holds the pair's first column; ties go to the
    first split in itertools.combinations order (so the current split wins ties)."""
    groups = np.asarray(perm).reshape(-1, m).copy()
    for gi, gj in pairs:
        cols = np.concatenate([groups[gi], groups[gj]])
        best, best_s = None, -1
        for first in itertools.combinations(range(2 * m), m):
            if first[0] != 0:
                continue
            second = [i for i in range(2 * m) if i not in first]
            both = np.concatenate([cols[list(first)], cols[second]])
            s = _np_score(f2[:, both], np.arange(2 * m), n, m)
            if s > best_s:
                best, best_s = (cols[list(first)], cols[second]), s
        groups[gi], groups[gj] = best
    return groups.reshape(-1)


NM = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8)]


@pytest.mark.parametrize("n,m", NM)
def test_swap_gains_equal_brute_force_score_differences(n, m):
    rng = np.random.default_rng(n + 7 * m)
    c = 4 * m
    # any bool matrix (not only N:M-structured ones): the gain formula does not assume structure
    f2 = rng.random((11, c)) < 0.55
    perm = rng.permutation(c)
    gains = np.asarray(ls.swap_gains(jnp.asarray(f2.T, jnp.int8), jnp.asarray(perm), n, m))
    base = _np_score(f2, perm, n, m)
    want = np.zeros((c, c), np.int64)
    for a in range(c):
        for b in range(c):
            if a // m != b // m:
                want[a, b] = _np_score(f2, _np_swapped(perm, a, b), n, m) - base
    np.testing.assert_array_equal(gains, want)
    assert np.any(want != 0)  # the check has something to compare


@pytest.mark.slow
@pytest.mark.parametrize("n,m", [(2, 4), (2, 8)])
def test_swap_search_one_iteration_takes_the_best_swap_and_converges(n, m):
    c = 48 // m * 4  # 48 columns for m = 4, 24 for m = 8
    k = _kernel((48, c), seed=m)
    f2 = np.asarray(bj.forward_mask(k, n, m))
    init = np.random.default_rng(2).permutation(c)
    base = _np_score(f2, init, n, m)
    best_gain = max(
        _np_score(f2, _np_swapped(init, a, b), n, m) - base
        for a in range(c)
        for b in range(c)
        if a // m != b // m
    )
    assert best_gain > 0
    one = np.asarray(
        bj.search_permutation(jax.random.key(0), k, n, m, method="swap", iterations=1, init=init)
    )
    assert sorted(one.tolist()) == list(range(c))
    assert _np_score(f2, one, n, m) >= base + best_gain
    # Run to convergence: no single exchange may improve the result any more.
    done = np.asarray(
        bj.search_permutation(jax.random.key(0), k, n, m, method="swap", iterations=60, init=init)
    )
    s = _np_score(f2, done, n, m)
    assert s >= _np_score(f2, one, n, m)
    for a in range(c):
        for b in range(c):
            if a // m != b // m:
                assert _np_score(f2, _np_swapped(done, a, b), n, m) <= s


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (1, 2), (3, 6)])
def test_stripe_one_iteration_equals_exhaustive_pair_splits(n, m):
    c = 5 * m  # an odd number of groups: one group sits out
    k = _kernel((40, c), seed=3 * m + n)
    f2 = np.asarray(bj.forward_mask(k, n, m)) if 40 % m == 0 else None
    if f2 is None:
        f2 = np.random.default_rng(n).random((40, c)) < 0.5
    init = np.random.default_rng(5).permutation(c)
    key = jax.random.key(11)
    got = np.asarray(
        ls.stripe_search(
            jnp.asarray(f2.T, jnp.int8), jnp.asarray(init, jnp.int32), key,
            n=n, m=m, iterations=1,
        )
    )
    # Documented pairing of iteration 0: the circle method on a random labelling of the G groups
    # plus a dummy (odd G), slot 0 fixed: pairs (labels[j], labels[L - 1 - j]).
    g = c // m
    labels = np.asarray(jax.random.permutation(jax.random.split(key)[0], g + g % 2))
    pairs = [(labels[j], labels[len(labels) - 1 - j]) for j in range(len(labels) // 2)]
    pairs = [(a, b) for a, b in pairs if a < g and b < g]
    np.testing.assert_array_equal(got, _np_best_splits(f2, init, pairs, n, m))
    assert _np_score(f2, got, n, m) >= _np_score(f2, init, n, m)


@pytest.mark.parametrize("n,m,c", [(2, 4, 28), (1, 4, 24), (1, 2, 10)])
def test_stripe_stops_at_a_pairwise_local_optimum(n, m, c):
    f2 = np.random.default_rng(c).random((30, c)) < 0.5
    ft = jnp.asarray(f2.T, jnp.int8)
    init = jnp.asarray(np.random.default_rng(1).permutation(c), jnp.int32)
    key = jax.random.key(4)
    got = np.asarray(ls.stripe_search(ft, init, key, n=n, m=m, iterations=500))
    assert _np_score(f2, got, n, m) > _np_score(f2, np.asarray(init), n, m)
    # No pair of groups can be re-split better (checked exhaustively, pair by pair).
    s = _np_score(f2, got, n, m)
    for pair in itertools.combinations(range(c // m), 2):
        assert _np_score(f2, _np_best_splits(f2, got, [pair], n, m), n, m) == s
    # It stopped there: a larger budget gives the same result.
    again = ls.stripe_search(ft, init, key, n=n, m=m, iterations=5000)
    np.testing.assert_array_equal(again, got)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,n,m", [("stripe", 2, 4), ("stripe", 1, 4), ("swap", 2, 4), ("swap", 4, 8)]
)
def test_search_is_permutation_never_below_incumbent_and_improves(method, n, m):
    k = _kernel((3, 3, 8, 8 * m), seed=n * m)
    f2 = np.asarray(bj.forward_mask(k, n, m)).reshape(-1, 8 * m)
    key = jax.random.key(1)
    for init in (None, np.random.default_rng(n).permutation(8 * m)):
        got = np.asarray(
            bj.search_permutation(key, k, n, m, method=method, iterations=8, init=init)
        )
        assert got.dtype == np.int32
        assert sorted(got.tolist()) == list(range(8 * m))
        start = _np_score(f2, np.arange(8 * m) if init is None else init, n, m)
        assert _np_score(f2, got, n, m) > start  # random kernels leave room to improve
        ub = int(np.minimum(f2.sum(1), n * 8).sum())
        assert _np_score(f2, got, n, m) <= ub


def test_search_from_a_local_optimum_returns_it_unchanged_without_kicks():
    k = _kernel((96, 32), seed=9)
    key = jax.random.key(0)
    opt = bj.search_permutation(key, k, 2, 4, method="swap", iterations=80)
    again = bj.search_permutation(key, k, 2, 4, method="swap", iterations=5, init=opt)
    np.testing.assert_array_equal(again, opt)


@pytest.mark.parametrize("method", ["stripe", "swap"])
def test_kicks_keep_the_best_and_a_permutation(method):
    k = _kernel((64, 32), seed=4)
    f2 = np.asarray(bj.forward_mask(k, 2, 4))
    init = np.random.default_rng(8).permutation(32)
    got = np.asarray(
        bj.search_permutation(
            jax.random.key(3), k, 2, 4, method=method, iterations=30, init=init,
            kick=6,
        )
    )
    assert sorted(got.tolist()) == list(range(32))
    assert _np_score(f2, got, 2, 4) >= _np_score(f2, init, 2, 4)


@pytest.mark.parametrize("method", ["stripe", "swap"])
def test_zero_iterations_returns_incumbent(method):
    k = _kernel((16, 8))
    init = np.array([3, 1, 2, 0, 7, 6, 5, 4])
    got = bj.search_permutation(jax.random.key(0), k, 2, 4, method=method, iterations=0, init=init)
    np.testing.assert_array_equal(got, init)
    got = bj.search_permutation(jax.random.key(0), k, 2, 4, method=method, iterations=0)
    np.testing.assert_array_equal(got, np.arange(8))


@pytest.mark.parametrize("method", ["stripe", "swap"])
def test_search_under_jit_and_vmap(method):
    ks = _kernel((2, 32, 16), seed=2)
    keys = jax.random.split(jax.random.key(0), 2)
    inits = jnp.stack([jnp.arange(16), jnp.arange(16)[::-1]]).astype(jnp.int32)

    def one(kk, w, p):
        return bj.search_permutation(kk, w, 2, 4, method=method, iterations=4, init=p)

    got = jax.jit(jax.vmap(one))(keys, ks, inits)
    for i in range(2):
        np.testing.assert_array_equal(got[i], one(keys[i], ks[i], inits[i]))
        f2 = np.asarray(bj.forward_mask(ks[i], 2, 4))
        assert _np_score(f2, got[i], 2, 4) >= _np_score(f2, inits[i], 2, 4)


def test_local_search_errors():
    k = _kernel((16, 8))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="method must be one of"):
        bj.search_permutation(key, k, 2, 4, method="greedy")
    with pytest.raises(ValueError, match="iterations must be a Python int >= 0"):
        bj.search_permutation(key, k, 2, 4, method="stripe", iterations=-1)
    with pytest.raises(ValueError, match="kick must be <= the number of output columns C=8"):
        bj.search_permutation(key, k, 2, 4, method="swap", kick=9)
    with pytest.raises(ValueError, match="method='stripe' needs m <= 6"):
        bj.search_permutation(key, _kernel((16, 16)), 2, 8, method="stripe")
    with pytest.raises(ValueError, match="init is not a permutation"):
        bj.search_permutation(key, k, 2, 4, method="swap", init=np.zeros(8, int))


@pytest.mark.parametrize("size", [2, 6, 8])
def test_round_robin_meets_every_pair_once_per_cycle(size):
    labels = jnp.asarray(np.random.default_rng(size).permutation(size))
    for start in (0, 3):
        seen = []
        for r in range(start, start + size - 1):
            pairs = np.asarray(ls._round_robin_pairs(labels, r))
            assert sorted(pairs.reshape(-1).tolist()) == list(range(size))  # a perfect matching
            seen += [tuple(sorted(p)) for p in pairs.tolist()]
        assert sorted(seen) == sorted(itertools.combinations(range(size), 2))
