"""Kernel shapes (Flax layout) of the sparse layers of the models the paper reports on."""

from __future__ import annotations


def resnet50_sparse_layers() -> list[tuple[int, tuple[int, ...]]]:
    """``(stage, HWIO kernel shape)`` of every sparse ResNet-50 layer (bottleneck v1.5): all convs
    but the 7x7 stem (the fc stays dense); per block conv1 1x1, conv2 3x3, conv3 1x1, plus the
    projection shortcut of each stage's first block. 52 layers."""
    out, inp = [], 64
    for stage, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for b in range(blocks):
            out += [
                (stage, (1, 1, inp, planes)),
                (stage, (3, 3, planes, planes)),
                (stage, (1, 1, planes, planes * 4)),
            ]
            if b == 0:
                out.append((stage, (1, 1, inp, planes * 4)))
            inp = planes * 4
    return out


def resnet50_sparse_kernels() -> list[tuple[int, ...]]:
    """HWIO kernel shapes of the 52 sparse ResNet-50 layers; as matrices ``(kh*kw*Cin, C)`` they
    are the reference procedure's ``(K, C)`` shapes."""
    return [shape for _, shape in resnet50_sparse_layers()]


def deit_small_sparse_kernels(depth: int = 12, dim: int = 384, mlp: int = 1536):
    """(in, out) kernels of DeiT-Small's sparse layers: qkv, proj, fc1, fc2 of each block."""
    return [(dim, 3 * dim), (dim, dim), (dim, mlp), (mlp, dim)] * depth


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    k = 1
    for s in shape[:-1]:
        k *= s
    return k, shape[-1]
