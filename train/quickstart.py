"""Quickstart: train a CIFAR-style ResNet-20 on scikit-learn's bundled 8x8 digits (1,797 real
images, no download), dense and with Bi-Mask 2:4 sparsity, and print both accuracies.

    python train/quickstart.py                    # about two minutes on a 2-core CPU
    python train/quickstart.py --epochs 30 --methods dense srste transposable bimask

Same loop, optimizer and checkpoints as ``train/cifar.py`` (this is ``train/cifar.py --dataset
digits`` with a short schedule); run directories go to a temporary folder unless ``--run-dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import cifar  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train/quickstart.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["dense", "bimask"],
                   choices=["dense", "srste", "transposable", "bimask"])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--refresh-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="parent of the per-method run directories")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, dict]:
    """Train each method; print and return ``{method: summary}``."""
    q = parse(argv)
    parent = q.run_dir or tempfile.mkdtemp(prefix="bimask-quickstart-")
    results = {}
    for method in q.methods:
        argv_m = ["--dataset", "digits", "--arch", q.arch, "--method", method,
                  "--epochs", str(q.epochs), "--batch-size", str(q.batch_size), "--lr", str(q.lr),
                  "--weight-decay", str(q.weight_decay), "--refresh-every", str(q.refresh_every),
                  "--seed", str(q.seed), "--log-every", "1000", "--eval-every", str(q.epochs),
                  "--run-dir", os.path.join(parent, method)]
        print(f"\n=== {method} ===", flush=True)
        results[method] = cifar.main(argv_m)
    print(f"\nquickstart: {q.arch} on sklearn digits (8x8, 10 classes), {q.epochs} epochs, "
          f"batch {q.batch_size}; run dirs under {parent}")
    print(f"{'method':<14}{'top-1':>8}{'top-5':>8}{'seconds':>9}")
    for method, r in results.items():
        print(f"{method:<14}{r['final_top1']:>7.2f}%{r['final_top5']:>7.2f}%{r['seconds']:>9.1f}")
    return results


if __name__ == "__main__":
    main()
