"""Hu et al.'s (ICML 2024) periodic transposable-mask update as ``sparse(..., mask_update="refresh")``
(issue 17): the stored mask is used between refreshes while the kernel changes, a refresh
recomputes it, gradients and masked decay use it, linen and nnx, jit, stacked layers,
summary/export, state validation, the training scripts' ``--mask-update``, and the default
``mask_update="step"`` unchanged. Masks against the brute-force NumPy rule of
tests/test_transposable_opt.py and the pure :func:`bimask_jax.periodic_mask`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bimask_jax as bj
import bimask_jax.flax
from tests.test_transposable_opt import _np_best_mask

X = np.asarray(jax.random.normal(jax.random.key(7), (4, 8)))


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class Two(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, use_bias=False, name="out")(nn.Dense(8, use_bias=False, name="fc")(x))


def _with_kernels(v, ws):
    return {**v, "params": {k: {"kernel": jnp.asarray(w)} for k, w in ws.items()}}


def _np_forward(ws, masks):
    h = np.asarray(X, np.float64)
    for k in ("fc", "out"):
        h = h @ (np.asarray(ws[k], np.float64) * masks[k])
    return h


# ------------------------------------------------------------------------- the schedule


def test_linen_mask_is_stored_between_refreshes_and_recomputed_by_refresh():
    """Steps 0..3 with refresh_every=2 and a fresh kernel each step: the forward of step s uses
    the mask of the kernel at the last refresh step (0, 2), as NumPy's optimal mask and the
    pure periodic_mask over the same kernel sequence say; maybe_refresh under jit (traced step)."""
    model = bj.sparse(Two(), method="transposable", mask_update="refresh", refresh_every=2,
                      decay=0.0)
    v = model.init(jax.random.key(0), X)
    w0 = {k: np.asarray(v["params"][k]["kernel"]) for k in ("fc", "out")}
    for k in w0:  # initial value: the mask of the initial kernel
        np.testing.assert_array_equal(v["bimask"][k]["mask"], _np_best_mask(w0[k], 2, 4))
    seq = [w0] + [{k: _normal(10 * s + i, (8, 8)) for i, k in enumerate(w0)} for s in range(1, 4)]
    apply = jax.jit(model.apply)
    refresh = jax.jit(lambda v, s: bj.maybe_refresh(jax.random.key(1), model, v, s))
    state = v["bimask"]
    pure = {k: np.asarray(bj.optimal_transposable_mask(w0[k])) for k in w0}
    periodic = jax.jit(bj.periodic_mask, static_argnames="every")
    for s, ws in enumerate(seq):
        vs = {**_with_kernels(v, ws), "bimask": state}
        state = refresh(vs, jnp.int32(s))
        vs = {**vs, "bimask": state}
        last = seq[s - s % 2]  # the kernels at the last refresh step
        want = {k: _np_best_mask(last[k], 2, 4) for k in ws}
        pure = {k: np.asarray(periodic(ws[k], pure[k], jnp.int32(s), every=2)) for k in ws}
        for k in ws:
            np.testing.assert_array_equal(state[k]["mask"], want[k])
            np.testing.assert_array_equal(pure[k], want[k])
            if s % 2:  # the test can fail: the kernel's own mask differs from the stored one
                assert (want[k] != _np_best_mask(ws[k], 2, 4)).any()
        assert int(state["fc"]["refreshes"]) == s // 2 + 1
        np.testing.assert_allclose(apply(vs, X), _np_forward(ws, want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.apply(vs, X), apply(vs, X), rtol=1e-6, atol=1e-6)  # eager


def test_gradients_use_the_stored_mask():
    """dx = g (W*T)^T and dW = x^T g + decay (1 - T) W with T the stored mask, not the kernel's."""
    decay = 0.3

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, use_bias=False, name="fc")(x)

    model = bj.sparse(One(), method="transposable", mask_update="refresh", decay=decay)
    v = model.init(jax.random.key(0), X)
    t = np.asarray(v["bimask"]["fc"]["mask"])
    w1 = _normal(3, (8, 8))  # the kernel moved since the mask was stored
    assert (t != _np_best_mask(w1, 2, 4)).any()
    g = _normal(4, (4, 8))

    def loss(w, x):
        return jnp.sum(model.apply({**v, "params": {"fc": {"kernel": w}}}, x) * g)

    dw, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(w1), jnp.asarray(X))
    x64, w64, g64 = (np.asarray(a, np.float64) for a in (X, w1, g))
    np.testing.assert_allclose(dx, g64 @ (w64 * t).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x64.T @ g64 + decay * (1 - t) * w64, rtol=1e-5, atol=1e-5)
    # the same with the kernel's own mask (what mask_update="step" computes) differs
    t1 = _np_best_mask(w1, 2, 4)
    assert not np.allclose(dw, x64.T @ g64 + decay * (1 - t1) * w64, rtol=1e-5, atol=1e-5)


