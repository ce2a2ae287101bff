"""Tiny synthetic datasets for tests and smoke runs: ImageFolder trees of JPEGs written on the fly."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

COLORS = ((220, 40, 40), (40, 200, 40), (40, 40, 220))


def write_image_folder(root, *, classes=3, train_per_class=6, val_per_class=2, size=16,
                       val_name="val", seed=0, sizes=None):
    """Write ``root/train/<c>/*.jpg`` and ``root/<val_name>/<c>/*.jpg``: noisy images whose mean
    colour depends on the class (learnable). ``sizes``: optional list of (w, h) cycled through
    to get non-square images. Returns ``root`` as str."""
    rng = np.random.default_rng(seed)
    root = str(root)
    k = 0
    for split, count in (("train", train_per_class), (val_name, val_per_class)):
        for c in range(classes):
            d = os.path.join(root, split, f"class_{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(count):
                w, h = sizes[k % len(sizes)] if sizes else (size, size)
                k += 1
                base = np.array(COLORS[c % len(COLORS)], np.float32)
                img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"{i:04d}.jpg"), quality=90)
    return root
