"""train.data: ImageFolder scanning and its errors, CIFAR pickles, digits, augmentation shapes and
rules, loader determinism (seed, epoch, resume position, worker processes), eval padding."""

import os
import pickle

import numpy as np
import pytest

from train import data as D
from train.testing import write_image_folder


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imgs"), sizes=[(20, 14), (12, 18), (16, 16)])


def test_scan_image_folder_lists_sorted_classes(tree):
    f = D.scan_image_folder(os.path.join(tree, "train"))
    assert f.classes == ("class_0", "class_1", "class_2")
    assert len(f) == 18 and f.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert all(p.endswith(".jpg") for p in f.paths)


def test_scan_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        D.scan_image_folder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        D.scan_image_folder(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        D.scan_image_folder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"only in train \['b'\], only in val \['c'\]"):
        D.check_same_classes(["a", "b"], ["a", "c"])
    with pytest.raises(ValueError, match="no 'val'"):
        D.find_val_split(str(tmp_path))


def _batches(src, tf, **kw):
    return [dict(b) for b in D.train_batches(src, tf, **kw)]


def _equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_deterministic_resumable_and_epoch_dependent(tree):
    src = D.elements(D.scan_image_folder(os.path.join(tree, "train")))
    tf = D.DecodeTrain(8)
    kw = dict(global_batch=4, seed=3)
    a = _batches(src, tf, epoch=0, **kw)
    assert len(a) == 4  # 18 // 4, remainder dropped
    assert a[0]["image"].shape == (4, 8, 8, 3) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].dtype == np.int32 and a[0]["valid"].all()
    _equal(a, _batches(src, tf, epoch=0, **kw))
    _equal(a[2:], _batches(src, tf, epoch=0, start_batch=2, **kw))  # resume position
    b = _batches(src, tf, epoch=1, **kw)
    assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b, strict=True))
    # Each epoch is a permutation: 16 distinct examples out of 18.
    labels = np.concatenate([x["label"] for x in a])
    assert np.bincount(labels, minlength=3).sum() == 16
    # Two hosts: host p gets rows p::2 of every global batch.
    h0 = _batches(src, tf, epoch=0, process_index=0, process_count=2, **kw)
    h1 = _batches(src, tf, epoch=0, process_index=1, process_count=2, **kw)
    for g, x0, x1 in zip(a, h0, h1, strict=True):
        np.testing.assert_array_equal(g["image"][0::2], x0["image"])
        np.testing.assert_array_equal(g["image"][1::2], x1["image"])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(tree):
    src = D.elements(D.scan_image_folder(os.path.join(tree, "train")))
    tf = D.DecodeTrain(8)
    kw = dict(global_batch=4, seed=1, epoch=2)
    _equal(_batches(src, tf, **kw), _batches(src, tf, workers=2, **kw))


def test_random_resized_crop_box_rules():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(5, 300, size=2)
        left, top, cw, ch = D.random_resized_crop_box(int(w), int(h), rng)
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0
    # Extreme aspect ratio falls back to a centre crop clipped to ratio 3/4..4/3 when all tries fail.
    assert D.random_resized_crop_box(400, 4, rng, scale=(0.99, 1.0)) == (197, 0, 5, 4)


def test_small_image_crop_and_flip_follow_the_rule():
    img = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    tf = D.SmallImage(4, 3, padding=2, flip=True)
    for seed in range(20):
        out = tf((img, 1), np.random.default_rng(seed))["image"]
        rng = np.random.default_rng(seed)
        i, j = rng.integers(0, 5, size=2)
        ref = np.pad(img, ((2, 2), (2, 2), (0, 0)))[i:i + 4, j:j + 4]
        if rng.random() < 0.5:
            ref = ref[:, ::-1]
        np.testing.assert_array_equal(out, ref)
    assert D.SmallImage(4, 3)((img, 0))["image"] is img


def test_eval_transform_resize_and_center_crop(tmp_path):
    # Left half black, right half white, 40x20: resize shorter side 20 -> 10, center crop 8.
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 20:] = 255
    path = str(tmp_path / "a.png")
    from PIL import Image
    Image.fromarray(img).save(path)
    out = D.DecodeEval(8, 10)((path, 2))
    assert out["image"].shape == (8, 8, 3) and out["label"] == 2
    assert out["image"][:, :3].max() < 40 and out["image"][:, 5:].min() > 215


