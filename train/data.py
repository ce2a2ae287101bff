"""Data pipelines: ImageFolder JPEG trees, CIFAR-10/100 python pickles, scikit-learn's bundled 8x8
digits; grain ``MapDataset`` pipelines with deterministic per-element augmentation.

Elements are dicts ``{"image": uint8 (H, W, C), "label": int32 (), "valid": bool ()}``; batches
stack them along a new leading axis. ``valid`` is False for a corrupt JPEG skipped by
``on_corrupt="skip"`` (its image is zeros) and for eval padding, so batch shapes never change and
the loss and metrics ignore those rows. Normalisation to float happens on the device (uint8 moves
4x fewer bytes host -> device).

Determinism: the order of epoch ``e`` is a shuffle seeded by ``(seed, e)`` and the augmentation
of element ``i`` is drawn from a generator seeded by ``(seed, e)`` and ``i`` (grain's
``random_map``), so batch ``b`` of epoch ``e`` is a pure function of ``(seed, e, b)``: resuming at
``(e, b)`` replays exactly, whatever the number of worker processes.

This module imports no JAX: grain's worker processes (spawned) import it.
"""

from __future__ import annotations

import codecs
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grain
import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# --------------------------------------------------------------------------------------------
# Datasets (random-access sources)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolder:
    """An ImageFolder split: ``root/<class>/<file>``; classes sorted by name, label = index."""

    root: str
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray  # int32 (N,)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class ArrayDataset:
    """Images held in memory: ``images`` uint8 (N, H, W, C), ``labels`` int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def scan_image_folder(root: str) -> ImageFolder:
    """List ``root/<class>/*.<image ext>`` (sorted). ValueError when ``root`` is missing, has no
    class folders, or a class folder holds no image."""
    if not os.path.isdir(root):
        raise ValueError(f"data directory {root!r} does not exist (or is not a directory)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"data directory {root!r} is empty: expected one sub-folder per class")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(
            f.name for f in os.scandir(os.path.join(root, cls))
            if f.is_file() and f.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise ValueError(f"class folder {os.path.join(root, cls)!r} holds no image "
                             f"(extensions {IMAGE_EXTENSIONS})")
        paths += [os.path.join(root, cls, f) for f in files]
        labels += [label] * len(files)
    return ImageFolder(root, tuple(classes), tuple(paths), np.asarray(labels, np.int32))


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str]) -> None:
    """ValueError naming the classes present in only one of train / val."""
    if tuple(train_classes) != tuple(val_classes):
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise ValueError(
            "class folders differ between train and val: "
            f"only in train {only_t[:10]}, only in val {only_v[:10]}"
        )


def find_val_split(root: str) -> str:
    """The evaluation folder of an ImageFolder root: ``val`` or else ``test``."""
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    raise ValueError(f"data directory {root!r} has no 'val' (or 'test') sub-folder")


def is_cifar_pickle_dir(path: str) -> bool:
    """True when ``path`` (or its ``cifar-10-batches-py`` / ``cifar-100-python`` child) holds the
    official python-pickle release."""
    return _cifar_pickle_root(path) is not None


def _cifar_pickle_root(path: str) -> str | None:
    for cand in (path, os.path.join(path, "cifar-10-batches-py"),
                 os.path.join(path, "cifar-100-python")):
        if os.path.isfile(os.path.join(cand, "data_batch_1")) or (
            os.path.isfile(os.path.join(cand, "train")) and os.path.isfile(os.path.join(cand, "meta"))
        ):
            return cand
    return None


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it, for the latin-1 codec only."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed in a CIFAR pickle")
    return codecs.encode(text, "latin1")


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only what the CIFAR python files contain: dicts, lists, strings,
    bytes, numbers and NumPy array reconstruction. Any other global (``os.system``, ``eval``,
    ``builtins.*``, ...) raises ``pickle.UnpicklingError`` before it can be called."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed in a CIFAR pickle (only dicts, lists, strings, bytes, "
            "numbers and NumPy arrays are)")


def _unpickle(path: str) -> dict:
    """Load one CIFAR python file with :class:`CifarUnpickler` (never plain ``pickle.load``: a
    crafted file in the data directory could run code)."""
    with open(path, "rb") as f:
        try:
            out = CifarUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: not a CIFAR python pickle: {e}") from e
    if not isinstance(out, dict):
        raise ValueError(f"{path}: a CIFAR python pickle holds a dict, got {type(out).__name__}")
    return out


def _cifar_arrays(d: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), np.asarray(d[key], np.int32)


def load_cifar_pickle(path: str) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) from the official CIFAR-10 (``data_batch_1..5``, ``test_batch``,
    ``batches.meta``) or CIFAR-100 (``train``, ``test``, ``meta``; fine labels) pickles."""
    root = _cifar_pickle_root(path)
    if root is None:
        raise ValueError(f"{path!r} holds no CIFAR python-pickle files (data_batch_1 or train+meta)")
    if os.path.isfile(os.path.join(root, "data_batch_1")):
        parts = [_cifar_arrays(_unpickle(os.path.join(root, f"data_batch_{i}")), "labels")
                 for i in range(1, 6) if os.path.isfile(os.path.join(root, f"data_batch_{i}"))]
        train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        test = _cifar_arrays(_unpickle(os.path.join(root, "test_batch")), "labels")
        meta = os.path.join(root, "batches.meta")
        classes = tuple(_unpickle(meta)["label_names"]) if os.path.isfile(meta) else tuple(
            str(i) for i in range(int(train[1].max()) + 1))
    else:
        train = _cifar_arrays(_unpickle(os.path.join(root, "train")), "fine_labels")
        test = _cifar_arrays(_unpickle(os.path.join(root, "test")), "fine_labels")
        classes = tuple(_unpickle(os.path.join(root, "meta"))["fine_label_names"])
    return ArrayDataset(*train, classes), ArrayDataset(*test, classes)


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, no download) as uint8
    (N, 8, 8, 1) images (0..16 scaled to 0..255), split per class into train / test with a fixed
    seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test_idx += list(rng.permutation(idx)[: int(round(len(idx) * test_fraction))])
    test_mask = np.zeros(len(labels), bool)
    test_mask[test_idx] = True
    classes = tuple(str(i) for i in range(10))
    return (ArrayDataset(images[~test_mask], labels[~test_mask], classes),
            ArrayDataset(images[test_mask], labels[test_mask], classes))


# --------------------------------------------------------------------------------------------
# Decoding and augmentation (numpy / PIL, run in grain workers)
# --------------------------------------------------------------------------------------------


def _as_rgb_array(img: Image.Image, channels: int) -> np.ndarray:
    img = img.convert("RGB" if channels == 3 else "L")
    arr = np.asarray(img, np.uint8)
    return arr if arr.ndim == 3 else arr[..., None]


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(left, top, w, h)``: 10 tries at a random area
    fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, else a center crop clipped
    to ``ratio``."""
    area = width * height
    log_r = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(*log_r))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def _draft(img: Image.Image, box_w: float, box_h: float, size: int):
    """Let the JPEG decoder downscale by a power of 2 (DCT scaling) while the crop box keeps at
    least ``size`` pixels per side; returns the scale factors applied (sx, sy)."""
    w0, h0 = img.size
    if img.format != "JPEG":
        return 1.0, 1.0
    reduce = 1
    while reduce < 8 and min(box_w, box_h) / (reduce * 2) >= size:
        reduce *= 2
    if reduce > 1:
        img.draft("RGB", (int(np.ceil(w0 / reduce)), int(np.ceil(h0 / reduce))))
    return img.size[0] / w0, img.size[1] / h0


# RandAugment, as timm's "rand-m9-mstd0.5-inc1" (the DeiT recipe): the "increasing" op set,
# 2 ops drawn with replacement, each applied with probability 0.5 at a magnitude drawn per op from
# N(9, 0.5) clipped to [0, 10]; geometric ops fill with the ImageNet mean, bicubic resampling.
RANDAUG_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
               "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
               "TranslateX", "TranslateY")
_FILL = tuple(int(round(255 * v)) for v in IMAGENET_MEAN)


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.random() < 0.5 else value


def randaug_op(img: Image.Image, name: str, level: float, rng: np.random.Generator) -> Image.Image:
    """One RandAugment op at ``level`` in [0, 10] (timm's level -> argument maps, "increasing"
    variants): Rotate +-30 deg x level/10; Shear +-0.3; Translate +-0.45 of the size; Posterize
    to 4 - int(4 level/10) bits; Solarize above 256 - int(256 level/10); SolarizeAdd +int(110
    level/10) below 128; Color/Contrast/Brightness/Sharpness factor 1 +- 0.9 level/10."""
    from PIL import ImageEnhance, ImageOps

    f = level / 10.0
    bicubic = {"resample": Image.BICUBIC, "fillcolor": _FILL[: len(img.getbands())]}
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(_signed(30.0 * f, rng), resample=Image.BICUBIC,
                          fillcolor=bicubic["fillcolor"])
    if name == "Posterize":
        bits = 4 - int(4 * f)
        return img if bits >= 8 else ImageOps.posterize(img, max(bits, 0))
    if name == "Solarize":
        return ImageOps.solarize(img, 256 - int(256 * f))
    if name == "SolarizeAdd":
        add = int(110 * f)
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        return img.point(lut * len(img.getbands()))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(img).enhance(1.0 + _signed(0.9 * f, rng))
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, _signed(0.3 * f, rng), 0, 0, 1, 0), **bicubic)
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, _signed(0.3 * f, rng), 1, 0), **bicubic)
    if name == "TranslateX":
        dx = _signed(0.45 * f, rng) * img.size[0]
        return img.transform(img.size, Image.AFFINE, (1, 0, dx, 0, 1, 0), **bicubic)
    if name == "TranslateY":
        dy = _signed(0.45 * f, rng) * img.size[1]
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, dy), **bicubic)
    raise ValueError(f"unknown RandAugment op {name!r}; choose from {RANDAUG_OPS}")


def rand_augment(img: Image.Image, rng: np.random.Generator, *, num_ops: int = 2,
                 magnitude: float = 9.0, magnitude_std: float = 0.5, prob: float = 0.5):
    """timm-style RandAugment on a PIL image: ``num_ops`` ops drawn with replacement from
    :data:`RANDAUG_OPS`, each applied with probability ``prob`` at a level drawn from
    N(magnitude, magnitude_std) clipped to [0, 10]."""
    for name in rng.choice(RANDAUG_OPS, size=num_ops, replace=True):
        if rng.random() > prob:
            continue
        level = magnitude if magnitude_std <= 0 else rng.normal(magnitude, magnitude_std)
        img = randaug_op(img, str(name), float(np.clip(level, 0.0, 10.0)), rng)
    return img


def random_erase(arr: np.ndarray, rng: np.random.Generator, mean, std, *,
                 area=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3)) -> np.ndarray:
    """timm's RandomErasing (mode "pixel", one box): up to 10 tries for a box of area fraction in
    ``area`` and log-uniform aspect ratio in ``ratio`` that fits strictly inside; its pixels become
    per-pixel normal noise in normalised space, ``255 * (mean + std * N(0, 1))`` clipped to uint8.
    ``arr``: uint8 (H, W, C); returns a new array (unchanged copy if no box fits)."""
    h, w, c = arr.shape
    out = arr.copy()
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        aspect = np.exp(rng.uniform(*log_ratio))
        eh, ew = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if ew < w and eh < h:
            top, left = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
            noise = np.asarray(mean) + np.asarray(std) * rng.standard_normal((eh, ew, c))
            out[top:top + eh, left:left + ew] = np.clip(np.round(noise * 255), 0, 255)
            break
    return out


@dataclass(frozen=True)
class DecodeTrain:
    """Decode a file element and apply the ImageNet training crop: RandomResizedCrop to ``size``
    (``interpolation``, antialiased), a horizontal flip with probability 1/2, and with probability
    ``erase_prob`` :func:`random_erase` (``mean``/``std``: the normalisation); with
    ``randaug_magnitude`` > 0, :func:`rand_augment` after the flip. Corrupt files: raise
    (``on_corrupt="fail"``) or return zeros with ``valid=False`` (``"skip"``)."""

    size: int
    channels: int = 3
    on_corrupt: str = "fail"
    scale: tuple[float, float] = (0.08, 1.0)
    erase_prob: float = 0.0
    interpolation: str = "bilinear"
    randaug_magnitude: float = 0.0
    randaug_ops: int = 2
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, element, rng: np.random.Generator):
        path, label = element
        try:
            with Image.open(path) as img:
                left, top, w, h = random_resized_crop_box(*img.size, rng, self.scale)
                sx, sy = _draft(img, w, h, self.size)
                box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
                img = img.convert("RGB" if self.channels == 3 else "L")
                img = img.resize((self.size, self.size), _RESAMPLE[self.interpolation], box=box)
        except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt image
            return _corrupt(path, e, self.on_corrupt, self.size, self.channels, label)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaug_magnitude > 0:
            img = rand_augment(img, rng, num_ops=self.randaug_ops, magnitude=self.randaug_magnitude)
        arr = _as_rgb_array(img, self.channels)
        if self.erase_prob and rng.random() < self.erase_prob:
            arr = random_erase(arr, rng, self.mean, self.std)
        return {"image": np.ascontiguousarray(arr), "label": np.int32(label), "valid": np.bool_(True)}


@dataclass(frozen=True)
class DecodeEval:
    """Decode a file element and apply the eval transform: resize the shorter side to
    ``resize`` then center-crop ``size`` (done as one antialiased resize of the matching box, with
    ``interpolation`` "bilinear" or "bicubic")."""

    size: int
    resize: int
    channels: int = 3
    on_corrupt: str = "fail"
    interpolation: str = "bilinear"

    def __call__(self, element):
        path, label = element
        try:
            with Image.open(path) as img:
                w0, h0 = img.size
                crop = self.size * min(w0, h0) / self.resize  # crop side in original pixels
                sx, sy = _draft(img, crop, crop, self.size)
                left, top = (w0 - crop) / 2, (h0 - crop) / 2
                box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
                img = img.convert("RGB" if self.channels == 3 else "L")
                img = img.resize((self.size, self.size), _RESAMPLE[self.interpolation], box=box)
                arr = _as_rgb_array(img, self.channels)
        except Exception as e:  # noqa: BLE001
            return _corrupt(path, e, self.on_corrupt, self.size, self.channels, label)
        return {"image": arr, "label": np.int32(label), "valid": np.bool_(True)}


def _corrupt(path, error, on_corrupt, size, channels, label):
    if on_corrupt == "fail":
        raise RuntimeError(
            f"cannot decode image {path!r} ({type(error).__name__}: {error}); "
            "pass --on-corrupt skip to skip (and count) unreadable images"
        ) from error
    return {"image": np.zeros((size, size, channels), np.uint8), "label": np.int32(label),
            "valid": np.bool_(False)}


def _load_small(path: str, size: int, channels: int) -> np.ndarray:
    with Image.open(path) as img:
        img = img.convert("RGB" if channels == 3 else "L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return _as_rgb_array(img, channels)


def padded_crop(arr: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
    """The ``size`` x ``size`` window at (top, left) of ``arr`` (H, W, C) zero-padded on every
    side (offsets may be negative): ``np.pad`` then slice, without building the padded image."""
    h, w = arr.shape[:2]
    out = np.zeros((size, size) + arr.shape[2:], arr.dtype)
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + size, h), min(left + size, w)
    if r1 > r0 and c1 > c0:
        out[r0 - top : r1 - top, c0 - left : c1 - left] = arr[r0:r1, c0:c1]
    return out


@dataclass(frozen=True)
class SmallImage:
    """Load a small image (CIFAR-style): an in-memory array or a file resized to ``size`` x
    ``size``; with ``padding`` > 0 apply a random ``size`` crop of the zero-padded image, and a
    horizontal flip with probability 1/2 when ``flip``. Called with ``rng=None`` (eval) it only
    loads."""

    size: int
    channels: int = 3
    padding: int = 0
    flip: bool = False
    on_corrupt: str = "fail"

    def __call__(self, element, rng: np.random.Generator | None = None):
        src, label = element
        if isinstance(src, str):
            try:
                arr = _load_small(src, self.size, self.channels)
            except Exception as e:  # noqa: BLE001
                return _corrupt(src, e, self.on_corrupt, self.size, self.channels, label)
        else:
            arr = src
        if rng is not None:
            if self.padding:
                i, j = rng.integers(0, 2 * self.padding + 1, size=2)
                arr = padded_crop(arr, int(i) - self.padding, int(j) - self.padding, self.size)
            if self.flip and rng.random() < 0.5:
                arr = arr[:, ::-1]
        return {"image": np.ascontiguousarray(arr), "label": np.int32(label), "valid": np.bool_(True)}


class _EvalLoader:
    """Picklable ``map`` wrapper calling an eval transform with no RNG."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, element):
        return self.transform(element)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


class PairSource:
    """Random-access ``(image or path, label)`` pairs over two aligned sequences (``images``: a
    uint8 array (N, H, W, C) or a tuple of paths; ``labels``: int (N,)). Pickles as two arrays,
    which is what grain's worker processes receive."""

    def __init__(self, images, labels):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def elements(dataset: ImageFolder | ArrayDataset) -> PairSource:
    """The ``(image or path, label)`` source a transform consumes."""
    if isinstance(dataset, ImageFolder):
        return PairSource(dataset.paths, dataset.labels)
    return PairSource(dataset.images, dataset.labels)


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
    """(shuffle seed, augmentation seed) of ``epoch``: 32-bit ints derived from (seed, epoch)."""
    s = np.random.SeedSequence([seed, epoch]).generate_state(2)
    return int(s[0]), int(s[1])


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch (the remainder is dropped, reshuffled every epoch)."""
    return num_examples // global_batch


def _iterate(ds: grain.MapDataset, workers: int, prefetch: int) -> Iterator[dict]:
    """Iterate ``ds`` (whose elements are whole batches) in order: in this process with one
    prefetch thread (``workers == 0``) or in ``workers`` spawned processes, each computing every
    ``workers``-th batch (grain's ``mp_prefetch``; the output order stays the same)."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))
    if workers:
        from absl import flags  # grain's worker processes read absl flags

        if not flags.FLAGS.is_parsed():  # argparse programs never parse them: use the defaults
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=prefetch))
    it = iter(it_ds)
    try:
        yield from it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def train_batches(
    source: Sequence,
    transform,
    *,
    global_batch: int,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    prefetch: int = 2,
    repeats: int = 1,
) -> Iterator[dict]:
    """This host's batches of ``epoch`` from batch ``start_batch`` on.

    ``source``: ``(image or path, label)`` elements; ``transform(element, rng)`` -> element dict.
    The epoch's shuffled order is cut to ``steps_per_epoch * global_batch`` elements and strided
    over hosts, so host ``p`` gets rows ``p::process_count`` of every global batch; each yielded
    dict holds ``global_batch // process_count`` rows.

    ``repeats`` > 1: repeated augmentation (DeiT): the epoch reads the first ``ceil(N/repeats)``
    examples of its shuffled order, each ``repeats`` times in a row (so the copies share a global
    batch), each copy with its own augmentation; the epoch length stays N.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by process_count={process_count}")
    steps = steps_per_epoch(len(source), global_batch)
    if steps == 0:
        raise ValueError(f"the training set has {len(source)} examples, fewer than one batch "
                         f"of {global_batch}")
    shuffle_seed, aug_seed = epoch_seeds(seed, epoch)
    if repeats == 1:
        ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
    else:
        n = len(source)
        order = np.random.default_rng(shuffle_seed).permutation(n)[: -(-n // repeats)]
        ds = grain.MapDataset.source(Gather(source, np.repeat(order, repeats)[:n]))
    # Augment before striding over hosts: element i's augmentation depends on its global
    # position only, so a host's rows equal the matching rows of a single-host run.
    ds = ds[: steps * global_batch].random_map(transform, seed=aug_seed)
    ds = ds[process_index::process_count]
    ds = ds.batch(global_batch // process_count, drop_remainder=True)[start_batch:]
    return _iterate(ds, workers, prefetch)


class Gather:
    """``source[indices[i]]`` for i < len(indices) (a picklable random-access view)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[int(self.indices[i])]


class _PadTo:
    """Index -> element, or a zero padding element (``valid=False``) past the end."""

    def __init__(self, source, transform, size, channels):
        self.source, self.transform = source, transform
        self.pad = {"image": np.zeros((size, size, channels), np.uint8), "label": np.int32(0),
                    "valid": np.bool_(False)}

    def __call__(self, i):
        return self.transform(self.source[i]) if i < len(self.source) else self.pad


def eval_batches(
    source: Sequence,
    transform,
    *,
    global_batch: int,
    image_size: int,
    channels: int,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    prefetch: int = 2,
) -> Iterator[dict]:
    """This host's eval batches covering every element once, in order; the last global batch is
    padded with ``valid=False`` rows. ``transform(element)`` -> element dict."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by process_count={process_count}")
    total = -(-len(source) // global_batch) * global_batch
    ds = grain.MapDataset.range(total).map(_PadTo(source, transform, image_size, channels))
    ds = ds[process_index::process_count].batch(global_batch // process_count)
    return _iterate(ds, workers, prefetch)


def eval_steps(num_examples: int, global_batch: int) -> int:
    """Number of (padded) eval batches."""
    return -(-num_examples // global_batch)
