"""DeiT (Touvron et al., 2021): ViT with a class token, patch size 16, pre-norm blocks.

DeiT-Tiny: dim 192, 12 blocks, 3 heads. DeiT-Small: dim 384, 12 blocks, 6 heads. Input
``(N, H, W, 3)`` with H, W multiples of ``patch_size``; logits ``(N, num_classes)`` from the class
token. Module names: ``patch_embed`` (conv, kept dense), ``block{i}/attn/qkv``, ``block{i}/attn/proj``,
``block{i}/mlp/fc1``, ``block{i}/mlp/fc2`` (all sparse), ``head`` (kept dense).

``reference_init=True`` initialises as the Bi-Mask reference's DeiT (its modified timm
``VisionTransformer``, ``vit_deit_*_patch16_224``): its ``_init_weights`` reaches only the sparse
linears (qkv, proj, fc1, fc2: N(0, 0.02^2) cut at +-2, zero bias) and the LayerNorms, so
``patch_embed`` (``nn.Conv2d``) and ``head`` (``nn.Linear``) keep PyTorch's default init
(U(+-1/sqrt(fan_in)) weights and biases); ``cls_token`` and ``pos_embed`` are N(0, 0.02^2) cut at
+-2. The default (``False``) keeps this module's init: Flax's truncated normal at +-2 std with std
0.02 everywhere, zero biases.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from train.models.common import timm_trunc_normal, torch_bias_init, torch_kernel_init

DENSE_LAYERS = (r"(^|/)patch_embed$", r"(^|/)head$")

trunc02 = nn.initializers.truncated_normal(0.02)


def drop_path(x, rate: float, train: bool, module: nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``rate`` (train only),
    scaling survivors by 1/(1-rate). Uses the ``dropout`` RNG stream."""
    if not train or rate == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Dense (dim -> 3*dim) and ``proj`` Dense."""

    dim: int
    heads: int
    dtype: Any = jnp.float32
    kernel_init: Any = trunc02

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        hd = self.dim // self.heads
        qkv = nn.Dense(3 * self.dim, kernel_init=self.kernel_init, dtype=self.dtype, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(b, t, 3, self.heads, hd), 3, axis=2)
        q, k, v = (a[:, :, 0] for a in (q, k, v))  # (B, T, heads, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(q.dtype)
        w = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, self.dim)
        return nn.Dense(self.dim, kernel_init=self.kernel_init, dtype=self.dtype, name="proj")(y)


class Mlp(nn.Module):
    """fc1 (dim -> hidden) -> GELU (exact erf, as PyTorch) -> fc2 (hidden -> dim)."""

    dim: int
    hidden: int
    dtype: Any = jnp.float32
    kernel_init: Any = trunc02

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, kernel_init=self.kernel_init, dtype=self.dtype, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.dim, kernel_init=self.kernel_init, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block with drop-path on both residual branches."""

    dim: int
    heads: int
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    kernel_init: Any = trunc02

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        x = x + drop_path(Attention(self.dim, self.heads, self.dtype, self.kernel_init, name="attn")(y),
                          self.drop_path, train, self)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = Mlp(self.dim, int(self.dim * self.mlp_ratio), self.dtype, self.kernel_init, name="mlp")(y)
        return x + drop_path(y, self.drop_path, train, self)


class VisionTransformer(nn.Module):
    """DeiT-style ViT; drop-path rate rises linearly from 0 to ``drop_path`` over the blocks."""

    num_classes: int = 1000
    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch_size: int = 16
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    reference_init: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        h, w = x.shape[1:3]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} must be a multiple of patch_size={self.patch_size}")
        p = self.patch_size
        if self.reference_init:
            lin_init = tok_init = timm_trunc_normal(0.02)
            embed_init = dict(kernel_init=torch_kernel_init,
                              bias_init=torch_bias_init(x.shape[-1] * p * p))
            head_init = dict(kernel_init=torch_kernel_init, bias_init=torch_bias_init(self.dim))
        else:
            lin_init = tok_init = trunc02
            embed_init = head_init = dict(kernel_init=trunc02)
        x = nn.Conv(self.dim, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                    name="patch_embed", **embed_init)(x)
        b = x.shape[0]
        x = x.reshape(b, -1, self.dim)
        cls = self.param("cls_token", tok_init, (1, 1, self.dim))
        pos = self.param("pos_embed", tok_init, (1, x.shape[1] + 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)).astype(x.dtype), x], axis=1)
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            rate = self.drop_path * i / max(1, self.depth - 1)
            x = Block(self.dim, self.heads, self.mlp_ratio, rate, self.dtype, lin_init,
                      name=f"block{i}")(x, train)
        x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head", **head_init)(x[:, 0])