def test_corrupt_jpeg_fail_or_skip(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(RuntimeError, match="cannot decode image .*bad.jpg.*--on-corrupt skip"):
        D.DecodeTrain(8)((str(bad), 0), np.random.default_rng(0))
    out = D.DecodeTrain(8, on_corrupt="skip")((str(bad), 0), np.random.default_rng(0))
    assert out["valid"] == np.False_ and out["image"].shape == (8, 8, 3)
    assert D.DecodeEval(8, 9, on_corrupt="skip")((str(bad), 1))["valid"] == np.False_
    assert D.SmallImage(8, on_corrupt="skip")((str(bad), 1))["valid"] == np.False_


def test_eval_batches_cover_everything_once_with_padding(tree):
    val = D.scan_image_folder(os.path.join(tree, "val"))
    src = D.elements(val)
    bs = list(D.eval_batches(src, D.DecodeEval(8, 9), global_batch=4, image_size=8, channels=3))
    assert len(bs) == D.eval_steps(6, 4) == 2
    valid = np.concatenate([b["valid"] for b in bs])
    assert valid.tolist() == [True] * 6 + [False] * 2
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in bs])[:6], val.labels)


def test_cifar_pickle_cifar10_and_cifar100(tmp_path):
    rng = np.random.default_rng(0)
    d10 = tmp_path / "cifar-10-batches-py"
    d10.mkdir()
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw[name] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        with open(d10 / name, "wb") as f:
            pickle.dump({"data": raw[name], "labels": [1, 2, 3]}, f)
    with open(d10 / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    train, test = D.load_cifar_pickle(str(tmp_path))
    assert D.is_cifar_pickle_dir(str(tmp_path))
    assert train.images.shape == (15, 32, 32, 3) and test.images.shape == (3, 32, 32, 3)
    # Channel-major rows: pixel (r, c) of channel ch is data[ch*1024 + r*32 + c].
    assert train.images[4, 5, 6, 2] == raw["data_batch_2"][1, 2 * 1024 + 5 * 32 + 6]
    assert train.classes[3] == "c3" and train.labels.tolist()[:3] == [1, 2, 3]
    d100 = tmp_path / "c100" / "cifar-100-python"
    d100.mkdir(parents=True)
    for name in ("train", "test"):
        with open(d100 / name, "wb") as f:
            pickle.dump({"data": raw["test_batch"], "fine_labels": [7, 8, 99]}, f)
    with open(d100 / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(i) for i in range(100)]}, f)
    train, test = D.load_cifar_pickle(str(tmp_path / "c100"))
    assert len(train.classes) == 100 and train.labels.tolist() == [7, 8, 99]
    with pytest.raises(ValueError, match="no CIFAR python-pickle"):
        D.load_cifar_pickle(str(tmp_path / "c100" / "cifar-100-python" / "x"))


