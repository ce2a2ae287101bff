"""Whole train-step speed on CPU: our dense and Bi-Mask CIFAR ResNets with each XLA:CPU
convolution path (``ynn``: XLA's default YNNPACK fusions; ``eigen``: ``train.xla_cpu``'s option),
beside PyTorch's dense step and the authors' Bi-Mask step (zyxxmu/Bi-Mask) when available.

1. Train step (forward, backward, SGD-momentum update, BatchNorm statistics) in img/s of
   ``train.models.resnet_cifar.ResNetCifar``: ResNet-32 at the reference's widths 32/64/128
   (``width_mult=2``, 1,849,898 parameters) and ResNet-20 (16/32/64), unwrapped (dense) and wrapped
   with ``bimask_jax`` ``method="bimask"`` (stem and classifier dense, as ``train/cifar.py``). Both
   conv paths of one model are compiled from the same lowering (per-compilation options) and timed
   round-robin in this process, so machine noise hits all alike. PyTorch runs afterwards in a
   child process of its own (its OpenMP threads and XLA's thread pool slow each other many times
   over when they share a process on a small machine), round-robin between its own rows. The
   permutation refresh is not part of the step (every 100 steps in both codes).
   PyTorch rows (only when ``torch`` is installed; it is a benchmark-only dependency):
   ``torch dense`` (the same network, ``nn.Conv2d``, NCHW) and ``authors bimask`` (their
   ``CnnModels`` ResNet-32 with ``NMConv``, imported from ``--reference-dir``, a checkout of
   https://github.com/zyxxmu/Bi-Mask; skipped when absent; the authors' model exists only at
   ResNet-32 widths 32/64/128).
2. Per-layer: forward, input-gradient and weight-gradient convolution of a 3x3 layer (ms) per path,
   beside ``torch.nn.functional.conv2d`` and its autograd gradients.

Usage::

    python benchmarks/train_speed.py [--reference-dir PATH] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

from train import xla_cpu
from train.models.resnet_cifar import DENSE_LAYERS, ResNetCifar

MODELS = {  # name: (depth, width_mult, batch)
    "resnet32w2": (32, 2.0, 64),
    "resnet20": (20, 1.0, 128),
}
PATHS = {"ynn": {}, "eigen": {xla_cpu.OPTION: xla_cpu.EIGEN_FUSION_TYPES}}


def _bimask_api():
    import bimask_jax

    if hasattr(bimask_jax, "sparse"):
        return bimask_jax
    import bimask_jax.flax

    return bimask_jax.flax


# ------------------------------------------------------------------------------------- ours


def jax_steps(name: str, method: str):
    """{path: (step, state)}: the jitted train step compiled per conv path, plus the count of
    convolutions in YNNPACK fusions per path."""
    depth, wm, batch = MODELS[name]
    module = ResNetCifar(depth=depth, width_mult=wm)
    if method == "bimask":
        module = _bimask_api().sparse(module, method="bimask", exclude=DENSE_LAYERS)
    x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    tx = optax.sgd(0.1, momentum=0.9)
    v = jax.jit(lambda k: module.init(k, x, train=False))(jax.random.key(0))
    params = v.pop("params")

    def step(state, x, y):
        params, opt, rest = state

        def loss_fn(p):
            logits, upd = module.apply({**rest, "params": p}, x, train=True,
                                       mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

        (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, u), opt, {**rest, **upd}), loss

    state = (params, tx.init(params), v)
    lowered = jax.jit(step).lower(state, x, y)
    out, info = {}, {}
    for path, opts in PATHS.items():
        t0 = time.perf_counter()
        exe = lowered.compile(opts)
        info[path] = {"compile_s": time.perf_counter() - t0,
                      "ynn_convs": xla_cpu.ynn_convolutions(exe.as_text())}
        out[path] = (lambda exe=exe: exe(state, x, y))
    return out, info, batch, sum(a.size for a in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------- torch


def torch_dense(batch: int, depth: int, widths: tuple[int, int, int]):
    import torch.nn as tnn
    import torch.nn.functional as F

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(cout)
            self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            y = F.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            s = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
            if self.extra:
                s = F.pad(s, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
            return F.relu(y + s)

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 2) // 6
            self.stem = tnn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.bn = tnn.BatchNorm2d(widths[0])
            blocks, cin = [], widths[0]
            for s, w in enumerate(widths):
                for b in range(n):
                    blocks.append(Block(cin, w, 2 if (s > 0 and b == 0) else 1))
                    cin = w
            self.blocks = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(widths[-1], 10)

        def forward(self, x):
            x = self.blocks(F.relu(self.bn(self.stem(x))))
            return self.fc(x.mean((2, 3)))

    return _torch_step(Net(), batch)


def _torch_step(model, batch, after_step=None):
    import torch

    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    model.train()

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
        return loss.item()

    return step


def authors_bimask(reference_dir: str, batch: int):
    """The authors' ResNet-32 (``NMConv``, 2:4, their defaults) train step, with their per-step
    ``iter`` counter; its first step (the permutation search) is taken before timing."""
    code = os.path.join(reference_dir, "CnnModels")
    if not os.path.isdir(os.path.join(code, "utils")):
        return None
    argv = sys.argv
    sys.argv = [argv[0], "--conv_type", "NMConv", "--N", "2", "--M", "4"]
    sys.path.insert(0, code)
    try:
        import models as ref_models  # their CnnModels/models
    finally:
        sys.argv = argv
    model = ref_models.resnet32_cifar10()

    def tick():
        for m in model.modules():
            if hasattr(m, "max_iter"):
                m.iter += 1

    step = _torch_step(model, batch, tick)
    step()  # iter 0: their permutation search; later steps reuse it (every 100 steps)
    return step


# ------------------------------------------------------------------------------------- timing


def round_robin(fns: dict, repeats: int, warmup: int = 1, sync=jax.block_until_ready) -> dict:
    """Median-ready timings: ``repeats`` rounds over ``fns`` in turn (after ``warmup`` calls each);
    ``sync`` waits for a result (torch's are ready on return)."""
    for f in fns.values():
        for _ in range(warmup):
            sync(f())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            sync(f())
            times[k].append(time.perf_counter() - t0)
    return times


def per_layer(batch: int, hw: int, c: int, repeats: int) -> list[dict]:
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.random.normal(jax.random.key(0), (batch, hw, hw, c))
    w = jax.random.normal(jax.random.key(1), (3, 3, c, c)) * 0.1

    def conv(a, b):
        return jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=dn)

    g = jnp.ones((batch, hw, hw, c))
    ops = {"forward": (conv, (x, w)),
           "input-gradient": (lambda g, w: jax.vjp(lambda a: conv(a, w), x)[1](g)[0], (g, w)),
           "weight-gradient": (lambda g, x: jax.vjp(lambda b: conv(x, b), w)[1](g)[0], (g, x))}
    fns = {}
    for op, (f, args) in ops.items():
        low = jax.jit(f).lower(*args)
        for path, opts in PATHS.items():
            exe = low.compile(opts)
            fns[(op, path)] = (lambda exe=exe, args=args: exe(*args))
    return _layer_rows(round_robin(fns, repeats), batch, hw, c)


