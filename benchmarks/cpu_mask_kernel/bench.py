"""Issue 2 experiment: could a hand-written CPU kernel reach the 50x per-step mask goal?

Compiles ``masks_kernel.cc`` (g++ -O3 -march=native -fopenmp) and, for the 52 sparse ResNet-50
layers with random kernels and permutations at 2:4, checks its forward and backward masks against
``bimask_jax.layer_masks`` bit for bit, then times, in the same process: the kernel on 1 and 2
threads (called per layer through ctypes), the library's jitted XLA ``layer_masks`` and, when
torch is installed, the reference procedure (``../shared/anchors/ref_procedure.py``). Not part of
the library or the tests::

    python benchmarks/cpu_mask_kernel/bench.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import bimask_jax as bj  # noqa: E402
from benchmarks.layer_shapes import as_matrix, resnet50_sparse_kernels  # noqa: E402
from benchmarks.masks import load_reference, timeit  # noqa: E402

N, M = 2, 4


def build() -> ctypes.CDLL:
    out = os.path.join(tempfile.mkdtemp(), "masks_kernel.so")
    src = os.path.join(HERE, "masks_kernel.cc")
    cmd = ["g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", out, src]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(out)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.masks.argtypes = [p, i64, i64, i32, i32, p, p, p, p, i32]
    lib.masks.restype = i32
    return lib


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--ref",
        default=os.path.join(HERE, "..", "..", "..", "shared", "anchors", "ref_procedure.py"),
    )
    args = ap.parse_args(argv)
    lib = build()
    rng = np.random.default_rng(0)
    shapes = [as_matrix(s) for s in resnet50_sparse_kernels()]
    ws = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    perms = [rng.permutation(s[1]).astype(np.int32) for s in shapes]
    orders = [np.ascontiguousarray(p.reshape(-1, M).T.reshape(-1)) for p in perms]
    invs = [np.argsort(o).astype(np.int32) for o in orders]
    fwds = [np.empty(s, np.uint8) for s in shapes]
    bwds = [np.empty(s, np.uint8) for s in shapes]

    def kernel(threads):
        for w, o, iv, f, b in zip(ws, orders, invs, fwds, bwds, strict=True):
            rc = lib.masks(
                w.ctypes.data,
                *w.shape,
                N,
                M,
                o.ctypes.data,
                iv.ctypes.data,
                f.ctypes.data,
                b.ctypes.data,
                threads,
            )
            assert rc == 0

    xla = jax.jit(
        lambda ks, ps: [bj.layer_masks(k, N, M, "bimask", p) for k, p in zip(ks, ps, strict=True)]
    )
    jk, jp = [jnp.asarray(w) for w in ws], [jnp.asarray(p) for p in perms]
    kernel(1)
    for (f, b), fk, bk in zip(xla(jk, jp), fwds, bwds, strict=True):
        if not (
            np.array_equal(np.asarray(f), fk.astype(bool))
            and np.array_equal(np.asarray(b), bk.astype(bool))
        ):
            sys.exit("kernel masks differ from bimask_jax.layer_masks")
    print(f"masks equal to bimask_jax.layer_masks on all {len(ws)} layers")

    t = {f"kernel, {n} thread(s)": timeit(lambda n=n: kernel(n), args.repeats) for n in (1, 2)}
    t["XLA layer_masks (jit)"] = timeit(lambda: jax.block_until_ready(xla(jk, jp)), args.repeats)
    ref, torch = load_reference(args.ref) if os.path.exists(args.ref) else (None, None)
    if ref is not None:
        tk = [torch.from_numpy(w) for w in ws]

        def ref_step():
            for w, p in zip(tk, perms, strict=True):
                ref.bwd_mask(w, ref.fwd_mask(w, N, M), p, N, M)

        ref_s = timeit(ref_step, max(3, args.repeats // 3))
        t["reference procedure (torch)"] = ref_s
    for name, s in t.items():
        speed = f"  {ref_s / s:5.1f}x the reference" if ref is not None else ""
        print(f"{name:30s} {1e3 * s:8.1f} ms per step{speed}")


if __name__ == "__main__":
    main()