class _Exploit:
    """A pickle payload that would create ``marker`` when unpickled with plain ``pickle.load``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_pickle_loader_refuses_code_and_admits_the_official_contents(tmp_path, protocol):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    marker = tmp_path / "pwned"
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256
    ok = {"batch_label": b"training batch 1 of 5", "labels": [0, 9],
          "data": data.astype(np.uint8), "filenames": [b"a.png", b"b.png"]}
    for name in ("data_batch_1", "test_batch"):
        with open(d / name, "wb") as f:
            pickle.dump(ok, f, protocol=protocol)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, f,
                    protocol=protocol)
    train, _ = D.load_cifar_pickle(str(tmp_path))  # bytes, lists, ints, a uint8 array: admitted
    assert train.labels.tolist() == [0, 9] and train.images.shape == (2, 32, 32, 3)
    # The same payload runs code under plain pickle (the test's premise) ...
    with open(tmp_path / "probe", "wb") as f:
        pickle.dump(_Exploit(str(tmp_path / "probe_marker")), f, protocol=protocol)
    with open(tmp_path / "probe", "rb") as f:
        pickle.load(f)
    assert (tmp_path / "probe_marker").exists()
    # ... and is refused by the CIFAR loader, before anything runs.
    for payload in ({"data": _Exploit(str(marker)), "labels": [0]}, _Exploit(str(marker))):
        with open(d / "data_batch_1", "wb") as f:
            pickle.dump(payload, f, protocol=protocol)
        with pytest.raises(ValueError, match=r"data_batch_1: not a CIFAR python pickle: "
                                             r"(__builtin__|builtins)\.exec is not allowed"):
            D.load_cifar_pickle(str(tmp_path))
        assert not marker.exists()
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump([1, 2], f, protocol=protocol)
    with pytest.raises(ValueError, match="holds a dict, got list"):
        D.load_cifar_pickle(str(tmp_path))


def test_digits_split_is_stratified_and_fixed():
    train, test = D.load_digits_split()
    assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.uint8
    assert len(train) + len(test) == 1797 and abs(len(test) - 359) <= 5
    assert set(np.unique(test.labels)) == set(range(10))
    again = D.load_digits_split()[1]
    np.testing.assert_array_equal(test.labels, again.labels)


def test_padded_crop_equals_pad_then_slice():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for top in range(-6, 7):
        for left in range(-8, 9):
            ref = np.pad(img, ((8, 8), (8, 8), (0, 0)))[top + 8:top + 8 + 5, left + 8:left + 8 + 5]
            np.testing.assert_array_equal(D.padded_crop(img, top, left, 5), ref)


def test_repeated_augmentation_reads_each_example_repeats_times_with_own_augmentation():
    imgs = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1) * np.ones((1, 4, 4, 3), np.uint8)
    src = D.PairSource(imgs, np.arange(12))
    tf = D.SmallImage(4, 3, padding=2, flip=True)
    bs = list(D.train_batches(src, tf, global_batch=6, seed=0, epoch=0, repeats=3))
    labels = np.concatenate([b["label"] for b in bs])
    assert len(labels) == 12 and sorted(np.bincount(labels)[np.bincount(labels) > 0]) == [3] * 4
    assert all((labels[i] == labels[i + 1] == labels[i + 2]) for i in range(0, 12, 3))
    images = np.concatenate([b["image"] for b in bs])
    # Copies of one example differ in their (random) crop of the zero-padded image.
    assert any(not np.array_equal(images[i], images[i + 1]) for i in range(0, 12, 3))
    again = np.concatenate([b["label"] for b in D.train_batches(src, tf, global_batch=6, seed=0,
                                                                 epoch=0, repeats=3)])
    np.testing.assert_array_equal(labels, again)


def test_random_erase_box_rule():
    img = np.full((20, 30, 3), 7, np.uint8)
    for seed in range(20):
        out = D.random_erase(img, np.random.default_rng(seed), (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
        changed = np.argwhere((out != 7).any(-1))
        if len(changed) == 0:
            continue
        (r0, c0), (r1, c1) = changed.min(0), changed.max(0)
        area = (r1 - r0 + 1) * (c1 - c0 + 1)
        assert 0.02 * 600 * 0.5 <= area <= 600 / 3 * 1.5 and r1 - r0 + 1 < 20 and c1 - c0 + 1 < 30
        # Inside the box: noise around 255 * 0.5 (values 7 only by chance).
        assert abs(out[r0:r1 + 1, c0:c1 + 1].mean() - 127.5) < 25
    np.testing.assert_array_equal(img, 7)  # input untouched


def test_randaug_pixel_ops_follow_their_numpy_rules():
    from PIL import Image

    arr = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    rng = np.random.default_rng(0)
    op = lambda name, level: np.asarray(D.randaug_op(img, name, level, rng))  # noqa: E731
    np.testing.assert_array_equal(op("Invert", 5), 255 - arr)
    # SolarizeAdd at level 10: +110 below 128, clipped to 255.
    np.testing.assert_array_equal(op("SolarizeAdd", 10), np.where(arr < 128, np.minimum(
        arr.astype(int) + 110, 255), arr))
    # Solarize at level 5: invert pixels >= 256 - 128.
    np.testing.assert_array_equal(op("Solarize", 5), np.where(arr >= 128, 255 - arr, arr))
    # Posterize at level 5: keep 4 - int(2.0) = 2 bits.
    np.testing.assert_array_equal(op("Posterize", 5), arr & 0b11000000)
    np.testing.assert_array_equal(op("Rotate", 0), arr)  # level 0: identity


def test_rand_augment_is_deterministic_and_keeps_shape(tmp_path):
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    outs = [np.asarray(D.rand_augment(img, np.random.default_rng(s))) for s in (3, 3, 4)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert all(o.shape == (16, 16, 3) for o in outs)
    changed = sum(not np.array_equal(np.asarray(D.rand_augment(img, np.random.default_rng(s))),
                                     np.asarray(img)) for s in range(20))
    assert 5 <= changed <= 20  # each of 2 ops applies with probability 1/2
    path = str(tmp_path / "x.jpg")
    img.save(path)
    out = D.DecodeTrain(8, randaug_magnitude=9, erase_prob=1.0)((path, 3), np.random.default_rng(0))
    assert out["image"].shape == (8, 8, 3) and out["valid"]
