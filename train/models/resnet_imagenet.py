"""ImageNet ResNet-18/34/50 (He et al., 2016; torchvision v1.5: stride on the 3x3 conv of the
bottleneck). Input ``(N, H, W, 3)``, logits ``(N, num_classes)``.

Module names: ``stem`` (7x7/2 conv, kept dense as in the paper), ``layer{s}_{b}/conv{1,2,3}``,
``layer{s}_{b}/downsample`` (1x1 projection shortcut), ``fc`` (kept dense).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models.common import batch_norm, conv_init, round_channels

LAYERS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
          101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3))}

DENSE_LAYERS = (r"(^|/)stem$", r"(^|/)fc$")


def _conv(features, kernel, stride, dtype, name):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=pad, use_bias=False,
                   kernel_init=conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """3x3 -> 3x3 residual block (expansion 1)."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_groups: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool):
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1", self.dtype, groups=self.bn_groups)(y))
        y = _conv(self.planes, 3, 1, self.dtype, "conv2")(y)
        y = batch_norm(train, "bn2", self.dtype, groups=self.bn_groups)(y)
        return nn.relu(y + _shortcut(self, x, self.planes, train))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 residual block (expansion 4)."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_groups: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool):
        y = _conv(self.planes, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1", self.dtype, groups=self.bn_groups)(y))
        y = _conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(batch_norm(train, "bn2", self.dtype, groups=self.bn_groups)(y))
        y = _conv(self.planes * 4, 1, 1, self.dtype, "conv3")(y)
        y = batch_norm(train, "bn3", self.dtype, groups=self.bn_groups)(y)
        return nn.relu(y + _shortcut(self, x, self.planes * 4, train))


def _shortcut(block: nn.Module, x, out_channels: int, train: bool):
    """Identity, or 1x1 strided projection + BN when the shape changes (called inside compact)."""
    if block.stride == 1 and x.shape[-1] == out_channels:
        return x
    y = _conv(out_channels, 1, block.stride, block.dtype, "downsample")(x)
    return batch_norm(train, "downsample_bn", block.dtype, groups=block.bn_groups)(y)


class ResNet(nn.Module):
    """ImageNet ResNet of ``depth`` in 18, 34, 50, 101, 152; widths 64..512 x ``width_mult``.
    ``bn_groups``: BatchNorm statistics per group of B/``bn_groups`` consecutive samples in training
    (``common.batch_norm``; 1: over the whole batch)."""

    depth: int = 50
    num_classes: int = 1000
    width_mult: float = 1.0
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in LAYERS:
            raise ValueError(f"depth must be one of {sorted(LAYERS)}, got {self.depth}")
        kind, counts = LAYERS[self.depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        x = _conv(round_channels(64 * self.width_mult), 7, 2, self.dtype, "stem")(x)
        x = nn.relu(batch_norm(train, "stem_bn", self.dtype, groups=self.bn_groups)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            planes = round_channels(planes * self.width_mult)
            for b in range(count):
                stride = 2 if (s > 0 and b == 0) else 1
                x = block(planes, stride, self.dtype, bn_groups=self.bn_groups,
                          name=f"layer{s + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
