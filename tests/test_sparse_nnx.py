"""bimask_jax.sparse on nnx models: in-place op swap of Linear/LinearGeneral/Conv, BimaskState,
gradients against hand-written layer_masks + sparse ops, methods, optimizer, export."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bimask_jax as bj
import bimask_jax.flax as bf
from tests import nm_reference as ref


def _normal(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


class Net(nnx.Module):
    """RGB stem (skipped), sparse conv, depthwise conv (skipped), LinearGeneral merging (2, 8)
    into 12 (bimask), Linear head with 10 outputs (srste fallback)."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.conv = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.dw = nnx.Conv(16, 16, (3, 3), feature_group_count=16, rngs=rngs)
        self.proj = nnx.LinearGeneral((2, 8), 12, axis=(-2, -1), rngs=rngs)
        self.head = nnx.Linear(12, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem(x))
        x = self.dw(self.conv(x)).mean((1, 2)).reshape(-1, 2, 8)
        return self.head(nnx.relu(self.proj(x)))


def _op(layer):
    return layer.conv_general_dilated if isinstance(layer, nnx.Conv) else layer.dot_general


@pytest.mark.slow
def test_params_unchanged_state_and_skips():
    plain, model = Net(nnx.Rngs(0)), bf.sparse(Net(nnx.Rngs(0)))
    p0, p1 = nnx.state(plain, nnx.Param), nnx.state(model, nnx.Param)
    assert jax.tree.structure(p0) == jax.tree.structure(p1)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), strict=True):
        np.testing.assert_array_equal(a, b)
    st = nnx.state(model, bf.BimaskState)
    assert jax.tree.map(jnp.shape, nnx.to_pure_dict(st)) == {
        "conv": {"conv_general_dilated": {"perm": (16,), "refreshes": ()}},
        "head": {"dot_general": {"perm": (10,), "refreshes": ()}},
        "proj": {"dot_general": {"perm": (12,), "refreshes": ()}},
    }
    rows = {r["path"]: r for r in bf.summary(model, print_fn=None)}
    assert rows["stem"]["status"] == "skipped" and "3 not divisible" in rows["stem"]["note"]
    assert rows["dw"]["status"] == "skipped" and "depthwise" in rows["dw"]["note"]
    assert (rows["conv"]["method"], rows["proj"]["method"]) == ("bimask", "bimask")
    assert rows["head"]["method"] == "srste" and "fallback" in rows["head"]["note"]
    with pytest.raises(ValueError, match="already"):
        bf.sparse(model)


@pytest.mark.slow
def test_grads_equal_hand_computed():
    model = bf.sparse(Net(nnx.Rngs(0)))
    perms = {"conv": jax.random.permutation(jax.random.key(1), 16).astype(jnp.int32),
             "proj": jax.random.permutation(jax.random.key(2), 12).astype(jnp.int32)}
    _op(model.conv).perm[...] = perms["conv"]
    _op(model.proj).perm[...] = perms["proj"]
    x, t = _normal(3, (4, 8, 8, 3)), _normal(4, (4, 10))

    def hand(p):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(x, p["stem"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=dn) + p["stem"]["bias"]
        h = jax.nn.relu(h)
        w = p["conv"]["kernel"]
        f, b = bj.layer_masks(w, 2, 4, "bimask", perms["conv"])
        h = bj.sparse_conv(h, w, f, b, strides=2) + p["conv"]["bias"]
        h = jax.lax.conv_general_dilated(h, p["dw"]["kernel"], (1, 1), "SAME", dimension_numbers=dn,
                                         feature_group_count=16) + p["dw"]["bias"]
        h = h.mean((1, 2))  # (4, 16) == the (2, 8) input of proj, flattened
        w = p["proj"]["kernel"].reshape(16, 12)
        f, b = bj.layer_masks(w, 2, 4, "bimask", perms["proj"])
        h = jax.nn.relu(bj.sparse_dense(h, w, f, b) + p["proj"]["bias"])
        w = p["head"]["kernel"]
        f, b = bj.layer_masks(w, 2, 4, "srste")
        return jnp.mean((bj.sparse_dense(h, w, f, b) + p["head"]["bias"] - t) ** 2)

    lw, gw = nnx.jit(nnx.value_and_grad(lambda mdl: jnp.mean((mdl(x) - t) ** 2)))(model)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    lh, gh = jax.jit(jax.value_and_grad(hand))(params)
    np.testing.assert_allclose(lw, lh, rtol=1e-5)
    gw = nnx.to_pure_dict(gw)
    assert jax.tree.structure(gw) == jax.tree.structure(gh)
    for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gh), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["dense", "srste", "transposable", "bimask"])
