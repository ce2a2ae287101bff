"""Benchmark of the 2:4 Pallas kernels against XLA's dense dot (and torch/cuSPARSELt when present).

On a GPU (bf16, the GEMM shapes of ResNet-50 at batch 256 as implicit GEMMs and DeiT-Small at
batch 256 x 197 tokens), per shape (M, K, N):

* ``dense``      XLA ``x @ W`` (W = W*Mf as a dense bf16 array)
* ``spmm``       ``pallas_kernels.spmm`` on ``compress(W*Mf)``                (forward product)
* ``dense_bwd``  XLA ``g @ (W*Mb)^T``
* ``bwd_xla``    ``spmm_bwd_data(..., gather="xla")``    (one XLA gather of g's columns + spmm)
* ``bwd_kernel`` ``spmm_bwd_data(..., gather="kernel")`` (gathered loads inside the kernel)
* ``gather``     the XLA gather ``g[:, perm]`` alone (its share of ``bwd_xla``)
* ``resparsify`` ``pallas_kernels.resparsify(W, perm)`` (both operands + Mf, one pass over W)
* ``torch_dense`` / ``torch_24``: ``F.linear`` dense and with ``to_sparse_semi_structured``
  (cuSPARSELt by default), only if torch with CUDA is importable.

Each time is the median over ``--reps`` calls after ``--warmup`` calls, each call on the next of
several input copies (rotated so that the copies together exceed ``--l2-mib`` x 3 bytes, to defeat
L2 reuse), timed with ``block_until_ready`` (so per-call dispatch overhead is included: small
GEMMs are overhead-bound). Correctness is checked in the same run (relative Frobenius error against
the dense result; exact equality of the re-sparsify outputs with the jnp reference).

Usage:
  python benchmarks/kernels.py                      # GPU: full table, JSON to --out
  python benchmarks/kernels.py --interpret --tiny   # CPU smoke test (interpret mode, tiny shapes)
  python benchmarks/kernels.py --models gpt2 --sm90 # the GPT-2 MLP shapes, with the Hopper kernel
  python benchmarks/kernels.py --shapes a:8192:768:3072  # explicit name:M:K:N shapes

``--sm90`` off a GPU (with ``--interpret``) still calls the Hopper path, which then reports its
error in the row (``benchmarks/gpu_check.py --dry-run`` swaps in a jnp stand-in kernel there).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas_kernels import (  # noqa: E402
    compress,
    resparsify,
    resparsify_reference,
    spmm,
    spmm_bwd_data,
    top2_mask,
)


def resnet50_gemms(batch: int = 256) -> list[tuple[str, int, int, int]]:
    """Distinct implicit GEMMs (M = batch*H*W, K = kh*kw*Cin, N = Cout) of ResNet-50 (v1.5, 224^2
    input, stride on the 3x3) except the dense stem: per stage the first block's 1x1 (at the input
    resolution), the 3x3, the expanding 1x1, the downsample shortcut, the later blocks' first 1x1;
    and the fc layer."""
    out = []
    # (stage, output side, width, first block's input channels, first block's input side)
    for st, hw, width, cin, hw_in in ((1, 56, 64, 64, 56), (2, 28, 128, 256, 56),
                                      (3, 14, 256, 512, 28), (4, 7, 512, 1024, 14)):
        m, m_in = batch * hw * hw, batch * hw_in * hw_in
        out += [
            (f"r50.s{st}.b0_1x1_in", m_in, cin, width),
            (f"r50.s{st}.3x3", m, 9 * width, width),
            (f"r50.s{st}.1x1_out", m, width, 4 * width),
            (f"r50.s{st}.downsample", m, cin, 4 * width),
            (f"r50.s{st}.1x1_in", m, 4 * width, width),
        ]
    out.append(("r50.fc", batch, 2048, 1000))
    seen, uniq = set(), []
    for name, m, k, n in out:
        if (m, k, n) not in seen:
            seen.add((m, k, n))
            uniq.append((name, m, k, n))
    return uniq


def deit_small_gemms(batch: int = 256, tokens: int = 197) -> list[tuple[str, int, int, int]]:
    m, d = batch * tokens, 384
    return [("deit_s.qkv", m, d, 3 * d), ("deit_s.proj", m, d, d), ("deit_s.fc1", m, d, 4 * d),
            ("deit_s.fc2", m, 4 * d, d), ("deit_s.head", batch, d, 1000)]


def gpt2_mlp_gemms(tokens: int = 8192, d: int = 768) -> list[tuple[str, int, int, int]]:
    """GPT-2 small's MLP at 8192 tokens (e.g. batch 8 x 1024): fc1 d -> 4d and fc2 4d -> d."""
    return [("gpt2.fc1", tokens, d, 4 * d), ("gpt2.fc2", tokens, 4 * d, d)]


