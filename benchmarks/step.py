"""Train-step cost of ``bimask_jax.sparse`` and the cost of one permutation refresh.

1. Jitted train step (forward, backward, SGD-momentum update, BatchNorm stats) of a CIFAR ResNet-20
   and of a small ViT (``nn.MultiHeadDotProductAttention`` blocks), unwrapped vs wrapped with
   ``method="dense"``, ``"srste"`` and ``"bimask"``. The variants run interleaved in one process
   (round-robin over repeats) and the median per-step time of each is reported with its ratio to
   the unwrapped model. The refresh is not part of the step (it runs every ``refresh_every`` steps;
   its amortized cost is reported separately). Also: the time of a jitted computation of all
   sparse layers' masks alone (the work the wrapper adds besides masking the products), which is
   less sensitive to machine noise than the ratio of two step times.
   The same for the ImageNet models ``resnet50`` (v1.5 with BatchNorm, 224^2) and ``deit_s``
   (DeiT-Small, patch 16, 197 tokens), 1000 classes, at ``--dtype`` (parameters stay float32;
   stem/patch embedding and classifier dense, as in the paper), XLA products only.
2. One ``bimask_jax.refresh`` (100 candidates per layer, jitted) over the sparse layers of a
   ResNet-50 (stem conv and fc excluded as in the paper; kernels random normal).

Usage::

    python benchmarks/step.py [--batch 64] [--repeats 5] [--steps 3] [--json out.json]
    python benchmarks/step.py --models resnet50,deit_s --batch 128 --dtype bfloat16 \
        --methods bimask   # GPU: Bi-Mask vs the unwrapped (dense) ImageNet step
    python benchmarks/step.py --models resnet50,deit_s --tiny --image-size 32 --batch 2 \
        --refresh-repeats 0   # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import bimask_jax.flax as bf
from bimask_jax.flax.layer import stacked_masks
from bimask_jax.flax.state import geometry, read

# ------------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
        y = nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = norm()(nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y))
        if x.shape != y.shape:
            x = norm()(nn.Conv(self.features, (1, 1), self.strides, use_bias=False)(x))
        return nn.relu(x + y)


class ResNet20(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for i, f in enumerate((16, 32, 64)):
            for b in range(3):
                x = BasicBlock(f, 2 if (i > 0 and b == 0) else 1)(x, train)
        return nn.Dense(self.num_classes, name="head")(x.mean((1, 2)))


class ViTBlock(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads)(y, y)
        y = nn.LayerNorm()(x)
        y = nn.Dense(2 * self.dim)(y)
        return x + nn.Dense(self.dim)(nn.gelu(y))


class SmallViT(nn.Module):
    num_classes: int = 10
    dim: int = 128
    depth: int = 4
    heads: int = 4
    patch: int = 4

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, name="patch_embed")(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:])
        for _ in range(self.depth):
            x = ViTBlock(self.dim, self.heads)(x)
        return nn.Dense(self.num_classes, name="head")(nn.LayerNorm()(x).mean(1))


class Bottleneck(nn.Module):
    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Conv(self.features, (1, 1), use_bias=False)(x))
        y = nn.relu(nn.Conv(self.features, (3, 3), self.strides, padding=1, use_bias=False)(y))
        y = nn.Conv(4 * self.features, (1, 1), use_bias=False)(y)
        if x.shape != y.shape:
            x = nn.Conv(4 * self.features, (1, 1), self.strides, use_bias=False)(x)
        return nn.relu(x + y)


class ResNet50(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(64, (7, 7), 2, padding=3, use_bias=False, name="conv_init")(x)
        x = nn.max_pool(x, (3, 3), (2, 2), "SAME")
        for i, (f, n) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            for b in range(n):
                x = Bottleneck(f, 2 if (i > 0 and b == 0) else 1)(x)
        return nn.Dense(1000, name="head")(x.mean((1, 2)))


class BottleneckBN(nn.Module):
    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 dtype=self.dtype)
        y = nn.relu(norm()(conv(self.features, (1, 1))(x)))
        y = nn.relu(norm()(conv(self.features, (3, 3), self.strides, padding=1)(y)))
        y = norm()(conv(4 * self.features, (1, 1))(y))
        if x.shape != y.shape:
            x = norm()(conv(4 * self.features, (1, 1), self.strides)(x))
        return nn.relu(x + y)


class ImageNetResNet50(nn.Module):
    """ResNet-50 v1.5 with BatchNorm; stem ``conv_init`` and classifier ``head`` (dense in the
    paper). ``width``/``blocks`` shrink it for smoke runs (64 / (3, 4, 6, 3) is ResNet-50)."""

    num_classes: int = 1000
    width: int = 64
    blocks: tuple[int, ...] = (3, 4, 6, 3)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.width, (7, 7), 2, padding=3, use_bias=False, dtype=self.dtype,
                    name="conv_init")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
        x = nn.max_pool(x, (3, 3), (2, 2), "SAME")
        for i, n in enumerate(self.blocks):
            for b in range(n):
                x = BottleneckBN(self.width * 2**i, 2 if (i > 0 and b == 0) else 1,
                                 self.dtype)(x, train)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x.mean((1, 2)))


class DeiTBlock(nn.Module):
    dim: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype)
        y = nn.LayerNorm(dtype=self.dtype)(x)
        qkv = dense(3 * self.dim, name="qkv")(y).reshape(b, t, 3, self.heads, -1)
        att = nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        x = x + dense(self.dim, name="proj")(att.reshape(b, t, self.dim))
        y = nn.gelu(dense(4 * self.dim, name="fc1")(nn.LayerNorm(dtype=self.dtype)(x)))
        return x + dense(self.dim, name="fc2")(y)


class DeiTSmall(nn.Module):
    """DeiT-Small (dim 384, 12 blocks, 6 heads, patch 16, class token); sparse layers qkv, proj,
    fc1, fc2; ``patch_embed`` and ``head`` dense (paper setting)."""

    num_classes: int = 1000
    dim: int = 384
    depth: int = 12
    heads: int = 6
    patch: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(self.dim, (self.patch, self.patch), self.patch, dtype=self.dtype,
                    name="patch_embed")(x)
        x = x.reshape(x.shape[0], -1, self.dim)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.dim)), x],
                            axis=1)
        x = x + self.param("pos", nn.initializers.normal(0.02), x.shape[1:]).astype(x.dtype)
        for i in range(self.depth):
            x = DeiTBlock(self.dim, self.heads, self.dtype, name=f"block{i}")(x)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0])


# ------------------------------------------------------------------------------------- timing

FAST_COMPILE = {"xla_backend_optimization_level": 0}


def make_step(module, tx):
    def step(state, x, y):
        params, opt, rest = state

        def loss_fn(p):
            logits, upd = module.apply({**rest, "params": p}, x, train=True,
                                       mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, u), opt, {**rest, **upd}), loss

    return jax.jit(step, donate_argnums=0)


def mask_cost(model, variables, repeats):
    """Median seconds of a jitted computation of every sparse layer's (fwd, bwd) masks: the
    per-step work the wrapper adds besides the masked products."""
    cfg, records, kernels = read(model, variables)
    paths = sorted(records, key=lambda p: tuple(map(str, p)))
    methods = [geometry(cfg, p, records[p], kernels[p])[0] for p in paths]

    def all_masks(ks, ps):
        return [stacked_masks(k, p, cfg.n, cfg.m, meth, cfg.k_order)
                for k, p, meth in zip(ks, ps, methods, strict=True)]

    fn = jax.jit(all_masks)
    args = ([kernels[p] for p in paths], [records[p]["perm"] for p in paths])
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name, module, x, y, methods, repeats, steps, exclude=("head",),
                fast_compile=False):
    """Interleaved step timings of ``module`` unwrapped and wrapped with each method (see the
    module docstring); ``fast_compile``: train steps compiled without backend optimisation
    (smoke runs: the times then mean nothing)."""
    tx = optax.sgd(0.1, momentum=0.9)
    variants = {"unwrapped": module}
    for meth in methods:
        variants[meth] = bf.sparse(module, method=meth, exclude=exclude)
    states, fns = {}, {}
    for k, mod in variants.items():
        # init runs once: compiled without backend optimisation (XLA:CPU otherwise spends
        # seconds per model optimising the unrolled random initialisers)
        v = dict(jax.jit(mod.init).lower(jax.random.key(0), x).compile(FAST_COMPILE)(
            jax.random.key(0), x))
        params = v.pop("params")
        states[k] = (params, tx.init(params), v)
        step = make_step(mod, tx)
        if fast_compile:
            step = step.lower(states[k], x, y).compile(FAST_COMPILE)
        fns[k] = step
        states[k], loss = fns[k](states[k], x, y)  # compile + warm up
        jax.block_until_ready(loss)
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k in variants:
            t0 = time.perf_counter()
            for _ in range(steps):
                states[k], loss = fns[k](states[k], x, y)
            jax.block_until_ready((states[k], loss))
            times[k].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [dict(model=name, variant=k, step_ms=1e3 * med[k], ratio=med[k] / med["unwrapped"],
                 min_ms=1e3 * min(times[k]), max_ms=1e3 * max(times[k])) for k in variants]
    for r in rows:
        print(f"{name:10s} {r['variant']:10s} step {r['step_ms']:8.1f} ms "
              f"(min {r['min_ms']:.1f}, max {r['max_ms']:.1f})  ratio {r['ratio']:.3f}", flush=True)
    if "bimask" in variants:
        mod = variants["bimask"]
        params, _, rest = states["bimask"]
        cost = mask_cost(mod, {**rest, "params": params}, 3 * repeats)
        rows.append(dict(model=name, variant="bimask masks only", step_ms=1e3 * cost,
                         ratio=cost / med["unwrapped"]))
        print(f"{name:10s} bimask masks only (jitted fwd+bwd masks of all sparse layers): "
              f"{1e3 * cost:.1f} ms = {100 * cost / med['unwrapped']:.1f}% of the unwrapped step",
              flush=True)
    return rows


def bench_refresh(repeats, num_candidates):
    model = bf.sparse(ResNet50(), num_candidates=num_candidates, exclude=("conv_init", "head"))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 224, 224, 3)))
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    variables = jax.tree.map(
        lambda s: jax.random.normal(next(keys), s.shape, s.dtype)
        if jnp.issubdtype(s.dtype, jnp.floating) else jnp.zeros(s.shape, s.dtype), shapes)
    variables["bimask"] = jax.tree.map(
        lambda s: jnp.broadcast_to(jnp.arange(s.shape[-1], dtype=jnp.int32), s.shape)
        if s.ndim else jnp.zeros((), jnp.int32), shapes["bimask"])
    layers = len(jax.tree.leaves(variables["bimask"])) // 2
    fn = jax.jit(bf.refresh, static_argnums=1)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(2), model, variables))
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(jax.random.key(3 + r), model, variables))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"refresh ResNet-50: {layers} sparse layers, {num_candidates} candidates each: "
          f"{med:.2f} s median of {repeats} (min {min(times):.2f}, max {max(times):.2f}); "
          f"first call incl. compile {compile_s:.1f} s; amortized over 100 steps "
          f"{1e3 * med / 100:.1f} ms/step", flush=True)
    return dict(layers=layers, num_candidates=num_candidates, median_s=med, min_s=min(times),
                max_s=max(times), compile_s=compile_s)


def imagenet_model(name: str, dtype, tiny: bool):
    """(module, excluded layers) of an ImageNet model; ``tiny``: the same code at toy sizes."""
    if name == "resnet50":
        kw = dict(width=8, blocks=(1, 1, 1, 1)) if tiny else {}
        return ImageNetResNet50(dtype=dtype, **kw), ("conv_init", "head")
    if name == "deit_s":
        kw = dict(dim=32, depth=1, heads=2, patch=8) if tiny else {}
        return DeiTSmall(dtype=dtype, **kw), ("patch_embed", "head")
    raise ValueError(f"unknown ImageNet model {name!r} (resnet50, deit_s)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat")
    ap.add_argument("--methods", default="dense,srste,bimask")
    ap.add_argument("--models", default="resnet20,vit",
                    help="comma list: resnet20, vit (CIFAR, 32x32, float32); resnet50, deit_s "
                         "(ImageNet, --image-size, --dtype)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="compute dtype of the ImageNet models (parameters stay float32)")
    ap.add_argument("--image-size", type=int, default=224, help="ImageNet models' input side")
    ap.add_argument("--fast-compile", action="store_true",
                    help="compile the train steps without backend optimisation (smoke runs only: "
                         "the step times then mean nothing)")
    ap.add_argument("--tiny", action="store_true",
                    help="ImageNet models at toy width/depth (CPU smoke runs of this script)")
    ap.add_argument("--refresh-repeats", type=int, default=3, help="0 skips the refresh timing")
    ap.add_argument("--num-candidates", type=int, default=100)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    print(f"jax {jax.__version__}, devices {jax.devices()}, {platform.processor() or platform.machine()}")
    x = jax.random.normal(jax.random.key(0), (a.batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (a.batch,), 0, 10)
    methods = a.methods.split(",")
    res = {"batch": a.batch, "dtype": a.dtype, "fast_compile": a.fast_compile,
           "image_size": a.image_size, "tiny": a.tiny,
           "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "command": " ".join(["python benchmarks/step.py",
                                *(sys.argv[1:] if argv is None else argv)]),
           "steps": []}

    def save(complete=False):
        if a.json:
            with open(a.json, "w") as f:
                json.dump({**res, "complete": complete}, f, indent=2)

    models = {"resnet20": ResNet20(), "vit": SmallViT()}
    dtype = jnp.dtype(a.dtype)
    for name in a.models.split(","):
        if name in models:
            res["steps"] += bench_model(name, models[name], x, y, methods, a.repeats, a.steps,
                                        fast_compile=a.fast_compile)
        else:
            module, exclude = imagenet_model(name, dtype, a.tiny)
            xi = jax.random.normal(jax.random.key(2), (a.batch, a.image_size, a.image_size, 3),
                                   dtype)
            yi = jax.random.randint(jax.random.key(3), (a.batch,), 0, 1000)
            res["steps"] += bench_model(name, module, xi, yi, methods, a.repeats, a.steps,
                                        exclude=exclude, fast_compile=a.fast_compile)
        save()  # after every model: a run cut short keeps what it measured
    if a.refresh_repeats:
        res["refresh_resnet50"] = bench_refresh(a.refresh_repeats, a.num_candidates)
    save(complete=True)
    return res


if __name__ == "__main__":
    main()
