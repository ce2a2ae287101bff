"""Measure the input pipeline alone (decode + augment + batch, no model): images per second.

    python -m train.bench_loader --data-path /tmp/cifar10 --pipeline cifar --workers 0 1 2
    python -m train.bench_loader --data-path /data/imagenet --pipeline imagenet --workers 16

``cifar``: the train/cifar.py transform (JPEG decode, 4-pixel padded random crop, flip);
``imagenet``: the train/imagenet.py transform (JPEG decode with DCT downscaling,
RandomResizedCrop to --image-size, flip). Prints one line per worker count; the first
``--warmup`` batches (worker start-up) are not timed.
"""

from __future__ import annotations

import argparse
import os
import time

from train import data as data_lib


def measure(source, transform, *, batch: int, workers: int, batches: int, warmup: int) -> float:
    """Images per second over ``batches`` batches after ``warmup`` untimed ones."""
    it = data_lib.train_batches(source, transform, global_batch=batch, seed=0, epoch=0,
                                workers=workers, prefetch=4)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["label"])
    dt = time.perf_counter() - t
    it.close()
    return n / dt


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-path", required=True, help="ImageFolder root (its train/ is read)")
    p.add_argument("--pipeline", choices=["cifar", "imagenet"], default="cifar")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    a = p.parse_args(argv)
    train = data_lib.scan_image_folder(os.path.join(a.data_path, "train"))
    src = data_lib.elements(train)
    if a.pipeline == "cifar":
        size = a.image_size or 32
        tf = data_lib.SmallImage(size, 3, padding=4, flip=True)
    else:
        size = a.image_size or 224
        tf = data_lib.DecodeTrain(size, 3)
    need = (a.batches + a.warmup) * a.batch_size
    if need > len(src):
        raise ValueError(f"{need} images needed, {len(src)} in {a.data_path}/train")
    for w in a.workers:
        ips = measure(src, tf, batch=a.batch_size, workers=w, batches=a.batches, warmup=a.warmup)
        print(f"pipeline={a.pipeline} size={size} batch={a.batch_size} workers={w}: "
              f"{ips:,.0f} img/s ({os.cpu_count()} CPUs)", flush=True)


if __name__ == "__main__":
    main()
