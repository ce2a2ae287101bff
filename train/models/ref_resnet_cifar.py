"""The Bi-Mask reference's CIFAR ResNet (``CnnModels/models/resnet_cifar.py``: ``resnet32_cifar10``,
``resnet32_cifar100``), which is not He et al.'s: stages of 32/64/128 channels (ResNet-32: 1,849,898
parameters with 10 classes, against 464,154 for He's 16/32/64), option-A shortcuts (stride-2
subsampling and zero-padded channels), ReLU, PyTorch's default conv/linear initialisation.

Input ``(N, H, W, 3)`` float, output logits ``(N, num_classes)``. Module names follow the
reference's ``state_dict`` (``layer1.0.conv1.weight`` is ``layer1_0/conv1/kernel``): ``conv1``
(3x3 stem, sparse in the reference: K = 3*3*3 = 27 with groups of M straddling output channels,
which needs ``k_order="ihw"``), ``bn1``, ``layer{s}_{b}/conv{1,2}``, ``layer{s}_{b}/bn{1,2}``,
``fc`` (``nn.Linear``: dense).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models.common import batch_norm, round_channels, torch_bias_init, torch_kernel_init
from train.models.resnet_cifar import DEPTHS, shortcut_a

# Regexes (on "/"-joined layer paths from the model root) of the layers the reference keeps dense,
# and of those it makes sparse only with the reference's "ihw" grouping (the 3-channel stem).
DENSE_LAYERS = (r"^fc$",)
IHW_LAYERS = (r"^conv1$",)


def _conv3x3(features: int, stride: int, dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), strides=stride, padding=1, use_bias=False,
                   kernel_init=torch_kernel_init, dtype=dtype, name=name)


class RefBasicBlock(nn.Module):
    """``ResBasicBlock``: conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + option-A shortcut
    (when the stride or the width changes), ReLU."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        y = _conv3x3(self.planes, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1", self.dtype, groups=self.bn_groups)(y))
        y = _conv3x3(self.planes, 1, self.dtype, "conv2")(y)
        y = batch_norm(train, "bn2", self.dtype, groups=self.bn_groups)(y)
        return nn.relu(y + shortcut_a(x, self.planes, self.stride))


class RefResNetCifar(nn.Module):
    """The reference's CIFAR ResNet of depth 6n+2 (the reference builds 32; ``depth`` in 8, 14,
    20, 32, 44, 56, 110 gives the same class at other depths). ``width_mult`` scales 32/64/128
    (rounded to multiples of 4).
    ``bn_groups``: BatchNorm statistics per group of B/``bn_groups`` consecutive samples in training
    (``common.batch_norm``; 1: over the whole batch)."""

    depth: int = 32
    num_classes: int = 10
    width_mult: float = 1.0
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {self.depth}")
        widths = [round_channels(c * self.width_mult) for c in (32, 64, 128)]
        x = _conv3x3(widths[0], 1, self.dtype, "conv1")(x)
        x = nn.relu(batch_norm(train, "bn1", self.dtype, groups=self.bn_groups)(x))
        for s, width in enumerate(widths):
            for b in range(DEPTHS[self.depth]):
                stride = 2 if (s > 0 and b == 0) else 1
                x = RefBasicBlock(width, stride, self.dtype, bn_groups=self.bn_groups,
                                  name=f"layer{s + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1)
        return nn.Dense(self.num_classes, kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(x.shape[-1]), dtype=self.dtype, name="fc")(x)
