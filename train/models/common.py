"""Shared building blocks of the training models (Flax linen, channels-last NHWC)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

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


def batch_norm(train: bool, name: str, dtype=jnp.float32, scale_init=nn.initializers.ones,
               groups: int = 1):
    """BatchNorm over the channel (last) axis with PyTorch's momentum and epsilon.

    ``groups`` = 1 (the default): ``flax.linen.BatchNorm``, statistics over the whole batch (the
    global batch of a sharded run: synchronised BN). ``groups`` = R > 1 with ``train``: a
    :class:`GhostBatchNorm` that normalises each of R consecutive slices of the batch with its
    own statistics, as PyTorch's per-GPU BatchNorm under ``nn.DataParallel`` / DDP when the batch
    is split over R GPUs. Both create the same variables under ``name`` (``params``: ``scale``,
    ``bias``; ``batch_stats``: ``mean``, ``var``, each ``(C,)`` float32), so checkpoints do not
    depend on R; evaluation (``train=False``) uses the running averages with
    ``flax.linen.BatchNorm`` whatever R.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"batch_norm groups must be an integer >= 1, got {groups!r}")
    if groups == 1 or not train:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPS,
            dtype=dtype,
            scale_init=scale_init,
            name=name,
        )
    return GhostBatchNorm(groups=groups, use_running_average=False, momentum=BN_MOMENTUM,
                          epsilon=BN_EPS, dtype=dtype, scale_init=scale_init, name=name)


class GhostBatchNorm(nn.Module):
    """BatchNorm with per-replica ("ghost") batch statistics over the channel (last) axis.

    In training (``use_running_average=False``) the batch axis 0 of ``x`` ``(B, ..., C)`` is split
    into ``groups`` = R consecutive slices of B/R samples (B must be divisible by R: ValueError
    naming both otherwise; shapes are static, so this also holds under jit). Slice r is
    normalised with its own mean and biased variance over every axis but the last,
    ``y = (x - mean_r) / sqrt(var_r + epsilon) * scale + bias``, with one ``scale`` and ``bias``
    for all slices: what PyTorch computes when a batch is scattered in order over R GPUs, each
    running its own ``BatchNorm2d`` (``nn.DataParallel``, or DDP without SyncBatchNorm). The
    running averages are updated from the first slice's statistics only,
    ``mean <- momentum mean + (1 - momentum) mean_0`` (likewise ``var``): ``nn.DataParallel``
    keeps the in-place buffer updates of its device-0 replica (the others are discarded with
    their replicas), and DDP broadcasts rank 0's buffers and saves rank 0's checkpoint. The
    running variance takes the biased ``var_0``, as ``flax.linen.BatchNorm`` does (PyTorch
    stores the unbiased ``var_0 n / (n - 1)``, n = B/R times the spatial size).

    With ``use_running_average=True`` it normalises with the running averages, the same formula
    as ``flax.linen.BatchNorm``. Statistics are computed in at least float32; variables and their
    names, shapes, dtypes and initial values are ``flax.linen.BatchNorm``'s (``params``:
    ``scale``, ``bias``; ``batch_stats``: ``mean`` zeros, ``var`` ones; ``(C,)``), so a
    checkpoint is the same for every R. The output has ``dtype`` (default: the promoted type of
    ``x`` and the parameters). ``groups`` = 1 computes the ordinary BatchNorm (equal to
    ``flax.linen.BatchNorm`` to float rounding; :func:`batch_norm` uses Flax's module then).
    """

    groups: int = 1
    use_running_average: bool = False
    momentum: float = BN_MOMENTUM
    epsilon: float = BN_EPS
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        r = self.groups
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"GhostBatchNorm groups must be an integer >= 1, got {r!r}")
        if x.ndim < 2:
            raise ValueError(f"GhostBatchNorm needs x of shape (B, ..., C), got shape {x.shape}")
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        if self.use_running_average:
            return self._normalize(x, ra_mean.value, ra_var.value)
        b = x.shape[0]
        if b % r:
            raise ValueError(f"GhostBatchNorm: the batch size {b} is not divisible by groups={r} "
                             f"(each of the {r} groups needs the same number of samples)")
        stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
        xg = x.reshape(r, b // r, *x.shape[1:])
        axes = tuple(range(1, xg.ndim - 1))
        x32 = xg.astype(stats_dtype)
        mean = x32.mean(axes)  # (R, C)
        var = jnp.maximum(0.0, jnp.square(x32).mean(axes) - jnp.square(mean))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean[0]
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var[0]
        shape = (r,) + (1,) * (xg.ndim - 2) + (c,)
        y = self._normalize(xg, mean.reshape(shape), var.reshape(shape))
        return y.reshape(x.shape)

    def _normalize(self, x, mean, var):
        """``(x - mean) rsqrt(var + epsilon) scale + bias`` in Flax's order of operations."""
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        y = x - mean
        mul = jax.lax.rsqrt(var + self.epsilon) * scale
        y = y * mul + bias
        return jnp.asarray(y, nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype))
