"""Method comparison of ``train/lm.py`` on one text file: dense, srste, transposable, bimask (the
paper's random search) and bimask with the stripe search, at N:M, for several seeds. Each run is a
``train/lm.py`` subprocess (its own ``metrics.jsonl``); the driver then writes ``results.json``, a
Markdown table (final validation loss, paired gap to dense of the same seed, median tokens/s) and a
plot of the validation curves.

    python benchmarks/lm_compare.py --data tinyshakespeare.txt --out runs/lm_compare \
        --preset gpt2-tiny --steps 400 --batch-size 16 --seeds 0 1

Extra flags after ``--`` go to every ``train/lm.py`` run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = {  # name -> train/lm.py flags
    "dense": ["--method", "dense"],
    "srste": ["--method", "srste"],
    "transposable": ["--method", "transposable"],
    "bimask": ["--method", "bimask", "--search", "random"],
    "bimask-stripe": ["--method", "bimask", "--search", "stripe"],
}


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_one(args, name, seed, extra):
    run_dir = os.path.join(args.out, f"{name}-s{seed}")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics) and any(r["type"] == "summary" for r in read_jsonl(metrics)):
        return run_dir  # finished earlier
    cmd = [sys.executable, os.path.join(ROOT, "train", "lm.py"), "--data", args.data,
           "--preset", args.preset, "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--seed", str(seed), "--n", str(args.n), "--m", str(args.m),
           "--eval-every", str(args.eval_every), "--log-every", str(args.log_every),
           "--refresh-every", str(args.refresh_every), "--run-dir", run_dir, "--no-progress",
           *METHODS[name], *extra]
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return run_dir


def summarize(args, runs):
    rows = []
    for (name, seed), run_dir in runs.items():
        recs = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        evals = [(r["step"], r["val_loss"]) for r in recs if r["type"] == "eval"]
        tps = [r["tokens_per_s"] for r in recs if r["type"] == "train" and r.get("tokens_per_s")]
        ret = [r["retained"] for r in recs if r["type"] == "sparsity" and r.get("retained")]
        rows.append({"method": name, "seed": seed, "curve": evals, "final_val_loss": evals[-1][1],
                     "tokens_per_s": statistics.median(tps) if tps else None,
                     "retained": ret[-1] if ret else None})
    dense = {r["seed"]: r["final_val_loss"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["gap_to_dense"] = (r["final_val_loss"] - dense[r["seed"]]) if r["seed"] in dense else None
    return rows


def table(rows, seeds):
    lines = ["| method | final val loss (per seed) | mean | paired gap to dense | median tokens/s | "
             "retained (bwd/fwd) |", "|---|---|---|---|---|---|"]
    for name in METHODS:
        rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        losses = " / ".join(f"{r['final_val_loss']:.4f}" for r in rs)
        mean = statistics.mean(r["final_val_loss"] for r in rs)
        gaps = [r["gap_to_dense"] for r in rs if r["gap_to_dense"] is not None]
        gap = f"{statistics.mean(gaps):+.4f}" if gaps and name != "dense" else "-"
        tps = statistics.median(r["tokens_per_s"] for r in rs if r["tokens_per_s"])
        ret = [r["retained"] for r in rs if r["retained"]]
        lines.append(f"| {name} | {losses} | {mean:.4f} | {gap} | {tps:,.0f} | "
                     f"{statistics.mean(ret):.3f} |" if ret else
                     f"| {name} | {losses} | {mean:.4f} | {gap} | {tps:,.0f} | - |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(METHODS, ("black", "tab:blue", "tab:green", "tab:red", "tab:purple"),
                      strict=True))
    dense = {r["seed"]: dict(r["curve"]) for r in rows if r["method"] == "dense"}
    for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
        steps, losses = zip(*r["curve"], strict=True)
        style = dict(color=colors[r["method"]], ls="-" if r["seed"] == 0 else "--",
                     label=f"{r['method']} seed {r['seed']}")
        ax.plot(steps, losses, **style)
        if r["seed"] in dense:
            gx.plot(steps, [v - dense[r["seed"]][s] for s, v in zip(steps, losses, strict=True)],
                    **style)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=7)
    gx.set_xlabel("step")
    gx.set_ylabel("validation loss - dense (same seed)")
    gx.axhline(0, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", default="runs/lm_compare")
    p.add_argument("--preset", default="gpt2-tiny")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--refresh-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs = {}
    for seed in args.seeds:
        for name in args.methods:
            runs[(name, seed)] = run_one(args, name, seed, extra)
    rows = summarize(args, runs)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"argv": argv + (["--", *extra] if extra else []), "rows": rows}, f, indent=1)
    text = table(rows, args.seeds)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(args.out, "val_loss.png"))
    print(text)


if __name__ == "__main__":
    main()
