"""Train an ImageNet model (ResNet-18/34/50, DeiT-Tiny/Small) with N:M sparsity or dense.

    python -m train.imagenet --arch resnet50 --data_path /data/imagenet --job_dir runs/r50 \\
        --workers 16
    python -m train.imagenet --arch vit_deit_small_patch16_224 --data_path /data/imagenet

Data: an ImageFolder root with ``train/`` and ``val/`` class folders (JPEG). Training crops:
RandomResizedCrop(image_size) + flip; eval: resize to eval_resize (shorter side), center crop.
Defaults: the reference code's (ResNet: ``imagenet.py`` with its README flags: 120 epochs, SGD,
lr 0.1 whatever the batch, per-step linear warm-up over 5 epochs times a per-epoch cosine, wd 1e-4
on every parameter not named ``bn*``, label smoothing 0.1, PCA lighting 0.1, G = 100, first search
at step 99; DeiT: ``main.py``: 300 epochs, AdamW 5e-4 x batch/512, wd 0.05, timm's per-epoch
warm-up and cosine to 1e-5, drop-path 0.1, mixup 0.8 / cutmix 1.0, SR-STE decay 2e-4 x 256).
ResNet BatchNorm statistics are over the whole batch (the reference's commands run on one GPU;
``--bn-groups R``: per group of batch/R, as R GPUs).
``train/README.md`` lists each with the flag for the alternative.
"""

from __future__ import annotations

import os

from train import config as config_lib
from train import data as data_lib
from train import loop
from train.models import IMAGENET_FAMILIES, arch_family, create_model


def build_data(cfg) -> loop.DataSpec:
    """ImageFolder train/val DataSpec with ImageNet augmentation (``cfg.lighting``: PCA lighting
    noise) and normalisation."""
    if not cfg.data_path:
        raise ValueError("--data-path is required")
    if not os.path.isdir(cfg.data_path):
        raise ValueError(f"data directory {cfg.data_path!r} does not exist")
    train = data_lib.scan_image_folder(os.path.join(cfg.data_path, "train"))
    val = data_lib.scan_image_folder(data_lib.find_val_split(cfg.data_path))
    data_lib.check_same_classes(train.classes, val.classes)
    size = cfg.image_size or 224
    resize = cfg.eval_resize or int(round(size * 256 / 224))
    if resize < size:
        raise ValueError(f"--eval-resize {resize} must be >= --image-size {size}")
    aug = data_lib.DecodeTrain(size, 3, on_corrupt=cfg.on_corrupt, erase_prob=cfg.reprob,
                               interpolation=cfg.interpolation,
                               randaug_magnitude=cfg.randaug_magnitude, randaug_ops=cfg.randaug_ops,
                               lighting=getattr(cfg, "lighting", 0.0))
    ev = data_lib.DecodeEval(size, resize, 3, on_corrupt=cfg.on_corrupt,
                             interpolation=cfg.interpolation)
    return loop.DataSpec(data_lib.elements(train), data_lib.elements(val), aug, ev,
                         len(train.classes), size, 3, data_lib.IMAGENET_MEAN,
                         data_lib.IMAGENET_STD, f"ImageFolder {cfg.data_path}")


def _with_recipe(cfg):
    family = arch_family(cfg.arch)
    if family not in IMAGENET_FAMILIES:
        raise ValueError(f"--arch {cfg.arch} is a CIFAR model; use train.cifar")
    return config_lib.apply_recipe(cfg, family)


def configure(**settings):
    """The configuration of ``python -m train.imagenet`` with ``settings`` (argparse dests)
    instead of flags, the recipe applied; checked like flags."""
    return _with_recipe(config_lib.make("imagenet", **settings))


def parse(argv=None):
    """The configuration from command-line flags, the recipe applied."""
    return _with_recipe(config_lib.build_parser("imagenet").parse_args(argv))


def train(cfg) -> dict:
    """Build data and model for ``cfg`` and train; returns the run summary."""
    loop.init_distributed(cfg)
    data = build_data(cfg)
    import jax.numpy as jnp

    spec = create_model(cfg.arch, data.num_classes, width_mult=cfg.width_mult, depth=cfg.depth,
                        patch_size=cfg.patch_size, drop_path=cfg.drop_path,
                        dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
                        bn_groups=getattr(cfg, "bn_groups", 1))
    return loop.run(cfg, spec.module, spec.dense_layers, data, script="imagenet")


def main(argv=None) -> dict:
    """Parse flags, build data and model, train; returns the run summary."""
    return train(parse(argv))


if __name__ == "__main__":
    loop.cli(main, "python -m train.imagenet")
