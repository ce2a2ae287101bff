import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj
from tests import nm_reference as ref

NM = [(1, 4), (2, 4), (2, 8), (4, 8), (1, 16)]


def _kernel(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _np_score(fwd, perm, n, m):
    """sum over rows and groups of min(forward-kept in the group, n)."""
    c = fwd.shape[-1]
    f = np.asarray(fwd).reshape(-1, c)[:, perm]
    return int(np.minimum(f.reshape(f.shape[0], c // m, m).sum(-1), n).sum())


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("shape", [(32, 32), (3, 3, 16, 48)])
def test_score_equals_backward_mask_count(n, m, shape):
    k = _kernel(shape, seed=n + 10 * m)
    fwd = bj.forward_mask(k, n, m)
    rng = np.random.default_rng(m)
    for _ in range(3):
        perm = rng.permutation(shape[-1])
        s = int(bj.permutation_score(k, fwd, perm, n, m))
        assert s == int(ref.backward_mask(k, np.asarray(fwd), perm, n, m).sum())
        assert s == _np_score(fwd, perm, n, m)


@pytest.mark.slow
@pytest.mark.parametrize("n,m", NM)
def test_search_never_below_incumbent_and_is_best_of_candidates(n, m):
    k = _kernel((64, 32), seed=n * m)
    fwd = bj.forward_mask(k, n, m)
    key = jax.random.key(3)
    init = np.random.default_rng(1).permutation(32)
    best = np.asarray(bj.search_permutation(key, k, n, m, 20, init=init, chunk_size=6))
    assert sorted(best.tolist()) == list(range(32))
    # Independent restatement: the incumbent and the 20 candidates the docstring defines.
    keys = jax.random.split(key, 20)
    cands = [init] + [np.asarray(jax.random.permutation(kk, 32)) for kk in keys]
    scores = [_np_score(fwd, p, n, m) for p in cands]
    assert _np_score(fwd, best, n, m) == max(scores) >= scores[0]
    np.testing.assert_array_equal(best, cands[int(np.argmax(scores))])


def test_search_zero_candidates_returns_incumbent():
    k = _kernel((16, 8))
    np.testing.assert_array_equal(
        bj.search_permutation(jax.random.key(0), k, 2, 4, 0), np.arange(8)
    )
    init = np.array([3, 1, 2, 0, 7, 6, 5, 4])
    np.testing.assert_array_equal(
        bj.search_permutation(jax.random.key(0), k, 2, 4, 0, init=init), init
    )


@pytest.mark.slow
def test_search_chunking_does_not_change_result():
    k = _kernel((3, 3, 8, 16), seed=4)
    key = jax.random.key(7)
    a = bj.search_permutation(key, k, 2, 4, 13, chunk_size=1)
    b = bj.search_permutation(key, k, 2, 4, 13, chunk_size=5)
    c = bj.search_permutation(key, k, 2, 4, 13)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_search_under_jit_and_vmap():
    ks = _kernel((2, 32, 16), seed=2)
    keys = jax.random.split(jax.random.key(0), 2)
    f = jax.jit(jax.vmap(lambda kk, w: bj.search_permutation(kk, w, 2, 4, 8)))
    got = f(keys, ks)
    for i in range(2):
        np.testing.assert_array_equal(got[i], bj.search_permutation(keys[i], ks[i], 2, 4, 8))


def test_upper_bound_and_efficacy():
    k = _kernel((64, 16), seed=5)
    fwd = np.asarray(bj.forward_mask(k, 2, 4))
    ub = int(bj.retained_upper_bound(fwd, 2, 4))
    assert ub == int(np.minimum(fwd.sum(1), 2 * 16 // 4).sum())
    ident = _np_score(fwd, np.arange(16), 2, 4)
    perm = np.asarray(bj.search_permutation(jax.random.key(1), k, 2, 4, 50))
    s = _np_score(fwd, perm, 2, 4)
    assert ident <= s <= ub
    eff = float(bj.search_efficacy(s, ident, ub))
    assert eff == pytest.approx((s - ident) / (ub - ident))
    assert float(bj.search_efficacy(5, 5, 5)) == 1.0


def test_search_errors():
    k = _kernel((16, 8))
    with pytest.raises(ValueError, match="num_candidates must be a Python int >= 0"):
        bj.search_permutation(jax.random.key(0), k, 2, 4, -1)
    with pytest.raises(ValueError, match="chunk_size must be a Python int >= 1"):
        bj.search_permutation(jax.random.key(0), k, 2, 4, 4, chunk_size=0)
    with pytest.raises(ValueError, match="init is not a permutation"):
        bj.search_permutation(jax.random.key(0), k, 2, 4, 4, init=np.zeros(8, int))
    with pytest.raises(ValueError, match="output axis \\(-1\\) of size 6 is not divisible by m=4"):
        bj.search_permutation(jax.random.key(0), _kernel((16, 6)), 2, 4, 4)
    with pytest.raises(ValueError, match="perm must have an integer dtype"):
        bj.permutation_score(k, jnp.ones((16, 8), bool), np.arange(8.0), 2, 4)


@pytest.mark.slow
def test_discard_incumbent_is_the_best_fresh_candidate():
    """keep_incumbent=False (the reference's refresh): the first best of the fresh candidates, even
    when the incumbent scores higher; NumPy scores of every candidate give the expected answer."""
    k = jax.random.normal(jax.random.key(3), (16, 12))
    fwd = bj.forward_mask(k, 2, 4)
    key = jax.random.key(4)
    # an incumbent better than any of 3 random candidates: the best of 200
    best = bj.search_permutation(jax.random.key(5), k, 2, 4, 200)
    got = bj.search_permutation(key, k, 2, 4, 3, init=best, keep_incumbent=False)
    cands = [np.asarray(jax.random.permutation(kk, 12)) for kk in jax.random.split(key, 3)]
    w, f = np.asarray(k, np.float64), np.asarray(fwd)
    scores = [int(ref.backward_mask(w, f, p, 2, 4).sum()) for p in cands]
    np.testing.assert_array_equal(got, cands[int(np.argmax(scores))])
    assert int(bj.permutation_score(k, fwd, best, 2, 4)) > max(scores)  # so discarding shows
    kept = bj.search_permutation(key, k, 2, 4, 3, init=best)
    np.testing.assert_array_equal(kept, best)
    np.testing.assert_array_equal(
        bj.search_permutation(key, k, 2, 4, 0, init=best, keep_incumbent=False), best)
    with pytest.raises(ValueError, match="keep_incumbent must be a bool"):
        bj.search_permutation(key, k, 2, 4, 3, keep_incumbent=1)