def torch_layer_fns(batch: int, hw: int, c: int) -> dict:
    import torch
    import torch.nn.functional as F

    tx = torch.randn(batch, c, hw, hw)
    tw = torch.randn(c, c, 3, 3) * 0.1
    tg = torch.ones(batch, c, hw, hw)
    return {("forward", "torch"): lambda: F.conv2d(tx, tw, padding=1),
            ("input-gradient", "torch"): lambda: torch.nn.grad.conv2d_input(
                tx.shape, tw, tg, padding=1),
            ("weight-gradient", "torch"): lambda: torch.nn.grad.conv2d_weight(
                tx, tw.shape, tg, padding=1)}


def _layer_rows(times: dict, batch: int, hw: int, c: int) -> list[dict]:
    rows = []
    for (op, path), ts in times.items():
        rows.append({"shape": f"batch {batch}, {hw}x{hw}, {c}->{c}, 3x3", "op": op, "path": path,
                     "ms": 1e3 * statistics.median(ts)})
        print(f"layer {rows[-1]['shape']:32s} {op:16s} {path:6s} {rows[-1]['ms']:8.1f} ms",
              flush=True)
    return rows


LAYER = (64, 32, 32)  # batch, height = width, channels of the per-layer table


def torch_child(a) -> None:
    """The PyTorch rows, in a process of their own: PyTorch's OpenMP threads and XLA's thread
    pool in one process slow each other down many times over on a small machine (measured here:
    PyTorch's ResNet-32 step 7 img/s beside JAX, 79 alone)."""
    import torch

    res = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "steps": []}
    for name in a.models.split(","):
        depth, wm, batch = MODELS[name]
        widths = tuple(int(round(w * wm)) for w in (16, 32, 64))
        fns = {"torch dense": torch_dense(batch, depth, widths)}
        if a.reference_dir and name == "resnet32w2":
            ref = authors_bimask(a.reference_dir, batch)
            if ref is not None:
                fns["authors bimask"] = ref
        res["steps"] += _step_rows(name, batch, round_robin(fns, a.repeats, sync=lambda r: r), {})
    res["layers"] = _layer_rows(round_robin(torch_layer_fns(*LAYER), a.layer_repeats,
                                                 sync=lambda r: r), *LAYER)
    print("TORCH_JSON " + json.dumps(res), flush=True)


