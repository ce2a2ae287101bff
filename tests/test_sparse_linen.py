"""bimask_jax.sparse on linen models: interception of Dense/DenseGeneral/Conv, state collection,
gradients against hand-written layer_masks + sparse_dense/sparse_conv, methods, remat/scan."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bimask_jax as bj
import bimask_jax.flax as bf
from tests import nm_reference as ref


def _normal(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape)


class SmallNet(nn.Module):
    """RGB stem (3 channels: skipped), a sparse conv, a depthwise conv (skipped), a Dense with 12
    outputs (bimask) and a 10-way head (C % 4 != 0: srste fallback)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), name="stem")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3), strides=2, padding=1, name="conv")(x)
        x = nn.Conv(16, (3, 3), feature_group_count=16, name="dw")(x)
        x = x.mean((1, 2))
        x = nn.relu(nn.Dense(12, name="fc")(x))
        return nn.Dense(10, name="head")(x)


@functools.cache
def _setup_cached(method):
    net = SmallNet()
    model = bf.sparse(net, method=method)
    x = _normal(0, (4, 8, 8, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    return net, model, x, variables


def _setup(method="bimask"):
    """(unwrapped, wrapped, x, fresh copy of the wrapped model's variables); one init per method."""
    net, model, x, v = _setup_cached(method)
    return net, model, x, jax.tree.map(lambda a: a, v)


def test_params_tree_equals_unwrapped_and_state_collection():
    net, model, x, v = _setup()
    v0 = jax.eval_shape(net.init, jax.random.key(1), x)
    assert jax.tree.structure(v["params"]) == jax.tree.structure(v0["params"])
    assert jax.tree.map(jnp.shape, v["params"]) == jax.tree.map(jnp.shape, v0["params"])
    assert set(v) == {"params", "batch_stats", "bimask"}
    # state only for sparse layers: conv (C=16), fc (C=12), head (srste fallback, C=10)
    assert sorted(v["bimask"]) == ["conv", "fc", "head"]
    for name, c in (("conv", 16), ("fc", 12), ("head", 10)):
        np.testing.assert_array_equal(v["bimask"][name]["perm"], np.arange(c))
        assert v["bimask"][name]["perm"].dtype == jnp.int32
        assert v["bimask"][name]["refreshes"].shape == ()
    # a dense checkpoint (the unwrapped model's params) loads unchanged
    dense_params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), v0["params"])
    y, _ = model.apply({**v, "params": dense_params}, x, train=True, mutable=["batch_stats"])
    assert y.shape == (4, 10)


