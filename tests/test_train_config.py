"""train.config: the PyTorch reference's flag names parse unchanged, recipes fill only what the
user did not pass."""

import dataclasses

import pytest

from train import config
from train.config import apply_recipe, build_parser
from train.models import arch_family


def _parse(script, argv):
    cfg = build_parser(script).parse_args(argv)
    return apply_recipe(cfg, arch_family(cfg.arch))


def test_reference_cifar_command_parses_unchanged():
    cfg = _parse("cifar", "--arch resnet32_cifar10 --lr 0.1 --weight_decay 0.001 --data_path D "
                          "--label_smoothing 0.1 --num_epochs 300 --job_dir J".split())
    assert (cfg.arch, cfg.lr, cfg.weight_decay, cfg.data_path, cfg.label_smoothing, cfg.epochs,
            cfg.run_dir) == ("resnet32_cifar10", 0.1, 0.001, "D", 0.1, 300, "J")
    # CIFAR recipe for the rest.
    assert (cfg.batch_size, cfg.optimizer, cfg.momentum, cfg.lr_schedule, cfg.warmup_epochs) == (
        256, "sgd", 0.9, "cosine_epoch", 0)
    assert (cfg.method, cfg.n, cfg.m, cfg.refresh_every, cfg.num_candidates, cfg.decay) == (
        "bimask", 2, 4, 100, 10, 2e-4)  # greedy_num: options.py's default 10 (README omits it)


def test_reference_imagenet_flags_and_recipes():
    cfg = _parse("imagenet", "--arch resnet50 --train_batch_size 512 --N 1 --M 4 --iter 50 "
                             "--greedy_num 20 --data_path D".split())
    assert (cfg.batch_size, cfg.n, cfg.m, cfg.refresh_every, cfg.num_candidates) == (512, 1, 4, 50, 20)
    # The reference does not scale the lr with the batch: 0.1 at batch 512 too.
    assert cfg.lr == 0.1 and cfg.epochs == 120 and cfg.warmup_epochs == 5
    assert cfg.weight_decay == 1e-4 and cfg.lr_schedule == "imagenet_ref" and not cfg.nesterov
    cfg = _parse("imagenet", ["--arch", "resnet18", "--nesterov", "--lr", "0.3"])
    assert cfg.nesterov is True and cfg.lr == 0.3
    cfg = _parse("imagenet", ["--arch", "vit_deit_small_patch16_224", "--mixup", "0"])
    assert (cfg.optimizer, cfg.weight_decay, cfg.min_lr, cfg.drop_path, cfg.mixup, cfg.cutmix) == (
        "adamw", 0.05, 1e-5, 0.1, 0.0, 1.0)
    assert (cfg.repeated_aug, cfg.reprob, cfg.randaug_magnitude, cfg.interpolation) == (
        3, 0.25, 9.0, "bicubic")
    assert cfg.lr == pytest.approx(5e-4 * cfg.batch_size / 512)


def test_recipe_errors():
    with pytest.raises(ValueError, match="0 < n <= m"):
        _parse("cifar", ["--N", "5", "--M", "4"])
    with pytest.raises(SystemExit):
        build_parser("cifar").parse_args(["--method", "magic"])


@pytest.mark.parametrize("argv, flag", [
    (["--eval-every", "0"], "--eval-every"), (["--log-every", "0"], "--log-every"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "-0.1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-8"], "--batch-size"),
    (["--epochs", "0"], "--epochs"), (["--m", "0"], "--m/--M"), (["--n", "-1"], "--n/--N"),
    (["--width-mult", "0"], "--width-mult"), (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--label-smoothing", "1.5"], "--label-smoothing"), (["--workers", "-1"], "--workers"),
    (["--refresh-every", "0"], "--refresh-every"), (["--decay", "nan"], "--decay"),
    (["--ckpt-every-steps", "-1"], "--ckpt-every-steps"), (["--image-size", "x"], "--image-size"),
])
def test_numeric_flags_are_checked_when_parsed_and_the_error_names_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser("cifar").parse_args(argv)
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_every_numeric_flag_has_a_rule():
    for script in ("cifar", "imagenet"):
        for action in build_parser(script)._actions:
            assert action.type not in (int, float), action.dest
            if action.dest in config.RULES:
                assert action.type is config.RULES[action.dest]


