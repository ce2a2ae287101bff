"""Shared building blocks of the training models (Flax linen, channels-last NHWC)."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch defaults: BatchNorm momentum 0.1 (= Flax 0.9), eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPS = 1e-5

# torchvision ResNets: kaiming normal, fan_out, gain sqrt(2).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# PyTorch's default initialisation of nn.Conv2d and nn.Linear (``reset_parameters``), which the
# Bi-Mask reference networks keep (their kaiming-normal ``_init_conv`` call is commented out):
# ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight, fan_in =
# Cin * kh * kw (Conv kernel ``(kh, kw, Cin, Cout)``) or in_features (Dense kernel ``(in, out)``);
# variance_scaling(1/3, "fan_in", "uniform") draws from U(-sqrt(3 * (1/3) / fan_in), ...), the
# same interval.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
    """PyTorch's default bias initialisation of a conv/linear layer with ``fan_in`` inputs per
    output: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the bias shape alone does not give fan_in)."""
    if fan_in < 1:
        raise ValueError(f"fan_in must be >= 1, got {fan_in}")
    return functools.partial(uniform_init, bound=1.0 / math.sqrt(fan_in))


def uniform_init(key, shape, dtype=jnp.float32, *, bound: float):
    """U(-bound, bound) of ``shape`` and ``dtype``."""
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def timm_trunc_normal(std: float = 0.02):
    """timm's ``trunc_normal_(w, std=std)`` as the reference DeiT calls it: N(0, std^2) cut at the
    absolute values +-2 (not +-2 std: at std 0.02 the cut is at 100 std, so this is a normal)."""

    return functools.partial(cut_normal_init, std=std, cut=2.0)


def cut_normal_init(key, shape, dtype=jnp.float32, *, std: float, cut: float):
    """N(0, std^2) restricted to [-cut, cut] (``cut`` in absolute units)."""
    return (jax.random.truncated_normal(key, -cut / std, cut / std, shape, jnp.float32)
            * std).astype(dtype)


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
