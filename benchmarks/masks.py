"""Cost of Bi-Mask's masks and permutation refresh, side by side with the reference procedure.

For every sparse layer of ResNet-50 (all convs but the stem) and DeiT-Small (qkv, proj, fc1, fc2 of
12 blocks), with random kernels:

* per-step time to compute (fwd, bwd) masks for the whole model under one ``jit``;
* time of one permutation refresh with 100 candidates;
* retained fraction (score / forward-kept count) for the identity vs. the searched permutation;
* peak temporary memory of the search (XLA's compiled memory analysis).

The reference procedure (``../shared/anchors/ref_procedure.py``: argsort + scatter masks per layer,
and a Python loop over random candidates, in torch) runs in the same process on the same shapes
when torch is installed. Usage::

    python benchmarks/masks.py [--ref PATH/ref_procedure.py] [--out benchmarks/results/masks.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bimask_jax as bj  # noqa: E402
from benchmarks.layer_shapes import (  # noqa: E402
    as_matrix,
    deit_small_sparse_kernels,
    resnet50_sparse_kernels,
)

N, M = 2, 4


def timeit(fn, repeats: int, warmup: int = 1, warmup_s: float = 0.5) -> float:
    """Median wall seconds of ``fn()`` (which must block until its result is ready).

    Warm-up: at least ``warmup`` calls and at least ``warmup_s`` seconds, so that what is timed is
    the steady state a training loop sees (the first several calls of the jitted ResNet-50 masks
    run measurably slower than the rest).
    """
    t_end = time.perf_counter() + warmup_s
    done = 0
    while done < warmup or (time.perf_counter() < t_end and done < 100):
        fn()
        done += 1
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def load_reference(path: str):
    try:
        import torch
    except ImportError:
        return None, None
    spec = importlib.util.spec_from_file_location("ref_procedure", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.set_num_threads(os.cpu_count() or 1)
    return mod, torch


def model_masks_fn(method: str = "bimask"):
    @jax.jit
    def masks(kernels, perms):
        return [
            bj.layer_masks(k, N, M, method, p)
            for k, p in zip(kernels, perms, strict=True)
        ]

    return masks


def refresh_fn(num_candidates: int):
    @jax.jit
    def refresh(key, kernels, perms):
        keys = jax.random.split(key, len(kernels))
        return [
            bj.search_permutation(kk, k, N, M, num_candidates, init=p)
            for kk, k, p in zip(keys, kernels, perms, strict=True)
        ]

    return refresh


def retained(kernels, perms):
    kept = ident = score = 0
    for k, p in zip(kernels, perms, strict=True):
        f = bj.forward_mask(k, N, M)
        kept += int(f.sum())
        ident += int(bj.permutation_score(k, f, jnp.arange(k.shape[-1]), N, M))
        score += int(bj.permutation_score(k, f, p, N, M))
    return ident / kept, score / kept


def bench_model(name, shapes, ref, torch, args, rng):
    kernels = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    perms = [jnp.asarray(rng.permutation(s[-1]), jnp.int32) for s in shapes]
    row = {"model": name, "layers": len(shapes), "params": int(sum(k.size for k in kernels))}

    # The library's default (impl="auto": the CPU kernel where it is available), then the XLA
    # formulation that every other platform uses.
    row["step_impl"] = "cpu_kernel" if bj.cpu_masks.available() else "xla"
    masks = model_masks_fn()
    row["ours_step_masks_s"] = timeit(
        lambda: jax.block_until_ready(masks(kernels, perms)), args.repeats
    )
    srste = model_masks_fn("srste")
    row["ours_step_srste_s"] = timeit(
        lambda: jax.block_until_ready(srste(kernels, perms)), args.repeats
    )
    masks_xla = model_masks_fn(impl="xla")
    row["ours_step_masks_xla_s"] = timeit(
        lambda: jax.block_until_ready(masks_xla(kernels, perms)), args.repeats
    )
    # Where the XLA formulation's per-step time goes: forward masks alone, backward masks alone
    # (given the forward masks), and the floor of any gather-based backward mask: one column gather
    # per layer.
    fwd_only = jax.jit(lambda ks: [bj.forward_mask(k, N, M) for k in ks])
    fwds = fwd_only(kernels)
    bwd_only = jax.jit(
        lambda ks, fs, ps: [
            bj.backward_mask(k, f, p, N, M) for k, f, p in zip(ks, fs, ps, strict=True)
        ]
    )
    gather = jax.jit(
        lambda ks, ps: [
            jnp.take_along_axis(
                k.reshape(-1, k.shape[-1]),
                jnp.broadcast_to(p[None, :], (k.size // k.shape[-1], k.shape[-1])),
                axis=1,
                mode="clip",
            )
            for k, p in zip(ks, ps, strict=True)
        ]
    )
    row["ours_fwd_only_s"] = timeit(lambda: jax.block_until_ready(fwd_only(kernels)), args.repeats)
    row["ours_bwd_only_s"] = timeit(
        lambda: jax.block_until_ready(bwd_only(kernels, fwds, perms)), args.repeats
    )
    row["one_column_gather_s"] = timeit(
        lambda: jax.block_until_ready(gather(kernels, perms)), args.repeats
    )
    refresh = refresh_fn(100)
    key = jax.random.key(0)
    row["ours_refresh100_s"] = timeit(
        lambda: jax.block_until_ready(refresh(key, kernels, perms)), max(1, args.repeats // 2)
    )
    ident_perms = [jnp.arange(s[-1], dtype=jnp.int32) for s in shapes]
    searched = refresh(key, kernels, ident_perms)
    row["retained_identity"], row["retained_random100"] = retained(kernels, searched)

    big = max(shapes, key=lambda s: np.prod(s))
    kb = jnp.zeros(big, jnp.float32)
    mem = (
        jax.jit(lambda kk, k: bj.search_permutation(kk, k, N, M, 100))
        .lower(key, kb)
        .compile()
        .memory_analysis()
    )
    row["search_peak_temp_MiB_largest_layer"] = (
        None if mem is None else round(mem.temp_size_in_bytes / 2**20, 2)
    )
    row["largest_layer"] = list(big)

    # The reference runs later (run_reference), after all of ours: torch's OpenMP workers keep
    # spinning for a while after each parallel region and would slow whatever is timed next.
    return row, (lambda: run_model_reference(row, kernels, perms, ref, torch, args))


def run_model_reference(row, kernels, perms, ref, torch, args):
    if ref is None:
        return
    tk = [torch.from_numpy(np.array(k).reshape(as_matrix(k.shape))) for k in kernels]
    tp = [np.asarray(p) for p in perms]

    def ref_step():
        for w, p in zip(tk, tp, strict=True):
            fm = ref.fwd_mask(w, N, M)
            ref.bwd_mask(w, fm, p, N, M)

    row["ref_step_masks_s"] = timeit(ref_step, max(3, args.repeats // 3))
    row["step_speedup"] = row["ref_step_masks_s"] / row["ours_step_masks_s"]
    row["step_speedup_xla"] = row["ref_step_masks_s"] / row["ours_step_masks_xla_s"]


def bench_refresh_anchor(ref, torch, args, rng):
    """The anchor's refresh: the four distinct 3x3 convs of ResNet-50, 100 candidates each."""
    shapes = [(3, 3, c, c) for c in (64, 128, 256, 512)]
    kernels = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    perms = [jnp.arange(s[-1], dtype=jnp.int32) for s in shapes]
    refresh = refresh_fn(100)
    key = jax.random.key(1)
    row = {"what": "refresh, 100 candidates, ResNet-50 3x3 convs (576x64 .. 4608x512)"}
    row["ours_s"] = timeit(
        lambda: jax.block_until_ready(refresh(key, kernels, perms)), args.repeats
    )

    def run_reference():
        if ref is None:
            return
        tk = [torch.from_numpy(np.array(k).reshape(as_matrix(k.shape))) for k in kernels]
        np_rng = np.random.default_rng(0)
        row["ref_s"] = timeit(
            lambda: [ref.search(w, N, M, 100, np_rng) for w in tk], 1, warmup=0, warmup_s=0
        )
        row["speedup"] = row["ref_s"] / row["ours_s"]

    return row, run_reference


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--ref", default=os.path.join(here, "..", "..", "shared", "anchors", "ref_procedure.py")
    )
    p.add_argument("--out", default=os.path.join(here, "results", "masks.json"))
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)

    ref, torch = load_reference(args.ref) if os.path.exists(args.ref) else (None, None)
    if ref is None:
        print(f"reference procedure not run (torch missing or {args.ref} absent)")
    rng = np.random.default_rng(0)
    r50, r50_ref = bench_model("ResNet-50", resnet50_sparse_kernels(), ref, torch, args, rng)
    deit, deit_ref = bench_model("DeiT-Small", deit_small_sparse_kernels(), ref, torch, args, rng)
    anchor, anchor_ref = bench_refresh_anchor(ref, torch, args, rng)
    for run_reference in (r50_ref, deit_ref, anchor_ref):
        run_reference()
    rows = [r50, deit]

    print(
        f"\n{N}:{M} masks, jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores"
    )
    hdr = (
        "model",
        "layers",
        "ours step (ms)",
        "ref step (ms)",
        "speed-up",
        "ours refresh-100 (s)",
        "retained identity",
        "retained random-100",
        "search temp MiB",
    )
    print(
        f"ours step = layer_masks(..., 'bimask') for every layer, one jit, impl={rows[0]['step_impl']}"
    )
    print(" | ".join(hdr))
    for r in rows:
        print(
            " | ".join(
                str(v)
                for v in (
                    r["model"],
                    r["layers"],
                    f"{1e3 * r['ours_step_masks_s']:.1f}",
                    f"{1e3 * r['ref_step_masks_s']:.0f}" if "ref_step_masks_s" in r else "-",
                    f"{r['step_speedup']:.0f}x" if "step_speedup" in r else "-",
                    f"{r['ours_refresh100_s']:.3f}",
                    f"{r['retained_identity']:.4f}",
                    f"{r['retained_random100']:.4f}",
                    r["search_peak_temp_MiB_largest_layer"],
                )
            )
        )
    print(
        "\nper step (ms): model | default impl: bimask | default impl: srste (fwd only)"
        " | XLA: bimask (speed-up) | XLA: fwd masks only | XLA: bwd masks only | one column gather"
    )
    for r in rows:
        xla_speed = f" ({r['step_speedup_xla']:.1f}x)" if "step_speedup_xla" in r else ""
        print(
            f"{r['model']} | {1e3 * r['ours_step_masks_s']:.1f} | {1e3 * r['ours_step_srste_s']:.1f}"
            f" | {1e3 * r['ours_step_masks_xla_s']:.1f}{xla_speed}"
            f" | {1e3 * r['ours_fwd_only_s']:.1f} | {1e3 * r['ours_bwd_only_s']:.1f}"
            f" | {1e3 * r['one_column_gather_s']:.1f}"
        )
    print(
        f"\n{anchor['what']}: ours {anchor['ours_s']:.3f} s"
        + (
            f", reference {anchor['ref_s']:.2f} s, speed-up {anchor['speedup']:.0f}x"
            if "ref_s" in anchor
            else ""
        )
    )
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "n": N,
                "m": M,
                "jax": jax.__version__,
                "cores": os.cpu_count(),
                "models": rows,
                "refresh_anchor": anchor,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
