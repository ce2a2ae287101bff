"""train/lm.py with the methods after Bi-Mask (issue 17): ``--method sste``, ``--wgrad mvue``,
``--track-flips`` and ``--dense-finish``.

* flag validation (ValueError naming the flag, as train/config.py for the CNN scripts);
* one device: a few steps of each option with finite losses and the expected state (S-STE's
  scale fixed at its initial value, the MVUE keys of the step, flip rates against NumPy and
  against ``bimask_jax.track_flips``, the switch to dense products at the right step);
* the (2, 2, 2) mesh of 8 host devices (subprocess): losses, gradients, masks and flip rates of
  sste and of bimask + mvue equal the single-device run; their compiled steps have no collective
  that srste's (which has none the dense step lacks) does not have;
* end to end: a run with every option stops before the dense switch and resumes past it exactly.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nm_reference import nm_mask
from train import lm, text_data
from train.models import gpt

GCFG = gpt.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
TOKENS = np.random.default_rng(0).integers(0, 32, 2000).astype(np.uint16)


def _args(*extra):
    return lm.build_parser().parse_args([
        "--data", "unused", "--batch-size", "4", "--steps", "6", "--warmup-steps", "0",
        "--lr", "5e-2", "--refresh-every", "2", "--num-candidates", "4", "--fast-compile",
        *extra])


def _trainer(*extra):
    return lm.Trainer(_args(*extra), GCFG, lm.make_mesh((1, 1, 1)))


def _batch(tr, s):
    return tr.put_batch(text_data.batch_at(TOKENS, seed=0, step=s, batch_size=4, block_size=8))


def _fields(st, name):
    return {"/".join(map(str, p[:-2])): np.asarray(v[...])
            for p, v in nnx.to_flat_state(st["bimask"]) if p[-1] == name}


def _kernels(st):
    return {"/".join(map(str, p[:-1])): np.asarray(v[...])
            for p, v in nnx.to_flat_state(st["params"]) if p[-1] == "kernel"}


def _np_soft_threshold(w, n=2, m=4):
    """S(w) of S-STE along the rows of a (K, C) matrix, groups of m rows: each entry shrunk toward
    0 by the largest dropped magnitude of its group (NumPy)."""
    k, c = w.shape
    g = w.reshape(k // m, m, c)
    t = np.sort(np.abs(g), axis=1)[:, m - n - 1:m - n, :]  # the (m - n)-th smallest magnitude
    return (np.sign(g) * np.maximum(np.abs(g) - t, 0.0)).reshape(k, c)


# ------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags, match", [
    (["--method", "dense", "--wgrad", "mvue"], "--wgrad is an option of the sparse methods"),
    (["--method", "dense", "--dense-finish", "0.2"], "--dense-finish is an option of the sparse"),
    (["--method", "dense", "--track-flips"], "--track-flips is an option of the sparse methods"),
    (["--method", "bimask", "--wgrad", "mvue", "--n", "3", "--m", "4"], "needs --n <= 2"),
    (["--method", "sste", "--mask-update", "refresh"], "needs --method transposable"),
    (["--method", "bimask", "--n", "5", "--m", "4"], "N:M needs 0 < n <= m"),
])
def test_invalid_flag_combinations_raise(flags, match):
    with pytest.raises(ValueError, match=match):
        lm.check_flags(_args(*flags))
    with pytest.raises(ValueError, match=match):  # before any data is read
        lm.main(["--data", "no-such-file", *flags])


@pytest.mark.parametrize("value", ["1.0", "-0.1", "nan", "x"])
def test_dense_finish_must_be_a_fraction_below_one(value, capsys):
    with pytest.raises(SystemExit):
        lm.build_parser().parse_args(["--data", "x", "--dense-finish", value])
    assert "--dense-finish" in capsys.readouterr().err
    args = _args()
    args.dense_finish = float(value) if value != "x" else 1.5  # a Namespace built in code
    with pytest.raises(ValueError, match="--dense-finish: must be"):
        lm.check_flags(args)


def test_defaults_and_dense_finish_start():
    args = lm.build_parser().parse_args(["--data", "x"])
    assert (args.wgrad, args.dense_finish, args.track_flips) == ("dense", 0.0, False)
    assert lm.dense_finish_start(args) is None
    assert lm.dense_finish_start(_args("--dense-finish", "0.34")) == 4  # 6 - round(2.04)
    assert lm.dense_finish_start(_args("--dense-finish", "0.05")) is None  # rounds to no step
    assert lm.dense_finish_start(_args("--method", "bimask", "--steps", "400",
                                       "--dense-finish", "0.2")) == 320


# ---------------------------------------------------------------------------- one device


@pytest.mark.slow
def test_sste_trains_with_its_fixed_scale_and_soft_thresholded_weights():
    tr = _trainer("--method", "sste")
    st = tr.init_state
    k0, s0 = _kernels(st), _fields(st, "sste_scale")
    assert sorted(s0) == ["h0/attn/out", "h0/attn/qkv", "h0/mlp/down", "h0/mlp/up"]
    for name, w in k0.items():
        if name in s0:
            s = _np_soft_threshold(w.astype(np.float64))
            np.testing.assert_allclose(s0[name], np.vdot(w, s) / np.vdot(s, s), rtol=1e-5)
    # the forward pass multiplies scale * S(w): the loss of a dense model with those kernels
    dense = lm.Trainer(_args("--method", "dense"), GCFG, lm.make_mesh((1, 1, 1)))
    flat = []
    for p, v in nnx.to_flat_state(st["params"]):
        name = "/".join(map(str, p[:-1]))
        if p[-1] == "kernel" and name in s0:
            v = v.replace(jnp.asarray(s0[name] * _np_soft_threshold(np.asarray(v[...]))))
        flat.append((p, v))
    params = nnx.from_flat_state(flat)
    want = float(dense.loss(params, dense.init_state["bimask"], _batch(tr, 0)))
    got = float(tr.loss(st["params"], st["bimask"], _batch(tr, 0)))
    assert got == pytest.approx(want, rel=1e-5)
    losses = []
    for s in range(3):
        st, met = tr.train_step(st, _batch(tr, s))
        losses.append(float(met["loss"]))
    assert np.all(np.isfinite(losses))  # random tokens: no trend to test
    s3 = _fields(st, "sste_scale")
    for name in s0:  # fixed at creation: unchanged by training and refreshes
        np.testing.assert_array_equal(s3[name], s0[name])
    assert any(not np.array_equal(_kernels(st)[n], k0[n]) for n in s0)


@pytest.mark.slow
def test_mvue_sets_the_step_keys_and_changes_only_the_sparse_kernel_gradients():
    from train.loop import wgrad_step_key

    tr = _trainer("--method", "bimask", "--wgrad", "mvue")
    ref = _trainer("--method", "bimask")
    st = tr.init_state
    assert all((k == 0).all() for k in _fields(st, "wgrad_key").values())
    for s in range(2):
        st, met = tr.train_step(st, _batch(tr, s))
        assert np.isfinite(float(met["loss"]))
    keys = _fields(st, "wgrad_key")  # the keys of step 1, layer i: fold_in(key of step 1, i)
    assert len(keys) == 4
    for i, name in enumerate(sorted(keys)):
        want = jax.random.key_data(jax.random.fold_in(wgrad_step_key(st["rng"], 1), i))
        np.testing.assert_array_equal(keys[name], np.asarray(want))
    # same state: the forward and every gradient upstream of the weight-gradient products are
    # the dense-wgrad run's; the sparse kernels' gradients differ (x^T g_hat, not x^T g)
    ref_bimask = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(st["bimask"])
                                      if p[-1] != "wgrad_key"])  # the same permutations
    (l1, g1), (l0, g0) = jax.jit(tr.grads)(st, _batch(tr, 2)), jax.jit(ref.grads)(
        {**st, "bimask": ref_bimask}, _batch(tr, 2))
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    sparse = set(keys)
    differ = 0
    for (p, a), (_, b) in zip(nnx.to_flat_state(g1), nnx.to_flat_state(g0), strict=True):
        name = "/".join(map(str, p[:-1]))
        if p[-1] == "kernel" and name in sparse:
            differ += int(not np.allclose(a[...], b[...], rtol=1e-3, atol=1e-6))
        else:
            np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-7, err_msg=str(p))
    assert differ == 4


@pytest.mark.slow
def test_track_flips_rates_match_numpy_and_the_library():
    import bimask_jax

    tr = _trainer("--method", "bimask", "--track-flips")
    st = tr.init_state
    prev = _fields(st, "prev_fwd")
    for name, w in _kernels(st).items():  # the masks of the initial kernels
        if name in prev:
            np.testing.assert_array_equal(prev[name], nm_mask(w, 2, 4, axis=0))
    for s in range(2):
        k_before = _kernels(st)
        st, met = tr.train_step(st, _batch(tr, s))
        k_after, rates = _kernels(st), met["flip_layers"]
        flipped = total = 0
        for name in prev:
            a, b = nm_mask(k_before[name], 2, 4, axis=0), nm_mask(k_after[name], 2, 4, axis=0)
            assert float(rates[name]) == pytest.approx(np.mean(a != b), abs=1e-7)
            flipped, total = flipped + np.sum(a != b), total + a.size
            np.testing.assert_array_equal(_fields(st, "prev_fwd")[name], b)
        assert float(met["flip_rate"]) == pytest.approx(flipped / total, rel=1e-6)
        assert float(met["flip_steps"]) == 1.0
    assert float(met["flip_rate"]) > 0  # lr 5e-2 moves some masks
    # lm.track_flips (masks through ShardedSparseOp) equals the library's on a moved kernel
    model = tr.model(st)
    for _, layer, _ in lm.sparse_layers(model):
        layer.kernel[...] = layer.kernel[...] + 0.01 * jnp.sin(jnp.arange(layer.kernel.size)
                                                               ).reshape(layer.kernel.shape)
    lib_state, lib_rates, lib_agg = bimask_jax.track_flips(model)
    rates, agg = lm.track_flips(model)
    assert float(agg) == pytest.approx(float(lib_agg), rel=1e-6)
    for k in lib_rates:
        assert float(rates[k]) == pytest.approx(float(lib_rates[k]), abs=1e-7)
    mine = nnx.state(model, bimask_jax.BimaskState)
    for (p, a), (_, b) in zip(nnx.to_flat_state(mine), nnx.to_flat_state(lib_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


@pytest.mark.slow
def test_dense_finish_switches_to_dense_products_at_its_step():
    tr = _trainer("--method", "bimask", "--dense-finish", "0.34", "--track-flips")
    dense = lm.Trainer(_args("--method", "dense"), GCFG, lm.make_mesh((1, 1, 1)))
    assert tr.dense_start == 4
    assert [tr.is_dense(s) for s in range(6)] == [False] * 4 + [True] * 2
    assert tr.step_fn(3) is tr.train_step and tr.step_fn(4) is tr.dense_train_step
    assert tr.eval_fn(4) is tr.eval_step and tr.eval_fn(5) is tr.dense_eval_step
    st = tr.init_state
    for s in range(4):
        st, met = tr.step_fn(s)(st, _batch(tr, s))
        assert float(met["flip_steps"]) == 1.0
    perms = _fields(st, "perm")
    for s in (4, 5):
        b = _batch(tr, s)
        want = float(dense.loss(st["params"], dense.init_state["bimask"], b))
        sparse = float(tr.loss(st["params"], st["bimask"], b))
        st, met = tr.step_fn(s)(st, b)
        # the loss of a dense step is the plain dense model's on the same parameters
        assert float(met["loss"]) == pytest.approx(want, rel=1e-5)
        assert abs(float(met["loss"]) - sparse) > 1e-4
        assert float(met["flip_steps"]) == 0.0 and float(met["flip_rate"]) == 0.0
    for k, p in _fields(st, "perm").items():  # step 4 would refresh (every 2): not when dense
        np.testing.assert_array_equal(p, perms[k])
    b = _batch(tr, 6)
    assert float(tr.eval_fn(6)(st, b)) == pytest.approx(
        float(dense.loss(st["params"], dense.init_state["bimask"], b)), rel=1e-5)


# ------------------------------------------------------------------------------ end to end


def _text(path):
    words = ("the", "king", "shall", "speak", "now", "and", "we", "go", "to", "war")
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)),
                    encoding="utf-8")
    return str(path)


def _main_args(data, run_dir, *extra):
    return ["--data", data, "--preset", "gpt2-tiny", "--block-size", "16", "--batch-size", "4",
            "--steps", "6", "--eval-every", "3", "--eval-batches", "1", "--log-every", "2",
            "--refresh-every", "2", "--num-candidates", "4", "--warmup-steps", "2",
            "--run-dir", run_dir, "--no-progress", "--fast-compile", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sste", "bimask"])
def test_script_metrics_and_resume_across_the_dense_switch(tmp_path, method):
    data = _text(tmp_path / "words.txt")
    flags = ["--method", method, "--wgrad", "mvue", "--track-flips", "--dense-finish", "0.34"]
    full = lm.main(_main_args(data, str(tmp_path / "full"), *flags))
    assert full["dense_start"] == 4 and full["wgrad"] == "mvue" and full["track_flips"]
    recs = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert (cfg["method"], cfg["wgrad"], cfg["dense_finish"], cfg["track_flips"]) == (
        method, "mvue", 0.34, True)
    assert [r["step"] for r in recs if r["type"] == "dense_finish"] == [4]
    train = {r["step"]: r for r in recs if r["type"] == "train"}
    assert 0 < train[2]["flip_rate"] < 1 and train[6]["flip_rate"] is None
    assert train[6]["dense_finish"] and "dense_finish" not in train[4]
    flips = {r["step"]: r for r in recs if r["type"] == "flips"}
    assert flips[3]["flip_steps"] == 3 and flips[6]["flip_steps"] == 1  # steps 4, 5 dense
    assert len(flips[3]["flip_rates"]) == 8 and 0 < flips[3]["flip_rate"] < 1
    evals = {r["step"]: r for r in recs if r["type"] == "eval"}
    assert evals[6]["dense"] and "dense" not in evals[3] and np.isfinite(evals[6]["val_loss"])

    part = str(tmp_path / "part")
    first = lm.main(_main_args(data, part, *flags, "--stop-after-steps", "3"))
    assert first["stopped_early"] and first["step"] == 3
    resumed = lm.main(_main_args(data, part, *flags, "--resume"))
    assert resumed["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-6)
    for x, y in zip(nnx.to_flat_state(full["state"]["params"]),
                    nnx.to_flat_state(resumed["state"]["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(x[1][...]), np.asarray(y[1][...]), rtol=1e-6,
                                   atol=1e-7)
    for x, y in zip(nnx.to_flat_state(full["state"]["bimask"]),
                    nnx.to_flat_state(resumed["state"]["bimask"]), strict=True):
        np.testing.assert_array_equal(np.asarray(x[1][...]), np.asarray(y[1][...]))


# ------------------------------------------------------------------------- (2, 2, 2) mesh

_MESH = """
import json, re
from collections import Counter
import jax, numpy as np
from flax import nnx
from train import lm, loop, text_data
from train.models import gpt

