"""The Bi-Mask reference's CIFAR VGG-19 (``CnnModels/models/vgg.py``: ``vgg19_cifar10``,
``vgg19_cifar100``): 16 x (3x3 conv without bias -> BN -> ReLU) with 5 max-pools, then a 1x1
*convolution* as the classifier, all 17 of them sparse (``builder.conv3x3`` / ``conv1x1_fc`` make
``NMConv`` layers), PyTorch's default conv initialisation.

The classifier conv is built with ``bias=True`` but ``NMConv.forward`` never adds the bias: the
parameter exists (``classifier/bias``, counted: 20,035,018 parameters with 10 classes) and is
unused here too (its gradient is zero).

Input ``(N, H, W, 3)``; the feature map must end at 1x1 (32x32 input, or smaller powers of two:
the max-pools use SAME padding, which equals PyTorch's ``MaxPool2d(2, 2)`` on even sizes);
logits ``(N, num_classes)``. Module names follow the reference's ``state_dict``: the
``features`` Sequential's conv at index i is ``features_{i}``, its BatchNorm ``features_{i+1}``
(so no BatchNorm name contains "bn", as in the reference), then ``classifier``.
The stem ``features_0`` has K = 3*3*3 = 27: sparse in the reference with groups straddling output
channels, which needs ``k_order="ihw"``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models.common import batch_norm, round_channels, torch_bias_init, torch_kernel_init
from train.models.vgg import CFG19

DENSE_LAYERS: tuple[str, ...] = ()  # every conv is sparse, the classifier included
IHW_LAYERS = (r"^features_0$",)


class ClassifierConv(nn.Conv):
    """``NMConv`` with ``bias=True`` as the reference runs it: a ``bias`` parameter (PyTorch's
    default init) that the output never includes. ``use_bias`` must stay False."""

    use_bias: bool = False

    @nn.compact
    def __call__(self, inputs):
        if self.use_bias:
            raise ValueError("ClassifierConv adds no bias: use_bias must be False")
        fan_in = inputs.shape[-1] * math.prod(self.kernel_size)
        self.param("bias", torch_bias_init(fan_in), (self.features,), self.param_dtype)
        return super().__call__(inputs)


class RefVGGCifar(nn.Module):
    """The reference's VGG (``cfg``: conv widths and "M" max-pools; default VGG-19).
    ``bn_groups``: BatchNorm statistics per group of B/``bn_groups`` consecutive samples in training
    (``common.batch_norm``; 1: over the whole batch)."""

    cfg: tuple = CFG19
    num_classes: int = 10
    width_mult: float = 1.0
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        idx = 0  # index in the reference's nn.Sequential
        for item in self.cfg:
            if item == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
                idx += 1
                continue
            x = nn.Conv(round_channels(item * self.width_mult), (3, 3), padding=1,
                        use_bias=False, kernel_init=torch_kernel_init, dtype=self.dtype,
                        name=f"features_{idx}")(x)
            x = nn.relu(batch_norm(train, f"features_{idx + 1}", self.dtype, groups=self.bn_groups)(x))
            idx += 3  # conv, BN, ReLU
        # AvgPool2d(kernel_size=1, stride=1) is the identity.
        if x.shape[1:3] != (1, 1):
            raise ValueError(f"the reference VGG needs a 1x1 feature map before its classifier "
                             f"(32x32 input); got {x.shape[1]}x{x.shape[2]}")
        x = ClassifierConv(self.num_classes, (1, 1), kernel_init=torch_kernel_init,
                           dtype=self.dtype, name="classifier")(x)
        return x.reshape(x.shape[0], -1)  # out.flatten(1)
