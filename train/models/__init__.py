"""Model registry: architecture names -> linen modules, the layers each keeps dense under N:M
sparsity, and which of its layers the Bi-Mask reference makes sparse only with its "ihw" grouping.

Two kinds of networks:

- **The reference's networks, under the reference's names** (``zyxxmu/Bi-Mask``:
  ``CnnModels/models/__init__.py`` and the DeiT timm registry): ``resnet32_cifar10``,
  ``resnet32_cifar100``, ``vgg19_cifar10``, ``vgg19_cifar100`` (defined in its ``vgg.py``, not
  exported), ``mobilenetv2``, ``resnet18``, ``resnet50``, ``vit_deit_{tiny,small,base}_patch16_224``
  and ``deit_{tiny,small,base}_patch16_224``: its widths, layer order, activations, biases, its
  sparse layer set and its initialisation (PyTorch's defaults). The same classes at other depths
  carry the same spellings: ``resnet{8,14,20,44,56,110}_cifar{10,100}``, ``resnet34``,
  ``resnet101``, ``mobilenetv2_cifar10`` (= ``mobilenetv2``) and ``mobilenetv2_cifar100``.
- **The standard architectures, under their own names**: ``resnet{8..110}`` (He et al.'s CIFAR
  ResNets, 16/32/64), ``vgg19`` (``vgg19_bn``), ``mobilenet_v2`` (Sandler et al.: depthwise, ReLU6),
  ``tv_resnet{18,34,50,101}`` (torchvision's init), ``deit_{tiny,small,base}`` (this project's
  DeiT init).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models import (
    mobilenetv2,
    ref_mobilenetv2,
    ref_resnet_cifar,
    ref_resnet_imagenet,
    ref_vgg,
    resnet_cifar,
    resnet_imagenet,
    vgg,
    vit,
)


@dataclass(frozen=True)
class ModelSpec:
    """A built model.

    Attributes:
      module: the linen module (``module.apply(v, x, train=...)``, ``x`` ``(N, H, W, 3)``).
      dense_layers: regexes (``re.search`` on "/"-joined layer paths from the model root) of the
        layers kept dense: pass as ``exclude`` to ``bimask_jax.sparse``.
      family: "cifar_resnet", "vgg", "mobilenetv2", "resnet" or "deit"; selects the recipe.
      reference: True for the Bi-Mask reference's networks.
      ihw_layers: regexes of the layers the reference makes sparse whose ``Cin`` is not a multiple
        of M (the 3-channel stems, K = 3*3*3 = 27): sparse only with ``k_order="ihw"`` (groups
        of M along the flattened ``(Cin, kh, kw)`` axis, straddling output channels); with
        ``"hwi"`` the library leaves them dense ("input channels 3 not divisible by m").
    """

    module: nn.Module
    dense_layers: tuple[str, ...]
    family: str
    reference: bool = False
    ihw_layers: tuple[str, ...] = ()


# canonical name -> (family, reference?, constructor kwargs)
_ARCHS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    # standard architectures
    **{f"resnet{d}": ("cifar_resnet", False, {"depth": d}) for d in resnet_cifar.DEPTHS},
    "vgg19": ("vgg", False, {}),
    "mobilenet_v2": ("mobilenetv2", False, {}),
    **{f"tv_resnet{d}": ("resnet", False, {"depth": d}) for d in (18, 34, 50, 101)},
    "deit_tiny": ("deit", False, {"dim": 192, "depth": 12, "heads": 3}),
    "deit_small": ("deit", False, {"dim": 384, "depth": 12, "heads": 6}),
    "deit_base": ("deit", False, {"dim": 768, "depth": 12, "heads": 12}),
    # the reference's networks
    **{f"resnet{d}_cifar{k}": ("cifar_resnet", True, {"depth": d, "classes": k})
       for d in resnet_cifar.DEPTHS for k in (10, 100)},
    "vgg19_cifar10": ("vgg", True, {"classes": 10}),
    "vgg19_cifar100": ("vgg", True, {"classes": 100}),
    "mobilenetv2": ("mobilenetv2", True, {"classes": 10}),
    "mobilenetv2_cifar10": ("mobilenetv2", True, {"classes": 10}),
    "mobilenetv2_cifar100": ("mobilenetv2", True, {"classes": 100}),
    **{f"resnet{d}": ("resnet", True, {"depth": d}) for d in (18, 34, 50, 101)},
    "vit_deit_tiny_patch16_224": ("deit", True, {"dim": 192, "depth": 12, "heads": 3}),
    "vit_deit_small_patch16_224": ("deit", True, {"dim": 384, "depth": 12, "heads": 6}),
    "vit_deit_base_patch16_224": ("deit", True, {"dim": 768, "depth": 12, "heads": 12}),
}

_ALIASES = {
    "vgg19_bn": "vgg19",
    "deit_tiny_patch16_224": "vit_deit_tiny_patch16_224",
    "deit_small_patch16_224": "vit_deit_small_patch16_224",
    "deit_base_patch16_224": "vit_deit_base_patch16_224",
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


def is_reference_arch(arch: str) -> bool:
    """Whether ``arch`` names one of the Bi-Mask reference's networks."""
    return _ARCHS[canonical_arch(arch)][1]


