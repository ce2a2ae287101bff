"""The Bi-Mask reference's ImageNet ResNets (``CnnModels/models/resnet50.py``: ``resnet18``,
``resnet50``): torchvision's architecture (v1.5, stride on the 3x3 conv of the bottleneck) with
PyTorch's default conv/linear initialisation (the reference calls no init; torchvision's ResNet
uses kaiming-normal fan-out, see ``resnet_imagenet.py``).

Sparse: every conv of the blocks, the 1x1 downsample convs included (``builder`` convs); dense:
the 7x7 stem (a plain ``nn.Conv2d``) and ``fc`` (``nn.Linear``). Module names follow the
reference's ``state_dict`` (``layer1.0.downsample.1.weight`` is ``layer1_0/downsample_1/scale``):
``conv1``, ``bn1``, ``layer{s}_{b}/conv{1,2,3}``, ``layer{s}_{b}/bn{1,2,3}``,
``layer{s}_{b}/downsample_0`` (conv), ``layer{s}_{b}/downsample_1`` (BatchNorm: no "bn" in its
name, as in the reference), ``fc``. The global pool is a mean (the reference's ``AvgPool2d(7)``
on the 7x7 map of a 224x224 input).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from train.models.common import batch_norm, round_channels, torch_bias_init, torch_kernel_init
from train.models.resnet_imagenet import LAYERS

DENSE_LAYERS = (r"^conv1$", r"^fc$")
IHW_LAYERS: tuple[str, ...] = ()


def _conv(features: int, k: int, stride: int, dtype, name: str) -> nn.Conv:
    return nn.Conv(features, (k, k), strides=stride, padding=k // 2, use_bias=False,
                   kernel_init=torch_kernel_init, dtype=dtype, name=name)


class RefResBlock(nn.Module):
    """``BasicBlock`` (3x3 -> 3x3, expansion 1) or ``Bottleneck`` (1x1 -> 3x3 strided -> 1x1,
    expansion 4), with a 1x1 strided conv + BN downsample when the shape changes."""

    planes: int
    stride: int = 1
    bottleneck: bool = True
    dtype: Any = jnp.float32
    bn_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        d = self.dtype

        def bn(name):
            return batch_norm(train, name, d, groups=self.bn_groups)

        if self.bottleneck:
            out = 4 * self.planes
            y = nn.relu(bn("bn1")(_conv(self.planes, 1, 1, d, "conv1")(x)))
            y = nn.relu(bn("bn2")(_conv(self.planes, 3, self.stride, d, "conv2")(y)))
            y = bn("bn3")(_conv(out, 1, 1, d, "conv3")(y))
        else:
            out = self.planes
            y = nn.relu(bn("bn1")(_conv(self.planes, 3, self.stride, d, "conv1")(x)))
            y = bn("bn2")(_conv(out, 3, 1, d, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = bn("downsample_1")(_conv(out, 1, self.stride, d, "downsample_0")(x))
        return nn.relu(y + x)


class RefResNet(nn.Module):
    """The reference's ImageNet ResNet (it builds 18 and 50; ``depth`` in 18, 34, 50, 101, 152
    gives the same class at other depths); widths 64..512 x ``width_mult``.
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
        x = nn.Conv(round_channels(64 * self.width_mult), (7, 7), strides=2, padding=3,
                    use_bias=False, kernel_init=torch_kernel_init, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(batch_norm(train, "bn1", self.dtype, groups=self.bn_groups)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for s, (planes, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True)):
            planes = round_channels(planes * self.width_mult)
            for b in range(count):
                stride = 2 if (s > 0 and b == 0) else 1
                x = RefResBlock(planes, stride, kind == "bottleneck", self.dtype, bn_groups=self.bn_groups,
                                name=f"layer{s + 1}_{b}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=torch_kernel_init,
                        bias_init=torch_bias_init(x.shape[-1]), dtype=self.dtype, name="fc")(x)
