import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bimask_jax import sste


def _np_soft_threshold(w, n, m, axis):
    """NumPy statement: per group of m along axis, t = (n+1)-th largest |w|;
    out = sign(w) * max(|w| - t, 0)."""
    x = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    g = x.reshape(*x.shape[:-1], -1, m)
    out = np.zeros_like(g)
    for idx in np.ndindex(*g.shape[:-1]):
        grp = g[idx]
        t = 0.0 if n == m else sorted(np.abs(grp), reverse=True)[n]
        out[idx] = np.sign(grp) * np.maximum(np.abs(grp) - t, 0.0)
    return np.moveaxis(out.reshape(x.shape), -1, axis)


def _w(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 4)])
@pytest.mark.parametrize("axis", [0, -2, -1])
def test_soft_threshold_matches_numpy(n, m, axis):
    w = _w((8, 16, 8), seed=n * 10 + m)
    got = np.asarray(jax.jit(sste.soft_threshold, static_argnums=(1, 2, 3))(w, n, m, axis))
    np.testing.assert_allclose(got, _np_soft_threshold(w, n, m, axis), rtol=1e-6, atol=1e-7)
    # N:M: at most n nonzeros per group (exactly n for continuous random weights when n < m)
    g = np.moveaxis(got, axis, -1).reshape(-1, m)
    nz = (g != 0).sum(-1)
    assert np.all(nz == n)


def test_soft_threshold_2_4_hand_example():
    # group |w| = 4, 3, 2, 1: threshold is the 3rd largest (2); kept 4-2, 3-2 with their signs
    w = np.array([[-3.0], [1.0], [4.0], [-2.0]], np.float32)
    got = np.asarray(sste.soft_threshold(w, 2, 4, axis=0))
    np.testing.assert_array_equal(got[:, 0], [-1.0, 0.0, 2.0, 0.0])


def test_soft_threshold_ties_stay_nm():
    w = np.ones((4, 2), np.float32)
    got = np.asarray(sste.soft_threshold(w, 2, 4, axis=0))
    np.testing.assert_array_equal(got, 0.0)  # all tied at the threshold: all zero, still 2:4


def test_soft_threshold_is_continuous_across_a_ranking_change():
    base = np.array([[3.0], [2.0], [1.0], [0.5]], np.float32)
    eps = 1e-4
    a = base.copy()
    a[1, 0], a[2, 0] = 1.5 + eps, 1.5 - eps
    b = base.copy()
    b[1, 0], b[2, 0] = 1.5 - eps, 1.5 + eps
    sa = np.asarray(sste.soft_threshold(a, 2, 4, axis=0))
    sb = np.asarray(sste.soft_threshold(b, 2, 4, axis=0))
    assert np.max(np.abs(sa - sb)) < 3 * eps


def test_scale_matches_least_squares():
    w = _w((32, 16), seed=3)
    beta = float(sste.sste_scale(w, 2, 4, axis=-2))
    s = _np_soft_threshold(w, 2, 4, 0)
    want = float((w.astype(np.float64) * s).sum() / (s * s).sum())
    assert beta == pytest.approx(want, rel=1e-5)
    # beta minimises ||w - beta S(w)||^2
    err = lambda b: float(((w - b * s) ** 2).sum())  # noqa: E731
    assert err(beta) <= min(err(beta * 0.99), err(beta * 1.01))
    assert beta > 1.0  # soft thresholding shrinks, the scale restores


def test_scale_zero_weights_is_one_not_nan():
    assert float(sste.sste_scale(np.zeros((8, 4), np.float32), 2, 4)) == 1.0


def test_prune_value_and_dtype():
    w = _w((16, 8), seed=5).astype(jnp.bfloat16)
    beta = sste.sste_scale(w, 2, 4)
    out = sste.sste_prune(w, 2, 4, beta)
    assert out.dtype == jnp.bfloat16 and out.shape == w.shape
    want = float(beta) * _np_soft_threshold(np.asarray(w, np.float32), 2, 4, 0)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=1e-2, atol=1e-2)


def test_sste_weight_forward_equals_prune_and_gradient_is_straight_through():
    w = _w((16, 8), seed=7)
    scale = jnp.float32(1.7)
    ct = _w((16, 8), seed=8)
    f = jax.jit(lambda w, s: jnp.sum(sste.sste_weight(w, s, 2, 4) * ct))
    np.testing.assert_allclose(
        np.asarray(sste.sste_weight(w, scale, 2, 4)),
        np.asarray(sste.sste_prune(w, 2, 4, scale)),
        rtol=0,
        atol=0,
    )
    gw, gs = jax.grad(f, argnums=(0, 1))(w, scale)
    # SoftThreshold.backward returns the output gradient unchanged: not scaled, not masked
    np.testing.assert_array_equal(np.asarray(gw), ct)
    assert float(gs) == 0.0
    # ... unlike the true derivative of the pruning function
    gtrue = jax.grad(lambda w: jnp.sum(sste.sste_prune(w, 2, 4, scale) * ct))(w)
    assert not np.allclose(np.asarray(gtrue), ct)


def test_errors_name_parameters():
    w = _w((8, 4))
    with pytest.raises(ValueError, match="axis"):
        sste.soft_threshold(w, 2, 4, axis=2)
    with pytest.raises(ValueError, match="divisible by m=4"):
        sste.soft_threshold(_w((6, 4)), 2, 4, axis=0)
    with pytest.raises(ValueError, match="n must be <= m"):
        sste.sste_scale(w, 5, 4)
    with pytest.raises(ValueError, match="w must have a floating dtype"):
        sste.soft_threshold(np.ones((8, 4), np.int32), 2, 4)
    with pytest.raises(ValueError, match="scale must be a scalar"):
        sste.sste_weight(w, jnp.ones(2), 2, 4)
    with pytest.raises(ValueError, match="scale must have a floating dtype"):
        sste.sste_prune(w, 2, 4, scale=jnp.int32(1))


def test_nan_weight_is_not_dropped():
    w = np.array([[np.nan], [1.0], [3.0], [2.0]], np.float32)
    got = np.asarray(sste.soft_threshold(w, 2, 4, axis=0))[:, 0]
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], [0.0, 1.0, 0.0])  # threshold 2: the largest finite drop


def test_vmap_over_stacked_layers_with_per_layer_scale():
    ws = _w((3, 16, 8), seed=9)
    scales = jax.vmap(lambda w: sste.sste_scale(w, 2, 4))(ws)
    got = jax.vmap(lambda w, s: sste.sste_weight(w, s, 2, 4))(ws, scales)
    for i in range(3):
        np.testing.assert_allclose(float(scales[i]), float(sste.sste_scale(ws[i], 2, 4)), rtol=1e-6)
        np.testing.assert_allclose(
            np.asarray(got[i]), np.asarray(sste.sste_prune(ws[i], 2, 4, scales[i])), rtol=1e-6
        )