def _step_rows(name, batch, times, info) -> list[dict]:
    rows = []
    for k, ts in times.items():
        t = statistics.median(ts)
        rows.append({"model": name, "batch": batch, "variant": k, "step_s": t, "img_s": batch / t,
                     "min_s": min(ts), "max_s": max(ts), **info.get(k, {})})
        print(f"{name:11s} batch {batch:4d} {k:20s} {batch / t:7.1f} img/s  "
              f"(median {t * 1e3:.0f} ms, min {min(ts) * 1e3:.0f}, max {max(ts) * 1e3:.0f}) "
              f"{info.get(k, '')}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer-repeats", type=int, default=7)
    ap.add_argument("--reference-dir", default=None,
                    help="a checkout of github.com/zyxxmu/Bi-Mask (its CnnModels/ is imported); "
                         "without it the authors' row is skipped")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.torch_child:
        return torch_child(a)
    use_torch = importlib.util.find_spec("torch") is not None and not a.no_torch
    flags = xla_cpu.cpu_flags() or frozenset()
    env = {"jax": jax.__version__, "backend": jax.default_backend(),
           "machine": platform.machine(), "avx512f": "avx512f" in flags, "avx2": "avx2" in flags,
           "cpus": os.cpu_count(), "auto_choice": xla_cpu.choose("auto").describe(),
           "load_average_start": os.getloadavg()}
    print(env, flush=True)
    res = {"env": env, "steps": [], "layers": []}

    def save():
        if a.json:  # after each section, so an interrupted run keeps what it measured
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)

    res["layers"] = per_layer(*LAYER, a.layer_repeats)
    for name in a.models.split(","):
        fns, info = {}, {}
        for method in ("dense", "bimask"):
            steps, inf, batch, nparams = jax_steps(name, method)
            for path, f in steps.items():
                fns[f"ours {method} {path}"] = f
                info[f"ours {method} {path}"] = {**inf[path], "params": nparams}
        res["steps"] += _step_rows(name, batch, round_robin(fns, a.repeats), info)
        save()
    if use_torch:
        cmd = [sys.executable, os.path.abspath(__file__), "--torch-child", "--models", a.models,
               "--repeats", str(a.repeats), "--layer-repeats", str(a.layer_repeats)]
        if a.reference_dir:
            cmd += ["--reference-dir", a.reference_dir]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        child = json.loads(out.split("TORCH_JSON ", 1)[1])
        for r in child["steps"] + child["layers"]:
            print("torch child:", r, flush=True)
        env["torch"], env["torch_threads"] = child["torch"], child["torch_threads"]
        res["steps"] += child["steps"]
        res["layers"] += child["layers"]
    env["load_average_end"] = os.getloadavg()
    save()


if __name__ == "__main__":
    main()
