"""VGG-19 with BatchNorm, CIFAR variant: 16 3x3 conv + BN + ReLU layers, 5 max-pools, global
average pool (= flatten for 32x32 input) and one dense classifier.

Module names: ``stem`` (first conv, 3 input channels: kept dense), ``conv{i}``, ``classifier``
(kept dense). Max-pools use SAME padding so that small test images (8x8) still run; for even sizes
this equals PyTorch's MaxPool2d(2, 2).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models.common import batch_norm, conv_init, round_channels

CFG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

DENSE_LAYERS = (r"(^|/)stem$", r"(^|/)classifier$")


class VGGCifar(nn.Module):
    """VGG with BatchNorm for CIFAR; ``cfg`` lists conv widths and "M" for 2x2 max-pools.
    ``bn_groups``: BatchNorm statistics per group of B/``bn_groups`` consecutive samples in training
    (``common.batch_norm``; 1: over the whole batch)."""

    cfg: tuple = CFG19
    num_classes: int = 10
    width_mult: float = 1.0
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        i = 0
        for item in self.cfg:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
                continue
            name = "stem" if i == 0 else f"conv{i}"
            x = nn.Conv(round_channels(item * self.width_mult), (3, 3), padding=1,
                        use_bias=False, kernel_init=conv_init, dtype=self.dtype, name=name)(x)
            x = nn.relu(batch_norm(train, f"bn{i}", self.dtype, groups=self.bn_groups)(x))
            i += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
