"""The data preparation and summary of benchmarks/compare_methods.py (no training here)."""

import os
import tarfile

import pytest

from benchmarks import compare_methods as cm


def _tree(root, split, classes, per_class):
    for c in classes:
        os.makedirs(os.path.join(root, split, c))
        for i in range(per_class):
            with open(os.path.join(root, split, c, f"{i:04d}.jpg"), "wb") as f:
                f.write(b"x")


def test_extract_and_subset(tmp_path):
    src = tmp_path / "src" / "cifar10"
    _tree(str(src), "train", ["cat", "dog"], 5)
    _tree(str(src), "test", ["cat", "dog"], 3)
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="cifar10")
    work = tmp_path / "work"
    root = cm.extracted_root(str(archive), str(work))
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["cat", "dog"]
    sub = cm.subset_tree(root, str(work), 2, 1)
    assert sorted(os.listdir(os.path.join(sub, "train", "cat"))) == ["0000.jpg", "0001.jpg"]
    assert os.listdir(os.path.join(sub, "val", "dog")) == ["0000.jpg"]
    assert os.path.islink(os.path.join(sub, "train", "cat", "0000.jpg"))
    assert cm.extracted_root(str(archive), str(work)) == root  # extracted once
    with pytest.raises(ValueError, match="neither a directory nor a tar archive"):
        cm.extracted_root(str(tmp_path / "missing.tar.gz"), str(work))


def test_summary_table_mean_and_spread():
    def row(method, seed, final):
        return {
            "nm": "2:4",
            "method": method,
            "seed": seed,
            "final_top1": final,
            "best_top1": final + 1,
            "retained": 0.8 if method == "bimask" else None,
            "flip_rate": 0.004 + 0.002 * seed if method == "bimask" else None,
            "seconds": 60.0,
        }

    rows = [row("bimask", 0, 70.0), row("bimask", 1, 72.0), row("dense", 0, 71.0)]
    rows.append(row("dense", 1, 74.0))
    table = cm.summarize(rows)
    # paired differences: 70 - 71 and 72 - 74, mean -1.5
    assert (
        "| 2:4 | bimask | 2 | 71.00 ± 1.41 | 72.00 | 70.00-72.00 | -1.50 | 0.8000 | 0.0050 | 1.0 |"
        in table
    )
    assert "| 2:4 | dense | 2 | 72.50 ± 2.12 | 73.50 | 71.00-74.00 | - | - | - | 1.0 |" in table


def test_flip_rate_is_the_mean_over_sparse_steps():
    """Per-epoch records hold the mean over their flip_steps; the run's rate weights by them and
    leaves out dense-finish epochs (flip_steps 0) and runs without flip tracking."""
    recs = [{"flip_rate": 0.01, "flip_steps": 30}, {"flip_rate": 0.02, "flip_steps": 10},
            {"flip_rate": None, "flip_steps": 0}]
    assert cm.flip_rate(recs) == pytest.approx((0.01 * 30 + 0.02 * 10) / 40)
    assert cm.flip_rate([{"retained": 0.8, "efficacy": 0.1}]) is None
    assert cm.flip_rate([]) is None


def test_plots_one_panel_per_nm(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    def row(method, nm, seed, retained):
        return {
            "method": method,
            "nm": nm,
            "seed": seed,
            "curve": [{"epoch": 1, "top1": 50.0}, {"epoch": 2, "top1": 60.0}],
            "retained_curve": [{"epoch": 1, "retained": retained}] if retained else [],
        }

    rows = [
        row("dense", "2:4", 0, None),
        row("bimask", "2:4", 0, 0.8),
        row("srste", "1:4", 0, None),
    ]
    paths = cm.plot(rows, str(tmp_path / "cmp"))
    assert [os.path.basename(p) for p in paths] == ["cmp_top1.png", "cmp_retained.png"]
    top1, retained = (Image.open(p).size for p in paths)
    assert top1[0] > 1.8 * retained[0]  # two N:M panels (1:4, 2:4) against one


def test_semantics_flags_give_the_settings_they_name():
    """--semantics ours reproduces the first comparison's settings; reference the scripts'
    (reference) defaults with the reference's CIFAR greedy_num of 10."""
    from train import cifar

    base = ["--dataset", "digits", "--arch", "resnet20"]
    ours = cifar.parse(base + cm.method_flags("bimask", "ours"))
    assert (ours.k_order, ours.keep_incumbent, ours.wd_rule, ours.cifar_std,
            ours.num_candidates, ours.search) == ("hwi", True, "kernels", "cifar10", 100, "random")
    ref = cifar.parse(base + cm.method_flags("bimask", "reference"))
    assert (ref.k_order, ref.keep_incumbent, ref.wd_rule, ref.cifar_std,
            ref.num_candidates) == ("ihw", False, "bn_name", "reference", 10)
    stripe = cifar.parse(base + cm.method_flags("bimask-stripe", "reference"))
    assert stripe.search == "stripe" and stripe.keep_incumbent
    assert cm.method_flags("dense", "ours")[:2] == ["--method", "dense"]


@pytest.mark.parametrize("semantics", sorted(cm.SEMANTICS))
def test_every_method_flag_set_parses(semantics):
    """Each method's flags are accepted by train/cifar.py (bimask-noperm: 0 candidates)."""
    from train import cifar

    for method in cm.METHODS:
        cfg = cifar.parse(["--dataset", "digits", *cm.method_flags(method, semantics)])
        assert cfg.method == cm.METHODS[method][1]
    assert cifar.parse(["--dataset", "digits",
                        *cm.method_flags("bimask-noperm", semantics)]).num_candidates == 0


@pytest.mark.parametrize("semantics", sorted(cm.SEMANTICS))
def test_methods_after_bimask_flags(semantics):
    """The issue-17 configurations set what their names say; the Bi-Mask ones use the paper's
    search with the semantics' candidate count, like ``bimask``."""
    from train import cifar

    def cfg(method):
        return cifar.parse(["--dataset", "digits", *cm.method_flags(method, semantics)])

    plain = cfg("bimask")
    for name in ("bimask-mvue", "bimask-densefinish"):
        c = cfg(name)
        assert (c.method, c.search, c.num_candidates) == ("bimask", "random", plain.num_candidates)
    assert cfg("bimask-mvue").wgrad == "mvue" and cfg("bimask-densefinish").dense_finish == 0.2
    assert cfg("sste").method == "sste" and cfg("sste").wgrad == "dense"
    assert (cfg("srste-mvue").method, cfg("srste-mvue").wgrad) == ("srste", "mvue")
    hu = cfg("transposable-hu")
    assert (hu.method, hu.mask_update, hu.refresh_every) == ("transposable", "refresh", 40)
    for name in cm.ALL_THREE_NM:
        assert cfg(name).wgrad == "mvue" and cfg(name).method in ("bimask", "transposable")
