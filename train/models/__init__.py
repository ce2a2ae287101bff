"""Model registry: architecture names (ours and the PyTorch reference's) -> linen modules, and the
layers each architecture keeps dense under N:M sparsity (as in the paper)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models import mobilenetv2, resnet_cifar, resnet_imagenet, vgg, vit


@dataclass(frozen=True)
class ModelSpec:
    """A built model: the linen module, the regexes of layers kept dense, and its family
    ("cifar_resnet", "vgg", "mobilenetv2", "resnet", "deit") which selects the recipe."""

    module: nn.Module
    dense_layers: tuple[str, ...]
    family: str


# canonical name -> (family, constructor kwargs)
_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet8": ("cifar_resnet", {"depth": 8}),
    "resnet14": ("cifar_resnet", {"depth": 14}),
    "resnet20": ("cifar_resnet", {"depth": 20}),
    "resnet32": ("cifar_resnet", {"depth": 32}),
    "resnet44": ("cifar_resnet", {"depth": 44}),
    "resnet56": ("cifar_resnet", {"depth": 56}),
    "resnet110": ("cifar_resnet", {"depth": 110}),
    "vgg19": ("vgg", {}),
    "mobilenetv2": ("mobilenetv2", {}),
    "resnet18": ("resnet", {"depth": 18}),
    "resnet34": ("resnet", {"depth": 34}),
    "resnet50": ("resnet", {"depth": 50}),
    "resnet101": ("resnet", {"depth": 101}),
    "deit_tiny": ("deit", {"dim": 192, "depth": 12, "heads": 3}),
    "deit_small": ("deit", {"dim": 384, "depth": 12, "heads": 6}),
}

# Reference (PyTorch Bi-Mask repo) and timm spellings.
_ALIASES = {
    **{f"resnet{d}_cifar{k}": f"resnet{d}" for d in (20, 32, 44, 56, 110) for k in (10, 100)},
    "vgg19_cifar10": "vgg19", "vgg19_cifar100": "vgg19", "vgg19_bn": "vgg19",
    "mobilenetv2_cifar10": "mobilenetv2", "mobilenetv2_cifar100": "mobilenetv2",
    "mobilenet_v2": "mobilenetv2",
    "vit_deit_tiny_patch16_224": "deit_tiny", "deit_tiny_patch16_224": "deit_tiny",
    "vit_deit_small_patch16_224": "deit_small", "deit_small_patch16_224": "deit_small",
}

CIFAR_FAMILIES = ("cifar_resnet", "vgg", "mobilenetv2")
IMAGENET_FAMILIES = ("resnet", "deit")


def canonical_arch(arch: str) -> str:
    """Map an architecture name or alias to its canonical name; ValueError listing the choices."""
    name = _ALIASES.get(arch, arch)
    if name not in _ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose from {sorted(_ARCHS) + sorted(_ALIASES)}")
    return name


def arch_family(arch: str) -> str:
    """The family ("cifar_resnet", "vgg", "mobilenetv2", "resnet", "deit") of an arch name."""
    return _ARCHS[canonical_arch(arch)][0]


def create_model(
    arch: str,
    num_classes: int,
    *,
    width_mult: float = 1.0,
    depth: int | None = None,
    patch_size: int | None = None,
    drop_path: float = 0.0,
    dtype: Any = jnp.float32,
) -> ModelSpec:
    """Build ``arch`` for ``num_classes`` classes.

    ``width_mult`` scales every width (rounded to multiples of 4, or 8 for MobileNetV2, so that
    N:M groups along input channels divide). ``depth`` overrides the number of DeiT blocks and
    ``patch_size`` the DeiT patch (small test models); ``drop_path`` is DeiT's stochastic depth.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    family, kw = _ARCHS[canonical_arch(arch)]
    kw = dict(kw)
    if family == "cifar_resnet":
        module = resnet_cifar.ResNetCifar(num_classes=num_classes, width_mult=width_mult,
                                          dtype=dtype, **kw)
        dense = resnet_cifar.DENSE_LAYERS
    elif family == "vgg":
        module = vgg.VGGCifar(num_classes=num_classes, width_mult=width_mult, dtype=dtype)
        dense = vgg.DENSE_LAYERS
    elif family == "mobilenetv2":
        module = mobilenetv2.MobileNetV2Cifar(num_classes=num_classes, width_mult=width_mult,
                                              dtype=dtype)
        dense = mobilenetv2.DENSE_LAYERS
    elif family == "resnet":
        module = resnet_imagenet.ResNet(num_classes=num_classes, width_mult=width_mult,
                                        dtype=dtype, **kw)
        dense = resnet_imagenet.DENSE_LAYERS
    else:
        heads = kw["heads"]
        dim = max(4 * heads, int(round(kw["dim"] * width_mult / (4 * heads))) * 4 * heads)
        module = vit.VisionTransformer(
            num_classes=num_classes, dim=dim, depth=depth or kw["depth"], heads=heads,
            patch_size=patch_size or 16, drop_path=drop_path, dtype=dtype,
        )
        dense = vit.DENSE_LAYERS
    return ModelSpec(module=module, dense_layers=dense, family=family)
