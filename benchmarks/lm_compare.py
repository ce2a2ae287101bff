"""Method comparison of ``train/lm.py`` on one text file: dense, srste, transposable, bimask (the
paper's random search) and bimask with the stripe search, and the methods after Bi-Mask (issue 17:
S-STE, MVUE weight gradients, Hu et al.'s periodically updated transposable mask, a dense finish),
at N:M, for several seeds. Each run is a ``train/lm.py`` subprocess (its own ``metrics.jsonl``);
the driver then writes ``results.json``, a Markdown table (final validation loss, paired gap to
dense of the same seed, median tokens/s, retained fraction, mean flip rate) and a plot of the
validation curves.

    python benchmarks/lm_compare.py --data tinyshakespeare.txt --out runs/lm_compare \
        --preset gpt2-tiny --steps 400 --batch-size 16 --seeds 0 1

``--track-flips`` passes ``--track-flips`` to every sparse run (the flip rates do not change the
training). Which configurations make all three GEMMs of a layer N:M: :data:`ALL_THREE_NM`.

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
    "sste": ["--method", "sste"],
    "srste-mvue": ["--method", "srste", "--wgrad", "mvue"],
    "bimask-mvue": ["--method", "bimask", "--search", "random", "--wgrad", "mvue"],
    "transposable-mvue": ["--method", "transposable", "--wgrad", "mvue"],
    "transposable-hu": ["--method", "transposable", "--mask-update", "refresh",
                        "--refresh-every", "40"],
    "bimask-densefinish": ["--method", "bimask", "--search", "random", "--dense-finish", "0.2"],
}
# Forward (x W), backward-data (g W^T) and weight-gradient (x^T g) products all N:M: the
# backward-data mask is N:M along C (bimask: after its permutation; transposable: both axes) and
# the weight gradient uses the N:M MVUE estimate of g along the tokens.
ALL_THREE_NM = ("bimask-mvue", "transposable-mvue")


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
           *METHODS[name], *(["--track-flips"] if args.track_flips and name != "dense" else []),
           *extra]
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
        flips = [(r["flip_rate"], r["flip_steps"]) for r in recs
                 if r["type"] == "flips" and r.get("flip_steps")]
        nflip = sum(s for _, s in flips)
        rows.append({"method": name, "seed": seed, "curve": evals, "final_val_loss": evals[-1][1],
                     "tokens_per_s": statistics.median(tps) if tps else None,
                     "retained": ret[-1] if ret else None,
                     "flip_rate": sum(r * s for r, s in flips) / nflip if nflip else None})
    dense = {r["seed"]: r["final_val_loss"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["gap_to_dense"] = (r["final_val_loss"] - dense[r["seed"]]) if r["seed"] in dense else None
    return rows


def table(rows, seeds):
    lines = ["| method | final val loss (per seed) | mean | paired gap to dense (per seed) | "
             "median tokens/s | retained (bwd/fwd) | mean flip rate | all 3 GEMMs N:M |",
             "|---|---|---|---|---|---|---|---|"]
    for name in METHODS:
        rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        losses = " / ".join(f"{r['final_val_loss']:.4f}" for r in rs)
        mean = statistics.mean(r["final_val_loss"] for r in rs)
        gaps = [r["gap_to_dense"] for r in rs if r["gap_to_dense"] is not None]
        gap = (f"{statistics.mean(gaps):+.4f} ({', '.join(f'{g:+.4f}' for g in gaps)})"
               if gaps and name != "dense" else "-")
        tps = statistics.median(r["tokens_per_s"] for r in rs if r["tokens_per_s"])
        ret = [r["retained"] for r in rs if r["retained"]]
        ret = f"{statistics.mean(ret):.3f}" if ret else "-"
        flips = [r["flip_rate"] for r in rs if r.get("flip_rate") is not None]
        flip = f"{statistics.mean(flips):.4f}" if flips else "-"
        nm = "yes" if name in ALL_THREE_NM else "no"
        lines.append(f"| {name} | {losses} | {mean:.4f} | {gap} | {tps:,.0f} | {ret} | {flip} | "
                     f"{nm} |")
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx) = plt.subplots(1, 2, figsize=(12, 4.5))
    palette = ("black", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange",
               "tab:cyan", "tab:brown", "tab:olive", "tab:pink", "tab:gray", "gold")
    colors = dict(zip(METHODS, palette[:len(METHODS)], strict=True))
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
    p.add_argument("--track-flips", action="store_true",
                   help="pass --track-flips to the sparse runs (table: mean flip rate)")
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
