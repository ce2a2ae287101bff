"""Shared building blocks of the training models (Flax linen, channels-last NHWC)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

# PyTorch defaults: BatchNorm momentum 0.1 (= Flax 0.9), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

# torchvision ResNets: kaiming normal, fan_out, gain sqrt(2).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def round_channels(channels: float, divisor: int = 4, minimum: int | None = None) -> int:
    """Round a (width-scaled) channel count to a multiple of ``divisor`` (never below ``minimum``,
    default ``divisor``), at most 10% below the unrounded value (the MobileNet rule).

    Every sparse layer needs its input channels divisible by M (4 for 2:4), so all models round
    their widths to multiples of 4 when a width multiplier is used.
    """
    minimum = divisor if minimum is None else minimum
    out = max(minimum, int(channels + divisor / 2) // divisor * divisor)
    if out < 0.9 * channels:
        out += divisor
    return out


def batch_norm(train: bool, name: str, dtype=jnp.float32, scale_init=nn.initializers.ones):
    """BatchNorm over the channel (last) axis with PyTorch's momentum and epsilon."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPS,
        dtype=dtype,
        scale_init=scale_init,
        name=name,
    )