assert jax.device_count() == 8, jax.devices()
GCFG = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
TOKENS = np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)

def trainer(shape, *flags):
    args = lm.build_parser().parse_args([
        "--data", "unused", "--batch-size", "8", "--refresh-every", "2", "--num-candidates", "8",
        "--perm-blocks", "2", "--steps", "6", "--warmup-steps", "1", "--lr", "1e-2",
        "--fast-compile", *flags])
    return lm.Trainer(args, GCFG, lm.make_mesh(shape))

def batch(tr, s):
    return tr.put_batch(text_data.batch_at(TOKENS, seed=0, step=s, batch_size=8, block_size=16))

OPS = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
PAT = re.compile(r"=\\s*(.+?)\\s+(" + OPS + r")(?:-start)?\\(")

def collectives(tr):
    jitted = jax.jit(tr._train_step, in_shardings=(tr.shardings, tr.batch_sharding),
                     out_shardings=(tr.shardings, tr.repl))
    text = jitted.lower(tr.init_state, batch(tr, 0)).compile(loop.FAST_COMPILE).as_text()
    found = Counter()
    for line in text.splitlines():
        mt = PAT.search(line)
        if mt:
            found[(mt.group(2), re.sub(r"\\{[^}]*\\}|/\\*[^*]*\\*/", "", mt.group(1)))] += 1
    return found

