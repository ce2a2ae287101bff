"""Permutation search benchmark: identity vs the paper's random candidates vs the local searches.

For every layer, from the identity as incumbent, measures the backward-mask score (forward-kept
weights that survive in the backward mask) and the jit-compiled wall time (compile excluded; the
median of ``--repeats`` calls, the random-100 and local-search calls interleaved so that load from
other processes hits them alike) of:

* ``identity``: no search;
* ``random-100`` (the paper) and ``random-1000``: ``search_permutation(method="random")``;
* ``stripe-B``: ``search_permutation(method="stripe", iterations=B)``;
* ``stripe-B-kickK``: the same with ``kick=K`` (optional, ``--stripe-kick-iterations``,
  ``--kick``);
* ``swap-B``: ``search_permutation(method="swap", iterations=B)`` (optional, ``--swap``).

Per layer group it reports the retained fraction ``sum score / sum forward-kept``, the efficacy
``(sum score - sum identity) / (sum upper bound - sum identity)`` (gap-weighted over the group) and
the summed time. Kernel sets:

* ``resnet50``: i.i.d. normal kernels of the 52 sparse ResNet-50 layers (all convs but the stem),
  grouped by stage; ``deit_s``: i.i.d. normal kernels of DeiT-Small's qkv/proj/fc1/fc2 layers
  (``--deit-blocks`` blocks), grouped by kind.
* ``trained``: the sparse kernels (``Cin % m == 0`` and ``C % m == 0``) of an orbax checkpoint
  written by ``train/cifar.py`` (``--trained PATH`` = a step directory holding ``state/``), grouped
  by the ``stage*`` component of the parameter path (else by ``C``).

With ``--exhaustive``, layers with ``C <= 16`` also get the exact optimum over all partitions
(2,627,625 for ``C = 16, m = 4``), which bounds the efficacy any search can reach.

    python benchmarks/search.py [--sets resnet50,deit_s,trained --trained RUN/checkpoints/last/STEP]
        [--stripe-iterations 100] [--repeats 5] [--exhaustive] [--out benchmarks/results/search.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bimask_jax as bj  # noqa: E402
from benchmarks.layer_shapes import (  # noqa: E402
    as_matrix,
    deit_small_sparse_kernels,
    resnet50_sparse_layers,
)


def resnet50_layers() -> list[tuple[str, tuple[int, int]]]:
    """``(group, (K, C))`` of the 52 sparse ResNet-50 layers, grouped by stage."""
    return [(f"resnet50/stage{st}", as_matrix(shape)) for st, shape in resnet50_sparse_layers()]


def deit_small_layers(blocks: int) -> list[tuple[str, tuple[int, int]]]:
    """``(group, (in, out))`` of DeiT-Small's sparse layers (dim 384, MLP 1536)."""
    kinds = ("qkv", "proj", "fc1", "fc2")
    shapes = deit_small_sparse_kernels(depth=blocks)
    return [(f"deit_s/{kinds[i % 4]}", shape) for i, shape in enumerate(shapes)]


def random_kernels(layers, seed: int):
    rng = np.random.default_rng(seed)
    return [
        (g, f"{g}/{i}", rng.standard_normal(s).astype(np.float32))
        for i, (g, s) in enumerate(layers)
    ]


def trained_kernels(path: str, m: int):
    """``(group, name, kernel)`` of every sparse kernel of an orbax checkpoint step directory."""
    import orbax.checkpoint as ocp

    state_dir = os.path.join(os.path.abspath(path), "state")
    tree = ocp.StandardCheckpointer().restore(state_dir)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = []
    for kp, leaf in flat:
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in kp]
        arr = np.asarray(leaf)
        if "params" not in names or names[-1] != "kernel" or arr.ndim < 2:
            continue
        if "opt_state" in names or arr.shape[-2] % m or arr.shape[-1] % m:
            continue
        stage = next((s for s in names if s.startswith("stage")), f"C={arr.shape[-1]}")
        stage = stage.split("_")[0]
        out.append((f"trained/{stage}", "/".join(names), arr.astype(np.float32)))
    if not out:
        raise ValueError(f"no sparse kernels found in {state_dir!r}")
    return out


