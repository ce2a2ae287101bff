"""Kernel shapes (Flax layout) of the sparse layers of the models the paper reports on."""

from __future__ import annotations


def resnet50_sparse_kernels() -> list[tuple[int, ...]]:
    """HWIO kernel shapes of every sparse ResNet-50 layer: all convs but the 7x7 stem (fc stays
    dense). 52 layers; as matrices (kh*kw*Cin, C) they are the reference's (K, C) shapes."""
    out, inp = [], 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            out += [(1, 1, inp, planes), (3, 3, planes, planes), (1, 1, planes, planes * 4)]
            if b == 0:
                out.append((1, 1, inp, planes * 4))
            inp = planes * 4
    return out


def deit_small_sparse_kernels(depth: int = 12, dim: int = 384, mlp: int = 1536):
    """(in, out) kernels of DeiT-Small's sparse layers: qkv, proj, fc1, fc2 of each block."""
    return [(dim, 3 * dim), (dim, dim), (dim, mlp), (mlp, dim)] * depth


def as_matrix(shape: tuple[int, ...]) -> tuple[int, int]:
    k = 1
    for s in shape[:-1]:
        k *= s
    return k, shape[-1]
