"""Training throughput (tokens/s) of train/lm.py's step, dense against Bi-Mask, measured in one
process with the methods interleaved (rounds of ``--block`` steps per method, each round holding one
Bi-Mask refresh), so that load changes on a shared machine hit every method alike.

    python benchmarks/lm_throughput.py --preset gpt2-tiny --batch-size 16 --rounds 5 --block 50

Random tokens (throughput does not depend on the data). Prints one JSON line per method with the
median and all per-round tokens/s; ``vs_dense`` is the ratio of the medians, ``vs_dense_paired`` the
median of the per-round ratios (each round's methods run back to back, so they share its load).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from train import lm, text_data  # noqa: E402
from train.models import gpt  # noqa: E402

METHODS = {"dense": ["--method", "dense"], "bimask": ["--method", "bimask", "--search", "random"],
           "bimask-stripe": ["--method", "bimask", "--search", "stripe"],
           "srste": ["--method", "srste"], "transposable": ["--method", "transposable"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=50, help="steps per round = refresh interval")
    p.add_argument("--methods", nargs="+", default=["dense", "bimask", "bimask-stripe"],
                   choices=list(METHODS))
    a = p.parse_args(argv)
    gcfg = gpt.preset(a.preset, vocab_size=256)
    tokens = np.random.default_rng(0).integers(0, 256, 200_000).astype(np.uint16)
    mesh = lm.make_mesh((1, 1, 1))
    trainers, states = {}, {}
    for name in a.methods:
        args = lm.build_parser().parse_args(
            ["--data", "unused", "--batch-size", str(a.batch_size), "--refresh-every",
             str(a.block), "--steps", str(a.rounds * a.block + 1), *METHODS[name]])
        tr = lm.Trainer(args, gcfg, mesh)
        st, _ = tr.train_step(tr.init_state, tr.put_batch(text_data.batch_at(
            tokens, seed=0, step=0, batch_size=a.batch_size, block_size=gcfg.block_size)))
        jax.block_until_ready(st)  # compiled; step 1 next
        trainers[name], states[name] = tr, st
    # Batches are prepared up front so that only the steps are timed.
    batches = [text_data.batch_at(tokens, seed=0, step=s, batch_size=a.batch_size,
                                  block_size=gcfg.block_size) for s in range(a.block)]
    per = {name: [] for name in a.methods}
    for _ in range(a.rounds):
        for name in a.methods:
            tr, st = trainers[name], states[name]
            dev = [tr.put_batch(b) for b in batches]
            jax.block_until_ready(dev)
            t0 = time.perf_counter()
            for b in dev:
                st, _ = tr.train_step(st, b)
            jax.block_until_ready(st)
            per[name].append(a.block * a.batch_size * gcfg.block_size / (time.perf_counter() - t0))
            states[name] = st
    base = statistics.median(per["dense"]) if "dense" in per else None
    for name, v in per.items():
        med = statistics.median(v)
        # Paired: each round's ratio to the dense round just before it (same load), then the median.
        paired = (round(statistics.median(x / d for x, d in zip(v, per["dense"], strict=True)), 3)
                  if base else None)
        print(json.dumps({"method": name, "preset": a.preset, "batch": a.batch_size,
                          "median_tokens_per_s": round(med), "vs_dense": round(med / base, 3)
                          if base else None, "vs_dense_paired": paired,
                          "rounds": [round(x) for x in v]}), flush=True)


if __name__ == "__main__":
    main()