def _hand_forward(params, bstats, perms, x, n=2, m=4, decay=2e-4):
    """SmallNet in train mode written by hand with layer_masks + sparse_conv/sparse_dense."""
    p = params
    h = jax.lax.conv_general_dilated(x, p["stem"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["stem"]["bias"]
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    h = (h - mean) / jnp.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    h = jax.nn.relu(h)
    w = p["conv"]["kernel"]
    f, b = bj.layer_masks(w, n, m, "bimask", perms["conv"])
    h = bj.sparse_conv(h, w, f, b, decay, strides=2, padding=((1, 1), (1, 1))) + p["conv"]["bias"]
    h = jax.lax.conv_general_dilated(h, p["dw"]["kernel"], (1, 1), "SAME", feature_group_count=16,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["dw"]["bias"]
    h = h.mean((1, 2))
    w = p["fc"]["kernel"]
    f, b = bj.layer_masks(w, n, m, "bimask", perms["fc"])
    h = jax.nn.relu(bj.sparse_dense(h, w, f, b, decay) + p["fc"]["bias"])
    w = p["head"]["kernel"]
    f, b = bj.layer_masks(w, n, m, "srste")
    return bj.sparse_dense(h, w, f, b, decay) + p["head"]["bias"]


def test_grads_equal_hand_computed_layer_masks_and_sparse_ops():
    net, model, x, v = _setup()
    perms = {"conv": jax.random.permutation(jax.random.key(5), 16).astype(jnp.int32),
             "fc": jax.random.permutation(jax.random.key(6), 12).astype(jnp.int32)}
    v["bimask"]["conv"]["perm"] = perms["conv"]
    v["bimask"]["fc"]["perm"] = perms["fc"]
    target = _normal(9, (4, 10))

    def loss_wrapped(params):
        y, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean((y - target) ** 2)

    def loss_hand(params):
        return jnp.mean((_hand_forward(params, None, perms, x) - target) ** 2)

    lw, gw = jax.jit(jax.value_and_grad(loss_wrapped))(v["params"])
    lh, gh = jax.jit(jax.value_and_grad(loss_hand))(v["params"])
    np.testing.assert_allclose(lw, lh, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gh), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the sparse kernels' gradients carry the SR-STE term, the skipped stem's do not
    assert jax.tree.structure(gw) == jax.tree.structure(v["params"])


# ---------------------------------------------------------------- masks seen through one layer


def _probe_masks(model, variables, k, c):
    """(fwd, bwd) actually used by a one-Dense model: y(I_K) = W*Mf and dx(g=I_C) = (W*Mb)^T."""
    w = variables["params"]["kernel"]
    y = model.apply(variables, jnp.eye(k)) - variables["params"]["bias"]
    _, vjp = jax.vjp(lambda x: model.apply(variables, x), jnp.ones((c, k)))
    (dx,) = vjp(jnp.eye(c))
    assert np.all(np.asarray(w) != 0)
    return np.asarray(y) != 0, np.asarray(dx).T != 0


@pytest.mark.parametrize("method", ["dense", "srste", "transposable", "bimask"])
def test_methods_masks_through_a_dense_layer(method):
    k, c = 16, 8
    model = bf.sparse(nn.Dense(c), method=method)
    v = model.init(jax.random.key(0), jnp.ones((1, k)))
    v["params"]["kernel"] = _normal(1, (k, c))
    perm = np.asarray(jax.random.permutation(jax.random.key(2), c), np.int32)
    v["bimask"]["perm"] = jnp.asarray(perm)
    fwd, bwd = _probe_masks(model, v, k, c)
    w = np.asarray(v["params"]["kernel"])
    if method == "dense":
        assert fwd.all() and bwd.all()
    elif method == "srste":  # dx uses the forward pattern
        np.testing.assert_array_equal(fwd, ref.nm_mask(w, 2, 4, axis=0))
        np.testing.assert_array_equal(bwd, fwd)
    elif method == "transposable":  # one mask, N:M along both axes
        np.testing.assert_array_equal(bwd, fwd)
        assert ref.is_nm(fwd, 2, 4, axis=0) and ref.is_nm(fwd, 2, 4, axis=1)
        assert fwd.sum() == k * c // 2
    else:
        want_f = ref.nm_mask(w, 2, 4, axis=0)
        np.testing.assert_array_equal(fwd, want_f)
        np.testing.assert_array_equal(bwd, ref.backward_mask(w, want_f, perm, 2, 4))


def test_dense_method_equals_unwrapped_exactly():
    net, model, x, v = _setup("dense")
    v0 = {k: v[k] for k in ("params", "batch_stats")}

    def loss(mod, params, extra):
        y, _ = mod.apply({**extra, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    lw, gw = jax.jit(jax.value_and_grad(lambda p: loss(model, p, v)))(v["params"])
    ld, gd = jax.jit(jax.value_and_grad(lambda p: loss(net, p, v0)))(v0["params"])
    assert lw == ld
    for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gd), strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- DenseGeneral and attention


class Attn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(x)


def test_multihead_attention_projections_are_sparse_and_match_numpy():
    model = bf.sparse(Attn())
    x = _normal(0, (2, 4, 8))
    v = model.init(jax.random.key(1), x)
    rows = bf.summary(model, v, print_fn=None)
    got = {r["path"]: (r["status"], r["method"]) for r in rows}
    assert got == {f"attn/{p}": ("sparse", "bimask") for p in ("query", "key", "value", "out")}
    # Output equals the unwrapped attention with forward-masked kernels: q/k/v kernels
    # (embed=8, heads=2, head_dim=8) read as (8, 16), out kernel (2, 8, 8) read as (16, 8).
    params = jax.tree.map(lambda a: a, v["params"])
    for name in ("query", "key", "value", "out"):
        kern = np.asarray(v["params"]["attn"][name]["kernel"])
        k2 = kern.reshape(16 if name == "out" else 8, -1)
        masked = (k2 * ref.nm_mask(k2, 2, 4, axis=0)).reshape(kern.shape)
        params["attn"][name] = {**params["attn"][name], "kernel": jnp.asarray(masked)}
    np.testing.assert_allclose(model.apply(v, x), Attn().apply({"params": params}, x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["split_out", "merge_in"])
def test_dense_general_matrix_view_masks(layout):
    """DenseGeneral kernels (8, 2, 8) [axis=-1, features=(2, 8)] and (2, 8, 8) [axis=(-2, -1)] are
    the matrices (8, 16) and (16, 8): forward and backward masks probed with identity inputs."""
    if layout == "split_out":
        layer, k, c, in_shape = nn.DenseGeneral((2, 8), axis=-1), 8, 16, (8,)
    else:
        layer, k, c, in_shape = nn.DenseGeneral(8, axis=(-2, -1)), 16, 8, (2, 8)
    model = bf.sparse(layer)
    v = model.init(jax.random.key(0), jnp.ones((1, *in_shape)))
    kshape = v["params"]["kernel"].shape
    v["params"]["kernel"] = _normal(1, kshape)
    perm = np.asarray(jax.random.permutation(jax.random.key(2), c), np.int32)
    v["bimask"]["perm"] = jnp.asarray(perm)
    bias = np.asarray(v["params"]["bias"]).reshape(-1)
    y = np.asarray(model.apply(v, jnp.eye(k).reshape(k, *in_shape))).reshape(k, c) - bias
    _, vjp = jax.vjp(lambda z: model.apply(v, z), jnp.ones((c, *in_shape)))
    (dx,) = vjp(jnp.eye(c).reshape(c, *kshape[len(in_shape):]))
    w2 = np.asarray(v["params"]["kernel"]).reshape(k, c)
    fwd = ref.nm_mask(w2, 2, 4, axis=0)
    np.testing.assert_allclose(y, w2 * fwd, rtol=1e-6, atol=1e-7)
    bwd = ref.backward_mask(w2, fwd, perm, 2, 4)
    np.testing.assert_allclose(np.asarray(dx).reshape(c, k), (w2 * bwd).T, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- training, remat, scan


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(8, name="fc2")(x)


def test_jit_optax_train_step_masks_follow_kernels():
    model = bf.sparse(MLP())
    x, t = _normal(0, (32, 8)), _normal(1, (32, 8))
    v = model.init(jax.random.key(2), x)
    tx = optax.sgd(0.5)
    opt = tx.init(v["params"])

    @jax.jit
    def step(params, opt, bimask, key, i):
        def loss(p):
            return jnp.mean((model.apply({"params": p, "bimask": bimask}, x) - t) ** 2)

        lv, g = jax.value_and_grad(loss)(params)
        upd, opt = tx.update(g, opt)
        params = optax.apply_updates(params, upd)
        bimask = bf.maybe_refresh(key, model, {"params": params, "bimask": bimask}, i,
                                  refresh_every=2)
        return params, opt, bimask, lv

    params, bimask = v["params"], v["bimask"]
    masks, losses = [], []
    for i in range(6):
        w = np.asarray(params["fc1"]["kernel"])
        fwd = ref.nm_mask(w, 2, 4, axis=0)
        masks.append(fwd)
        # the forward pass uses the mask of the current kernel
        h = np.maximum(np.asarray(x) @ (w * fwd) + np.asarray(params["fc1"]["bias"]), 0)
        w2 = np.asarray(params["fc2"]["kernel"])
        y_ref = h @ (w2 * ref.nm_mask(w2, 2, 4, axis=0)) + np.asarray(params["fc2"]["bias"])
        np.testing.assert_allclose(model.apply({"params": params, "bimask": bimask}, x), y_ref,
                                   rtol=1e-4, atol=1e-5)
        params, opt, bimask, lv = step(params, opt, bimask, jax.random.key(i), i)
        losses.append(float(lv))
    assert any((a != b).any() for a, b in zip(masks, masks[1:], strict=False))
    assert losses[-1] < losses[0]
    assert int(bimask["fc1"]["refreshes"]) == 3  # steps 0, 2, 4


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(8, name="fc")(nn.relu(x)), None


class Stack(nn.Module):
    axes: tuple = ("params", "bimask")

    @nn.compact
    def __call__(self, x):
        blocks = nn.scan(nn.remat(Block), variable_axes={a: 0 for a in self.axes},
                         split_rngs={"params": True}, length=3)
        return blocks(name="blocks")(x, None)[0]


def test_remat_scan_state_is_scanned_and_grads_match_unrolled():
    model = bf.sparse(Stack())
    x = _normal(0, (4, 8))
    v = jax.jit(model.init)(jax.random.key(1), x)
    assert v["params"]["blocks"]["fc"]["kernel"].shape == (3, 8, 8)
    assert v["bimask"]["blocks"]["fc"]["perm"].shape == (3, 8)
    v["params"]["blocks"]["fc"]["kernel"] = _normal(2, (3, 8, 8))
    new = jax.jit(bf.refresh, static_argnums=1)(jax.random.key(3), model, v)
    perms = np.asarray(new["blocks"]["fc"]["perm"])
    assert perms.shape == (3, 8) and all(sorted(p) == list(range(8)) for p in perms)
    np.testing.assert_array_equal(new["blocks"]["fc"]["refreshes"], [1, 1, 1])
    v = {**v, "bimask": new}

    def unrolled(params):
        h = x
        for i in range(3):
            w = params["blocks"]["fc"]["kernel"][i]
            f, b = bj.layer_masks(w, 2, 4, "bimask", perms[i])
            h = h + bj.sparse_dense(jax.nn.relu(h), w, f, b) + params["blocks"]["fc"]["bias"][i]
        return jnp.sum(h ** 2)

    gw = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({**v, "params": p}, x) ** 2)))(v["params"])
    gh = jax.jit(jax.grad(unrolled))(v["params"])
    for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gh), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scan_without_state_axis_raises_clear_error():
    model = bf.sparse(Stack(axes=("params",)))
    with pytest.raises(ValueError, match="variable_axes"):
        model.init(jax.random.key(0), jnp.ones((2, 8)))


# ---------------------------------------------------------------- selection and reporting


def test_skip_rules_fallback_and_summary():
    net, model, x, v = _setup()
    # without inputs: the sparse layers (they carry state), by path
    assert [r["path"] for r in bf.summary(model, v, print_fn=None)] == ["conv", "fc", "head"]
    rows = {r["path"]: r for r in bf.summary(model, v, sample_args=(x,), print_fn=None)}
    assert list(rows) == ["stem", "conv", "dw", "fc", "head"]
    assert rows["stem"]["kernel_shape"] == (3, 3, 3, 8) and rows["fc"]["kind"] == "Dense"
    assert rows["stem"]["status"] == "skipped" and "3 not divisible by m=4" in rows["stem"]["note"]
    assert rows["dw"]["status"] == "skipped" and "depthwise" in rows["dw"]["note"]
    assert rows["conv"]["method"] == "bimask" and rows["fc"]["method"] == "bimask"
    assert rows["head"]["method"] == "srste" and "fallback" in rows["head"]["note"]
    assert rows["conv"]["kernel_shape"] == (3, 3, 8, 16)
    w = np.asarray(v["params"]["conv"]["kernel"]).reshape(-1, 16)
    f = ref.nm_mask(w, 2, 4, axis=0)
    b = ref.backward_mask(w, f, np.arange(16), 2, 4)
    assert rows["conv"]["fwd_density"] == pytest.approx(0.5)
    assert rows["conv"]["bwd_retained"] == pytest.approx(b.sum() / f.sum())
    assert rows["head"]["bwd_retained"] == pytest.approx(1.0)


@pytest.mark.parametrize("kw,sparse", [
    (dict(exclude=("conv", "head")), ["fc"]),
    (dict(exclude=lambda path, mod: isinstance(mod, nn.Dense)), ["conv"]),
    (dict(include="^fc$"), ["fc"]),
])
def test_exclude_include(kw, sparse):
    model = bf.sparse(SmallNet(), **kw)
    x = jnp.ones((1, 8, 8, 3))
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    assert sorted(v["bimask"]) == sparse
    layers = bf.layers(model, sample_args=(x,))
    assert [x.path for x in layers] == ["stem", "conv", "dw", "fc", "head"]
    assert [x.path for x in layers if x.sparse] == sparse


def test_export_loads_into_unwrapped_model():
    net, model, x, v = _setup()
    v["bimask"] = bf.refresh(jax.random.key(0), model, v)
    exported = bf.export(model, v)
    assert set(exported) == {"params", "batch_stats"}
    conv = np.asarray(exported["params"]["conv"]["kernel"]).reshape(-1, 16)
    assert ref.is_nm(conv != 0, 2, 4, axis=0) and (conv != 0).sum() == conv.size // 2
    np.testing.assert_array_equal(exported["params"]["stem"]["kernel"], v["params"]["stem"]["kernel"])
    np.testing.assert_allclose(net.apply(exported, x), model.apply(v, x), rtol=1e-5, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        bf.sparse(MLP(), method="magic")
    with pytest.raises(ValueError, match="n must be <= m"):
        bf.sparse(MLP(), n=5, m=4)
    with pytest.raises(ValueError, match="exclude"):
        bf.sparse(MLP(), exclude=[3])
    with pytest.raises(ValueError, match="linen.Module or a flax.nnx.Module"):
        bf.sparse(object())
    model = bf.sparse(MLP())
    v = model.init(jax.random.key(0), jnp.ones((1, 8)))
    with pytest.raises(ValueError, match="no Bi-Mask state"):
        model.apply({"params": v["params"]}, jnp.ones((1, 8)))


def test_pallas_backend_matches_xla():
    """backend="pallas": the wrapper hands the layer's permutation to the 2:4 kernels (interpret
    mode on CPU); loss and grads equal the XLA backend's."""
    x = _normal(0, (4, 8))
    out = []
    for backend in ("xla", "pallas"):
        model = bf.sparse(MLP(), backend=backend)
        v = jax.jit(model.init)(jax.random.key(1), x)
        v["bimask"] = bf.refresh(jax.random.key(2), model, v)
        loss = lambda p, v=v, model=model: jnp.sum(model.apply({**v, "params": p}, x) ** 2)
        out.append(jax.jit(jax.value_and_grad(loss))(v["params"]))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