def test_recipes_are_frozen_data_and_apply_recipe_returns_a_new_config():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.CIFAR_RECIPE.lr = 0.2
    assert config.RESNET_RECIPE.peak_lr(512) == 0.1
    assert config.DEIT_RECIPE.peak_lr(1024) == pytest.approx(1e-3)
    raw = build_parser("cifar").parse_args(["--arch", "resnet20"])
    cfg = apply_recipe(raw, "cifar_resnet")
    assert raw.lr is None and raw.epochs is None  # the parsed flags are not changed
    assert (cfg.lr, cfg.epochs, cfg.eval_batch_size) == (0.1, 300, 256)


def test_make_equals_parsing_the_same_flags():
    from train import cifar

    made = cifar.configure(dataset="digits", arch="resnet20", epochs=15, batch_size=64, lr=0.1)
    parsed = cifar.parse("--dataset digits --arch resnet20 --epochs 15 --batch-size 64 "
                         "--lr 0.1".split())
    assert vars(made) == vars(parsed)
    with pytest.raises(ValueError, match="--eval-every: must be"):
        cifar.configure(eval_every=0)
    with pytest.raises(ValueError, match="unknown settings"):
        cifar.configure(learning_rate=0.1)


def test_training_settings_and_differences():
    a = config.training_settings(_parse("cifar", ["--seed", "1"]))
    b = config.training_settings(_parse("cifar", ["--seed", "2", "--workers", "4", "--lr", "0.1"]))
    assert "workers" not in a and "resume_override" not in a and "seed" in a
    assert config.differences(a, b) == {"seed": (1, 2)}  # workers: a run setting; lr: same value
    assert config.differences({**a, "old_key": 1}, b) == {"old_key": (1, None), "seed": (1, 2)}


