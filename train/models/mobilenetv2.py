"""MobileNetV2 (Sandler et al., 2018), CIFAR variant: 3x3 stride-1 stem and stride 1 in the second
stage (32x32 input ends at 4x4), real depthwise convs (``feature_group_count = channels``).

Module names: ``stem`` (dense: 3 input channels), ``block{i}/expand``, ``block{i}/dw`` (depthwise,
kept dense), ``block{i}/project``, ``last_conv``, ``classifier`` (kept dense).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models.common import batch_norm, conv_init, round_channels

# (expansion t, output channels c, repeats n, first stride s); CIFAR: second stage stride 1.
CFG_CIFAR = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

DENSE_LAYERS = (r"(^|/)stem$", r"(^|/)dw$", r"(^|/)classifier$")


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t == 1) -> 3x3 depthwise -> 1x1 linear projection (+ residual)."""

    in_channels: int
    out_channels: int
    stride: int
    expansion: int
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        hidden = self.in_channels * self.expansion
        y = x
        if self.expansion != 1:
            y = nn.Conv(hidden, (1, 1), use_bias=False, kernel_init=conv_init,
                        dtype=self.dtype, name="expand")(y)
            y = nn.relu6(batch_norm(train, "expand_bn", self.dtype, groups=self.bn_groups)(y))
        y = nn.Conv(hidden, (3, 3), strides=self.stride, padding=1, feature_group_count=hidden,
                    use_bias=False, kernel_init=conv_init, dtype=self.dtype, name="dw")(y)
        y = nn.relu6(batch_norm(train, "dw_bn", self.dtype, groups=self.bn_groups)(y))
        y = nn.Conv(self.out_channels, (1, 1), use_bias=False, kernel_init=conv_init,
                    dtype=self.dtype, name="project")(y)
        y = batch_norm(train, "project_bn", self.dtype, groups=self.bn_groups)(y)
        if self.stride == 1 and self.in_channels == self.out_channels:
            y = y + x
        return y


class MobileNetV2Cifar(nn.Module):
    """MobileNetV2 for 32x32 inputs; all widths (the last 1x1 conv included) scaled by
    ``width_mult`` and rounded to multiples of 8.
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
        last = round_channels(1280 * self.width_mult, 8)
        x = nn.Conv(ch, (3, 3), padding=1, use_bias=False, kernel_init=conv_init,
                    dtype=self.dtype, name="stem")(x)
        x = nn.relu6(batch_norm(train, "stem_bn", self.dtype, groups=self.bn_groups)(x))
        i = 0
        for t, c, n, s in self.cfg:
            out = round_channels(c * self.width_mult, 8)
            for r in range(n):
                x = InvertedResidual(ch, out, s if r == 0 else 1, t, self.dtype, bn_groups=self.bn_groups,
                                     name=f"block{i}")(x, train)
                ch = out
                i += 1
        x = nn.Conv(last, (1, 1), use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                    name="last_conv")(x)
        x = nn.relu6(batch_norm(train, "last_bn", self.dtype, groups=self.bn_groups)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
