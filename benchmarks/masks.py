"""Cost of Bi-Mask's masks and permutation refresh, side by side with the reference procedure.

``eager`` part: every public function of the core on the README's shapes (a 3x3x64x128 conv
kernel), called eagerly (as a notebook calls it) and under ``jax.jit``: first call (trace +
compile), then the median of repeated calls of each.

``models`` part: for every sparse layer of ResNet-50 (all convs but the stem) and DeiT-Small (qkv,
proj, fc1, fc2 of 12 blocks), with random kernels:

* per-step time to compute (fwd, bwd) masks for the whole model under one ``jit``;
* time of one permutation refresh with 100 candidates;
* retained fraction (score / forward-kept count) for the identity vs. the searched permutation;
* peak temporary memory of the search (XLA's compiled memory analysis).

The reference procedure (a file defining ``fwd_mask(w, n, m)``, ``bwd_mask(w, fm, perm, n, m)`` and
``search(w, n, m, candidates, rng)`` on torch ``(K, C)`` tensors: argsort + scatter masks per layer,
and a Python loop over random candidates) runs in the same process on the same shapes when
``--ref`` names it and torch is installed. Usage::

    python benchmarks/masks.py [--parts eager,models,anchor] [--ref PATH/ref_procedure.py]
        [--out benchmarks/results/masks.json]
"""

from __future__ import annotations

import argparse
import functools
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
    # checkify_perm=False, as the Flax layers: no checkify effect, so the jit dispatches from C++
    # (since commit 4cac15b; the figures in BENCHMARKS.md from earlier commits carried it).
    @jax.jit
    def masks(kernels, perms):
        return [
            bj.layer_masks(k, N, M, method, p, checkify_perm=False)
            for k, p in zip(kernels, perms, strict=True)
        ]

    return masks


