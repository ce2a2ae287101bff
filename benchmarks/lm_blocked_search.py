"""What restricting Bi-Mask's permutation to tensor-parallel column blocks costs: the backward
mask's retained fraction (kept backward-mask entries / forward-mask entries) of the unrestricted
search (1 block) and of block-diagonal searches (2, 4, 8 blocks: a column-parallel layer on 2, 4, 8
devices), on the same kernels, for the paper's random search and the stripe local search.

    python benchmarks/lm_blocked_search.py --shapes 768x2304 768x3072 --blocks 1 2 4 8

Kernels: i.i.d. normal (GPT-2 initialisation, up to scale; the masks only see magnitudes) at the
given ``KxC`` shapes (default: GPT-2 small's ``qkv`` and ``up``), ``--seeds`` of them per shape.
Prints one JSON line per (shape, search, blocks) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bimask_jax as bj  # noqa: E402
from bimask_jax.blocked_permutation import block_keys, search_blocked_permutation  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["768x2304", "768x3072"])
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--searches", nargs="+", default=["random", "stripe"])
    p.add_argument("--budget", type=int, default=100, help="candidates / iterations")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    args = p.parse_args(argv)
    rows = []
    for shape in args.shapes:
        k, c = (int(v) for v in shape.split("x"))
        for seed in range(args.seeds):
            w = np.random.default_rng(seed).standard_normal((k, c)).astype(np.float32)
            fwd = bj.forward_mask(w, args.n, args.m)
            kept = int(fwd.sum())
            ident = int(bj.permutation_score(w, fwd, np.arange(c), args.n, args.m))
            for search in args.searches:
                for blocks in args.blocks:
                    keys = block_keys(jax.random.key(seed), blocks)
                    t0 = time.time()
                    perm = search_blocked_permutation(
                        keys, w, args.n, args.m, method=search, num_candidates=args.budget,
                        iterations=args.budget)
                    score = int(bj.permutation_score(w, fwd, perm, args.n, args.m))
                    row = dict(shape=shape, seed=seed, search=search, blocks=blocks,
                               retained=score / kept, identity=ident / kept,
                               seconds=round(time.time() - t0, 2))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(f"\n{args.n}:{args.m}, budget {args.budget}, {args.seeds} seed(s); retained fraction "
          "(mean over seeds), identity permutation in brackets\n")
    print("| shape | search | " + " | ".join(f"{b} block(s)" for b in args.blocks) + " |")
    print("|---|---|" + "---|" * len(args.blocks))
    for shape in args.shapes:
        for search in args.searches:
            cells = []
            for b in args.blocks:
                r = [x for x in rows if (x["shape"], x["search"], x["blocks"]) == (shape, search, b)]
                cells.append(f"{np.mean([x['retained'] for x in r]):.4f}")
            ident = np.mean([x["identity"] for x in rows if x["shape"] == shape])
            print(f"| {shape} ({ident:.4f}) | {search} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