CONFIGS = {"sste": ["--method", "sste", "--track-flips"],
           "bimask-mvue": ["--method", "bimask", "--wgrad", "mvue", "--track-flips"]}
out = {}
for name, flags in CONFIGS.items():
    res = {}
    for shape in [(1, 1, 1), (2, 2, 2)]:
        tr = trainer(shape, *flags)
        st, losses, rates = tr.init_state, [], []
        for s in range(4):  # refreshes (bimask) at steps 0 and 2
            st, met = tr.train_step(st, batch(tr, s))
            losses.append(float(met["loss"]))
            rates.append({k: float(v) for k, v in met["flip_layers"].items()})
        loss, grads = jax.jit(tr.grads)(st, batch(tr, 4))  # with step 4's refresh and keys
        masks = jax.jit(tr.masks)(st)
        res[shape] = dict(losses=losses, rates=rates, loss=float(loss),
                          grads={"/".join(map(str, p)): np.asarray(v[...])
                                 for p, v in nnx.to_flat_state(grads)},
                          masks={k: (np.asarray(f), np.asarray(b)) for k, (f, b) in masks.items()},
                          state={"/".join(map(str, p)): np.asarray(v[...])
                                 for p, v in nnx.to_flat_state(st["bimask"])})
    ref, got = res[(1, 1, 1)], res[(2, 2, 2)]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-5)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=2e-5)
    assert got["grads"].keys() == ref["grads"].keys()
    for k in ref["grads"]:
        np.testing.assert_allclose(got["grads"][k], ref["grads"][k], rtol=2e-4, atol=2e-6,
                                   err_msg=name + " " + k)
    assert len(ref["masks"]) == 8
    for k in ref["masks"]:
        np.testing.assert_array_equal(got["masks"][k][0], ref["masks"][k][0], err_msg=k)
        np.testing.assert_array_equal(got["masks"][k][1], ref["masks"][k][1], err_msg=k)
    for k in ref["state"]:  # perms, wgrad_key, prev_fwd, refreshes exactly; sste_scale (a sum
        if k.endswith("sste_scale"):  # over the sharded initial kernel) to float tolerance
            np.testing.assert_allclose(got["state"][k], ref["state"][k], rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(got["state"][k], ref["state"][k], err_msg=name + k)
    for a, b in zip(got["rates"], ref["rates"], strict=True):
        for k in b:
            assert abs(a[k] - b[k]) < 1e-7, (name, k, a[k], b[k])
    out[name] = {"losses": ref["losses"], "flip": ref["rates"][-1]}

# collectives: sste and the MVUE estimate add none to their base method's step (srste: none
# beyond the dense step's; bimask: its score sums); --track-flips is off here
base = {m: collectives(trainer((2, 2, 2), "--method", m)) for m in ("srste", "bimask")}
for name, flags, against in [("sste", ["--method", "sste"], "srste"),
                             ("bimask-mvue", ["--method", "bimask", "--wgrad", "mvue"], "bimask")]:
    found = collectives(trainer((2, 2, 2), *flags))
    extra = {k: v - base[against].get(k, 0) for k, v in found.items()
             if v > base[against].get(k, 0)}
    assert not extra, (name, extra)
    out[name]["collectives"] = sum(found.values())
print(json.dumps({"ok": True, **out}))
"""


@pytest.mark.slow
def test_sste_and_bimask_mvue_on_the_222_mesh_equal_single_device():
    from tests.test_lm_parallel import _run

    out = _run(_MESH)
    assert len(out["sste"]["losses"]) == 4 and len(out["bimask-mvue"]["losses"]) == 4


@pytest.mark.parametrize("n", [1, 2])
def test_mvue_draw_selects_the_top_k_set(n):
    """The MVUE draw's top-n (successive argmax, partitioned locally under a batch-sharded mesh)
    keeps the set lax.top_k keeps."""
    from bimask_jax.mvue import _top_n

    s = jax.random.normal(jax.random.key(1), (64, 8, 4))
    idx = jax.lax.top_k(s, n)[1]
    want = jnp.any(idx[..., :, None] == jnp.arange(4), axis=-2)
    np.testing.assert_array_equal(_top_n(s, n), want)
    assert int(_top_n(s, n).sum()) == 64 * 8 * n


@pytest.mark.slow
def test_track_flips_with_the_stored_transposable_mask():
    """--mask-update refresh --track-flips: the new record's prev_fwd is its stored mask (one
    array); the donating step must get two buffers. The flip rates are those of the stored masks:
    0 between refreshes."""
    tr = _trainer("--method", "transposable", "--mask-update", "refresh", "--track-flips")
    st = tr.init_state
    rates = []
    for s in range(4):  # refreshes at steps 0 and 2 (the mask of the kernel before the step)
        masks = _fields(st, "mask")
        st, met = tr.train_step(st, _batch(tr, s))
        assert np.isfinite(float(met["loss"]))
        rates.append(float(met["flip_rate"]))
        new = _fields(st, "mask")
        flipped = sum(int(np.sum(new[k] != masks[k])) for k in new)
        assert rates[-1] == pytest.approx(flipped / sum(v.size for v in new.values()), abs=1e-7)
        for k in new:
            np.testing.assert_array_equal(_fields(st, "prev_fwd")[k], new[k])
    assert rates[1] == 0.0 and rates[3] == 0.0
