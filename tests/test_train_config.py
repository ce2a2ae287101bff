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
        "bimask", 2, 4, 100, 100, 2e-4)


def test_reference_imagenet_flags_and_recipes():
    cfg = _parse("imagenet", "--arch resnet50 --train_batch_size 512 --N 1 --M 4 --iter 50 "
                             "--greedy_num 20 --data_path D".split())
    assert (cfg.batch_size, cfg.n, cfg.m, cfg.refresh_every, cfg.num_candidates) == (512, 1, 4, 50, 20)
    assert cfg.lr == pytest.approx(0.2) and cfg.epochs == 120 and cfg.warmup_epochs == 5
    assert cfg.weight_decay == 1e-4 and cfg.lr_schedule == "cosine_step" and not cfg.nesterov
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
    assert config.RESNET_RECIPE.peak_lr(512) == pytest.approx(0.2)
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
