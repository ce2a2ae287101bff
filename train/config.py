"""Command-line flags of ``train/cifar.py`` and ``train/imagenet.py``, the PyTorch reference's flag
names as aliases, and the reference code's recipes as defaults.

The recipes are data (:class:`Recipe`, one frozen instance per family). Every recipe flag defaults
to ``None`` on the command line and :func:`apply_recipe` returns a new configuration with those
filled from the architecture's recipe, so any flag the user passes wins over the recipe. Every
numeric flag is checked when parsed (argparse names the flag); :func:`make` builds the same
configuration from keyword arguments, with the same checks, for code (the quickstart).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """One training recipe: the default of every recipe flag (keys are argparse dests). ``lr`` is
    absolute, or None with ``lr_per_256`` / ``lr_per_512`` (linear scaling with the batch).

    Bi-Mask settings: ``num_candidates`` (the reference's ``greedy_num`` G), ``decay`` (SR-STE),
    ``first_refresh`` (``"start"``: searches at steps s with ``s % I == 0``, first at step 0;
    ``"end"``: ``s % I == I - 1``, first at step I - 1, identity permutation until then).
    ``wd_rule``: which parameters get weight decay (``"bn_name"``: every parameter whose path has
    no ``"bn"``, the reference's rule; ``"kernels"``: kernels only, no decay on norms, biases, cls
    token, position embedding). ``lighting``: std of the PCA lighting noise (0: off)."""

    epochs: int
    batch_size: int
    optimizer: str
    weight_decay: float
    warmup_epochs: float
    warmup_lr: float
    min_lr: float
    lr_schedule: str
    lr: float | None = None
    lr_per_256: float | None = None
    lr_per_512: float | None = None
    momentum: float = 0.9
    nesterov: bool = False
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    drop_path: float = 0.0
    repeated_aug: int = 1
    reprob: float = 0.0
    randaug_magnitude: float = 0.0
    interpolation: str = "bilinear"
    num_candidates: int = 100
    decay: float = 2e-4
    wd_rule: str = "bn_name"
    lighting: float = 0.0
    first_refresh: str = "start"

    def peak_lr(self, batch_size: int) -> float:
        """The recipe's learning rate for a global batch of ``batch_size``."""
        if self.lr is not None:
            return self.lr
        if self.lr_per_256 is not None:
            return self.lr_per_256 * batch_size / 256
        return self.lr_per_512 * batch_size / 512


# The reference's recipes (zyxxmu/Bi-Mask: CnnModels/cifar.py and imagenet.py with the flags of its
# README commands; DeiT/main.py with DeiT's defaults). train/README.md's fidelity table lists each
# setting, the reference's value and the flag for ours.
CIFAR_RECIPE = Recipe(epochs=300, batch_size=256, optimizer="sgd", lr=0.1, weight_decay=1e-3,
                      warmup_epochs=0, warmup_lr=0.0, min_lr=0.0, lr_schedule="cosine_epoch",
                      num_candidates=10)
RESNET_RECIPE = Recipe(epochs=120, batch_size=256, optimizer="sgd", lr=0.1,
                       weight_decay=1e-4, warmup_epochs=5, warmup_lr=0.0, min_lr=0.0,
                       lr_schedule="imagenet_ref", lighting=0.1, first_refresh="end")
DEIT_RECIPE = Recipe(epochs=300, batch_size=1024, optimizer="adamw", lr_per_512=5e-4,
                     weight_decay=0.05, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
                     lr_schedule="timm_epoch", mixup=0.8, cutmix=1.0, drop_path=0.1,
                     repeated_aug=3, reprob=0.25, randaug_magnitude=9.0, interpolation="bicubic",
                     decay=2e-4 * 256, wd_rule="kernels")

# Choices of the recipe's string settings.
LR_SCHEDULES = ("cosine_epoch", "cosine_step", "imagenet_ref", "timm_epoch", "constant")
WD_RULES = ("bn_name", "kernels")
FIRST_REFRESH = ("start", "end")
K_ORDERS = ("ihw", "hwi")
WGRADS = ("dense", "mvue")
MASK_UPDATES = ("step", "refresh")
RECIPES = {"cifar_resnet": CIFAR_RECIPE, "vgg": CIFAR_RECIPE, "mobilenetv2": CIFAR_RECIPE,
           "resnet": RESNET_RECIPE, "deit": DEIT_RECIPE}

# Settings that may change when a run is resumed (how it runs, logs and checkpoints, not what it
# computes); every other setting is compared with the checkpoint's on --resume.
RUN_SETTINGS = frozenset({
    "run_dir", "resume", "resume_override", "workers", "prefetch", "no_progress", "tensorboard",
    "distributed", "coordinator_address", "num_processes", "process_id", "stop_after_steps",
    "eval_export", "log_every", "ckpt_every_steps", "keep_checkpoints", "eval_every",
    "eval_batch_size", "fast_compile", "data_path", "xla_cpu_conv",
})


# --------------------------------------------------------------------------------------------
# Numeric flag rules: argparse types (the error names the flag) and the same checks for
# configurations built in code (:func:`make`).
# --------------------------------------------------------------------------------------------


def _number(kind, *, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse ``type``: parse with ``kind`` (int or float), reject NaN/inf and values outside
    ``[lo, hi]`` (``lo_open`` / ``hi_open``: exclusive bounds)."""
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if isinstance(text, bool) or (kind is int and isinstance(text, float)):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        below = lo is not None and (value <= lo if lo_open else value < lo)
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            what = "an integer" if kind is int else "a number"
            if hi is None:
                rule = f"{what} {'>' if lo_open else '>='} {lo}"
            else:
                rule = f"{what} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid <name> value" fallback
    return parse


POSITIVE_INT = _number(int, lo=1)
NONNEG_INT = _number(int, lo=0)
NONNEG_FLOAT = _number(float, lo=0.0)
FRACTION = _number(float, lo=0.0, hi=1.0)
ANY_INT = _number(int)


RULES = {
    "image_size": POSITIVE_INT, "eval_resize": POSITIVE_INT, "depth": POSITIVE_INT,
    "patch_size": POSITIVE_INT, "width_mult": _number(float, lo=0.0, lo_open=True),
    "workers": NONNEG_INT, "prefetch": POSITIVE_INT, "epochs": POSITIVE_INT,
    "batch_size": POSITIVE_INT, "eval_batch_size": POSITIVE_INT, "lr": NONNEG_FLOAT,
    "momentum": _number(float, lo=0.0, hi=1.0, hi_open=True), "weight_decay": NONNEG_FLOAT,
    "label_smoothing": FRACTION, "warmup_epochs": NONNEG_FLOAT, "warmup_lr": NONNEG_FLOAT,
    "min_lr": NONNEG_FLOAT, "mixup": NONNEG_FLOAT, "cutmix": NONNEG_FLOAT,
    "drop_path": _number(float, lo=0.0, hi=1.0, hi_open=True), "clip_grad": NONNEG_FLOAT,
    "repeated_aug": POSITIVE_INT, "reprob": FRACTION, "randaug_magnitude": NONNEG_FLOAT,
    "randaug_ops": NONNEG_INT, "n": POSITIVE_INT, "m": POSITIVE_INT,
    "refresh_every": POSITIVE_INT, "num_candidates": NONNEG_INT, "decay": NONNEG_FLOAT,
    "search_iterations": POSITIVE_INT, "seed": NONNEG_INT, "ckpt_every_steps": NONNEG_INT,
    "keep_checkpoints": POSITIVE_INT, "eval_every": POSITIVE_INT, "log_every": POSITIVE_INT,
    "num_processes": POSITIVE_INT, "process_id": NONNEG_INT, "stop_after_steps": NONNEG_INT,
    "lighting": NONNEG_FLOAT, "dense_finish": _number(float, lo=0.0, hi=1.0, hi_open=True),
    "bn_groups": POSITIVE_INT,
}


def _keys(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip().replace("-", "_") for k in str(text).split(",") if k.strip())
    if not keys:
        raise argparse.ArgumentTypeError("expected KEY[,KEY...]")
    return keys


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
        prog=f"python -m train.{script}",
        description=("Train a CIFAR model (the reference's resnet32_cifar10, vgg19_cifar10, "
                     "mobilenetv2; standard ResNet-20/32/56, VGG-19, MobileNetV2)" if script == "cifar"
                     else "Train an ImageNet model (ResNet-18/34/50, DeiT-Tiny/Small)")
        + " with N:M sparsity (Bi-Mask, SR-STE, S-STE, transposable masks) or dense. Defaults "
          "reproduce the Bi-Mask reference code (train/README.md: fidelity table).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    g = p.add_argument_group("model and data")
    g.add_argument("--arch", default="resnet32_cifar10" if script == "cifar" else "resnet50",
                   help="architecture: the reference's networks under its names (resnet32_cifar10, "
                        "vgg19_cifar10, mobilenetv2, resnet18, resnet50, "
                        "vit_deit_small_patch16_224), the standard ones under theirs (resnet20, "
                        "resnet32, vgg19, mobilenet_v2, tv_resnet50, deit_small)")
    g.add_argument("--data-path", "--data_path", dest="data_path", default=None,
                   help="ImageFolder root with train/ and val/ (or test/) class folders"
                        + (", or a CIFAR-10/100 python-pickle directory" if script == "cifar" else ""))
    if script == "cifar":
        g.add_argument("--dataset", default="auto", choices=["auto", "imagefolder", "cifar-pickle",
                                                              "digits"],
                       help="auto: CIFAR pickle if --data-path holds one, else ImageFolder; "
                            "digits: scikit-learn's bundled 8x8 digits (no download)")
        g.add_argument("--cifar-std", default="reference", choices=["reference", "cifar10"],
                       help="normalisation std: reference (0.2023, 0.1994, 0.2010), the reference "
                            "code's; cifar10 (0.2470, 0.2435, 0.2616), the CIFAR-10 training set's "
                            "per-channel std (mean (0.4914, 0.4822, 0.4465) either way)")
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
    g.add_argument("--bn-groups", type=int, default=1, metavar="R",
                   help="BatchNorm training statistics per group of batch/R consecutive samples "
                        "(PyTorch's per-GPU BatchNorm, the batch split in order over R GPUs; the "
                        "running averages follow the first group, as nn.DataParallel's device-0 "
                        "replica). 1: over the whole global batch (synchronised BN). The "
                        "reference's README commands run on one GPU (its --gpus default is a "
                        "single id): R 1 reproduces them; a reference run with --gpus over k GPUs "
                        "is R k. --batch-size must be divisible by R; CNNs only (DeiT has no "
                        "BatchNorm)")
    g.add_argument("--workers", type=int, default=0,
                   help="grain worker processes for decode + augmentation (0: in-process)")
    g.add_argument("--prefetch", type=int, default=4, help="batches prefetched per worker")
    g.add_argument("--on-corrupt", default="fail", choices=["fail", "skip"],
                   help="an undecodable image: stop with its path, or skip it and count it")

    g = p.add_argument_group("recipe (defaults: the reference's recipe for the arch's family)")
    g.add_argument("--epochs", "--num_epochs", "--num-epochs", dest="epochs", type=int, default=None)
    g.add_argument("--batch-size", "--train_batch_size", "--train-batch-size", dest="batch_size",
                   type=int, default=None, help="global batch size (over all devices and hosts)")
    g.add_argument("--eval-batch-size", "--eval_batch_size", dest="eval_batch_size", type=int,
                   default=None, help="global eval batch (default: --batch-size)")
    g.add_argument("--optimizer", default=None, choices=["sgd", "adamw"])
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, used as given (default: CIFAR and ResNet 0.1, not "
                        "scaled with the batch, as the reference; DeiT 5e-4 x batch/512)")
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--nesterov", type=_bool, nargs="?", const=True, default=None)
    g.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=None,
                   help="decoupled for AdamW, L2 for SGD; on the parameters --wd-rule selects")
    g.add_argument("--wd-rule", default=None, choices=list(WD_RULES),
                   help="bn_name: decay every parameter whose path has no 'bn' (the reference CNN "
                        "scripts' rule: BatchNorms not named bn*, and biases, are decayed); "
                        "kernels: no decay on norms, biases, cls token, position embedding (timm's "
                        "rule). Default: bn_name for CNNs, kernels for DeiT")
    g.add_argument("--label-smoothing", "--label_smoothing", dest="label_smoothing", type=float,
                   default=None)
    g.add_argument("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=float,
                   default=None)
    g.add_argument("--warmup-lr", type=float, default=None, help="lr at the start of warm-up")
    g.add_argument("--min-lr", type=float, default=None, help="lr at the end of the cosine")
    g.add_argument("--lr-schedule", default=None, choices=list(LR_SCHEDULES),
                   help="cosine_epoch: per-step linear warm-up, then cosine constant within an "
                        "epoch (CosineAnnealingLR stepped per epoch: the reference's CIFAR); "
                        "cosine_step: warm-up and cosine per step; imagenet_ref: the reference's "
                        "imagenet.py adjust_learning_rate (per-epoch cosine from epoch "
                        "--warmup-epochs, times a per-step linear warm-up factor before it); "
                        "timm_epoch: timm's CosineLRScheduler per epoch as DeiT's main.py steps it")
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
        g.add_argument("--lighting", type=float, default=None,
                       help="PCA lighting noise std (the reference's ColorAugmentation: its "
                            "eigenvalues and vectors, added before normalisation; 0: off). "
                            "Default: 0.1 for ResNets, 0 for DeiT")

    g = p.add_argument_group("N:M sparsity")
    g.add_argument("--method", default="bimask",
                   choices=["dense", "srste", "transposable", "bimask", "sste"],
                   help="sste: S-STE (Hu et al., NeurIPS 2024), a continuous soft-threshold "
                        "2:4 weight with a per-layer scale fixed at init; the library applies "
                        "no SR-STE decay to it (--decay is ignored)")
    g.add_argument("--n", "--N", dest="n", type=int, default=2, help="N of N:M")
    g.add_argument("--m", "--M", dest="m", type=int, default=4, help="M of N:M")
    g.add_argument("--refresh-every", "--iter", dest="refresh_every", type=int, default=100,
                   help="Bi-Mask: steps between permutation searches; transposable with "
                        "--mask-update refresh: steps between mask recomputations")
    g.add_argument("--num-candidates", "--greedy_num", dest="num_candidates", type=int,
                   default=None, help="Bi-Mask: random permutations tried per search (default: "
                   "the reference's, CIFAR 10, ImageNet 100)")
    g.add_argument("--decay", type=float, default=None,
                   help="SR-STE decay on pruned weights (srste, transposable, bimask). Default "
                        "2e-4; DeiT 2e-4 x 256 = 0.0512, the reference DeiT's effective value "
                        "(its per-sample decay term is summed over the per-GPU batch of 256); "
                        "--decay 2e-4 gives the batch-independent value")
    g.add_argument("--k-order", default="ihw", choices=list(K_ORDERS),
                   help="how a conv kernel is read as a matrix for the masks: ihw, the "
                        "reference's (PyTorch's (Cin, kh, kw) flatten, groups straddling output "
                        "channels; 3-channel stems sparse); hwi, groups along Cin at each tap "
                        "(what an NHWC 2:4 conv kernel needs; the library's default)")
    g.add_argument("--keep-incumbent", type=_bool, nargs="?", const=True, default=None,
                   help="Bi-Mask random search: keep the current permutation unless a candidate "
                        "is strictly better (ours). Default false with --search random (the "
                        "reference: the best of the fresh candidates replaces it); the local "
                        "searches always start from it")
    g.add_argument("--first-refresh", default=None, choices=list(FIRST_REFRESH),
                   help="Bi-Mask search steps: start, s %% I == 0 (first at step 0: the reference's "
                        "CIFAR and DeiT); end, s %% I == I-1 (first at step I-1, identity "
                        "permutation until then: the reference's imagenet.py). Default: end for "
                        "ImageNet ResNets, start otherwise")
    g.add_argument("--search", default="random", choices=["auto", "random", "stripe", "swap"],
                   help="Bi-Mask permutation search: random (the reference's, --num-candidates "
                        "candidates), stripe/swap (local search, --search-iterations), auto "
                        "(the library default: stripe for m <= 6)")
    g.add_argument("--search-iterations", type=int, default=100,
                   help="Bi-Mask: iterations of a stripe/swap search per refresh")
    g.add_argument("--kernels", default="xla", choices=["xla", "pallas"],
                   help="sparse matmul backend (pallas: the 2:4 GPU kernels)")
    add_method_options(
        g, flips_logged="in the train lines of metrics.jsonl, per layer in the per-epoch "
        "sparsity line", refresh_steps="the refresh steps (--refresh-every, --first-refresh; "
        "their schedule: --refresh-every 40 --first-refresh start, steps 0, 40, 80, ...)")

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
    g.add_argument("--xla-cpu-conv", default="auto", choices=["auto", "ynn", "eigen"],
                   help="XLA:CPU convolution path (train/xla_cpu.py): auto picks Eigen on x86-64 "
                        "without AVX-512 (YNNPACK measured 2-12x slower there), else XLA's default "
                        "YNNPACK; GPU/TPU untouched")
    g.add_argument("--resume-override", type=_keys, default=(), metavar="KEY[,KEY]",
                   help="--resume: accept these settings differing from the checkpoint's (e.g. "
                        "epochs,lr); any other difference stops the resume")
    del a
    for action in p._actions:  # every numeric flag gets its rule (the error names the flag)
        if action.type in (int, float):
            action.type = RULES[action.dest]
    return p


def apply_recipe(cfg: argparse.Namespace, family: str) -> argparse.Namespace:
    """A new configuration: ``cfg`` with every ``None`` recipe setting filled from the recipe of
    ``family`` ("cifar_resnet", "vgg", "mobilenetv2", "resnet", "deit"); ``cfg`` is not changed.
    Also checks the rules between flags (``0 < n <= m``; ``--bn-groups`` divides ``--batch-size``,
    and is 1 for DeiT)."""
    if family not in RECIPES:
        raise ValueError(f"unknown model family {family!r}")
    recipe = RECIPES[family]
    values = dict(vars(cfg))
    for field in dataclasses.fields(Recipe):
        if field.name in values and values[field.name] is None:
            values[field.name] = getattr(recipe, field.name)
    if values["lr"] is None:
        values["lr"] = recipe.peak_lr(values["batch_size"])
    if "keep_incumbent" in values and values["keep_incumbent"] is None:
        # The reference's policy belongs to the random search; the local searches start from the
        # incumbent by construction.
        values["keep_incumbent"] = values.get("search") != "random"
    if values.get("keep_incumbent") is False and values.get("search") != "random":
        raise ValueError(f"--keep-incumbent false is a policy of --search random (the local "
                         f"searches start from the incumbent), got --search {values['search']}")
    if values["lr_schedule"] == "imagenet_ref" and values["warmup_epochs"] == values["epochs"]:
        raise ValueError(f"--lr-schedule imagenet_ref divides by --epochs - --warmup-epochs (its "
                         f"cosine's length): they must differ, both are {values['epochs']}")
    if values["lr_schedule"] == "imagenet_ref" and values["warmup_lr"] != 0:
        raise ValueError(f"--lr-schedule imagenet_ref warms up by a factor (1 + step) / (warm-up "
                         f"steps), not from --warmup-lr: pass --warmup-lr 0 (got "
                         f"{values['warmup_lr']})")
    if values.get("eval_batch_size") is None:
        values["eval_batch_size"] = values["batch_size"]
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if values[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {values[name]}")
    groups = values.get("bn_groups", 1)
    if groups != 1 and family == "deit":
        raise ValueError(f"--bn-groups {groups}: DeiT has no BatchNorm; --bn-groups must be 1")
    if values["batch_size"] % groups:
        raise ValueError(f"--batch-size {values['batch_size']} is not divisible by --bn-groups "
                         f"{groups}: every BatchNorm group needs batch/R samples")
    if not 0 < values["n"] <= values["m"]:
        raise ValueError(f"--n/--m: N:M needs 0 < n <= m, got n={values['n']}, m={values['m']}")
    check_method_options(values)
    return argparse.Namespace(**values)


def add_method_options(g, *, flips_logged: str, refresh_steps: str) -> None:
    """Adds the options of the methods after Bi-Mask (``--wgrad``, ``--dense-finish``,
    ``--track-flips``, ``--mask-update``) to the argument group ``g``: one definition for the CNN
    scripts and ``train/lm.py``. ``flips_logged``: where the flip rates go (after "the
    aggregate"); ``refresh_steps``: the steps at which ``--mask-update refresh`` recomputes."""
    g.add_argument("--wgrad", default="dense", choices=list(WGRADS),
                   help="weight-gradient product of the sparse layers: dense, or mvue (its output "
                        "gradient replaced by an unbiased N:M estimate along the examples: batch, "
                        "positions, tokens; Chmiel et al., ICLR 2023; a fresh key every step; "
                        "needs n <= 2). With bimask or transposable, all three products of a "
                        "layer are N:M")
    g.add_argument("--dense-finish", type=RULES["dense_finish"], default=0.0, metavar="FRACTION",
                   help="train the last FRACTION of the steps dense (Hu et al., ICML 2024): from "
                        "step total - round(FRACTION x total) on, the sparse layers run dense "
                        "products of their raw kernels (no masks, decay, refreshes or MVUE); "
                        "evaluation and export after the switch are dense too. 0: off")
    g.add_argument("--track-flips", action="store_true",
                   help="log the forward-mask flip rate (fraction of mask entries that changed "
                        f"in a step; Hu et al., ICML 2024): the aggregate {flips_logged} (one "
                        "bool per kernel entry kept in the checkpointed state)")
    g.add_argument("--mask-update", default="step", choices=list(MASK_UPDATES),
                   help="transposable: step, the mask recomputed from the kernel at every step; "
                        "refresh, Hu et al.'s (ICML 2024) periodic update: the mask is kept in "
                        "the checkpointed state (one bool per kernel entry) and recomputed only "
                        f"at {refresh_steps}")


def check_method_options(values: dict) -> None:
    """The rules between the method flags (ValueError naming the flag), for the CNN scripts and
    ``train/lm.py``: ``--wgrad``, ``--dense-finish`` and ``--track-flips`` need a sparse method,
    ``--mask-update refresh`` needs ``--method transposable``, ``--wgrad mvue`` needs ``n <= 2``.
    ``values``: argparse dests; settings missing from an older run's configuration count as off."""
    method = values.get("method", "bimask")
    if method == "dense":
        for name, off in (("wgrad", "dense"), ("dense_finish", 0.0), ("track_flips", False)):
            if values.get(name, off) != off:
                raise ValueError(f"--{name.replace('_', '-')} is an option of the sparse methods, "
                                 f"got --method dense")
    if values.get("mask_update", "step") == "refresh" and method != "transposable":
        raise ValueError(f"--mask-update refresh (Hu et al.'s periodic update of the stored "
                         f"transposable mask) needs --method transposable, got --method {method}")
    if values.get("wgrad", "dense") == "mvue" and values["n"] > 2:
        raise ValueError(f"--wgrad mvue keeps 1 or 2 of every m output-gradient entries: it needs "
                         f"--n <= 2, got --n {values['n']}")


def make(script: str, **settings) -> argparse.Namespace:
    """The configuration ``script`` ("cifar" or "imagenet") would parse from flags, built from
    keyword arguments (argparse dests, e.g. ``make("cifar", dataset="digits", epochs=15)``):
    the parser's defaults, then ``settings``, each numeric one checked by the same rule as its
    flag (ValueError naming the flag). The recipe is not applied (see :func:`apply_recipe`)."""
    cfg = vars(build_parser(script).parse_args([]))
    unknown = sorted(set(settings) - set(cfg))
    if unknown:
        raise ValueError(f"unknown settings for train/{script}: {unknown}")
    choices = {a.dest: a.choices for a in build_parser(script)._actions if a.choices}
    for key, value in settings.items():
        if key in choices and value is not None and value not in choices[key]:
            raise ValueError(f"--{key.replace('_', '-')}: {value!r} is not one of "
                             f"{list(choices[key])}")
        if key in RULES and value is not None:
            try:
                value = RULES[key](value)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"--{key.replace('_', '-')}: {e}") from None
        cfg[key] = value
    return argparse.Namespace(**cfg)


def training_settings(cfg) -> dict:
    """The settings of ``cfg`` that define what a run computes (all but :data:`RUN_SETTINGS`),
    JSON-ready: compared with the checkpoint's on ``--resume``."""
    values = cfg if isinstance(cfg, dict) else vars(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(values.items())
            if k not in RUN_SETTINGS}


# Settings added after checkpoints were first written, with the value that older runs computed
# with: a checkpoint without one is read as having it (so such a run still resumes).
LATER_SETTINGS = {"wgrad": "dense", "dense_finish": 0.0, "track_flips": False, "bn_groups": 1,
                  "mask_update": "step"}


def differences(stored: dict, current: dict) -> dict[str, tuple]:
    """``{key: (stored value, current value)}`` for every training setting that differs (a key
    missing on one side counts as a difference with ``None``, except a key of
    :data:`LATER_SETTINGS` missing from ``stored``, which counts as its value there)."""
    stored = {**{k: v for k, v in LATER_SETTINGS.items() if k in current}, **stored}
    keys = set(stored) | set(current)
    return {k: (stored.get(k), current.get(k)) for k in sorted(keys)
            if k not in RUN_SETTINGS and stored.get(k) != current.get(k)}