def parse_shapes(spec: str) -> list[tuple[str, int, int, int]]:
    """``"name:M:K:N,name:M:K:N"`` -> shape tuples (for explicit shapes on the command line)."""
    out = []
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        if len(parts) != 4:
            raise ValueError(f"--shapes entry {item!r} must be name:M:K:N")
        name, dims = parts[0], [int(v) for v in parts[1:]]
        if min(dims) < 1:
            raise ValueError(f"--shapes entry {item!r}: M, K, N must be >= 1")
        out.append((name, *dims))
    return out


def tiny_gemms(gpu: bool = False) -> list[tuple[str, int, int, int]]:
    out = [("tiny.a", 40, 64, 32), ("tiny.b", 17, 36, 24)]
    return out + [("tiny.sm90", 256, 256, 128)] if gpu else out  # divides the sm90 tiles


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def time_calls(fn, arg_sets, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn(*arg_sets[i % len])``, each call blocked on."""
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times = []
    for i in range(reps):
        args = arg_sets[i % len(arg_sets)]
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_times(x_sets, w_dense, warmup, reps):
    """(dense ms, 2:4 ms, rel err) of torch F.linear, or an error string."""
    try:
        import torch
        import torch.nn.functional as F  # noqa: N812
        from torch.sparse import to_sparse_semi_structured

        if not torch.cuda.is_available():
            return "torch without CUDA"
        wt = torch.from_numpy(np.asarray(w_dense, np.float32).T.copy()).to("cuda", torch.bfloat16)
        xs = [torch.from_numpy(np.asarray(x, np.float32)).to("cuda", torch.bfloat16)
              for x in x_sets]
        ws = to_sparse_semi_structured(wt)

        def run(w):
            for i in range(warmup):
                F.linear(xs[i % len(xs)], w)
            torch.cuda.synchronize()
            ts = []
            for i in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                F.linear(xs[i % len(xs)], w)
                end.record()
                torch.cuda.synchronize()
                ts.append(start.elapsed_time(end))
            return statistics.median(ts)

        d, s = run(wt), run(ws)
        err = rel_err(F.linear(xs[0], ws).float().cpu().numpy(),
                      F.linear(xs[0], wt).float().cpu().numpy())
        return d, s, err
    except Exception as e:  # report, never hide
        return f"{type(e).__name__}: {e}"[:200]


def sm90_times(xs, fv, fm, wf, f_dense, dense_ms, warmup, reps):
    """Hopper sparse-wgmma forward (UNVERIFIED kernel): timings and errors vs dense, or an error.

    ``probe01_rel_err`` uses metadata with positions (0, 1) in every group, so it does not depend on
    the per-thread metadata layout: if it fails, descriptors/instruction are wrong; if only
    ``rel_err`` fails, the derived metadata layout is (see the hopper-sparse-mma note, section 6).
    """
    try:
        from pallas_kernels import decompress
        from pallas_kernels.hopper_sparse import pack_sm90_metadata, spmm_sm90, spmm_t_sm90

        n = fv.shape[1]  # A = W^T has N rows: 128-row tiles where they divide, else 64
        tiles = dict(tile_m=128 if n % 128 == 0 else 64, tile_n=128, tile_k=128)
        f_full = jax.jit(lambda x, v, md: spmm_sm90(x, v, md, **tiles))
        a_t, words = fv.T, pack_sm90_metadata(fm.T)
        f_kernel = jax.jit(lambda a, w_, x: spmm_t_sm90(a, w_, x, **tiles))
        probe = jnp.full(fm.shape, 0x44, jnp.uint8)
        probe_err = rel_err(f_full(xs[0], fv, probe), f_dense(xs[0], decompress(fv, probe, 0)))
        err = rel_err(f_full(xs[0], fv, fm), f_dense(xs[0], wf))
        full = time_calls(f_full, [(x, fv, fm) for x in xs], warmup, reps)
        kern = time_calls(f_kernel, [(a_t, words, x) for x in xs], warmup, reps)
        return dict(ms_with_transposes=full, ms_kernel=kern, rel_err=err,
                    probe01_rel_err=probe_err, dense_over_kernel=dense_ms / kern)
    except Exception as e:  # report, never hide
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def bench_shape(name, m, k, n, *, dtype, interpret, warmup, reps, l2_bytes, seed, blocks,
                with_torch, with_sm90=False):
    key = jax.random.PRNGKey(seed)
    kw, kp, kx, kg = jax.random.split(key, 4)
    w = jax.random.normal(kw, (k, n), jnp.float32).astype(dtype)
    perm = jax.random.permutation(kp, n).astype(jnp.int32)
    set_bytes = (m * k + m * n) * jnp.dtype(dtype).itemsize
    copies = int(min(16, max(2, math.ceil(3 * l2_bytes / set_bytes))))
    xs = [jax.random.normal(jax.random.fold_in(kx, i), (m, k), jnp.float32).astype(dtype)
          for i in range(copies)]
    gs = [jax.random.normal(jax.random.fold_in(kg, i), (m, n), jnp.float32).astype(dtype)
          for i in range(copies)]

    # operands (outside the timed region)
    rs = resparsify(w, perm, interpret=interpret)
    ref = resparsify_reference(w, perm)
    resparsify_exact = all(bool(jnp.array_equal(a, b)) for a, b in zip(rs, ref, strict=True))
    mf = rs.fwd_mask
    wf = jnp.where(mf, w, jnp.zeros((), dtype))
    mbp = top2_mask(wf[:, perm], axis=1)
    wb = jnp.zeros_like(w).at[:, perm].set(jnp.where(mbp, wf[:, perm], jnp.zeros((), dtype)))
    fv, fm = rs.fwd_values, rs.fwd_meta
    bv, bm = rs.bwd_values, rs.bwd_meta
    cv, cm = compress(wf, 0, mask=mf)
    assert bool(jnp.array_equal(cv, fv)) and bool(jnp.array_equal(cm, fm))

    w_bytes = k * n * jnp.dtype(dtype).itemsize
    w_copies = [w + jnp.zeros((), dtype) for _ in range(
        int(min(16, max(2, math.ceil(3 * l2_bytes / w_bytes)))))]
    kern = dict(interpret=interpret, **blocks)
    f_dense = jax.jit(lambda x, w_: jnp.dot(x, w_))
    f_spmm = jax.jit(lambda x, v, md: spmm(x, v, md, **kern))
    f_dense_bwd = jax.jit(lambda g, w_: jnp.dot(g, w_.T))
    f_bwd_xla = jax.jit(lambda g, v, md, p: spmm_bwd_data(g, v, md, p, gather="xla", **kern))
    f_bwd_kernel = jax.jit(
        lambda g, v, md, p: spmm_bwd_data(g, v, md, p, gather="kernel", **kern))
    f_gather = jax.jit(lambda g, p: jnp.take(g, p, axis=1))
    f_resp = jax.jit(lambda w_, p: resparsify(w_, p, interpret=interpret))

    checks = {
        "spmm": rel_err(f_spmm(xs[0], fv, fm), f_dense(xs[0], wf)),
        "bwd_xla": rel_err(f_bwd_xla(gs[0], bv, bm, perm), f_dense_bwd(gs[0], wb)),
        "bwd_kernel": rel_err(f_bwd_kernel(gs[0], bv, bm, perm), f_dense_bwd(gs[0], wb)),
        "resparsify_exact": resparsify_exact,
    }
    t = {
        "dense": time_calls(f_dense, [(x, wf) for x in xs], warmup, reps),
        "spmm": time_calls(f_spmm, [(x, fv, fm) for x in xs], warmup, reps),
        "dense_bwd": time_calls(f_dense_bwd, [(g, wb) for g in gs], warmup, reps),
        "bwd_xla": time_calls(f_bwd_xla, [(g, bv, bm, perm) for g in gs], warmup, reps),
        "bwd_kernel": time_calls(f_bwd_kernel, [(g, bv, bm, perm) for g in gs], warmup, reps),
        "gather": time_calls(f_gather, [(g, perm) for g in gs], warmup, reps),
        "resparsify": time_calls(f_resp, [(w_, perm) for w_ in w_copies], warmup, reps),
    }
    row = dict(name=name, M=m, K=k, N=n, copies=copies, ms=t, checks=checks)
    row["ratios"] = {
        "dense/spmm": t["dense"] / t["spmm"],
        "dense_bwd/bwd_xla": t["dense_bwd"] / t["bwd_xla"],
        "dense_bwd/bwd_kernel": t["dense_bwd"] / t["bwd_kernel"],
        "resparsify/spmm": t["resparsify"] / t["spmm"],
    }
    if with_sm90:
        row["sm90"] = sm90_times(xs, fv, fm, wf, f_dense, t["dense"], warmup, reps)
    if with_torch:
        tt = torch_times(xs, wf, warmup, reps)
        row["torch"] = (dict(dense_ms=tt[0], sparse24_ms=tt[1], rel_err=tt[2],
                             dense_over_sparse=tt[0] / tt[1])
                        if isinstance(tt, tuple) else {"error": tt})
    return row


def print_table(rows):
    head = ("| shape | M | K | N | dense ms | spmm ms | dense/spmm | dense_bwd ms | bwd_xla ms | "
            "bwd_kernel ms | gather ms | resparsify ms | resp/spmm | torch dense/2:4 | "
            "sm90 dense/kernel (err) | max rel err |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        t, q, c = r["ms"], r["ratios"], r["checks"]
        tor = r.get("torch", {})
        tor_s = (f"{tor['dense_over_sparse']:.2f}x" if "dense_over_sparse" in tor
                 else tor.get("error", "-"))
        err = max(c["spmm"], c["bwd_xla"], c["bwd_kernel"])
        sm = r.get("sm90", {})
        sm_s = (f"{sm['dense_over_kernel']:.2f}x ({sm['rel_err']:.1e}, "
                f"probe {sm['probe01_rel_err']:.1e})"
                if "dense_over_kernel" in sm else sm.get("error", "-"))
        print(f"| {r['name']} | {r['M']} | {r['K']} | {r['N']} | {t['dense']:.3f} | "
              f"{t['spmm']:.3f} | {q['dense/spmm']:.2f}x | {t['dense_bwd']:.3f} | "
              f"{t['bwd_xla']:.3f} | {t['bwd_kernel']:.3f} | {t['gather']:.3f} | "
              f"{t['resparsify']:.3f} | {100 * q['resparsify/spmm']:.0f}% | {tor_s} | {sm_s} | "
              f"{err:.1e}{'' if c['resparsify_exact'] else ' RESPARSIFY MISMATCH'} |")


def write_json(path, meta, rows, complete=False, failed=()):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dict(meta=meta, rows=rows, complete=complete,
                                          failed=list(failed)), indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes only")
    ap.add_argument("--models", default="resnet50,deit_small",
                    help="comma list of resnet50, deit_small, gpt2")
    ap.add_argument("--shapes", default="", help="explicit shapes name:M:K:N,... (added last)")
    ap.add_argument("--only", default="", help="comma list of shape-name prefixes to keep")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--l2-mib", type=float, default=50.0, help="L2 size to rotate past (H100: 50)")
    ap.add_argument("--block-m", type=int, default=64)
    ap.add_argument("--block-n", type=int, default=64)
    ap.add_argument("--block-k", type=int, default=256)
    ap.add_argument("--loads", default="strided", choices=["strided", "split"],
                    help="spmm kernel variant (see pallas_kernels.spmm)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--sm90", action="store_true",
                    help="also time the (unverified) Hopper sparse-wgmma forward kernel")
    ap.add_argument("--out", default="", help="JSON output path")
    args = ap.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not args.interpret:
        ap.error("no GPU backend: pass --interpret (with --tiny) for the CPU smoke test")
    shapes = tiny_gemms(gpu=on_gpu) if args.tiny else []
    if not args.tiny:
        models = args.models.split(",")
        if "resnet50" in models:
            shapes += resnet50_gemms()
        if "deit_small" in models:
            shapes += deit_small_gemms()
        if "gpt2" in models:
            shapes += gpt2_mlp_gemms()
        unknown = set(models) - {"resnet50", "deit_small", "gpt2", ""}
        if unknown:
            ap.error(f"--models: unknown {sorted(unknown)} (resnet50, deit_small, gpt2)")
    shapes += parse_shapes(args.shapes)
    if args.only:
        keep = tuple(args.only.split(","))
        shapes = [s for s in shapes if s[0].startswith(keep)]
    dtype = jnp.dtype(args.dtype)
    blocks = dict(block_m=args.block_m, block_n=args.block_n, block_k=args.block_k,
                  loads=args.loads)
    if args.interpret:
        blocks = dict(block_m=16, block_n=16, block_k=32, loads=args.loads)
    meta = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                jax=jax.__version__, python=platform.python_version(), dtype=args.dtype,
                interpret=args.interpret, blocks=blocks, warmup=args.warmup, reps=args.reps,
                l2_mib=args.l2_mib,
                command=" ".join(["python benchmarks/kernels.py",
                                  *(sys.argv[1:] if argv is None else argv)]))
    print(f"# {meta['device']} ({meta['backend']}), jax {meta['jax']}, {args.dtype}, "
          f"interpret={args.interpret}, blocks={blocks}")
    if args.interpret:
        print("# interpret mode: a correctness smoke test; the times are NOT kernel performance")
    rows = []
    for name, m, k, n in shapes:
        row = bench_shape(name, m, k, n, dtype=dtype, interpret=args.interpret,
                          warmup=args.warmup, reps=args.reps, l2_bytes=args.l2_mib * 2**20,
                          seed=len(rows), blocks=blocks,
                          with_torch=on_gpu and not args.no_torch,
                          with_sm90=args.sm90)
        rows.append(row)
        print(f"done {name}: " + ", ".join(f"{a}={b:.3f}ms" for a, b in row["ms"].items()),
              file=sys.stderr, flush=True)
        if args.out:  # after every shape: a run cut short by a timeout keeps its rows
            write_json(args.out, meta, rows)
    print_table(rows)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    bad = [r["name"] for r in rows
           if max(r["checks"]["spmm"], r["checks"]["bwd_xla"], r["checks"]["bwd_kernel"]) > tol
           or not r["checks"]["resparsify_exact"]]
    if args.out:
        write_json(args.out, meta, rows, complete=True, failed=bad)
    if bad:
        print(f"CORRECTNESS FAILED for {bad} (tolerance {tol})")
        return 1
    print(f"correctness ok for all {len(rows)} shapes (rel err <= {tol}, re-sparsify exact)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
