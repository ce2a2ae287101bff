"""Command-line flags of ``train/cifar.py`` and ``train/imagenet.py``, the PyTorch reference's flag
names as aliases, and the paper's recipes as defaults.

Every recipe flag defaults to ``None`` on the command line and is filled by :func:`apply_recipe`
from the architecture's family, so any flag the user passes wins over the recipe.
"""

from __future__ import annotations

import argparse

# Recipes (paper / DeiT): keys are argparse dests.
CIFAR_RECIPE = dict(
    epochs=300, batch_size=256, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
    weight_decay=1e-3, label_smoothing=0.1, warmup_epochs=0, warmup_lr=0.0, min_lr=0.0,
    lr_schedule="cosine_epoch", mixup=0.0, cutmix=0.0, drop_path=0.0, repeated_aug=1,
)
RESNET_RECIPE = dict(
    epochs=120, batch_size=256, optimizer="sgd", lr_per_256=0.1, momentum=0.9, nesterov=False,
    weight_decay=1e-4, label_smoothing=0.1, warmup_epochs=5, warmup_lr=0.0, min_lr=0.0,
    lr_schedule="cosine_step", mixup=0.0, cutmix=0.0, drop_path=0.0, repeated_aug=1, reprob=0.0,
    randaug_magnitude=0.0, interpolation="bilinear",
)
DEIT_RECIPE = dict(
    epochs=300, batch_size=1024, optimizer="adamw", lr_per_512=5e-4, momentum=0.9, nesterov=False,
    weight_decay=0.05, label_smoothing=0.1, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
    lr_schedule="cosine_step", mixup=0.8, cutmix=1.0, drop_path=0.1, repeated_aug=3, reprob=0.25,
    randaug_magnitude=9.0, interpolation="bicubic",
)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser(script: str) -> argparse.ArgumentParser:
    """The flags of ``script`` ("cifar" or "imagenet"). Reference aliases: ``--arch --data_path
    --job_dir --num_epochs --lr --weight_decay --label_smoothing --train_batch_size --N --M --iter
    --greedy_num``."""
    if script not in ("cifar", "imagenet"):
        raise ValueError(f"script must be 'cifar' or 'imagenet', got {script!r}")
    p = argparse.ArgumentParser(
        prog=f"train/{script}.py",
        description=("Train a CIFAR model (ResNet-20/32/56, VGG-19, MobileNetV2)" if script == "cifar"
                     else "Train an ImageNet model (ResNet-18/34/50, DeiT-Tiny/Small)")
        + " with N:M sparsity (Bi-Mask, SR-STE, transposable masks) or dense.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", default="resnet32" if script == "cifar" else "resnet50",
                   help="architecture (reference names such as resnet32_cifar10, vgg19_cifar10, "
                        "mobilenetv2, resnet18, resnet50, vit_deit_small_patch16_224 accepted)")
    g.add_argument("--data-path", "--data_path", dest="data_path", default=None,
                   help="ImageFolder root with train/ and val/ (or test/) class folders"
                        + (", or a CIFAR-10/100 python-pickle directory" if script == "cifar" else ""))
    if script == "cifar":
        g.add_argument("--dataset", default="auto", choices=["auto", "imagefolder", "cifar-pickle",
                                                              "digits"],
                       help="auto: CIFAR pickle if --data-path holds one, else ImageFolder; "
                            "digits: scikit-learn's bundled 8x8 digits (no download)")
    g.add_argument("--image-size", type=int, default=None,
                   help="training/eval crop size (default 32 CIFAR, 224 ImageNet, 8 digits)")
    if script == "imagenet":
        g.add_argument("--eval-resize", type=int, default=None,
                       help="eval: resize shorter side to this, then center crop (default "
                            "image_size*256/224)")
        g.add_argument("--depth", type=int, default=None, help="DeiT: number of blocks (override)")
        g.add_argument("--patch-size", type=int, default=None, help="DeiT: patch size (override)")
    g.add_argument("--width-mult", type=float, default=1.0,
                   help="scale all widths (rounded to multiples of 4); for small test models")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the model (parameters stay float32)")
    g.add_argument("--workers", type=int, default=0,
                   help="grain worker processes for decode + augmentation (0: in-process)")
    g.add_argument("--prefetch", type=int, default=4, help="batches prefetched per worker")
    g.add_argument("--on-corrupt", default="fail", choices=["fail", "skip"],
                   help="an undecodable image: stop with its path, or skip it and count it")

    g = p.add_argument_group("recipe (defaults: the paper's recipe for the arch's family)")
    g.add_argument("--epochs", "--num_epochs", "--num-epochs", dest="epochs", type=int, default=None)
    g.add_argument("--batch-size", "--train_batch_size", "--train-batch-size", dest="batch_size",
                   type=int, default=None, help="global batch size (over all devices and hosts)")
    g.add_argument("--eval-batch-size", "--eval_batch_size", dest="eval_batch_size", type=int,
                   default=None, help="global eval batch (default: --batch-size)")
    g.add_argument("--optimizer", default=None, choices=["sgd", "adamw"])
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, used as given (default: CIFAR 0.1; ResNet 0.1 x "
                        "batch/256; DeiT 5e-4 x batch/512)")
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--nesterov", type=_bool, nargs="?", const=True, default=None)
    g.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=None,
                   help="decoupled for AdamW, L2 for SGD; never on BatchNorm/LayerNorm/bias, "
                        "cls token, position embedding")
    g.add_argument("--label-smoothing", "--label_smoothing", dest="label_smoothing", type=float,
                   default=None)
    g.add_argument("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=float,
                   default=None)
    g.add_argument("--warmup-lr", type=float, default=None, help="lr at the start of warm-up")
    g.add_argument("--min-lr", type=float, default=None, help="lr at the end of the cosine")
    g.add_argument("--lr-schedule", default=None, choices=["cosine_epoch", "cosine_step", "constant"],
                   help="cosine_epoch: lr constant within an epoch (PyTorch CosineAnnealingLR "
                        "stepped per epoch); cosine_step: per step")
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (0: off)")
    g.add_argument("--drop-path", type=float, default=None, help="DeiT stochastic depth rate")
    g.add_argument("--clip-grad", type=float, default=0.0, help="global-norm clip (0: off)")
    g.add_argument("--repeated-aug", type=int, default=None,
                   help="repeated augmentation: copies of each example per epoch (1: off)")
    if script == "imagenet":
        g.add_argument("--reprob", type=float, default=None,
                       help="random erasing probability (timm, pixel mode)")
        g.add_argument("--randaug-magnitude", type=float, default=None,
                       help="RandAugment magnitude (timm rand-mM-mstd0.5-inc1; 0: off)")
        g.add_argument("--randaug-ops", type=int, default=2, help="RandAugment ops per image")
        g.add_argument("--interpolation", default=None, choices=["bilinear", "bicubic"],
                       help="resampling of the train crop and eval resize (ResNet: bilinear, "
                            "DeiT: bicubic)")

    g = p.add_argument_group("N:M sparsity")
    g.add_argument("--method", default="bimask", choices=["dense", "srste", "transposable", "bimask"])
    g.add_argument("--n", "--N", dest="n", type=int, default=2, help="N of N:M")
    g.add_argument("--m", "--M", dest="m", type=int, default=4, help="M of N:M")
    g.add_argument("--refresh-every", "--iter", dest="refresh_every", type=int, default=100,
                   help="Bi-Mask: steps between permutation searches")
    g.add_argument("--num-candidates", "--greedy_num", dest="num_candidates", type=int, default=100,
                   help="Bi-Mask: random permutations tried per search")
    g.add_argument("--decay", type=float, default=2e-4,
                   help="SR-STE decay on pruned weights (srste, transposable, bimask)")
    g.add_argument("--search", default="random", choices=["auto", "random", "stripe", "swap"],
                   help="Bi-Mask permutation search: random (the paper's, --num-candidates "
                        "candidates), stripe/swap (local search, --search-iterations), auto "
                        "(the library default: stripe for m <= 6)")
    g.add_argument("--search-iterations", type=int, default=100,
                   help="Bi-Mask: iterations of a stripe/swap search per refresh")
    g.add_argument("--kernels", default="xla", choices=["xla", "pallas"],
                   help="sparse matmul backend (pallas: the 2:4 GPU kernels)")

    g = p.add_argument_group("run")
    g.add_argument("--run-dir", "--job_dir", "--job-dir", dest="run_dir", default=None,
                   help="checkpoints, metrics.jsonl, config.json (default runs/<script>-<arch>-<method>)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true",
                   help="continue exactly from the latest checkpoint in --run-dir")
    g.add_argument("--ckpt-every-steps", type=int, default=0,
                   help="also checkpoint every this many steps (0: only at epoch ends)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="recent checkpoints kept "
                   "(the best one is kept apart)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every this many epochs")
    g.add_argument("--log-every", type=int, default=50, help="steps between metric lines")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events "
                   "(needs tensorboardX)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (cluster "
                        "auto-detection, or the three flags below)")
    g.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--stop-after-steps", type=int, default=0,
                   help="checkpoint and exit after this global step (simulates pre-emption)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--eval-export", action="store_true",
                   help="sparse methods: also evaluate the exported (masked, unwrapped) weights")
    g.add_argument("--fast-compile", action="store_true",
                   help="compile the train/eval steps without XLA backend optimisation (much "
                        "faster compiles, slower steps: smoke runs and tests on CPU)")
    del a
    return p


def apply_recipe(cfg: argparse.Namespace, family: str) -> argparse.Namespace:
    """Fill every ``None`` recipe flag of ``cfg`` from the recipe of ``family`` (in place; also
    returned). ``family`` in "cifar_resnet", "vgg", "mobilenetv2", "resnet", "deit"."""
    if family in ("cifar_resnet", "vgg", "mobilenetv2"):
        recipe = dict(CIFAR_RECIPE)
    elif family == "resnet":
        recipe = dict(RESNET_RECIPE)
    elif family == "deit":
        recipe = dict(DEIT_RECIPE)
    else:
        raise ValueError(f"unknown model family {family!r}")
    per256, per512 = recipe.pop("lr_per_256", None), recipe.pop("lr_per_512", None)
    for key, value in recipe.items():
        if key in vars(cfg) and getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.lr is None:
        cfg.lr = per256 * cfg.batch_size / 256 if per256 else per512 * cfg.batch_size / 512
    if cfg.eval_batch_size is None:
        cfg.eval_batch_size = cfg.batch_size
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not 0 < cfg.n <= cfg.m:
        raise ValueError(f"N:M needs 0 < n <= m, got n={cfg.n}, m={cfg.m}")
    return cfg
