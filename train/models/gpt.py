"""GPT-2-style decoder in Flax nnx (Radford et al., 2019; the nanoGPT layout).

Pre-LayerNorm blocks ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``; causal multi-head attention with
one fused ``qkv`` projection; a 4x GELU (tanh approximation, as GPT-2) MLP; learned token and
position embeddings; a final LayerNorm and an untied output head ``lm_head`` without bias.

Input: int ``(B, T)`` token ids with ``T <= block_size``; output: logits ``(B, T, vocab_size)`` in
float32.

Layer paths (as ``bimask_jax.sparse`` / ``summary`` show them): ``h{i}/attn/qkv``, ``h{i}/attn/out``,
``h{i}/mlp/up``, ``h{i}/mlp/down`` (the Linears of attention and MLP: made sparse), ``wte``, ``wpe``
(embeddings) and ``lm_head`` (kept dense: :data:`DENSE_LAYERS`).

Parallel layout (Megatron-style tensor parallelism over the mesh axis ``"model"``, parameters also
sharded over ``"fsdp"``; batch over ``("data", "fsdp")``), stated with ``nnx.with_partitioning``:

* column-parallel (``qkv``, ``up``, ``lm_head``): kernel ``(D, C)`` stored ``P("fsdp", "model")``,
  used as ``P(None, "model")`` (gathered over fsdp): every device computes its own output columns.
  The ``qkv`` columns are ordered ``(head, [q, k, v], head_dim)``, so a column block is whole heads.
* row-parallel (``out``, ``down``): kernel ``(C_in, D)`` stored ``P("model", "fsdp")``, used as
  ``P("model", None)``: every device contracts its own input rows; the partial sums are added by
  the compiler (the one all-reduce of the layer).

Every :class:`ParallelLinear` carries ``role`` (``"column"``, ``"row"``) so that a trainer knows which
of its axes is split across the ``"model"`` axis. Without a ``mesh`` no sharding constraint is
applied (plain single-device model).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DENSE_LAYERS = (r"(^|/)lm_head$",)
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Architecture: ``n_layer`` blocks of width ``n_embd`` with ``n_head`` heads, context
    ``block_size``, vocabulary ``vocab_size``."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int = 256

    def __post_init__(self):
        for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")


# CPU-sized to GPT-2 medium. vocab_size is the byte-level 256 for the small ones; the GPT-2 BPE
# vocabulary (50257) padded to a multiple of 64 for the GPT-2 sizes. Parameter counts (untied head):
# gpt2-small 163.1M (GPT-2 124M plus an untied 38.6M head), gpt2-medium 406.4M (GPT-2 350M
# plus an untied 51.5M head).
PRESETS = {
    "gpt2-tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256),
    "gpt2-mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256),
    "gpt2-small": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, block_size=1024,
                             vocab_size=50304),
}


def preset(name: str, **overrides) -> GPTConfig:
    """The :data:`PRESETS` entry ``name`` with fields replaced by ``overrides`` (e.g. vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return dataclasses.replace(PRESETS[name], **overrides)


def _constrain(x, mesh, spec):
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# Stored (sharded) and compute layouts of the kernels, by role.
STORED = {"column": ("fsdp", "model"), "row": ("model", "fsdp")}
COMPUTE = {"column": P(None, "model"), "row": P("model", None)}


class ParallelLinear(nnx.Linear):
    """``nnx.Linear`` whose kernel is constrained to its tensor-parallel compute layout (gathered
    over ``"fsdp"``, split over ``"model"`` by ``role``) before the product. Same parameters and
    the same ``dot_general`` call as ``nnx.Linear``, so ``bimask_jax.sparse`` handles it."""

    def __init__(self, in_features: int, out_features: int, *, role: str, mesh=None,
                 std: float = 0.02, dtype=None, use_bias: bool = True, rngs: nnx.Rngs):
        if role not in STORED:
            raise ValueError(f"role must be one of {sorted(STORED)}, got {role!r}")
        bias_names = ("model",) if role == "column" else (None,)
        super().__init__(
            in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), STORED[role]),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), bias_names),
            rngs=rngs,
        )
        self.role = role
        self.mesh = mesh

    def __call__(self, inputs):
        kernel = _constrain(self.kernel[...], self.mesh, COMPUTE[self.role])
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                             precision=self.precision)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, mesh=None, dtype=None, rngs: nnx.Rngs):
        d = cfg.n_embd
        self.n_head, self.mesh, self.dtype = cfg.n_head, mesh, dtype
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.qkv = ParallelLinear(d, 3 * d, role="column", mesh=mesh, dtype=dtype, rngs=rngs)
        self.out = ParallelLinear(d, d, role="row", mesh=mesh, std=resid_std, dtype=dtype,
                                  rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        h = self.n_head
        hd = d // h
        qkv = self.qkv(x).reshape(b, t, h, 3, hd)
        qkv = _constrain(qkv, self.mesh, P(BATCH_AXES, None, "model", None, None))
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]  # (B, T, H, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bkhd->bqhd", w, v)
        y = _constrain(y, self.mesh, P(BATCH_AXES, None, "model", None)).reshape(b, t, d)
        return self.out(y)


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, mesh=None, dtype=None, rngs: nnx.Rngs):
        d = cfg.n_embd
        self.mesh = mesh
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.up = ParallelLinear(d, 4 * d, role="column", mesh=mesh, dtype=dtype, rngs=rngs)
        self.down = ParallelLinear(4 * d, d, role="row", mesh=mesh, std=resid_std, dtype=dtype,
                                   rngs=rngs)

    def __call__(self, x):
        hdn = _constrain(self.up(x), self.mesh, P(BATCH_AXES, None, "model"))
        return self.down(jax.nn.gelu(hdn, approximate=True))


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, mesh=None, dtype=None, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(cfg.n_embd, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.attn = CausalSelfAttention(cfg, mesh=mesh, dtype=dtype, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(cfg.n_embd, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, mesh=mesh, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nnx.Module):
    """The decoder. ``dtype``: compute dtype (``None``: float32; parameters stay float32);
    ``mesh``: a ``jax.sharding.Mesh`` with axes ``("data", "fsdp", "model")`` or None."""

    def __init__(self, cfg: GPTConfig, *, mesh=None, dtype: Any = None, rngs: nnx.Rngs):
        self.config, self.mesh, self.dtype = cfg, mesh, dtype
        d = cfg.n_embd
        emb = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(cfg.vocab_size, d, dtype=dtype, rngs=rngs,
                             embedding_init=nnx.with_partitioning(emb, (None, "fsdp")))
        self.wpe = nnx.Embed(cfg.block_size, d, dtype=dtype, rngs=rngs,
                             embedding_init=nnx.with_partitioning(emb, (None, "fsdp")))
        for i in range(cfg.n_layer):
            setattr(self, f"h{i}", Block(cfg, mesh=mesh, dtype=dtype, rngs=rngs))
        self.ln_f = nnx.LayerNorm(d, epsilon=1e-5, dtype=dtype, rngs=rngs)
        self.lm_head = ParallelLinear(d, cfg.vocab_size, role="column", mesh=mesh, dtype=dtype,
                                      use_bias=False, rngs=rngs)

    def _embed(self, table, idx):
        """Lookup in an embedding table gathered over ``fsdp`` first (as every kernel is): a
        gather from a table sharded along its width would leave the activations sharded along the
        width, which the compiler cannot move to the batch layout without replicating them."""
        w = _constrain(table.embedding[...], self.mesh, P(None, None))
        return jnp.take(w, idx, axis=0).astype(self.dtype or w.dtype)

    def __call__(self, idx):
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        x = self._embed(self.wte, idx) + self._embed(self.wpe, jnp.arange(t))[None]
        x = _constrain(x, self.mesh, P(BATCH_AXES, None, None))
        for i in range(self.config.n_layer):
            x = getattr(self, f"h{i}")(x)
            x = _constrain(x, self.mesh, P(BATCH_AXES, None, None))
        logits = self.lm_head(self.ln_f(x)).astype(jnp.float32)
        return _constrain(logits, self.mesh, P(BATCH_AXES, None, "model"))


def create(cfg: GPTConfig, *, seed: int = 0, mesh=None, dtype: Any = None) -> GPT:
    """A :class:`GPT` initialised on the host from ``seed`` (the same values whatever the mesh);
    the sharding annotations are kept as metadata (no eager sharding) for the trainer to place the
    parameters with ``nnx.get_partition_spec``."""
    with nnx.use_eager_sharding(False):
        return GPT(cfg, mesh=mesh, dtype=dtype, rngs=nnx.Rngs(seed))
