"""The Bi-Mask reference's CIFAR MobileNetV2 (``CnnModels/models/mobilenetv2.py``:
``mobilenetv2``), which is not Sandler et al.'s: its 3x3 conv in every block is a *full* conv
(``groups=1``: ``builder.conv3x3(planes, planes)``), not a depthwise one, its activations are ReLU,
not ReLU6, and every conv, the 3-channel stem included, is sparse (42,843,002 parameters with 10
classes, against 2,236,682 for the standard network).

Blocks (expansion t, out c, repeats n, first stride s) as the reference's ``cfg``; each block is
1x1 expand (also when t == 1) -> BN -> ReLU -> 3x3 full conv (stride) -> BN -> ReLU -> 1x1 project
-> BN; with stride 1 it adds the shortcut: identity, or 1x1 conv + BN when the width changes; with
stride 2 it has no residual. Then 1x1 conv 320 -> 1280, BN, ReLU, global average pool (the
reference's ``avg_pool2d(out, 4)`` on the 4x4 map of a 32x32 input) and ``nn.Linear`` (dense).
PyTorch's default conv/linear initialisation.

Module names follow the reference's ``state_dict`` (``layers.0.shortcut.0.weight`` is
``layers_0/shortcut_0/kernel``): ``conv1`` (stem, K = 27: sparse in the reference with groups
straddling output channels, which needs ``k_order="ihw"``), ``bn1``,
``layers_{i}/{conv1,bn1,conv2,bn2,conv3,bn3,shortcut_0,shortcut_1}``, ``conv2``, ``bn2``, ``linear``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models.common import batch_norm, round_channels, torch_bias_init, torch_kernel_init
from train.models.mobilenetv2 import CFG_CIFAR

DENSE_LAYERS = (r"^linear$",)
IHW_LAYERS = (r"^conv1$",)


def _conv(features: int, k: int, stride: int, dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (k, k), strides=stride, padding=k // 2, use_bias=False,
                   kernel_init=torch_kernel_init, dtype=dtype, name=name)


class RefBlock(nn.Module):
    """The reference's ``Block``: expand + full 3x3 conv + pointwise projection."""

    in_planes: int
    out_planes: int
    expansion: int
    stride: int
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        planes = self.expansion * self.in_planes
        y = nn.relu(batch_norm(train, "bn1", self.dtype, groups=self.bn_groups)(
            _conv(planes, 1, 1, self.dtype, "conv1")(x)))
        y = nn.relu(batch_norm(train, "bn2", self.dtype, groups=self.bn_groups)(
            _conv(planes, 3, self.stride, self.dtype, "conv2")(y)))
        y = batch_norm(train, "bn3", self.dtype, groups=self.bn_groups)(
            _conv(self.out_planes, 1, 1, self.dtype, "conv3")(y))
        if self.stride != 1:
            return y
        if self.in_planes != self.out_planes:
            x = batch_norm(train, "shortcut_1", self.dtype, groups=self.bn_groups)(
                _conv(self.out_planes, 1, 1, self.dtype, "shortcut_0")(x))
        return y + x


class RefMobileNetV2(nn.Module):
    """The reference's MobileNetV2 for 32x32 inputs; ``width_mult`` scales every width (rounded
    to multiples of 8).
    ``bn_groups``: BatchNorm statistics per group of B/``bn_groups`` consecutive samples in training
    (``common.batch_norm``; 1: over the whole batch)."""

    num_classes: int = 10
    width_mult: float = 1.0
    cfg: tuple = CFG_CIFAR
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        ch = round_channels(32 * self.width_mult, 8)
        x = nn.relu(batch_norm(train, "bn1", self.dtype, groups=self.bn_groups)(
            _conv(ch, 3, 1, self.dtype, "conv1")(x)))
        i = 0
        for t, c, n, s in self.cfg:
            out = round_channels(c * self.width_mult, 8)
            for r in range(n):
                x = RefBlock(ch, out, t, s if r == 0 else 1, self.dtype, bn_groups=self.bn_groups,
                             name=f"layers_{i}")(x, train)
                ch = out
                i += 1
        last = round_channels(1280 * self.width_mult, 8)
        x = nn.relu(batch_norm(train, "bn2", self.dtype, groups=self.bn_groups)(
            _conv(last, 1, 1, self.dtype, "conv2")(x)))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(x.shape[-1]), dtype=self.dtype, name="linear")(x)
