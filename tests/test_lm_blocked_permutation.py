"""bimask_jax.blocked_permutation against an independent NumPy statement of the rule: the result is
block-diagonal and every block is the best of its incumbent and its own candidates."""

import jax
import numpy as np
import pytest

import bimask_jax as bj
from bimask_jax import block_keys, is_block_diagonal, search_blocked_permutation


def _np_score(fwd2, perm, n, m):
    c = fwd2.shape[-1]
    f = fwd2[:, perm]
    return int(np.minimum(f.reshape(f.shape[0], c // m, m).sum(-1), n).sum())


def _kernel(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n,m,blocks", [
    (2, 4, 2),
    pytest.param(2, 4, 4, marks=pytest.mark.slow),
    pytest.param(1, 4, 3, marks=pytest.mark.slow),
])
def test_random_search_is_best_per_block(n, m, blocks):
    c, k = 16 * blocks, 32
    w = _kernel((k, c), seed=blocks)
    fwd = np.asarray(bj.forward_mask(w, n, m))
    cb = c // blocks
    rng = np.random.default_rng(5)
    init = np.concatenate([rng.permutation(cb) + b * cb for b in range(blocks)])
    keys = block_keys(jax.random.key(7), blocks)
    out = np.asarray(search_blocked_permutation(keys, w, n, m, init=init, num_candidates=12,
                                                chunk_size=5))
    assert is_block_diagonal(out, blocks)
    total = 0
    for b in range(blocks):
        sl = slice(b * cb, (b + 1) * cb)
        fb = fwd[:, sl]
        cand_keys = jax.random.split(keys[b], 12)
        cands = [init[sl] - b * cb] + [np.asarray(jax.random.permutation(kk, cb)) for kk in cand_keys]
        scores = [_np_score(fb, p, n, m) for p in cands]
        best = cands[int(np.argmax(scores))]  # first maximum: the incumbent wins ties
        np.testing.assert_array_equal(out[sl], best + b * cb)
        total += max(scores)
    # The score is additive over blocks, and the full-kernel score is the sum of the block bests.
    assert _np_score(fwd, out, n, m) == total == int(bj.permutation_score(w, fwd, out, n, m))
    assert total >= _np_score(fwd, init, n, m)


def test_stripe_per_block_equals_search_permutation_on_the_block():
    n, m, blocks = 2, 4, 2
    w = _kernel((40, 48), seed=3)
    keys = block_keys(jax.random.key(1), blocks)
    out = np.asarray(search_blocked_permutation(keys, w, n, m, method="stripe", iterations=20))
    assert is_block_diagonal(out, blocks)
    for b in range(blocks):
        sl = slice(b * 24, (b + 1) * 24)
        ref = np.asarray(bj.search_permutation(keys[b], w[:, sl], n, m, method="stripe",
                                               iterations=20))
        np.testing.assert_array_equal(out[sl], ref + b * 24)
    fwd = np.asarray(bj.forward_mask(w, n, m))
    assert _np_score(fwd, out, n, m) >= _np_score(fwd, np.arange(48), n, m)


@pytest.mark.slow
def test_a_device_searching_its_own_blocks_gets_the_global_result():
    # Device d holding blocks [2d, 2d + 2) passes keys[2d:2d + 2] and its columns (local indices).
    w = _kernel((16, 64), seed=9)
    keys = block_keys(jax.random.key(2), 4)
    full = np.asarray(search_blocked_permutation(keys, w, 2, 4, num_candidates=8))
    for d in range(2):
        cols = slice(d * 32, (d + 1) * 32)
        local = np.asarray(search_blocked_permutation(keys[2 * d:2 * d + 2], w[:, cols], 2, 4,
                                                      num_candidates=8))
        np.testing.assert_array_equal(local + d * 32, full[cols])


def test_jit_and_zero_budget():
    w = _kernel((8, 16))
    keys = block_keys(jax.random.key(0), 2)
    init = np.array([1, 0, 2, 3, 4, 5, 6, 7, 15, 14, 13, 12, 11, 10, 9, 8])
    out = search_blocked_permutation(keys, w, 2, 4, init=init, num_candidates=0)
    np.testing.assert_array_equal(out, init)
    f = jax.jit(lambda ks, ww, p: search_blocked_permutation(ks, ww, 2, 4, init=p, num_candidates=4))
    assert is_block_diagonal(np.asarray(f(keys, w, init)), 2)


def test_errors_name_the_rule():
    w = _kernel((8, 24))
    with pytest.raises(ValueError, match="must divide C=24"):
        search_blocked_permutation(block_keys(jax.random.key(0), 5), w, 2, 4)
    with pytest.raises(ValueError, match="block size C / blocks of size 6"):
        search_blocked_permutation(block_keys(jax.random.key(0), 4), w, 2, 4)
    bad = np.arange(24)[::-1].copy()
    with pytest.raises(ValueError, match="init must be block-diagonal"):
        search_blocked_permutation(block_keys(jax.random.key(0), 2), w, 2, 4, init=bad)
    with pytest.raises(ValueError, match="blocks must be a Python int"):
        block_keys(jax.random.key(0), 0)
    assert not is_block_diagonal(bad, 2) and is_block_diagonal(bad, 1)
