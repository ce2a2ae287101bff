"""train.config: the PyTorch reference's flag names parse unchanged, recipes fill only what the
user did not pass."""

import pytest

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
    with pytest.raises(ValueError, match="--batch-size must be >= 1"):
        _parse("cifar", ["--batch-size", "0"])
    with pytest.raises(SystemExit):
        build_parser("cifar").parse_args(["--method", "magic"])


def test_scripts_run_as_files_from_the_repo_root():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script, needle in (("train/cifar.py", "--greedy_num"), ("train/imagenet.py", "--mixup")):
        res = subprocess.run([sys.executable, script, "--help"], cwd=root, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert needle in res.stdout and "--job_dir" in res.stdout
