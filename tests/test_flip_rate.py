import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bimask_jax as bj
from bimask_jax import dense_finish, stability


def test_flip_rate_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.random((16, 8)) < 0.5
    b = a.copy()
    b[rng.random(a.shape) < 0.1] ^= True
    got = float(jax.jit(stability.flip_rate)(a, b))
    assert got == pytest.approx(np.mean(a != b), abs=1e-7)
    assert float(stability.flip_rate(a, a)) == 0.0
    assert float(stability.flip_rate(a, ~a)) == 1.0


def test_flip_rate_between_consecutive_forward_masks():
    w0 = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    w1 = w0 + 0.05 * np.random.default_rng(2).standard_normal(w0.shape).astype(np.float32)
    m0, m1 = bj.forward_mask(w0, 2, 4), bj.forward_mask(w1, 2, 4)
    r = float(stability.flip_rate(m0, m1))
    assert r == pytest.approx(np.mean(np.asarray(m0) != np.asarray(m1)))
    # a 2:4 group that changes its choice flips an even number of entries (2 or 4)
    flips = (np.asarray(m0) != np.asarray(m1)).reshape(8, 4, 16).sum(1)
    assert np.all(flips % 2 == 0)


def test_flip_rates_per_layer_and_aggregate():
    rng = np.random.default_rng(3)
    prev = {"a": rng.random((8, 4)) < 0.5, "b": {"c": rng.random((4, 4)) < 0.5}}
    new = {"a": ~prev["a"], "b": {"c": prev["b"]["c"].copy()}}
    new["b"]["c"][0, :2] ^= True
    per, agg = jax.jit(stability.flip_rates)(prev, new)
    assert float(per["a"]) == 1.0
    assert float(per["b"]["c"]) == pytest.approx(2 / 16)
    assert float(agg) == pytest.approx((32 + 2) / 48)


def test_flip_rate_errors():
    a = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="same shape"):
        stability.flip_rate(a, a[:2])
    with pytest.raises(ValueError, match="new must be a bool mask"):
        stability.flip_rate(a, a.astype(np.float32))
    with pytest.raises(ValueError, match="at least one entry"):
        stability.flip_rate(a[:0], a[:0])
    with pytest.raises(ValueError, match="same structure"):
        stability.flip_rates({"a": a}, {"b": a})


def test_dense_finish_schedule():
    # Hu et al.: dense from iteration 250000 of 300000
    assert dense_finish.dense_finish_start(300000, 1 / 6) == 250000
    assert dense_finish.dense_finish_start(100, 0.0) == 100
    assert dense_finish.dense_finish_start(100, 1.0) == 0
    f = jax.jit(lambda s: dense_finish.is_dense_step(s, 100, 0.25))
    assert [bool(f(jnp.int32(s))) for s in (0, 74, 75, 99)] == [False, False, True, True]
    with pytest.raises(ValueError, match="fraction must be a float in"):
        dense_finish.dense_finish_start(100, 1.5)
    with pytest.raises(ValueError, match="total_steps must be"):
        dense_finish.dense_finish_start(0, 0.1)