class NTwo(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 8, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(8, 8, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.out(self.fc(x))


def test_nnx_stored_mask_jit_and_refresh():
    net = bj.sparse(NTwo(nnx.Rngs(0)), method="transposable", mask_update="refresh")
    w0 = {k: np.asarray(getattr(net, k).kernel[...]) for k in ("fc", "out")}
    t0 = {k: _np_best_mask(w0[k], 2, 4) for k in w0}
    np.testing.assert_array_equal(net.fc.dot_general.mask[...], t0["fc"])
    w1 = {k: _normal(20 + i, (8, 8)) for i, k in enumerate(w0)}
    for k in w1:
        getattr(net, k).kernel[...] = jnp.asarray(w1[k])
    fwd = nnx.jit(lambda mdl, x: mdl(x))
    np.testing.assert_allclose(fwd(net, X), _np_forward(w1, t0), rtol=1e-5, atol=1e-5)
    nnx.update(net, nnx.jit(lambda mdl: bj.refresh(jax.random.key(0), mdl))(net))
    t1 = {k: _np_best_mask(w1[k], 2, 4) for k in w1}
    assert (t1["fc"] != t0["fc"]).any()
    np.testing.assert_array_equal(net.fc.dot_general.mask[...], t1["fc"])
    np.testing.assert_allclose(fwd(net, X), _np_forward(w1, t1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net(X), _np_forward(w1, t1), rtol=1e-5, atol=1e-5)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(8, use_bias=False)(x), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={True: 0}, split_rngs={"params": True}, length=3)
        return scan()(x, None)[0]


def test_stacked_linen_scan():
    model = bj.sparse(Scanned(), method="transposable", mask_update="refresh", decay=0.0)
    v = model.init(jax.random.key(0), X)
    kern = np.asarray(v["params"]["ScanBlock_0"]["Dense_0"]["kernel"])  # (3, 8, 8)
    rec = v["bimask"]["ScanBlock_0"]["Dense_0"]
    assert rec["mask"].shape == (3, 8, 8)
    for i in range(3):
        np.testing.assert_array_equal(rec["mask"][i], _np_best_mask(kern[i], 2, 4))
    new_k = np.stack([_normal(30 + i, (8, 8)) for i in range(3)])
    v1 = {**v, "params": {"ScanBlock_0": {"Dense_0": {"kernel": jnp.asarray(new_k)}}}}

    def np_scan(masks):
        h = np.asarray(X, np.float64)
        for i in range(3):
            h = h @ (new_k[i] * masks[i])
        return h

    np.testing.assert_allclose(jax.jit(model.apply)(v1, X), np_scan(rec["mask"]), rtol=1e-4,
                               atol=1e-5)
    new = bj.refresh(jax.random.key(0), model, v1)["ScanBlock_0"]["Dense_0"]["mask"]
    want = np.stack([_np_best_mask(new_k[i], 2, 4) for i in range(3)])
    np.testing.assert_array_equal(new, want)


def test_stacked_nnx_vmap():
    new_k = np.stack([_normal(30 + i, (8, 8)) for i in range(3)])
    want = np.stack([_np_best_mask(new_k[i], 2, 4) for i in range(3)])

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return bj.sparse(nnx.Linear(8, 8, use_bias=False, rngs=nnx.Rngs(key)),
                         method="transposable", mask_update="refresh")

    stack = create(jax.random.split(jax.random.key(0), 3))
    assert stack.dot_general.mask.shape == (3, 8, 8)
    ks = np.asarray(stack.kernel[...])
    for i in range(3):
        np.testing.assert_array_equal(stack.dot_general.mask[...][i], _np_best_mask(ks[i], 2, 4))
    stack.kernel[...] = jnp.asarray(new_k)
    nnx.update(stack, bj.refresh(jax.random.key(1), stack))
    np.testing.assert_array_equal(stack.dot_general.mask[...], want)


# ------------------------------------------------------------------------- summary, export, state


def test_summary_and_export_use_the_stored_mask():
    model = bj.sparse(Two(), method="transposable", mask_update="refresh", track_flips=True)
    v = model.init(jax.random.key(0), X)
    t = {k: np.asarray(v["bimask"][k]["mask"]) for k in ("fc", "out")}
    w1 = {k: _normal(40 + i, (8, 8)) for i, k in enumerate(t)}
    v1 = _with_kernels(v, w1)
    exported = bj.export(model, v1)["params"]
    for k in w1:
        np.testing.assert_array_equal(exported[k]["kernel"], w1[k] * t[k])
    rows = bj.summary(model, v1, print_fn=None)
    assert rows[0]["method"] == "transposable" and "stored mask" in rows[0]["note"]
    assert rows[0]["fwd_density"] == 0.5 and rows[0]["bwd_retained"] == 1.0
    # the mask in use has not changed since init: no flips until a refresh changes it
    assert rows[-1]["status"] == "aggregate" and rows[-1]["flip_rate"] == 0.0
    v2 = {**v1, "bimask": bj.refresh(jax.random.key(0), model, v1)}
    want = np.mean(t["fc"] != _np_best_mask(w1["fc"], 2, 4))
    assert want > 0 and bj.summary(model, v2, print_fn=None)[0]["flip_rate"] == pytest.approx(want)


def test_state_validation_and_traced_fallback():
    model = bj.sparse(Two(), method="transposable", mask_update="refresh", decay=0.0)
    v = model.init(jax.random.key(0), X)
    bad = {**v["bimask"], "fc": {**v["bimask"]["fc"], "mask": jnp.ones((8, 8), bool)}}
    for fn in (lambda b: model.apply({**v, "bimask": b}, X),
               lambda b: bj.summary(model, {**v, "bimask": b}, print_fn=None)):
        with pytest.raises(ValueError, match="layer 'fc': Bi-Mask state 'mask' must be a "
                                             "transposable 2:4 mask"):
            fn(bad)
    wrong = {**v["bimask"], "fc": {**v["bimask"]["fc"], "mask": jnp.ones((8, 4), bool)}}
    with pytest.raises(ValueError, match="'mask' is bool\\[8, 4\\].*needs bool\\[8, 8\\]"):
        model.apply({**v, "bimask": wrong}, X)
    # a state from a mask_update="step" model lacks the field
    step = bj.sparse(Two(), method="transposable")
    v_step = step.init(jax.random.key(0), X)
    assert set(v_step["bimask"]["fc"]) == {"perm", "refreshes"}
    with pytest.raises(ValueError, match="layer 'fc': its Bi-Mask state has no 'mask' field"):
        model.apply(v_step, X)
    with pytest.raises(ValueError, match="no 'mask' field"):
        bj.refresh(jax.random.key(0), model, v_step)
    # under jit the value cannot be checked: an invalid stored mask is replaced by the kernel's
    w = {k: np.asarray(v["params"][k]["kernel"]) for k in ("fc", "out")}
    y = jax.jit(model.apply)({**v, "bimask": bad}, X)
    masks = {k: _np_best_mask(w[k], 2, 4) for k in w}
    np.testing.assert_allclose(y, _np_forward(w, masks), rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, _np_forward(w, {"fc": np.ones((8, 8)), "out": masks["out"]}),
                           rtol=1e-3)


def test_invalid_combinations_raise():
    for method in ("bimask", "srste", "sste", "dense"):
        with pytest.raises(ValueError, match=f"mask_update='refresh' .* needs "
                                             f"method='transposable', got method='{method}'"):
            bj.sparse(Two(), method=method, mask_update="refresh")
    with pytest.raises(ValueError, match="mask_update must be one of \\('step', 'refresh'\\)"):
        bj.sparse(Two(), method="transposable", mask_update="periodic")


def test_default_is_step_and_unchanged():
    """Default: no stored mask, the kernel's own mask at every call (bit-identical to
    mask_update="step" and to the explicit masked product with layer_masks)."""
    assert bj.flax.SparseConfig().mask_update == "step"
    a, b = bj.sparse(Two(), method="transposable"), bj.sparse(Two(), method="transposable",
                                                             mask_update="step")
    va, vb = a.init(jax.random.key(0), X), b.init(jax.random.key(0), X)
    assert set(va["bimask"]["fc"]) == set(vb["bimask"]["fc"]) == {"perm", "refreshes"}
    w1 = {k: _normal(50 + i, (8, 8)) for i, k in enumerate(("fc", "out"))}
    ya, yb = (jax.jit(m.apply)(_with_kernels(v, w1), X) for m, v in ((a, va), (b, vb)))
    np.testing.assert_array_equal(ya, yb)
    masks = {k: _np_best_mask(w1[k], 2, 4) for k in w1}
    np.testing.assert_allclose(ya, _np_forward(w1, masks), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- training scripts


def test_script_flag_parse_rules_and_resume_setting():
    from tests.test_train_methods import _parse
    from train import config, lm

    assert _parse([]).mask_update == "step"
    assert _parse(["--method", "transposable", "--mask-update", "refresh"]).mask_update == "refresh"
    for method in ("bimask", "dense", "srste"):
        with pytest.raises(ValueError, match="--mask-update refresh .* needs --method "
                                             f"transposable, got --method {method}"):
            _parse(["--method", method, "--mask-update", "refresh"])
    assert "--mask-update" in config.build_parser("imagenet").format_help()
    a = config.training_settings(_parse(["--method", "transposable"]))
    b = config.training_settings(_parse(["--method", "transposable", "--mask-update", "refresh"]))
    assert config.differences(a, b) == {"mask_update": ("step", "refresh")}
    old = {k: v for k, v in a.items() if k != "mask_update"}  # a checkpoint from before the flag
    assert config.differences(old, a) == {}
    assert config.differences(old, b) == {"mask_update": ("step", "refresh")}
    assert lm.build_parser().parse_args(["--data", "x"]).mask_update == "step"
    with pytest.raises(ValueError, match="--mask-update refresh .* got --method bimask"):
        lm.main(["--data", "unused", "--method", "bimask", "--mask-update", "refresh"])


def test_train_step_refreshes_the_stored_mask_at_refresh_steps():
    """The cifar/imagenet step with --mask-update refresh --refresh-every 2: the stored mask of the
    conv (a (3, 3, 4, 8) kernel) is recomputed before the forward of steps 0 and 2, from the
    kernel before that step's update, and kept at step 1 although the kernel moved."""
    from tests.test_train_methods import _step

    _, hooks, state, step, _ = _step(lr=0.5, method="transposable", mask_update="refresh",
                                     refresh_every=2)
    from tests.test_train_methods import _batch

    def conv(st):
        return (np.asarray(st["params"]["Conv_0"]["kernel"]),
                np.asarray(st["model_state"]["bimask"]["Conv_0"]["mask"]))

    def np_mask(kernel):  # the (36, 8) layer matrix, "hwi" rows
        return _np_best_mask(kernel.reshape(-1, 8), 2, 4).reshape(kernel.shape)

    kernels, masks = [conv(state)[0]], []
    for s in range(3):
        state, _ = step(state, _batch(s))
        k, mk = conv(state)
        kernels.append(k)
        masks.append(mk)
    np.testing.assert_array_equal(masks[0], np_mask(kernels[0]))
    np.testing.assert_array_equal(masks[1], masks[0])
    assert (np_mask(kernels[1]) != masks[0]).any()  # the kernel's own mask moved at step 1
    np.testing.assert_array_equal(masks[2], np_mask(kernels[2]))
    assert int(state["model_state"]["bimask"]["Conv_0"]["refreshes"]) == 2


@pytest.mark.slow
def test_lm_trainer_refreshes_the_stored_mask_at_refresh_steps():
    """train/lm.py with --method transposable --mask-update refresh --refresh-every 2 (one device):
    the stored masks (recomputed through ShardedSparseOp.masks) follow the schedule of the
    cifar/imagenet step, and Trainer.masks reports them."""
    from flax import nnx as _nnx

    from train import lm, text_data
    from train.models import gpt

    gcfg = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    args = lm.build_parser().parse_args([
        "--data", "unused", "--method", "transposable", "--mask-update", "refresh",
        "--refresh-every", "2", "--batch-size", "4", "--steps", "3", "--warmup-steps", "0",
        "--lr", "5e-2", "--fast-compile"])
    tr = lm.Trainer(args, gcfg, lm.make_mesh((1, 1, 1)))
    tokens = np.random.default_rng(0).integers(0, 32, 2000).astype(np.uint16)

    def masks_and_kernels(st):
        flat = dict(_nnx.to_flat_state(st["bimask"]))
        params = dict(_nnx.to_flat_state(st["params"]))
        return ({p[:-2]: np.asarray(v[...]) for p, v in flat.items() if p[-1] == "mask"},
                {p[:-1]: np.asarray(v[...]) for p, v in params.items() if p[-1] == "kernel"})

    st = tr.init_state
    seq = [masks_and_kernels(st)]
    for s in range(3):
        st, _ = tr.train_step(st, tr.put_batch(text_data.batch_at(
            tokens, seed=0, step=s, batch_size=4, block_size=8)))
        seq.append(masks_and_kernels(st))
    (m0, k0), (m1, k1), (m2, k2), (m3, _) = seq
    assert len(m0) == 4  # qkv, out, up, down of the one block
    for path in m0:
        np.testing.assert_array_equal(m1[path], _np_best_mask(k0[path], 2, 4))  # step 0
        np.testing.assert_array_equal(m2[path], m1[path])  # step 1: kept
        np.testing.assert_array_equal(m3[path], _np_best_mask(k2[path], 2, 4))  # step 2
    assert any((_np_best_mask(k1[p], 2, 4) != m1[p]).any() for p in m0)  # the kernels moved
    reported = jax.jit(tr.masks)(st)
    for path in m0:
        fwd, bwd = reported["/".join(map(str, path))]
        np.testing.assert_array_equal(fwd, m3[path])
        np.testing.assert_array_equal(bwd, m3[path])


_LM_MESHES = """
import json
import jax, numpy as np
from flax import nnx
from train import lm, text_data
from train.models import gpt

assert jax.device_count() == 8, jax.devices()
GCFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
TOKENS = np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)
out = {}
for shape in [(1, 1, 1), (2, 2, 2)]:
    args = lm.build_parser().parse_args([
        "--data", "unused", "--method", "transposable", "--mask-update", "refresh",
        "--refresh-every", "2", "--batch-size", "8", "--steps", "3", "--warmup-steps", "0",
        "--lr", "1e-2", "--perm-blocks", "2", "--fast-compile"])
    tr = lm.Trainer(args, GCFG, lm.make_mesh(shape))
    st, losses = tr.init_state, []
    for s in range(3):
        st, met = tr.train_step(st, tr.put_batch(text_data.batch_at(
            TOKENS, seed=0, step=s, batch_size=8, block_size=16)))
        losses.append(float(met["loss"]))
    masks = {"/".join(map(str, p[:-2])): v[...] for p, v in nnx.to_flat_state(st["bimask"])
             if p[-1] == "mask"}
    if shape == (2, 2, 2):
        for k, v in masks.items():
            role = "row" if k.endswith(("out", "down")) else "column"
            assert v.sharding.spec == gpt.COMPUTE[role], (k, v.sharding)
    out[shape] = (losses, {k: np.asarray(v) for k, v in masks.items()})
(l1, m1), (l8, m8) = out[(1, 1, 1)], out[(2, 2, 2)]
np.testing.assert_allclose(l8, l1, rtol=2e-4)
assert sorted(m1) == sorted(m8) and len(m1) == 8
for k in m1:
    np.testing.assert_array_equal(m8[k], m1[k], err_msg=k)
print(json.dumps({"ok": True, "losses": l1}))
"""


@pytest.mark.slow
def test_lm_stored_masks_on_a_tensor_parallel_mesh_equal_single_device():
    """--mask-update refresh on the (2, 2, 2) mesh of 8 host devices (subprocess): the stored masks
    are sharded as the kernels are used and equal the single-device run's after 3 steps (two
    refreshes); the losses agree."""
    from tests.test_lm_parallel import _run

    assert len(_run(_LM_MESHES)["losses"]) == 3
