"""Train a CIFAR model (the reference's resnet32_cifar10, vgg19_cifar10, mobilenetv2; standard
ResNet-20/32/56, VGG-19, MobileNetV2) with N:M sparsity or dense.

    python -m train.cifar --arch resnet32_cifar10 --data_path /data/cifar10 --job_dir runs/r32
    python -m train.cifar --dataset digits --arch resnet20 --epochs 10      # no download

(from the repository root; in code: ``train(configure(dataset="digits", epochs=10))``).

Data: an ImageFolder root (``train/`` and ``val/`` or ``test/``), the official CIFAR-10/100
python-pickle directory, or ``--dataset digits``. Defaults: the reference code's (``cifar.py`` with
its README flags): 300 epochs, batch 256, SGD 0.9, lr 0.1 cosine per epoch, weight decay 1e-3 on
every parameter not named ``bn*``, label smoothing 0.1, crop 4 + flip, std (0.2023, 0.1994,
0.2010), ``k_order="ihw"``, G = 10 fresh candidates per search (incumbent discarded), first search
at step 0, BatchNorm statistics over the whole batch (the reference's commands run on one GPU;
``--bn-groups R``: per group of batch/R, as R GPUs). ``train/README.md`` lists each with the flag
for the alternative.
"""

from __future__ import annotations

import os

from train import config as config_lib
from train import data as data_lib
from train import loop
from train.models import CIFAR_FAMILIES, arch_family, create_model


def build_data(cfg) -> loop.DataSpec:
    """The DataSpec of ``cfg.dataset`` / ``cfg.data_path`` with CIFAR augmentation (random crop
    of the 4-pixel zero-padded image + horizontal flip; digits: 1-pixel crop, no flip) and
    normalisation (CIFAR mean, ``cfg.cifar_std``; digits: their own mean and std)."""
    kind = cfg.dataset
    if kind == "digits":
        train, test = data_lib.load_digits_split()
        size = cfg.image_size or 8
        if size != 8:
            raise ValueError(f"--image-size must be 8 for --dataset digits, got {size}")
        aug = data_lib.SmallImage(size, 1, padding=1, flip=False)
        ev = data_lib.SmallImage(size, 1)
        mean, std = (float(train.images.mean() / 255),), (float(train.images.std() / 255),)
        return loop.DataSpec(data_lib.elements(train), data_lib.elements(test), aug,
                             _Eval(ev), 10, size, 1, mean, std, "sklearn digits 8x8")
    if not cfg.data_path:
        raise ValueError("--data-path is required (or --dataset digits)")
    if not os.path.isdir(cfg.data_path):
        raise ValueError(f"data directory {cfg.data_path!r} does not exist")
    size = cfg.image_size or 32
    if kind == "cifar-pickle" or (kind == "auto" and data_lib.is_cifar_pickle_dir(cfg.data_path)):
        train, test = data_lib.load_cifar_pickle(cfg.data_path)
        if size != 32:
            raise ValueError(f"--image-size must be 32 for CIFAR pickles, got {size}")
        name = f"CIFAR pickle {cfg.data_path}"
        classes = train.classes
    else:
        train = data_lib.scan_image_folder(os.path.join(cfg.data_path, "train"))
        test = data_lib.scan_image_folder(data_lib.find_val_split(cfg.data_path))
        data_lib.check_same_classes(train.classes, test.classes)
        name = f"ImageFolder {cfg.data_path}"
        classes = train.classes
    pad = max(1, round(4 * size / 32))
    aug = data_lib.SmallImage(size, 3, padding=pad, flip=True, on_corrupt=cfg.on_corrupt)
    ev = data_lib.SmallImage(size, 3, on_corrupt=cfg.on_corrupt)
    return loop.DataSpec(data_lib.elements(train), data_lib.elements(test), aug, _Eval(ev),
                         len(classes), size, 3, data_lib.CIFAR_MEAN,
                         data_lib.CIFAR_STDS[getattr(cfg, "cifar_std", "reference")], name)


class _Eval:
    """Picklable eval transform: the small-image loader without augmentation."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, element):
        return self.transform(element, None)


def _with_recipe(cfg):
    family = arch_family(cfg.arch)
    if family not in CIFAR_FAMILIES:
        raise ValueError(f"--arch {cfg.arch} is an ImageNet model; use train.imagenet")
    return config_lib.apply_recipe(cfg, family)


def configure(**settings):
    """The configuration of ``python -m train.cifar`` with ``settings`` (argparse dests, e.g.
    ``dataset="digits", epochs=15``) instead of flags, the recipe applied; checked like flags."""
    return _with_recipe(config_lib.make("cifar", **settings))


def parse(argv=None):
    """The configuration from command-line flags, the recipe applied."""
    return _with_recipe(config_lib.build_parser("cifar").parse_args(argv))


def train(cfg) -> dict:
    """Build data and model for ``cfg`` and train; returns the run summary."""
    loop.init_distributed(cfg)
    data = build_data(cfg)
    import jax.numpy as jnp

    spec = create_model(cfg.arch, data.num_classes, width_mult=cfg.width_mult,
                        dtype=jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
                        bn_groups=getattr(cfg, "bn_groups", 1))
    return loop.run(cfg, spec.module, spec.dense_layers, data, script="cifar")


def main(argv=None) -> dict:
    """Parse flags, build data and model, train; returns the run summary."""
    return train(parse(argv))


if __name__ == "__main__":
    loop.cli(main, "python -m train.cifar")