def create_model(
    arch: str,
    num_classes: int,
    *,
    width_mult: float = 1.0,
    depth: int | None = None,
    patch_size: int | None = None,
    drop_path: float = 0.0,
    dtype: Any = jnp.float32,
    bn_groups: int = 1,
) -> ModelSpec:
    """Build ``arch`` for ``num_classes`` classes.

    ``width_mult`` scales every width (rounded to multiples of 4, or 8 for MobileNetV2, so that
    N:M groups along input channels divide). ``depth`` overrides the number of DeiT blocks and
    ``patch_size`` the DeiT patch (small test models); ``drop_path`` is DeiT's stochastic depth.
    The reference's CIFAR names fix the dataset (``resnet32_cifar100``: 100 classes;
    ``mobilenetv2``: 10): another ``num_classes`` is a ValueError.

    ``bn_groups`` = R: the training-mode batch statistics of every BatchNorm are computed per
    group of B/R consecutive samples (PyTorch's per-GPU BatchNorm with the batch split over R
    GPUs; :func:`train.models.common.batch_norm`); 1 (default): over the whole batch. The
    parameters and ``batch_stats`` do not depend on R. DeiT has no BatchNorm: R must be 1.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    if isinstance(bn_groups, bool) or not isinstance(bn_groups, int) or bn_groups < 1:
        raise ValueError(f"bn_groups must be an integer >= 1, got {bn_groups!r}")
    name = canonical_arch(arch)
    family, ref, kw = _ARCHS[name]
    kw = dict(kw)
    classes = kw.pop("classes", None)
    if classes is not None and classes != num_classes:
        raise ValueError(f"--arch {arch} is the reference's {classes}-class network, but the data "
                         f"has num_classes={num_classes}")
    if family == "deit" and bn_groups != 1:
        raise ValueError(f"bn_groups={bn_groups}: --arch {arch} (DeiT) has no BatchNorm; "
                         f"bn_groups must be 1")
    common = dict(num_classes=num_classes, width_mult=width_mult, dtype=dtype,
                  bn_groups=bn_groups)
    ihw: tuple[str, ...] = ()
    if family == "cifar_resnet":
        if ref:
            module = ref_resnet_cifar.RefResNetCifar(**common, **kw)
            dense, ihw = ref_resnet_cifar.DENSE_LAYERS, ref_resnet_cifar.IHW_LAYERS
        else:
            module = resnet_cifar.ResNetCifar(**common, **kw)
            dense = resnet_cifar.DENSE_LAYERS
    elif family == "vgg":
        if ref:
            module = ref_vgg.RefVGGCifar(**common)
            dense, ihw = ref_vgg.DENSE_LAYERS, ref_vgg.IHW_LAYERS
        else:
            module = vgg.VGGCifar(**common)
            dense = vgg.DENSE_LAYERS
    elif family == "mobilenetv2":
        if ref:
            module = ref_mobilenetv2.RefMobileNetV2(**common)
            dense, ihw = ref_mobilenetv2.DENSE_LAYERS, ref_mobilenetv2.IHW_LAYERS
        else:
            module = mobilenetv2.MobileNetV2Cifar(**common)
            dense = mobilenetv2.DENSE_LAYERS
    elif family == "resnet":
        if ref:
            module = ref_resnet_imagenet.RefResNet(**common, **kw)
            dense, ihw = ref_resnet_imagenet.DENSE_LAYERS, ref_resnet_imagenet.IHW_LAYERS
        else:
            module = resnet_imagenet.ResNet(**common, **kw)
            dense = resnet_imagenet.DENSE_LAYERS
    else:
        heads = kw["heads"]
        dim = max(4 * heads, int(round(kw["dim"] * width_mult / (4 * heads))) * 4 * heads)
        module = vit.VisionTransformer(
            num_classes=num_classes, dim=dim, depth=depth or kw["depth"], heads=heads,
            patch_size=patch_size or 16, drop_path=drop_path, dtype=dtype, reference_init=ref,
        )
        dense = vit.DENSE_LAYERS
    return ModelSpec(module=module, dense_layers=dense, family=family, reference=ref,
                     ihw_layers=ihw)