@functools.cache
def _partitions(c: int, m: int) -> np.ndarray:
    """Every partition of ``range(c)`` into ``c/m`` unordered groups of ``m``, as int32
    ``(count, c/m)`` indices into ``itertools.combinations(range(c), m)`` (2,627,625 for 16, 4)."""
    subset_id = {sub: i for i, sub in enumerate(itertools.combinations(range(c), m))}
    out = []

    def rec(rest, chosen):
        if not rest:
            out.append(chosen)
            return
        for tail in itertools.combinations(rest[1:], m - 1):  # the smallest left opens a group
            sub = (rest[0], *tail)
            rec([x for x in rest if x not in sub], chosen + [subset_id[sub]])

    rec(list(range(c)), [])
    return np.asarray(out, np.int32)


def exhaustive_optimum(fwd, n: int, m: int) -> int:
    """The best permutation score over all partitions (exhaustive; only for ``C <= 16``)."""
    c = fwd.shape[-1]
    f2 = np.asarray(fwd).reshape(-1, c)
    subs = np.asarray(list(itertools.combinations(range(c), m)))
    value = np.minimum(f2[:, subs].sum(-1), n).sum(0)  # score of every group of m columns
    return int(value[_partitions(c, m)].sum(1).max())


def _timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def bench_layer(kernel, n, m, methods, repeats, key, exhaustive=False):
    """Scores and median times of every method on one kernel. ``methods``: name -> (fn, repeats)
    with ``fn(key, kernel, fwd) -> perm``; the first method with ``repeats`` > 1 sets the order."""
    c = kernel.shape[-1]
    fwd = bj.forward_mask(kernel, n, m)
    ident = int(bj.permutation_score(kernel, fwd, np.arange(c), n, m))
    row = {
        "shape": list(kernel.shape),
        "fwd_kept": int(np.asarray(fwd).sum()),
        "upper": int(bj.retained_upper_bound(fwd, n, m)),
        "identity": {"score": ident, "time_s": 0.0},
    }
    if exhaustive and c <= 16:
        row["optimum"] = exhaustive_optimum(fwd, n, m)
    perms, times = {}, {name: [] for name in methods}
    for name, (fn, _) in methods.items():  # compile + warm-up
        perms[name] = np.asarray(jax.block_until_ready(fn(key, kernel, fwd)))
    names = list(methods)
    for r in range(max(reps for _, reps in methods.values())):
        order = names if r % 2 == 0 else names[::-1]  # interleaved, alternating order
        for name in order:
            fn, reps = methods[name]
            if r < reps:
                _, dt = _timed(fn, key, kernel, fwd)
                times[name].append(dt)
    for name in names:
        s = int(bj.permutation_score(kernel, fwd, perms[name], n, m))
        assert s >= ident, (name, s, ident)
        row[name] = {"score": s, "time_s": statistics.median(times[name])}
    return row


def make_methods(n, m, args):
    def random_fn(count):
        return jax.jit(lambda k, w, f: bj.search_permutation(k, w, n, m, count, fwd=f))

    def local_fn(method, iters, kick=0):
        return jax.jit(
            lambda k, w, f: bj.search_permutation(
                k, w, n, m, fwd=f, method=method, iterations=iters, kick=kick
            )
        )

    methods = {"random-100": (random_fn(100), args.repeats)}
    for it in args.stripe_iterations:
        methods[f"stripe-{it}"] = (local_fn("stripe", it), args.repeats)
    for it in args.stripe_kick_iterations:
        for kick in args.kick:
            methods[f"stripe-{it}-kick{kick}"] = (local_fn("stripe", it, kick), args.repeats)
    for it in args.swap:
        methods[f"swap-{it}"] = (local_fn("swap", it), args.repeats)
    methods["random-1000"] = (random_fn(1000), args.repeats_1000)
    return methods


def summarize(rows, names):
    """Per group: retained fraction, efficacy and summed time of every method."""
    groups: dict[str, list] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    groups["all"] = rows
    table = {}
    for g, rs in groups.items():
        kept = sum(r["fwd_kept"] for r in rs)
        ident = sum(r["identity"]["score"] for r in rs)
        upper = sum(r["upper"] for r in rs)
        table[g] = {"layers": len(rs), "upper_retained": upper / kept}
        if all("optimum" in r for r in rs):
            opt = sum(r["optimum"] for r in rs)
            table[g]["optimum"] = {
                "retained": opt / kept,
                "efficacy": float(bj.search_efficacy(opt, ident, upper)),
            }
        for name in ["identity", *names]:
            s = sum(r[name]["score"] for r in rs)
            table[g][name] = {
                "retained": s / kept,
                "efficacy": float(bj.search_efficacy(s, ident, upper)),
                "time_s": sum(r[name]["time_s"] for r in rs),
            }
    return table


