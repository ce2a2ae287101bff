"""The training scripts' options for the methods after Bi-Mask (issue 17): ``--method sste``,
``--wgrad mvue``, ``--dense-finish``, ``--track-flips``. Fast tests check the flags and one
compiled train step of a tiny model against independent statements; the end-to-end runs (slow)
use the tiny ImageFolder configuration of tests/test_train_loop.py."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bimask_jax as api
from tests.test_train_loop import _leaves_equal, _lines
from train import cifar, config, loop
from train.config import apply_recipe, build_parser
from train.testing import write_image_folder

# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def _parse(argv, script="cifar"):
    return apply_recipe(build_parser(script).parse_args(argv), "cifar_resnet")


def test_new_flags_parse_and_default_off():
    cfg = _parse([])
    assert (cfg.wgrad, cfg.dense_finish, cfg.track_flips) == ("dense", 0.0, False)
    cfg = _parse(["--method", "sste", "--wgrad", "mvue", "--dense-finish", "0.25",
                  "--track-flips"])
    assert (cfg.method, cfg.wgrad, cfg.dense_finish, cfg.track_flips) == (
        "sste", "mvue", 0.25, True)
    assert "--decay is ignored" in " ".join(build_parser("imagenet").format_help().split())


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan", "inf", "x"])
def test_dense_finish_is_a_fraction_in_0_1(value, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser("cifar").parse_args(["--dense-finish", value])
    assert e.value.code == 2
    assert "argument --dense-finish" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--dense-finish"):
        cifar.configure(dense_finish=float(value) if value != "x" else value)


def test_new_flags_need_a_sparse_method_and_mvue_needs_n_le_2():
    for argv in (["--wgrad", "mvue"], ["--dense-finish", "0.1"], ["--track-flips"]):
        with pytest.raises(ValueError, match=f"{argv[0]} is an option of the sparse methods"):
            _parse(["--method", "dense"] + argv)
    with pytest.raises(ValueError, match="--wgrad mvue .* needs --n <= 2, got --n 3"):
        _parse(["--wgrad", "mvue", "--n", "3", "--m", "8"])
    assert _parse(["--wgrad", "mvue", "--n", "1"]).n == 1
    with pytest.raises(SystemExit):
        build_parser("cifar").parse_args(["--wgrad", "sparse"])


def test_new_flags_are_training_settings_compared_on_resume():
    new = ("wgrad", "dense_finish", "track_flips")
    assert not set(new) & config.RUN_SETTINGS
    a = config.training_settings(_parse([]))
    b = config.training_settings(_parse(["--method", "sste", "--wgrad", "mvue",
                                         "--dense-finish", "0.5", "--track-flips"]))
    assert config.differences(a, b) == {
        "method": ("bimask", "sste"), "wgrad": ("dense", "mvue"), "dense_finish": (0.0, 0.5),
        "track_flips": (False, True)}
    # A checkpoint written before these settings existed computed with them off.
    old = {k: v for k, v in a.items() if k not in new}
    assert config.differences(old, a) == {}
    assert config.differences(old, b) == {
        "method": ("bimask", "sste"), "wgrad": ("dense", "mvue"), "dense_finish": (0.0, 0.5),
        "track_flips": (False, True)}


def test_dense_finish_start_of_a_run():
    cfg = _parse(["--epochs", "2", "--dense-finish", "0.5"])
    assert loop.dense_finish_start(cfg, 3) == 3  # 6 steps: steps 3, 4, 5 (0-based) are dense
    cfg = _parse(["--epochs", "10", "--dense-finish", "0.99"])
    assert loop.dense_finish_start(cfg, 1) == 0  # round(9.9) = 10: every step dense
    # Off: 0, a fraction that rounds to no step, or the dense method.
    assert loop.dense_finish_start(_parse(["--epochs", "2"]), 3) is None
    assert loop.dense_finish_start(_parse(["--epochs", "2", "--dense-finish", "0.05"]), 3) is None
    assert loop.dense_finish_start(_parse(["--epochs", "2", "--method", "dense"]), 3) is None


# --------------------------------------------------------------------------------------------
# One compiled train step of a tiny model
# --------------------------------------------------------------------------------------------


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, (1, 2)))


_DATA = loop.DataSpec(train_source=[], eval_source=[], train_transform=None, eval_transform=None,
                      num_classes=3, image_size=4, channels=4, mean=(0.5,) * 4, std=(0.25,) * 4)


def _batch(seed=0, b=8):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (b, 4, 4, 4), dtype=np.uint8),
            "label": rng.integers(0, 3, (b,)).astype(np.int32), "valid": np.ones(b, bool)}


def _step(lr=0.1, **settings):
    """(cfg, hooks, initial state, jitted sparse step, jitted dense-finish step) of ``_Net``
    (its classifier kept dense) under the flags ``settings``."""
    cfg = apply_recipe(cifar.configure(k_order="hwi", num_candidates=2, **settings),
                       "cifar_resnet")
    hooks = loop.sparsify(_Net(), cfg, ("Dense_0",))
    tx = loop.make_optimizer(cfg, lambda s: lr)
    init = loop._compile(jax.jit(lambda k, x: hooks.model.init(k, x, train=False)), fast=True)
    variables = dict(init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4))))
    params = variables.pop("params")
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "model_state": variables, "rng": jax.random.PRNGKey(1)}
    make = [loop._compile(jax.jit(loop.make_train_step(hooks, tx, lambda s: lr, cfg, _DATA, [],
                                                       dense=d)), fast=True)
            for d in (False, True)]
    return cfg, hooks, state, *make


def _conv(tree):
    return tree["Conv_0"]


def test_mvue_wgrad_step_keeps_the_forward_and_changes_only_the_kernel_gradient():
    _, _, s_dense, step_dense, _ = _step(method="srste", wgrad="dense")
    _, hooks, s_mvue, step_mvue, _ = _step(method="srste", wgrad="mvue")
    batch = _batch()
    new_d, m_d = step_dense(s_dense, batch)
    new_m, m_m = step_mvue(s_mvue, batch)
    # The forward is the same (same loss); SGD's first update is -lr (g + wd w), so equal biases
    # mean equal bias gradients, and the MVUE weight gradient changes the sparse kernel's update.
    assert float(m_m["loss"]) == float(m_d["loss"])
    np.testing.assert_array_equal(_conv(new_m["params"])["bias"], _conv(new_d["params"])["bias"])
    np.testing.assert_array_equal(new_m["params"]["Dense_0"]["kernel"],
                                  new_d["params"]["Dense_0"]["kernel"])  # dense layer
    assert not np.array_equal(_conv(new_m["params"])["kernel"], _conv(new_d["params"])["kernel"])
    # This step's key: set_wgrad_key(fold_in(fold_in(rng, WGRAD_STREAM), step)); a new one at
    # the next step.
    variables = {"params": s_mvue["params"], **s_mvue["model_state"]}
    want = api.set_wgrad_key(loop.wgrad_step_key(s_mvue["rng"], 0), hooks.model, variables)
    key0 = _conv(new_m["model_state"]["bimask"])["wgrad_key"]
    np.testing.assert_array_equal(key0, _conv(want)["wgrad_key"])
    after, _ = step_mvue(new_m, _batch(1))
    assert not np.array_equal(_conv(after["model_state"]["bimask"])["wgrad_key"], key0)


def test_dense_finish_step_is_the_plain_model_and_never_refreshes():
    cfg, _, state, sparse_step, dense_step = _step(method="bimask", refresh_every=1,
                                                   track_flips=True)
    batch = _batch()
    new_s, m_s = sparse_step(state, batch)
    new_d, m_d = dense_step(state, batch)
    # The dense step's loss is the unwrapped model's with the raw kernels.
    x = loop.normalize(batch["image"], _DATA.mean, _DATA.std)
    logits = _Net().apply({"params": state["params"]}, x)
    y = optax.smooth_labels(jax.nn.one_hot(batch["label"], 3), cfg.label_smoothing)
    plain = float(jnp.mean(optax.softmax_cross_entropy(logits, y)))
    assert float(m_d["loss"]) / 8 == pytest.approx(plain, rel=1e-6)
    assert float(m_s["loss"]) / 8 != pytest.approx(plain, rel=1e-3)
    # A refresh is due at every step: the sparse step refreshes, the dense step never.
    assert int(_conv(new_s["model_state"]["bimask"])["refreshes"]) == 1
    jax.tree.map(np.testing.assert_array_equal, new_d["model_state"], state["model_state"])
    # With --track-flips the dense step reports no flip step, with the sparse step's metrics.
    assert jax.tree.structure(m_d) == jax.tree.structure(m_s)
    assert float(m_d["flip_steps"]) == 0.0 and float(m_d["flip_rate"]) == 0.0
    assert float(m_s["flip_steps"]) == 1.0


def test_track_flips_step_reports_the_changed_mask_entries():
    _, hooks, state, step, _ = _step(method="srste", track_flips=True, lr=2.0)

    def mask(s):  # forward mask, from the exported (masked) kernel; kernels have no zeros
        exported = api.export(hooks.model, {"params": s["params"], **s["model_state"]})
        return np.asarray(_conv(exported["params"])["kernel"]) != 0

    new, metrics = step(state, _batch())
    want = np.mean(mask(state) != mask(new))
    assert 0.0 < want < 1.0
    assert float(metrics["flip_layers"]["Conv_0"]) == pytest.approx(want, abs=1e-7)
    assert float(metrics["flip_rate"]) == pytest.approx(want, abs=1e-7)  # one tracked layer
    np.testing.assert_array_equal(_conv(new["model_state"]["bimask"])["prev_fwd"], mask(new))


# --------------------------------------------------------------------------------------------
# End-to-end runs (slow)
# --------------------------------------------------------------------------------------------

ARGS = ["--arch", "resnet8", "--width-mult", "0.25", "--image-size", "8", "--batch-size", "8",
        "--num_epochs", "2", "--log-every", "1", "--no-progress", "--refresh-every", "2",
        "--num-candidates", "4", "--fast-compile", "--seed", "7"]
SPARSE = [f"stage{s}_block0/conv{c}" for s in (1, 2, 3) for c in (1, 2)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, compile_cache):
    return write_image_folder(tmp_path_factory.mktemp("tree"), classes=3, train_per_class=8,
                              val_per_class=2, size=8)


def _refreshes(state):
    return [int(x) for p, x in jax.tree_util.tree_leaves_with_path(state["model_state"]["bimask"])
            if "refreshes" in jax.tree_util.keystr(p)]


@pytest.mark.slow
def test_sste_run(tree, tmp_path):
    out = cifar.main(ARGS + ["--data_path", tree, "--job_dir", str(tmp_path), "--method", "sste",
                             "--eval-export"])
    assert out["method"] == "sste" and out["step"] == 6
    assert out["export_top1"] == out["final_top1"]  # exported scale * S(w) scores the same
    rows = [r for r in json.load(open(tmp_path / "sparsity.json")) if r["status"] == "sparse"]
    assert [r["path"] for r in rows] == SPARSE
    assert all(r["method"] == "sste" and r["sste_scale"] > 0 and r["fwd_density"] == 0.5
               for r in rows)
    assert [x for x in _lines(tmp_path) if x["type"] == "summary"][0]["method"] == "sste"


@pytest.mark.slow
def test_mvue_and_flip_tracking_run_and_resume(tree, tmp_path):
    base = ARGS + ["--data_path", tree, "--method", "bimask"]
    plain = cifar.main(base + ["--job_dir", str(tmp_path / "plain")])
    flags = ["--wgrad", "mvue", "--track-flips"]
    full = cifar.main(base + flags + ["--job_dir", str(tmp_path / "full")])
    assert full["wgrad"] == "mvue"
    lp = [x for x in _lines(tmp_path / "plain") if x["type"] == "train"]
    lf = [x for x in _lines(tmp_path / "full") if x["type"] == "train"]
    # Same first forward (same init, data and masks), other gradients from then on.
    assert lf[0]["loss"] == lp[0]["loss"] and lf[1]["loss"] != lp[1]["loss"]
    assert not np.array_equal(np.asarray(full["state"]["params"]["stage1_block0"]["conv1"]["kernel"]),
                              np.asarray(plain["state"]["params"]["stage1_block0"]["conv1"]["kernel"]))
    assert all("flip_rate" not in x for x in lp)
    assert len(lf) == 6 and all(0.0 <= x["flip_rate"] <= 1.0 for x in lf)
    assert any(x["flip_rate"] > 0 for x in lf)
    sp = [x for x in _lines(tmp_path / "full") if x["type"] == "sparsity"]
    assert len(sp) == 2 and [x["flip_steps"] for x in sp] == [3, 3]
    for x in sp:
        assert sorted(x["flip_rates"]) == SPARSE
        assert all(0.0 <= v <= 1.0 for v in x["flip_rates"].values())
        assert 0.0 <= x["flip_rate"] <= 1.0
    assert sp[0]["flip_rate"] == pytest.approx(np.mean([y["flip_rate"] for y in lf[:3]]))
    # The keys and the previous masks are in the checkpointed state: a resume mid-epoch gives
    # the unbroken run to the bit, and the same train lines.
    part = str(tmp_path / "part")
    cifar.main(base + flags + ["--job_dir", part, "--stop-after-steps", "4"])
    resumed = cifar.main(base + flags + ["--job_dir", part, "--resume"])
    _leaves_equal(full["state"], resumed["state"])
    strip = ("img_per_s",)
    assert [{k: v for k, v in x.items() if k not in strip} for x in _lines(part)
            if x["type"] == "train"] == [{k: v for k, v in x.items() if k not in strip} for x in lf]


@pytest.mark.slow
def test_dense_finish_run_switches_and_resumes_in_it(tree, tmp_path):
    args = ARGS + ["--data_path", tree, "--method", "bimask", "--dense-finish", "0.5"]
    full_dir = str(tmp_path / "full")
    full = cifar.main(args + ["--job_dir", full_dir, "--eval-export"])
    lines = _lines(full_dir)
    assert full["dense_from_step"] == 3
    assert [x["type"] for x in lines] == (["train"] * 3 + ["eval", "sparsity", "dense_finish"]
                                          + ["train"] * 3 + ["eval", "sparsity", "summary"])
    assert lines[5] == {"type": "dense_finish", "step": 3, "epoch": 2, "dense_steps": 3}
    evals = [x for x in lines if x["type"] == "eval"]
    assert "dense_finish" not in evals[0] and evals[1]["dense_finish"] is True
    # Bi-Mask refreshes at steps 0 and 2; the one due at step 4 falls in the dense finish.
    assert _refreshes(full["state"]) == [2] * 6
    # The export holds the raw kernels (no longer 2:4) and scores as the dense model does.
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        exported = ck.restore(os.path.join(full_dir, "export"))
    for path in SPARSE:
        a, b = path.split("/")
        k = np.asarray(exported["params"][a][b]["kernel"])
        np.testing.assert_array_equal(k, np.asarray(full["state"]["params"][a][b]["kernel"]))
    k = np.asarray(exported["params"]["stage3_block0"]["conv2"]["kernel"])
    assert np.all(k != 0)
    assert full["export_top1"] == full["final_top1"]
    rows = json.load(open(os.path.join(full_dir, "sparsity.json")))
    assert all("dense finish" in r["note"] for r in rows if r["status"] == "sparse")
    # A run stopped after the switch resumes with the dense step: to the bit.
    part = str(tmp_path / "part")
    cifar.main(args + ["--job_dir", part, "--stop-after-steps", "4"])
    with pytest.raises(ValueError, match="--dense-finish: 0.5 in the checkpoint, 0.25 now"):
        cifar.main(ARGS + ["--data_path", tree, "--method", "bimask", "--dense-finish", "0.25",
                           "--job_dir", part, "--resume"])
    resumed = cifar.main(args + ["--job_dir", part, "--resume"])
    _leaves_equal(full["state"], resumed["state"])
    assert [x["type"] for x in _lines(part)].count("dense_finish") == 1
    assert [x["loss"] for x in _lines(part) if x["type"] == "train"] == [
        x["loss"] for x in lines if x["type"] == "train"]
