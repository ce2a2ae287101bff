"""CIFAR ResNet-20/32/56 (He et al., 2016, section 4.2): 3 stages of 16/32/64 channels, option-A
shortcuts (stride-2 subsampling + zero-padded channels, no parameters).

Input ``(N, H, W, C)`` float, output logits ``(N, num_classes)``. Module names: ``stem`` (3x3 conv,
kept dense: its 3 input channels are not divisible by M), ``stage{s}_block{b}/conv{1,2}``,
``classifier`` (kept dense, as in the paper).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models.common import batch_norm, conv_init, round_channels

DEPTHS = {8: 1, 14: 2, 20: 3, 32: 5, 44: 7, 56: 9, 110: 18}

# Regexes (on "/"-joined module paths) of the layers that stay dense.
DENSE_LAYERS = (r"(^|/)stem$", r"(^|/)classifier$")


def shortcut_a(x: jnp.ndarray, out_channels: int, stride: int) -> jnp.ndarray:
    """Option-A shortcut: subsample by ``stride`` and zero-pad channels (half on each side)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    extra = out_channels - x.shape[-1]
    if extra:
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


class BasicBlockA(nn.Module):
    """Two 3x3 conv + BN layers with an option-A shortcut."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda s, name: nn.Conv(
            self.features, (3, 3), strides=s, padding=1, use_bias=False,
            kernel_init=conv_init, dtype=self.dtype, name=name,
        )
        y = conv(self.stride, "conv1")(x)
        y = nn.relu(batch_norm(train, "bn1", self.dtype, groups=self.bn_groups)(y))
        y = conv(1, "conv2")(y)
        y = batch_norm(train, "bn2", self.dtype, groups=self.bn_groups)(y)
        return nn.relu(y + shortcut_a(x, self.features, self.stride))


class ResNetCifar(nn.Module):
    """CIFAR ResNet of depth 6n+2 (``depth`` in 8, 14, 20, 32, 44, 56, 110).
    ``bn_groups``: BatchNorm statistics per group of B/``bn_groups`` consecutive samples in training
    (``common.batch_norm``; 1: over the whole batch)."""

    depth: int = 20
    num_classes: int = 10
    width_mult: float = 1.0
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {self.depth}")
        widths = [round_channels(c * self.width_mult) for c in (16, 32, 64)]
        x = nn.Conv(widths[0], (3, 3), padding=1, use_bias=False, kernel_init=conv_init,
                    dtype=self.dtype, name="stem")(x)
        x = nn.relu(batch_norm(train, "stem_bn", self.dtype, groups=self.bn_groups)(x))
        for s, width in enumerate(widths):
            for b in range(DEPTHS[self.depth]):
                stride = 2 if (s > 0 and b == 0) else 1
                x = BasicBlockA(width, stride, self.dtype, bn_groups=self.bn_groups,
                                name=f"stage{s + 1}_block{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