def test_methods_masks_through_a_linear_layer(method):
    k, c = 16, 8
    layer = nnx.Linear(k, c, rngs=nnx.Rngs(0))
    layer.kernel[...] = _normal(1, (k, c))
    bf.sparse(layer, method=method)
    perm = np.asarray(jax.random.permutation(jax.random.key(2), c), np.int32)
    layer.dot_general.perm[...] = jnp.asarray(perm)
    y = np.asarray(layer(jnp.eye(k)) - layer.bias[...])
    _, vjp = jax.vjp(layer, jnp.ones((c, k)))
    (dx,) = vjp(jnp.eye(c))
    fwd, bwd = y != 0, np.asarray(dx).T != 0
    w = np.asarray(layer.kernel[...])
    if method == "dense":
        assert fwd.all() and bwd.all()
    elif method == "srste":
        np.testing.assert_array_equal(fwd, ref.nm_mask(w, 2, 4, axis=0))
        np.testing.assert_array_equal(bwd, fwd)
    elif method == "transposable":
        np.testing.assert_array_equal(bwd, fwd)
        assert ref.is_nm(fwd, 2, 4, axis=0) and ref.is_nm(fwd, 2, 4, axis=1)
        assert fwd.sum() == k * c // 2
    else:
        want = ref.nm_mask(w, 2, 4, axis=0)
        np.testing.assert_array_equal(fwd, want)
        np.testing.assert_array_equal(bwd, ref.backward_mask(w, want, perm, 2, 4))


def test_dense_method_equals_unwrapped_exactly():
    plain, model = Net(nnx.Rngs(0)), bf.sparse(Net(nnx.Rngs(0)), method="dense")
    x = _normal(3, (2, 8, 8, 3))

    def loss(mdl):
        return jnp.sum(jnp.sin(mdl(x)))

    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(plain)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(model)
    assert l0 == l1
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_array_equal(a, b)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x)))


@pytest.mark.slow
def test_jit_optimizer_step_updates_params_only_and_masks_follow_kernels():
    model = bf.sparse(MLP(nnx.Rngs(0)))
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    x, t = _normal(1, (32, 8)), _normal(2, (32, 8))

    @nnx.jit
    def step(model, opt, key, i):
        lv, g = nnx.value_and_grad(lambda mdl: jnp.mean((mdl(x) - t) ** 2))(model)
        opt.update(model, g)
        nnx.update(model, bf.maybe_refresh(key, model, None, i, refresh_every=3))
        return lv

    apply = nnx.jit(lambda mdl, z: mdl(z))
    masks, losses = [], []
    for i in range(5):
        w = np.asarray(model.fc1.kernel[...])
        masks.append(ref.nm_mask(w, 2, 4, axis=0))
        w2 = np.asarray(model.fc2.kernel[...])
        h = np.maximum(np.asarray(x) @ (w * masks[-1]) + np.asarray(model.fc1.bias[...]), 0)
        y = h @ (w2 * ref.nm_mask(w2, 2, 4, axis=0)) + np.asarray(model.fc2.bias[...])
        np.testing.assert_allclose(apply(model, x), y, rtol=1e-4, atol=1e-5)
        before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, bf.BimaskState)))
        losses.append(float(step(model, opt, jax.random.key(i), jnp.int32(i))))
        after = nnx.to_pure_dict(nnx.state(model, bf.BimaskState))
        if i % 3:  # no refresh: the optimizer left the state alone
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
                np.testing.assert_array_equal(a, b)
    assert any((a != b).any() for a, b in zip(masks, masks[1:], strict=False))
    assert losses[-1] < losses[0]
    assert int(model.fc1.dot_general.refreshes[...]) == 2  # steps 0 and 3


