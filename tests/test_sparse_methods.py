"""The methods after Bi-Mask in the library API (issue 17): ``wgrad="mvue"`` of the ops and of
``sparse``, ``method="sste"`` in ``layer_masks`` and ``sparse`` (linen and nnx), the flip rate of
``track_flips``/``summary``, the dense finish (``with_dense_products``), and ``transposable_mask``
against Hu et al.'s 90-pattern mask. Numbers against NumPy statements of the rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bimask_jax as bj


def _normal(key, shape):
    return np.asarray(jax.random.normal(jax.random.key(key), shape))


# ------------------------------------------------------------------------- NumPy statements


def np_soft_threshold(w, n, m):
    """S-STE along axis 0 of a (K, C) matrix: per group of m rows, t = (n+1)-th largest |w|,
    S = sign(w) * max(|w| - t, 0) (Hu et al.'s _soft_threshold)."""
    k, c = w.shape
    g = w.reshape(k // m, m, c)
    t = np.sort(np.abs(g), axis=1)[:, m - n - 1 : m - n, :]
    return (np.sign(g) * np.maximum(np.abs(g) - t, 0)).reshape(k, c)


def np_topn(w, n, m):
    """Forward mask of a (K, C) matrix: top-n |w| per group of m rows, ties to the lower index."""
    k, c = w.shape
    g = np.abs(w).reshape(k // m, m, c)
    order = np.argsort(-g, axis=1, kind="stable")
    keep = np.zeros_like(g, bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(k, c)


# ------------------------------------------------------------------------- ops: wgrad="mvue"


def _identity_wgrad(key, g, backend="xla"):
    """dW of sparse_dense with x = I_T, fwd = bwd = all True, decay 0 and cotangent g: x^T g_hat =
    g_hat, the MVUE estimate of g itself."""
    t, c = g.shape
    x = jnp.eye(t)
    w = jnp.zeros((t, c))
    ones = jnp.ones((t, c), bool)

    def f(w):
        y = bj.sparse_dense(x, w, ones, ones, 0.0, wgrad="mvue", key=key, backend=backend)
        return jnp.sum(y * g)

    return jax.grad(f)(w)


def test_mvue_wgrad_is_nm_along_tokens_and_unbiased():
    """Chmiel et al. (ICLR 2023): E[g_hat] = g (Horvitz-Thompson over n draws without
    replacement), exactly n kept entries in every group of m consecutive tokens."""
    g = jnp.asarray(_normal(0, (8, 3)))
    keys = jax.random.split(jax.random.key(1), 20000)
    est = np.asarray(jax.jit(jax.vmap(lambda k: _identity_wgrad(k, g)))(keys))
    nz = (est != 0).reshape(-1, 2, 4, 3).sum(axis=2)  # groups of 4 tokens per column
    assert (nz == 2).all()
    mean, sd = est.mean(0), est.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(mean - np.asarray(g)) < 5 * sd + 1e-6), (mean, g)


def test_mvue_dense_weight_gradient_unbiased_by_averaging():
    x = jnp.asarray(_normal(2, (2, 5, 8)))  # T = 10 tokens: a ragged last group of 2
    w = jnp.asarray(_normal(3, (8, 8)))
    f, b = bj.layer_masks(w, 2, 4, "bimask")
    gy = jnp.asarray(_normal(4, (2, 5, 8)))

    def dw(key, wgrad="mvue"):
        fn = lambda w: jnp.sum(bj.sparse_dense(x, w, f, b, 1e-3, wgrad=wgrad, key=key) * gy)  # noqa: E731
        return jax.grad(fn)(w)

    want = np.einsum("btk,btc->kc", x, gy) + 1e-3 * np.where(f, 0, w)  # x^T g + decay term
    np.testing.assert_allclose(dw(None, "dense"), want, rtol=1e-5, atol=1e-5)
    keys = jax.random.split(jax.random.key(5), 2000)
    est = np.asarray(jax.jit(jax.vmap(dw))(keys))
    sd = est.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(est.mean(0) - want) < 5 * sd + 1e-5)


@pytest.mark.slow
def test_mvue_conv_weight_gradient_unbiased_by_averaging():
    keys = jax.random.split(jax.random.key(5), 1000)
    xc = jnp.asarray(_normal(6, (2, 4, 4, 4)))
    wc = jnp.asarray(_normal(7, (3, 3, 4, 8)))
    fc, bc = bj.layer_masks(wc, 2, 4, "bimask")

    def dwc(key, wgrad="mvue"):
        fn = lambda w: jnp.sum(bj.sparse_conv(xc, w, fc, bc, 0.0, wgrad=wgrad, key=key) ** 2)  # noqa: E731
        return jax.grad(fn)(wc)

    want_c = np.asarray(dwc(None, "dense"))
    est = np.asarray(jax.jit(jax.vmap(dwc))(keys))
    sd = est.std(0) / np.sqrt(1000)
    assert np.all(np.abs(est.mean(0) - want_c) < 5 * sd + 1e-4)


@pytest.mark.slow
def test_mvue_pallas_backend_same_draw_as_xla():
    g = jnp.asarray(_normal(8, (8, 4)))
    key = jax.random.key(9)
    np.testing.assert_allclose(_identity_wgrad(key, g, "pallas"), _identity_wgrad(key, g, "xla"),
                               rtol=1e-6)


def test_wgrad_errors_name_the_parameter():
    x, w = jnp.ones((4, 4)), jnp.ones((4, 4))
    m = jnp.ones((4, 4), bool)
    with pytest.raises(ValueError, match="wgrad must be one of"):
        bj.sparse_dense(x, w, m, m, wgrad="sparse")
    with pytest.raises(ValueError, match="needs key"):
        bj.sparse_dense(x, w, m, m, wgrad="mvue")
    with pytest.raises(ValueError, match="wgrad_nm.*n=3"):
        bj.sparse_dense(x, w, m, m, wgrad="mvue", key=jax.random.key(0), wgrad_nm=(3, 4))
    with pytest.raises(ValueError, match="key must be one PRNG key"):
        bj.sparse_conv(jnp.ones((1, 2, 2, 4)), jnp.ones((1, 1, 4, 4)), m.reshape(1, 1, 4, 4),
                       m.reshape(1, 1, 4, 4), wgrad="mvue", key=jax.random.split(jax.random.key(0)))
    with pytest.raises(ValueError, match="wgrad='mvue' keeps n"):
        bj.sparse(nn.Dense(4), n=3, m=4, wgrad="mvue")


# ------------------------------------------------------------------------- models


class Lin(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, use_bias=False, name="out")(nn.Dense(8, use_bias=False, name="fc")(x))


class NLin(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(8, 8, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.out(self.fc(x))


X = jnp.asarray(_normal(10, (4, 8)))


def _linen(**kw):
    model = bj.sparse(Lin(), **kw)
    return model, model.init(jax.random.key(0), X)


# ------------------------------------------------------------------------- S-STE


def test_layer_masks_sste_is_the_forward_mask_pair():
    w = jnp.asarray(_normal(11, (16, 8)))
    f, b = bj.layer_masks(w, 2, 4, "sste")
    np.testing.assert_array_equal(f, np_topn(np.asarray(w), 2, 4))
    np.testing.assert_array_equal(b, f)
    assert "sste" in bj.METHODS


def _sste_reference(w, x, g):
    """Forward y = x @ (beta S(w)), beta = <w,S>/<S,S>; straight-through dW = x^T g (no decay)."""
    s = np_soft_threshold(w, 2, 4)
    beta = np.vdot(w, s) / np.vdot(s, s)
    return beta, s


def test_sste_linen_forward_scale_fixed_at_init_and_straight_through_gradient():
    model, v = _linen(method="sste", decay=1e-2)
    p = v["params"]
    w_fc, w_out = np.asarray(p["fc"]["kernel"]), np.asarray(p["out"]["kernel"])
    beta_fc, s_fc = _sste_reference(w_fc, None, None)
    beta_out, s_out = _sste_reference(w_out, None, None)
    np.testing.assert_allclose(v["bimask"]["fc"]["sste_scale"], beta_fc, rtol=1e-5)
    h = np.asarray(X) @ (beta_fc * s_fc)
    np.testing.assert_allclose(model.apply(v, X), h @ (beta_out * s_out), rtol=1e-4, atol=1e-5)
    # straight-through: dL/dW_out = h^T g with g = dL/dy = 1 (no SR-STE decay although decay > 0)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, X))))(p)
    np.testing.assert_allclose(grads["out"]["kernel"], h.T @ np.ones((4, 8)), rtol=1e-4,
                               atol=1e-5)
    # dL/dW_fc = x^T (g @ W_out_eff^T), through the straight-through S-STE weight of "out"
    gh = np.ones((4, 8)) @ (beta_out * s_out).T
    np.testing.assert_allclose(grads["fc"]["kernel"], np.asarray(X).T @ gh, rtol=1e-4, atol=1e-5)
    # the scale is state: new weights use the stored scale until reset_sste_scales
    p2 = jax.tree.map(lambda a: 2.0 * a, p)
    y2 = model.apply({**v, "params": p2}, X)
    np.testing.assert_allclose(y2, 4.0 * model.apply(v, X), rtol=1e-4, atol=1e-5)
    st = bj.reset_sste_scales(model, {**v, "params": p2})
    np.testing.assert_allclose(st["fc"]["sste_scale"], beta_fc, rtol=1e-5)  # scale-invariant
    # export: the weight the layer multiplies
    ex = bj.export(model, v)
    np.testing.assert_allclose(ex["params"]["fc"]["kernel"], beta_fc * s_fc, rtol=1e-5, atol=1e-6)


def test_sste_nnx_matches_linen_rule_under_jit():
    net = NLin(nnx.Rngs(0))
    w_fc, w_out = np.asarray(net.fc.kernel[...]), np.asarray(net.out.kernel[...])
    bj.sparse(net, method="sste")
    beta_fc, s_fc = _sste_reference(w_fc, None, None)
    beta_out, s_out = _sste_reference(w_out, None, None)
    np.testing.assert_allclose(net.fc.dot_general.sste_scale[...], beta_fc, rtol=1e-5)
    y = nnx.jit(lambda m, x: m(x))(net, X)
    np.testing.assert_allclose(y, np.asarray(X) @ (beta_fc * s_fc) @ (beta_out * s_out),
                               rtol=1e-4, atol=1e-5)
    rows = bj.summary(net, print_fn=None)
    assert rows[0]["method"] == "sste" and rows[0]["sste_scale"] == pytest.approx(beta_fc, 1e-5)


# ------------------------------------------------------------------------- wgrad="mvue" in sparse


def test_set_wgrad_key_per_layer_and_unbiased_model_gradient():
    model, v = _linen(method="bimask", wgrad="mvue", decay=0.0)
    assert v["bimask"]["fc"]["wgrad_key"].dtype == jnp.uint32
    st = bj.set_wgrad_key(jax.random.key(3), model, v)
    want = [jax.random.key_data(jax.random.fold_in(jax.random.key(3), i)) for i in range(2)]
    np.testing.assert_array_equal(st["fc"]["wgrad_key"], want[0])  # sorted paths: fc, out
    np.testing.assert_array_equal(st["out"]["wgrad_key"], want[1])

    dense_model, dv = _linen(method="bimask", decay=0.0)
    assert "wgrad_key" not in dv["bimask"]["fc"]
    want_g = jax.grad(lambda p: jnp.sum(dense_model.apply({**dv, "params": p}, X) ** 2))(
        v["params"])

    @jax.jit
    def grad(key):
        vv = {**v, "bimask": bj.set_wgrad_key(key, model, v)}
        return jax.grad(lambda p: jnp.sum(model.apply({**vv, "params": p}, X) ** 2))(v["params"])

    keys = jax.random.split(jax.random.key(4), 1500)
    est = jax.lax.map(grad, keys, batch_size=500)
    for layer in ("fc", "out"):
        e = np.asarray(est[layer]["kernel"])
        sd = e.std(0) / np.sqrt(len(keys))
        assert np.all(np.abs(e.mean(0) - want_g[layer]["kernel"]) < 5 * sd + 1e-4), layer


def test_set_wgrad_key_nnx_and_errors():
    net = bj.sparse(NLin(nnx.Rngs(0)), wgrad="mvue")
    nnx.update(net, bj.set_wgrad_key(jax.random.key(3), net))
    np.testing.assert_array_equal(net.out.dot_general.wgrad_key[...],
                                  jax.random.key_data(jax.random.fold_in(jax.random.key(3), 1)))
    grads = nnx.jit(lambda m: nnx.grad(lambda m: jnp.sum(m(X) ** 2))(m))(net)
    assert np.isfinite(np.asarray(grads.fc.kernel[...])).all()
    with pytest.raises(ValueError, match="per-step keys are for wgrad='mvue'"):
        bj.set_wgrad_key(jax.random.key(0), bj.sparse(NLin(nnx.Rngs(0))))
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        bj.set_wgrad_key(jnp.zeros((3,), jnp.uint32), net)


# ------------------------------------------------------------------------- flip rate


def test_track_flips_linen_matches_numpy_per_layer_and_aggregate():
    model, v = _linen(method="srste", track_flips=True)
    p = v["params"]
    w0 = {k: np.asarray(p[k]["kernel"]) for k in ("fc", "out")}
    np.testing.assert_array_equal(v["bimask"]["fc"]["prev_fwd"], np_topn(w0["fc"], 2, 4))
    w1 = {"fc": w0["fc"] + 0.5 * _normal(20, (8, 8)), "out": w0["out"]}
    v1 = {**v, "params": {k: {"kernel": jnp.asarray(w1[k])} for k in w1}}
    state, rates, agg = jax.jit(lambda v: bj.track_flips(model, v))(v1)
    want = {k: np.mean(np_topn(w0[k], 2, 4) != np_topn(w1[k], 2, 4)) for k in w0}
    assert want["fc"] > 0 and want["out"] == 0
    for k in w0:
        assert float(rates[k]) == pytest.approx(want[k])
    assert float(agg) == pytest.approx((want["fc"] * 64 + want["out"] * 64) / 128)
    rows = bj.summary(model, v1, print_fn=None)
    assert rows[0]["flip_rate"] == pytest.approx(want["fc"])
    assert rows[-1]["status"] == "aggregate" and rows[-1]["flip_rate"] == pytest.approx(float(agg))
    _, rates2, agg2 = bj.track_flips(model, {**v1, "bimask": state})  # masks remembered
    assert float(agg2) == 0.0 and float(rates2["fc"]) == 0.0
    with pytest.raises(ValueError, match="track_flips=True"):
        bj.track_flips(*_linen())


def test_track_flips_nnx():
    net = NLin(nnx.Rngs(0))
    w0 = np.asarray(net.fc.kernel[...])
    bj.sparse(net, method="bimask", track_flips=True)
    net.fc.kernel[...] = jnp.asarray(-w0[::-1])  # reversed rows: a different forward mask
    state, rates, agg = bj.track_flips(net)
    want = np.mean(np_topn(w0, 2, 4) != np_topn(-w0[::-1], 2, 4))
    assert float(rates["fc"]) == pytest.approx(want) and float(agg) == pytest.approx(want / 2)
    nnx.update(net, state)
    assert float(bj.track_flips(net)[2]) == 0.0


# ------------------------------------------------------------------------- dense finish


def test_dense_products_keep_state_linen_and_nnx():
    model, v = _linen(method="bimask")
    w = {k: np.asarray(v["params"][k]["kernel"]) for k in ("fc", "out")}
    dense = bj.with_dense_products(model)
    np.testing.assert_allclose(dense.apply(v, X), np.asarray(X) @ w["fc"] @ w["out"], rtol=1e-5,
                               atol=1e-6)
    g = jax.grad(lambda p: jnp.sum(dense.apply({**v, "params": p}, X)))(v["params"])
    np.testing.assert_allclose(g["out"]["kernel"], (np.asarray(X) @ w["fc"]).T @ np.ones((4, 8)),
                               rtol=1e-5, atol=1e-5)
    new = bj.refresh(jax.random.key(0), dense, v)  # the state is still there and refreshable
    assert int(new["fc"]["refreshes"]) == 1
    sparse_again = bj.with_dense_products(dense, False)
    np.testing.assert_allclose(sparse_again.apply(v, X), model.apply(v, X))
    assert "dense finish" in bj.summary(dense, v, print_fn=None)[0]["note"]
    np.testing.assert_array_equal(bj.export(dense, v)["params"]["fc"]["kernel"], w["fc"])

    net = bj.sparse(NLin(nnx.Rngs(0)))
    ws = np.asarray(net.fc.kernel[...]), np.asarray(net.out.kernel[...])
    y_sparse = net(X)
    assert bj.with_dense_products(net) is net
    np.testing.assert_allclose(net(X), np.asarray(X) @ ws[0] @ ws[1], rtol=1e-5, atol=1e-6)
    bj.with_dense_products(net, False)
    np.testing.assert_allclose(net(X), y_sparse)
    assert bj.is_dense_step(9, 10, 0.1) and not bj.is_dense_step(8, 10, 0.1)


# ------------------------------------------------------------------------- transposable


@pytest.mark.parametrize("n,m,shape", [(2, 4, (16, 12)), (1, 4, (8, 8)), (2, 4, (3, 3, 8, 4))])
def test_transposable_mask_is_the_optimal_pattern_mask(n, m, shape):
    """Random kernels (no ties): our transposable_mask and Hu et al.'s 90-pattern mask agree."""
    w = jnp.asarray(_normal(30, shape))
    np.testing.assert_array_equal(bj.transposable_mask(w, n, m),
                                  bj.optimal_transposable_mask(w, n, m))


def test_sparse_transposable_forward_uses_the_optimal_mask():
    model, v = _linen(method="transposable", decay=0.0)
    w = {k: np.asarray(v["params"][k]["kernel"]) for k in ("fc", "out")}
    t = {k: np.asarray(bj.optimal_transposable_mask(w[k])) for k in w}
    np.testing.assert_allclose(model.apply(v, X), np.asarray(X) @ (w["fc"] * t["fc"])
                               @ (w["out"] * t["out"]), rtol=1e-5, atol=1e-6)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(8, use_bias=False)(x), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={True: 0}, split_rngs={"params": True}, length=3)
        return scan()(x, None)[0]


def test_stacked_layers_get_per_layer_scale_keys_and_masks():
    model = bj.sparse(_Scanned(), method="sste", wgrad="mvue", track_flips=True)
    v = model.init(jax.random.key(0), X)
    rec = v["bimask"]["ScanBlock_0"]["Dense_0"]
    kern = np.asarray(v["params"]["ScanBlock_0"]["Dense_0"]["kernel"])  # (3, 8, 8)
    for i in range(3):
        beta, _ = _sste_reference(kern[i], None, None)
        assert float(rec["sste_scale"][i]) == pytest.approx(beta, rel=1e-5)
        np.testing.assert_array_equal(rec["prev_fwd"][i], np_topn(kern[i], 2, 4))
    keys = bj.set_wgrad_key(jax.random.key(1), model, v)["ScanBlock_0"]["Dense_0"]["wgrad_key"]
    assert keys.shape == (3, 2) and len({tuple(np.asarray(k)) for k in keys}) == 3
    np.testing.assert_allclose(
        bj.reset_sste_scales(model, v)["ScanBlock_0"]["Dense_0"]["sste_scale"],
        rec["sste_scale"], rtol=1e-6)