@pytest.mark.slow
def test_scripts_run_as_modules_from_the_repo_root():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script, needle in (("train.cifar", "--greedy_num"), ("train.imagenet", "--mixup"),
                           ("train.quickstart", "--methods"), ("train.bench_loader", "--pipeline")):
        res = subprocess.run([sys.executable, "-m", script, "--help"], cwd=root, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert needle in res.stdout
    res = subprocess.run([sys.executable, "-m", "train.cifar", "--eval-every", "0"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        "python -m train.cifar: error: argument --eval-every: must be an integer >= 1, got '0'")


def test_quickstart_calls_the_trainer_with_the_configuration_its_flags_meant(monkeypatch, tmp_path):
    from train import cifar, quickstart

    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        return {"final_top1": 50.0, "final_top5": 90.0, "seconds": 1.0}

    monkeypatch.setattr(cifar, "train", fake_train)
    out = quickstart.main(["--methods", "dense", "bimask", "--epochs", "3", "--run-dir",
                           str(tmp_path)])
    assert sorted(out) == ["bimask", "dense"]
    for cfg, method in zip(seen, ("dense", "bimask"), strict=True):
        # What the quickstart used to pass to train/cifar.py as argv strings.
        want = cifar.parse(["--dataset", "digits", "--arch", "resnet20", "--method", method,
                            "--epochs", "3", "--batch-size", "64", "--lr", "0.1",
                            "--weight-decay", "0.0005", "--refresh-every", "100", "--seed", "0",
                            "--log-every", "1000", "--eval-every", "3",
                            "--run-dir", str(tmp_path / method)])
        assert vars(cfg) == vars(want)


# The reference's settings by default, each alternative one flag away (train/README.md's fidelity
# table). Expected values are the reference code's (zyxxmu/Bi-Mask: CnnModels/utils/options.py,
# CnnModels/data/cifar10.py, CnnModels/imagenet.py, DeiT/main.py, DeiT's vision_transformer.py).
REFERENCE_DEFAULTS = {
    # script, arch: k_order, keep_incumbent, num_candidates, decay, wd_rule, first_refresh, lr,
    # lr_schedule, lighting
    ("cifar", "resnet32_cifar10"): ("ihw", False, 10, 2e-4, "bn_name", "start", 0.1,
                                    "cosine_epoch", None),
    ("cifar", "vgg19_cifar10"): ("ihw", False, 10, 2e-4, "bn_name", "start", 0.1, "cosine_epoch",
                                 None),
    ("imagenet", "resnet50"): ("ihw", False, 100, 2e-4, "bn_name", "end", 0.1, "imagenet_ref", 0.1),
    ("imagenet", "vit_deit_small_patch16_224"): ("ihw", False, 100, 0.0512, "kernels", "start",
                                                 5e-4 * 1024 / 512, "timm_epoch", 0.0),
}


@pytest.mark.parametrize("script, arch", sorted(REFERENCE_DEFAULTS))
def test_defaults_are_the_reference_settings(script, arch):
    cfg = _parse(script, ["--arch", arch])
    got = (cfg.k_order, cfg.keep_incumbent, cfg.num_candidates, cfg.decay, cfg.wd_rule,
           cfg.first_refresh, cfg.lr, cfg.lr_schedule, getattr(cfg, "lighting", None))
    want = REFERENCE_DEFAULTS[(script, arch)]
    assert got[:6] == want[:6] and got[7:] == want[7:]
    assert got[6] == pytest.approx(want[6])
    if script == "cifar":
        assert cfg.cifar_std == "reference"


def test_cifar_default_arch_is_the_reference_network():
    assert _parse("cifar", []).arch == "resnet32_cifar10"
    assert _parse("imagenet", []).arch == "resnet50"


def test_each_alternative_is_one_flag_away():
    flags = {"--k-order": ("hwi", "k_order", "hwi"), "--keep-incumbent": (None, "keep_incumbent", True),
             "--num-candidates": ("100", "num_candidates", 100),
             "--wd-rule": ("kernels", "wd_rule", "kernels"),
             "--first-refresh": ("end", "first_refresh", "end"),
             "--lr-schedule": ("cosine_step", "lr_schedule", "cosine_step"),
             "--cifar-std": ("cifar10", "cifar_std", "cifar10")}
    base = vars(_parse("cifar", []))
    for flag, (value, dest, want) in flags.items():
        argv = [flag] + ([] if value is None else [value])
        cfg = vars(_parse("cifar", argv))
        assert cfg[dest] == want, flag
        assert config.differences(config.training_settings(base),
                                  config.training_settings(cfg)) == {dest: (base[dest], want)}
    deit = ["--arch", "vit_deit_small_patch16_224"]
    assert _parse("imagenet", deit + ["--decay", "2e-4"]).decay == 2e-4
    assert _parse("imagenet", deit + ["--lr-schedule", "cosine_step"]).lr_schedule == "cosine_step"
    r50 = _parse("imagenet", ["--lighting", "0", "--first-refresh", "start", "--lr", "0.2"])
    assert (r50.lighting, r50.first_refresh, r50.lr) == (0.0, "start", 0.2)
    assert _parse("cifar", ["--keep-incumbent", "false"]).keep_incumbent is False
    assert _parse("cifar", ["--search", "stripe"]).keep_incumbent is True  # local: from the incumbent


def test_new_settings_are_checked():
    with pytest.raises(ValueError, match="--keep-incumbent false is a policy of --search random"):
        _parse("cifar", ["--search", "stripe", "--keep-incumbent", "false"])
    with pytest.raises(ValueError, match="--warmup-lr 0"):
        _parse("imagenet", ["--warmup-lr", "1e-6"])
    with pytest.raises(ValueError, match="imagenet_ref divides by --epochs - --warmup-epochs"):
        _parse("imagenet", ["--epochs", "5"])
    with pytest.raises(ValueError, match="--k-order: 'chw' is not one of"):
        from train import cifar

        cifar.configure(k_order="chw")
    for argv in (["--lighting", "-0.1"], ["--lighting", "nan"]):
        with pytest.raises(SystemExit):
            build_parser("imagenet").parse_args(argv)
    for argv in (["--k-order", "chw"], ["--wd-rule", "all"], ["--first-refresh", "middle"],
                 ["--keep-incumbent", "maybe"], ["--cifar-std", "x"]):
        with pytest.raises(SystemExit):
            build_parser("cifar").parse_args(argv)


def test_new_settings_are_training_settings_compared_on_resume():
    new = ("k_order", "keep_incumbent", "num_candidates", "decay", "wd_rule", "first_refresh",
           "cifar_std", "lighting", "lr_schedule")
    assert not set(new) & config.RUN_SETTINGS
    a = config.training_settings(_parse("imagenet", []))
    b = config.training_settings(_parse("imagenet", ["--lighting", "0.2", "--k-order", "hwi"]))
    assert config.differences(a, b) == {"k_order": ("ihw", "hwi"), "lighting": (0.1, 0.2)}


def test_zero_candidates_is_the_no_permutation_ablation_and_negative_is_refused(capsys):
    """--num-candidates 0 (Bi-Mask without permutation, benchmarks' bimask-noperm) parses; -1 does
    not, and the error names the flag."""
    assert build_parser("cifar").parse_args(["--num-candidates", "0"]).num_candidates == 0
    with pytest.raises(SystemExit):
        build_parser("cifar").parse_args(["--num-candidates", "-1"])
    assert "argument --num-candidates/--greedy_num" in capsys.readouterr().err