@pytest.mark.slow
def test_attention_sparse_and_export_loads_into_unwrapped():
    def make():
        return nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=16, decode=False,
                                      rngs=nnx.Rngs(0))

    model = bf.sparse(make())
    rows = bf.summary(model, print_fn=None)
    assert {r["path"]: r["status"] for r in rows} == {
        p: "sparse" for p in ("key", "out", "query", "value")}
    nnx.update(model, bf.refresh(jax.random.key(1), model))
    x = _normal(2, (2, 4, 8))
    exported = bf.export(model)
    plain = make()
    nnx.update(plain, exported)
    fwd = nnx.jit(lambda mdl, z: mdl(z))
    np.testing.assert_allclose(fwd(plain, x), fwd(model, x), rtol=1e-5, atol=1e-6)
    q = np.asarray(plain.query.kernel[...]).reshape(8, 16)
    assert ref.is_nm(q != 0, 2, 4, axis=0) and (q != 0).sum() == q.size // 2


@pytest.mark.slow
def test_stacked_layers_under_nnx_scan():
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return bf.sparse(nnx.Linear(8, 8, rngs=nnx.Rngs(key)))

    stack = create(jax.random.split(jax.random.key(0), 3))
    assert stack.dot_general.perm.shape == (3, 8)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, layer):
        return x + layer(x)

    x = _normal(1, (4, 8))
    nnx.update(stack, bf.refresh(jax.random.key(2), stack))
    perms = np.asarray(stack.dot_general.perm[...])
    h = np.asarray(x, np.float64)
    for i in range(3):
        w = np.asarray(stack.kernel[...][i])
        h = h + h @ (w * ref.nm_mask(w, 2, 4, axis=0)) + np.asarray(stack.bias[...][i])
    np.testing.assert_allclose(nnx.jit(forward)(x, stack), h, rtol=1e-4, atol=1e-5)
    assert all(sorted(p) == list(range(8)) for p in perms)


class _KeepAll(bf.SparseOp):
    """A SparseOp whose masks hook keeps every weight (the product becomes the dense one)."""

    def masks(self, kernel, c, method, perm):
        ones = jnp.ones(kernel.shape, bool)
        return ones, ones


def test_sparse_ops_lists_ops_and_masks_hook_is_used():
    model, plain = bf.sparse(Net(nnx.Rngs(0))), Net(nnx.Rngs(0))
    ops = bf.sparse_ops(model)
    assert [p for p, _, _ in ops] == [("conv",), ("head",), ("proj",)]  # sorted; stem, dw dense
    assert all(_op(layer) is op and isinstance(op, bf.SparseOp) for _, layer, op in ops)
    assert bf.sparse_ops(plain) == []
    # The default hook: the reference masks of the (16, 12) matrix of proj's (2, 8, 12) kernel.
    _, proj, op = ops[2]
    perm = np.asarray(jax.random.permutation(jax.random.key(2), 12), np.int32)
    w = np.asarray(proj.kernel[...])
    fwd, bwd = op.masks(proj.kernel[...], 12, "bimask", jnp.asarray(perm))
    want = ref.nm_mask(w.reshape(16, 12), 2, 4, axis=0)
    np.testing.assert_array_equal(np.asarray(fwd).reshape(16, 12), want)
    np.testing.assert_array_equal(np.asarray(bwd).reshape(16, 12),
                                  ref.backward_mask(w.reshape(16, 12), want, perm, 2, 4))
    x = _normal(3, (2, 8, 8, 3))
    assert not np.allclose(model(x), plain(x), rtol=1e-4, atol=1e-5)
    # A subclass put in place of each op (same config, layer, conv, record): the products call
    # its masks, and sparse_ops and refresh see it like the original.
    for _, layer, op in ops:
        new = _KeepAll(op.config, op.layer, op.conv, op.perm.shape[-1], op.perm.shape[:-1])
        for name, value in op.record().items():
            getattr(new, name)[...] = value
        setattr(layer, "conv_general_dilated" if op.conv else "dot_general", nnx.data(new))
    assert [type(op) for _, _, op in bf.sparse_ops(model)] == [_KeepAll] * 3
    np.testing.assert_allclose(model(x), plain(x), rtol=1e-5, atol=1e-6)
    new = nnx.to_pure_dict(bf.refresh(jax.random.key(0), model))
    assert {k: int(v["dot_general" if k != "conv" else "conv_general_dilated"]["refreshes"])
            for k, v in new.items()} == {"conv": 1, "head": 1, "proj": 1}
