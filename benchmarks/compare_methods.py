"""The paper's method comparison on CIFAR-10: the same model trained with every method, same seeds,
same budget.

Methods (``--methods``, default all): ``dense``, ``srste``, ``transposable``, ``bimask-noperm``
(Bi-Mask with 0 candidates: the identity permutation), ``bimask`` (the paper's search: 100 random
candidates every 100 steps) and ``bimask-stripe`` (the stripe local search); and the methods after
Bi-Mask (issue 17, the configurations of ``benchmarks/lm_compare.py``): ``sste`` (S-STE),
``srste-mvue``, ``bimask-mvue`` and ``transposable-mvue`` (``--wgrad mvue``: the weight gradient from
the unbiased N:M estimate of the output gradient), ``transposable-hu`` (the transposable mask kept
and recomputed every 40 steps, Hu et al.'s schedule) and ``bimask-densefinish`` (the last 20% of
the steps dense). ``bimask-mvue`` and ``transposable-mvue`` make all three products of a layer N:M
(``ALL_THREE_NM``). ``--track-flips`` records the forward-mask flip rate of the sparse runs. Each run is
``train/cifar.py`` in this process, on an ImageFolder subset (``--train-per-class``,
``--test-per-class``: symbolic links into the extracted data, first images of each class in name
order) so that a CPU budget can be chosen from a measurement.

Writes one JSON line per run to ``--out`` (method, N:M, seed, epochs, final/best top-1, wall time,
mean retained fraction and search efficacy of the Bi-Mask layers at the end, flip rate), a
Markdown summary table (mean and spread per method) beside it, and with ``--plots`` two PNGs: test
top-1 per epoch per method, and the backward mask's retained fraction per epoch for the Bi-Mask
variants.

    python benchmarks/compare_methods.py --data $DATA/cifar10-jpeg.tar.gz \\
        --work-dir /tmp/bimask-compare --seeds 0 1 --epochs 10 --train-per-class 1000 \\
        --out benchmarks/results/compare_cpu.jsonl --plots
    # extra train/cifar.py flags after --, e.g.:  -- --width-mult 0.5 --batch-size 128

``--semantics`` picks what the training script computes besides the method: ``ours`` (default; the
settings of the first comparison in RESULTS.md: ``--k-order hwi --keep-incumbent --wd-rule kernels
--cifar-std cifar10``, and ``bimask`` with 100 candidates) or ``reference`` (the scripts' defaults,
which follow the authors' code: ``ihw`` grouping, the best fresh candidate replacing the current
permutation, weight decay on every parameter without "bn" in its name, their CIFAR std, and
``bimask`` with their CIFAR ``greedy_num`` of 10 candidates). Every row records it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = {
    "dense": ["--method", "dense"],
    "srste": ["--method", "srste"],
    "transposable": ["--method", "transposable"],
    "bimask-noperm": ["--method", "bimask", "--num-candidates", "0"],
    "bimask": ["--method", "bimask", "--search", "random", "--num-candidates", "100"],
    "bimask-stripe": ["--method", "bimask", "--search", "stripe"],
    # The methods after Bi-Mask (issue 17), as in benchmarks/lm_compare.py:
    "sste": ["--method", "sste"],
    "srste-mvue": ["--method", "srste", "--wgrad", "mvue"],
    "bimask-mvue": ["--method", "bimask", "--search", "random", "--num-candidates", "100",
                    "--wgrad", "mvue"],
    "transposable-mvue": ["--method", "transposable", "--wgrad", "mvue"],
    "transposable-hu": ["--method", "transposable", "--mask-update", "refresh",
                        "--refresh-every", "40"],
    "bimask-densefinish": ["--method", "bimask", "--search", "random", "--num-candidates", "100",
                           "--dense-finish", "0.2"],
}
# Forward (x W), backward-data (g W^T) and weight-gradient (x^T g) products all N:M: the
# backward-data mask is N:M along C (bimask: after its permutation; transposable: both axes) and
# the weight gradient uses the N:M MVUE estimate of g along the batch and spatial positions.
ALL_THREE_NM = ("bimask-mvue", "transposable-mvue")


# Flags per --semantics (see the module docstring); "bimask" candidates are set per semantics.
SEMANTICS = {
    "ours": ["--k-order", "hwi", "--keep-incumbent", "--wd-rule", "kernels",
             "--cifar-std", "cifar10"],
    "reference": [],
}
CANDIDATES = {"ours": "100", "reference": "10"}


def method_flags(method: str, semantics: str) -> list[str]:
    """The train/cifar.py flags of ``method`` under ``semantics``."""
    flags = list(METHODS[method])
    if "random" in flags and "--num-candidates" in flags:  # the paper's search: bimask, bimask-*
        flags[flags.index("--num-candidates") + 1] = CANDIDATES[semantics]
    return flags + SEMANTICS[semantics]


def extracted_root(data: str, work_dir: str) -> str:
    """The ImageFolder root (holding ``train/``) of ``data``: a directory, or a ``.tar.gz``
    extracted once under ``work_dir``."""
    if os.path.isdir(data):
        root = data
    else:
        if not os.path.isfile(data) or not tarfile.is_tarfile(data):
            raise ValueError(f"--data {data!r} is neither a directory nor a tar archive")
        dest = os.path.join(work_dir, "extracted")
        if not os.path.isdir(dest):
            os.makedirs(dest + ".partial", exist_ok=True)
            with tarfile.open(data) as tf:
                tf.extractall(dest + ".partial", filter="data")
            os.rename(dest + ".partial", dest)
        root = dest
    for dirpath, dirnames, _ in os.walk(root):
        if "train" in dirnames:
            return dirpath
    raise ValueError(f"no train/ folder found under {root!r}")


def subset_tree(root: str, work_dir: str, train_per_class: int, test_per_class: int) -> str:
    """An ImageFolder tree of symbolic links: the first images (by name) of every class."""
    val = next((d for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
    if val is None:
        raise ValueError(f"{root!r} has no val/ or test/ folder")
    out = os.path.join(work_dir, f"subset-{train_per_class}-{test_per_class}")
    if os.path.isdir(out):
        return out
    tmp = out + ".partial"
    for split, src, count in (("train", "train", train_per_class), ("val", val, test_per_class)):
        for cls in sorted(os.listdir(os.path.join(root, src))):
            files = sorted(os.listdir(os.path.join(root, src, cls)))
            if count:
                files = files[:count]
            os.makedirs(os.path.join(tmp, split, cls), exist_ok=True)
            for f in files:
                os.symlink(
                    os.path.abspath(os.path.join(root, src, cls, f)),
                    os.path.join(tmp, split, cls, f),
                )
    os.rename(tmp, out)
    return out


def flip_rate(sparsity: list[dict]) -> float | None:
    """The mean per-step forward-mask flip rate over the sparse steps of a run, from its
    per-epoch ``sparsity`` records (each the mean over its ``flip_steps`` steps); None without
    flip tracking or sparse steps."""
    recs = [(s["flip_rate"], s["flip_steps"]) for s in sparsity
            if s.get("flip_rate") is not None and s.get("flip_steps")]
    steps = sum(n for _, n in recs)
    return sum(r * n for r, n in recs) / steps if steps else None


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    evals, sparsity = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("type") == "eval":
                evals.append(rec)
            elif rec.get("type") == "sparsity":
                sparsity.append(rec)
    return evals, sparsity


def summarize(rows: list[dict]) -> str:
    """Markdown table: mean and spread (sample std, min-max) of the final/best top-1 per method, and
    the paired difference to dense (same seed: same initialisation and data order), averaged."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["nm"], r["method"]), []).append(r)
    dense = {r["seed"]: r["final_top1"] for r in rows if r["method"] == "dense"}
    lines = [
        "| N:M | method | seeds | final top-1 (mean ± std) | best top-1 (mean) | min-max final "
        "| final - dense, same seed (mean) | retained (mean) | flip rate (mean) | minutes per run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (nm, method), rs in sorted(groups.items()):
        fin = [r["final_top1"] for r in rs]
        best = [r["best_top1"] for r in rs]
        std = statistics.stdev(fin) if len(fin) > 1 else 0.0
        ret = [r["retained"] for r in rs if r["retained"] is not None]
        ret_cell = f"{statistics.mean(ret):.4f}" if ret else "-"
        flips = [r["flip_rate"] for r in rs if r.get("flip_rate") is not None]
        flip_cell = f"{statistics.mean(flips):.4f}" if flips else "-"
        diffs = [r["final_top1"] - dense[r["seed"]] for r in rs if r["seed"] in dense]
        diff_cell = "-" if method == "dense" or not diffs else f"{statistics.mean(diffs):+.2f}"
        minutes = statistics.mean(r["seconds"] for r in rs) / 60
        lines.append(
            f"| {nm} | {method} | {len(rs)} | {statistics.mean(fin):.2f} ± {std:.2f} | "
            f"{statistics.mean(best):.2f} | {min(fin):.2f}-{max(fin):.2f} | {diff_cell} | "
            f"{ret_cell} | {flip_cell} | {minutes:.1f} |"
        )
    return "\n".join(lines)


def _line_plot(rows: list[dict], curve: str, value: str, ylabel: str, path: str) -> str:
    """``row[curve]`` entries' ``value`` against their epoch, one panel per N:M (dense, which has
    no N:M, in every panel); a colour per method, a line style per seed. Saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nms = sorted({r["nm"] for r in rows if r["method"] != "dense"}) or ["2:4"]
    tab20 = plt.get_cmap("tab20").colors  # dark shades for the first 10 methods, then light
    colours = {m: tab20[(2 * i) % 20 + (i >= 10)] for i, m in enumerate(METHODS)}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(nms), figsize=(6.5 * len(nms), 4.5), squeeze=False)
    for ax, nm in zip(axes[0], nms, strict=True):
        for r in rows:
            if r["nm"] != nm and r["method"] != "dense":
                continue
            ax.plot(
                [e["epoch"] for e in r[curve]],
                [e[value] for e in r[curve]],
                color=colours.get(r["method"], "k"),
                linestyle=styles[r["seed"] % len(styles)],
                marker="o",
                markersize=3,
                label=f"{r['method']} s{r['seed']}",
                alpha=0.85,
            )
        ax.set_title(f"N:M = {nm}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows: list[dict], prefix: str) -> list[str]:
    """Test top-1 per epoch for every run; retained fraction per epoch for the Bi-Mask runs."""
    paths = [_line_plot(rows, "curve", "top1", "test top-1 (%)", prefix + "_top1.png")]
    bim = [r for r in rows if r["retained_curve"]]
    if bim:
        paths.append(
            _line_plot(
                bim,
                "retained_curve",
                "retained",
                "backward mask: retained fraction of forward-kept weights",
                prefix + "_retained.png",
            )
        )
    return paths


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="cifar10-jpeg.tar.gz or an ImageFolder root")
    p.add_argument("--work-dir", default="/tmp/bimask-compare")
    p.add_argument("--out", default="benchmarks/results/compare_methods.jsonl")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--nm", nargs="+", default=["2:4"], help="N:M ratios, e.g. 2:4 1:4 4:8")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=0, help="0: all")
    p.add_argument("--test-per-class", type=int, default=0, help="0: all")
    p.add_argument("--plots", action="store_true")
    p.add_argument("--track-flips", action="store_true",
                   help="pass --track-flips to the sparse runs: their forward-mask flip rate")
    p.add_argument("--semantics", default="ours", choices=list(SEMANTICS),
                   help="ours: the first comparison's settings; reference: the authors' code's")
    args = p.parse_args(argv)

    import jax  # after the argument checks: importing JAX takes seconds

    from train import cifar

    dev = jax.devices()[0]  # named in every row: "NVIDIA H100 80GB HBM3 x1", "cpu (2 cores)"
    device = (
        f"cpu ({os.cpu_count()} cores)"
        if dev.platform == "cpu"
        else f"{dev.device_kind} x{jax.device_count()}"
    )

    os.makedirs(args.work_dir, exist_ok=True)
    root = subset_tree(
        extracted_root(args.data, args.work_dir),
        args.work_dir,
        args.train_per_class,
        args.test_per_class,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    done = set()
    rows = []
    if os.path.exists(args.out):  # resume an interrupted comparison: skip finished runs
        with open(args.out) as f:
            for line in f:
                r = json.loads(line)
                rows.append(r)
                done.add((r["nm"], r["method"], r["seed"], r.get("semantics", "ours")))
    for nm in args.nm:
        n, m = (int(v) for v in nm.split(":"))
        for seed in args.seeds:
            for method in args.methods:
                if (nm, method, seed, args.semantics) in done:
                    continue
                if method == "dense" and any(
                    r["method"] == "dense" and r["seed"] == seed
                    and r.get("semantics", "ours") == args.semantics for r in rows
                ):
                    continue  # dense does not depend on N:M
                run_dir = os.path.join(args.work_dir, "runs", f"{method}-{n}of{m}-s{seed}")
                if os.path.isdir(run_dir):
                    import shutil

                    shutil.rmtree(run_dir)  # an unfinished earlier attempt
                flags = [
                    "--arch",
                    args.arch,
                    "--data-path",
                    root,
                    "--epochs",
                    str(args.epochs),
                    "--n",
                    str(n),
                    "--m",
                    str(m),
                    "--seed",
                    str(seed),
                    "--run-dir",
                    run_dir,
                    "--no-progress",
                    *method_flags(method, args.semantics),
                    *(["--track-flips"] if args.track_flips and method != "dense" else []),
                    *extra,
                ]
                summary = cifar.main(flags)
                evals, sparsity = read_metrics(run_dir)
                final = sparsity[-1] if sparsity else {}
                row = {
                    "method": method,
                    "nm": nm,
                    "seed": seed,
                    "semantics": args.semantics,
                    "arch": args.arch,
                    "device": device,
                    "epochs": summary["epochs_done"],
                    "final_top1": summary["final_top1"],
                    "best_top1": summary["best_top1"],
                    "seconds": summary["seconds"],
                    "retained": final.get("retained"),
                    "efficacy": final.get("efficacy"),
                    "flip_rate": flip_rate(sparsity),
                    "train_per_class": args.train_per_class,
                    "test_per_class": args.test_per_class,
                    "extra_flags": extra,
                    "curve": [{"epoch": e["epoch"], "top1": e["top1"]} for e in evals],
                    "retained_curve": [
                        {"epoch": s["epoch"], "retained": s["retained"]} for s in sparsity
                        if s.get("retained") is not None  # flip-only records of other methods
                    ],
                }
                rows.append(row)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    table = summarize(rows)
    print(table)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"Command: python benchmarks/compare_methods.py {' '.join(sys.argv[1:])}\n\n")
        devices = sorted({r.get("device", "not recorded") for r in rows})
        f.write(f"Device: {', '.join(devices)}\n\n")
        f.write(table + "\n")
    if args.plots:
        for path in plot(rows, os.path.splitext(args.out)[0]):
            print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
