"""Quickstart: train a CIFAR-style ResNet-20 on scikit-learn's bundled 8x8 digits (1,797 real
images, no download), dense and with Bi-Mask 2:4 sparsity, and print both accuracies.

    python -m train.quickstart                    # about two minutes on a 2-core CPU
    python -m train.quickstart --epochs 30 --methods dense srste transposable bimask

Same loop, optimizer and checkpoints as ``python -m train.cifar`` (this is ``train.cifar.train``
on ``--dataset digits`` with a short schedule); run directories go to a temporary folder unless
``--run-dir``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from train import cifar


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.quickstart", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["dense", "bimask"],
                   choices=["dense", "srste", "transposable", "bimask", "sste"])
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--refresh-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None, help="parent of the per-method run directories")
    p.add_argument("--xla-cpu-conv", default="auto", choices=["auto", "ynn", "eigen"],
                   help="XLA:CPU convolution path (see train/xla_cpu.py)")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, dict]:
    """Train each method; print and return ``{method: summary}``."""
    q = parse(argv)
    parent = q.run_dir or tempfile.mkdtemp(prefix="bimask-quickstart-")
    results = {}
    for method in q.methods:
        cfg = cifar.configure(
            dataset="digits", arch=q.arch, method=method, epochs=q.epochs,
            batch_size=q.batch_size, lr=q.lr, weight_decay=q.weight_decay,
            refresh_every=q.refresh_every, seed=q.seed, log_every=1000, eval_every=q.epochs,
            run_dir=os.path.join(parent, method), xla_cpu_conv=q.xla_cpu_conv)
        print(f"\n=== {method} ===", flush=True)
        results[method] = cifar.train(cfg)
    print(f"\nquickstart: {q.arch} on sklearn digits (8x8, 10 classes), {q.epochs} epochs, "
          f"batch {q.batch_size}; run dirs under {parent}")
    print(f"{'method':<14}{'top-1':>8}{'top-5':>8}{'seconds':>9}")
    for method, r in results.items():
        print(f"{method:<14}{r['final_top1']:>7.2f}%{r['final_top5']:>7.2f}%{r['seconds']:>9.1f}")
    return results


if __name__ == "__main__":
    from train import loop

    loop.cli(main, "python -m train.quickstart")