def refresh_fn(num_candidates: int):
    @jax.jit
    def refresh(key, kernels, perms):
        keys = jax.random.split(key, len(kernels))
        return [
            bj.search_permutation(kk, k, N, M, num_candidates, init=p, checkify_perm=False)
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

    masks = model_masks_fn()
    row["ours_step_masks_s"] = timeit(
        lambda: jax.block_until_ready(masks(kernels, perms)), args.repeats
    )
    srste = model_masks_fn("srste")
    row["ours_step_srste_s"] = timeit(
        lambda: jax.block_until_ready(srste(kernels, perms)), args.repeats
    )
    # Where the per-step time goes: forward masks alone, backward masks alone
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


def eager_cases():
    """``(name, fn, args)``: ``fn(*args)`` calls one public function with the README's shapes; the
    N:M ratio and options are closed over (static), the arrays are arguments."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 128)), jnp.float32)
    fwd = bj.forward_mask(w, N, M)
    perm = jnp.asarray(rng.permutation(128), jnp.int32)
    key = jax.random.key(1)
    x = jnp.asarray(rng.standard_normal((8, 32, 32, 64)), jnp.float32)
    fb = bj.layer_masks(w, N, M, "bimask", perm)
    w2 = w.reshape(-1, 128)
    fb2 = (fb[0].reshape(-1, 128), fb[1].reshape(-1, 128))
    x2 = jnp.asarray(rng.standard_normal((256, w2.shape[0])), jnp.float32)
    score, ident = bj.permutation_score(w, fwd, perm, N, M), bj.permutation_score(
        w, fwd, jnp.arange(128), N, M
    )
    upper = bj.retained_upper_bound(fwd, N, M)
    return [
        ("nm_mask", lambda w: bj.nm_mask(w, N, M, axis=-2), (w,)),
        ("forward_mask", lambda w: bj.forward_mask(w, N, M), (w,)),
        ("forward_mask ihw", lambda w: bj.forward_mask(w, N, M, k_order="ihw"), (w,)),
        ("backward_mask", lambda w, f, p: bj.backward_mask(w, f, p, N, M), (w, fwd, perm)),
        ("transposable_mask", lambda w: bj.transposable_mask(w, N, M), (w,)),
        ("layer_masks bimask", lambda w, p: bj.layer_masks(w, N, M, "bimask", p), (w, perm)),
        ("layer_masks srste", lambda w: bj.layer_masks(w, N, M, "srste"), (w,)),
        ("inverse_permutation", bj.inverse_permutation, (perm,)),
        ("permutation_score", lambda w, f, p: bj.permutation_score(w, f, p, N, M), (w, fwd, perm)),
        ("search_permutation random-100",
         lambda k, w: bj.search_permutation(k, w, N, M, num_candidates=100), (key, w)),
        ("search_permutation stripe-100",
         lambda k, w: bj.search_permutation(k, w, N, M, method="stripe", iterations=100),
         (key, w)),
        ("retained_upper_bound", lambda f: bj.retained_upper_bound(f, N, M), (fwd,)),
        ("search_efficacy", bj.search_efficacy, (score, ident, upper)),
        ("sparse_dense (256x576 @ 576x128)",
         lambda x, w, f, b: bj.sparse_dense(x, w, f, b), (x2, w2, *fb2)),
        ("sparse_conv (8x32x32x64, 3x3x64x128)",
         lambda x, w, f, b: bj.sparse_conv(x, w, f, b), (x, w, *fb)),
        ("grad sparse_conv",
         lambda x, w, f, b: jax.grad(lambda w_: bj.sparse_conv(x, w_, f, b).sum())(w),
         (x, w, *fb)),
    ]


def _call(fn, fargs):
    return jax.block_until_ready(fn(*fargs))


def bench_eager(args):
    """Eager vs. jitted call of every public function (issue 13 §1: eager <= ~2x jit)."""
    rows = []
    for name, fn, fargs in eager_cases():
        jitted = jax.jit(fn)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*fargs))
        first = time.perf_counter() - t0
        jax.block_until_ready(jitted(*fargs))
        # interleave so that load changes hit both alike
        eager_t, jit_t = [], []
        for _ in range(3):
            for f, ts in ((fn, eager_t), (jitted, jit_t)):
                ts.append(timeit(functools.partial(_call, f, fargs), args.repeats, 1, 0.1))
        row = {
            "function": name,
            "first_eager_call_s": first,
            "eager_s": statistics.median(eager_t),
            "jit_s": statistics.median(jit_t),
        }
        row["eager_over_jit"] = row["eager_s"] / row["jit_s"]
        rows.append(row)
        print(
            f"{name:40s} first {1e3 * first:8.1f} ms | eager {1e3 * row['eager_s']:8.3f} ms"
            f" | jit {1e3 * row['jit_s']:8.3f} ms | ratio {row['eager_over_jit']:.2f}",
            flush=True,
        )
    return rows


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="eager,models,anchor",
                   help="comma-separated subset of eager, models, anchor")
    p.add_argument("--models", default="ResNet-50,DeiT-Small")
    p.add_argument("--ref", default=None,
                   help="the reference procedure's file (needs torch); not run when omitted")
    p.add_argument("--out", default=os.path.join(here, "results", "masks.json"))
    p.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))

    ref = torch = None
    if args.ref is not None and ({"models", "anchor"} & parts):
        ref, torch = load_reference(args.ref) if os.path.exists(args.ref) else (None, None)
    if ref is None and ({"models", "anchor"} & parts):
        print(f"reference procedure not run (no --ref, torch missing or {args.ref} absent)")
    out = {"n": N, "m": M, "jax": jax.__version__, "cores": os.cpu_count()}
    print(f"{N}:{M}, jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores")
    if "eager" in parts:
        out["eager_vs_jit"] = bench_eager(args)
    rng = np.random.default_rng(0)
    later = []
    rows = []
    shapes = {"ResNet-50": resnet50_sparse_kernels, "DeiT-Small": deit_small_sparse_kernels}
    if "models" in parts:
        for name in args.models.split(","):
            row, run_ref = bench_model(name, shapes[name](), ref, torch, args, rng)
            rows.append(row)
            later.append(run_ref)
        out["models"] = rows
    if "anchor" in parts:
        anchor, anchor_ref = bench_refresh_anchor(ref, torch, args, rng)
        later.append(anchor_ref)
        out["refresh_anchor"] = anchor
    for run_reference in later:  # the reference after all of ours (torch's spinning workers)
        run_reference()

    if rows:
        print("\nours step = layer_masks(..., 'bimask') for every layer, one jit")
        print("model | layers | ours step (ms) | ref step (ms) | speed-up | ours refresh-100 (s)"
              " | retained identity | retained random-100 | search temp MiB")
        for r in rows:
            print(" | ".join(str(v) for v in (
                r["model"], r["layers"], f"{1e3 * r['ours_step_masks_s']:.1f}",
                f"{1e3 * r['ref_step_masks_s']:.0f}" if "ref_step_masks_s" in r else "-",
                f"{r['step_speedup']:.1f}x" if "step_speedup" in r else "-",
                f"{r['ours_refresh100_s']:.3f}", f"{r['retained_identity']:.4f}",
                f"{r['retained_random100']:.4f}", r["search_peak_temp_MiB_largest_layer"],
            )))
        print("\nper step (ms): model | bimask | srste (fwd only) | fwd masks only | bwd masks only"
              " | one column gather")
        for r in rows:
            print(f"{r['model']} | {1e3 * r['ours_step_masks_s']:.1f}"
                  f" | {1e3 * r['ours_step_srste_s']:.1f} | {1e3 * r['ours_fwd_only_s']:.1f}"
                  f" | {1e3 * r['ours_bwd_only_s']:.1f} | {1e3 * r['one_column_gather_s']:.1f}")
    if "refresh_anchor" in out:
        anchor = out["refresh_anchor"]
        print(f"\n{anchor['what']}: ours {anchor['ours_s']:.3f} s" + (
            f", reference {anchor['ref_s']:.2f} s, speed-up {anchor['speedup']:.0f}x"
            if "ref_s" in anchor else ""))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