def print_table(table, names, stream=sys.stdout):
    cols = ["identity", *names]
    head = f"{'group':<22}{'L':>3} {'upper':>6} " + " ".join(f"{c:>24}" for c in cols)
    print(head, file=stream)
    print(
        f"{'':<22}{'':>3} {'ret%':>6} " + " ".join(f"{'ret% / eff / ms':>24}" for _ in cols),
        file=stream,
    )
    for g, t in table.items():
        cells = [
            f"{100 * t[c]['retained']:6.2f} /{t[c]['efficacy']:6.3f} /{1e3 * t[c]['time_s']:7.1f}"
            for c in cols
        ]
        print(
            f"{g:<22}{t['layers']:>3} {100 * t['upper_retained']:6.2f} "
            + " ".join(f"{x:>24}" for x in cells),
            file=stream,
        )
    for g, t in table.items():
        if "optimum" in t:
            print(
                f"{g}: exhaustive optimum over all partitions: retained "
                f"{100 * t['optimum']['retained']:.2f}%, efficacy "
                f"{t['optimum']['efficacy']:.3f}",
                file=stream,
            )


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="resnet50,deit_s", help="comma list: resnet50,deit_s,trained")
    p.add_argument("--trained", default=None, help="orbax step directory (holding state/)")
    p.add_argument("--trained-note", default="", help="how the trained kernels were produced")
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--stripe-iterations", type=int, nargs="+", default=[100])
    p.add_argument("--swap", type=int, nargs="*", default=[], help="swap iteration budgets")
    p.add_argument(
        "--stripe-kick-iterations",
        type=int,
        nargs="*",
        default=[],
        help="stripe budgets to also run with kicks (see --kick)",
    )
    p.add_argument("--kick", type=int, nargs="*", default=[8], help="kick sizes for those")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--repeats-1000", type=int, default=1)
    p.add_argument("--deit-blocks", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--exhaustive",
        action="store_true",
        help="also the exact optimum of layers with C <= 16 (all partitions)",
    )
    p.add_argument("--out", default=os.path.join(here, "results", "search.json"))
    args = p.parse_args(argv)

    kernels = []
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    for s in sets:
        if s == "resnet50":
            kernels += random_kernels(resnet50_layers(), args.seed)
        elif s == "deit_s":
            kernels += random_kernels(deit_small_layers(args.deit_blocks), args.seed + 1)
        elif s == "trained":
            if not args.trained:
                p.error("--sets trained needs --trained PATH")
            kernels += trained_kernels(args.trained, args.m)
        else:
            p.error(f"unknown set {s!r}")
    methods = make_methods(args.n, args.m, args)
    names = list(methods)
    rows = []
    key = jax.random.key(args.seed)
    t0 = time.time()
    for i, (group, name, w) in enumerate(kernels):
        row = bench_layer(
            w, args.n, args.m, methods, args.repeats, jax.random.fold_in(key, i), args.exhaustive
        )
        row.update(group=group, name=name)
        rows.append(row)
        print(
            f"[{time.time() - t0:6.0f}s] {name} {tuple(w.shape)} "
            + " ".join(f"{k}={row[k]['score']}" for k in ["identity", *names]),
            file=sys.stderr,
            flush=True,
        )
    table = summarize(rows, names)
    print(
        f"{args.n}:{args.m}; times: median of {args.repeats} interleaved calls "
        f"(random-1000: {args.repeats_1000}), summed over the group's layers"
    )
    print_table(table, names)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "command": "python "
                + " ".join(
                    [os.path.relpath(__file__)] + sys.argv[1:]
                    if argv is None
                    else ["benchmarks/search.py", *argv]
                ),
                "n": args.n,
                "m": args.m,
                "trained": args.trained,
                "trained_note": args.trained_note,
                "jax": jax.__version__,
                "device": str(jax.devices()[0]),
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "methods": names,
                "groups": table,
                "layers": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
