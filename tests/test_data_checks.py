"""Data checks: the val split leaves the training set alone, bad sources and splits fail clearly,
and --smoke checks the same as a full run."""

import copy
import json

import numpy as np
import pytest
import torch

from ltframe.data.bundle import build_bundle, save_splits
from ltframe.data.longtail import ProfileCfg, SplitCfg, make_splits
from ltframe.data.sources import CIFAR10_CLASSES, SourceData
from ltframe.errors import DataError, RecipeError
from ltframe.recipe import build_recipe, merge
from ltframe.testing import TINY_RECIPE, write_image_folder

CPU = torch.device("cpu")


def _data_cfg(registry, **data):
    raw = merge(copy.deepcopy(TINY_RECIPE), {"data": data})
    return build_recipe(raw, registry).data


def _source(labels: list[int], classes: list[str] | None = None) -> SourceData:
    y = torch.tensor(labels)
    names = classes or [str(c) for c in range(int(y.max()) + 1)]
    test_y = torch.arange(len(names))
    return SourceData(torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), y,
                      torch.zeros(len(names), 3, 4, 4, dtype=torch.uint8), test_y, names,
                      (0.5,) * 3, (0.25,) * 3)


def _counts(y, idx, c=10):
    return torch.bincount(y[idx], minlength=c).tolist()


# --- 1. the val split does not change the training set ----------------------------------------
def test_cifar10_lt_val_split_comes_from_unused_images():
    y = torch.arange(10).repeat_interleave(5000)  # CIFAR-10's train labels: 5000 per class
    profile = ProfileCfg("exp", ratio=100)
    base = make_splits(y, 10, profile, SplitCfg(), 0, seed=0, classes=CIFAR10_CLASSES)
    s = make_splits(y, 10, profile, SplitCfg(), 20, seed=0, classes=CIFAR10_CLASSES)
    assert torch.equal(s.labeled, base.labeled) and torch.equal(s.unlabeled, base.unlabeled)
    assert s.labeled.numel() == 12406 and _counts(y, s.labeled)[0] == 5000
    assert _counts(y, s.val) == [0] + [20] * 9  # the head class uses all its 5000 images
    assert not set(s.val.tolist()) & set(s.labeled.tolist())
    assert _val_notes(s) == ["val split: class 'airplane' has only 0 spare images (the long-tailed "
                             "split uses the rest), so it gets 0 of data.val_per_class = 20"]
    assert _val_notes(base) == []
    assert base.notes[0].startswith("long tail (exp): head class 'airplane' (5000 images), tail "
                                    "class 'truck' (50)")
    assert "keeps 12406 of the source's 50000 labelled training images (25%)" in base.notes[1]


def _val_notes(splits):
    return [n for n in splits.notes if n.startswith("val split")]


@pytest.mark.parametrize("split", [
    SplitCfg("fraction", labeled_fraction=0.2),
    SplitCfg("multiple", multiple=1, unlabeled_ratio=-10),
    SplitCfg("counts", labeled_head=30, labeled_ratio=10, unlabeled_head=40, unlabeled_ratio=10),
])
def test_val_per_class_keeps_labeled_and_unlabeled_bit_identical(split):
    y = torch.arange(4).repeat_interleave(100)
    profile = ProfileCfg("exp", ratio=10, n_max=60)
    base = make_splits(y, 4, profile, split, 0, seed=7)
    s = make_splits(y, 4, profile, split, 20, seed=7)
    assert torch.equal(s.labeled, base.labeled) and torch.equal(s.unlabeled, base.unlabeled)
    used = set(s.labeled.tolist()) | set(s.unlabeled.tolist())
    assert s.val.numel() and not set(s.val.tolist()) & used
    assert s.val.unique().numel() == s.val.numel()
    spare = [100 - n for n in _counts(y, torch.cat([s.labeled, s.unlabeled]), 4)]
    assert _counts(y, s.val, 4) == [min(20, n) for n in spare]


def test_short_val_classes_are_listed_in_one_line():
    y = torch.arange(4).repeat_interleave(10)
    s = make_splits(y, 4, ProfileCfg("step", ratio=10, head_fraction=0.5), SplitCfg(), 5, 0,
                    classes=["a", "b", "c", "d"])
    assert _counts(y, s.val, 4) == [0, 0, 5, 5]
    assert _val_notes(s) == ["val split: 2 classes have fewer than data.val_per_class = 5 spare images "
                             "(the long-tailed split uses the rest) and get only: 'a' 0, 'b' 0"]


def test_bundle_records_val_counts_and_notes(registry, tmp_path):
    src = _source(torch.arange(4).repeat_interleave(10).tolist(), ["a", "b", "c", "d"])
    cfg = _data_cfg(registry, longtail={"name": "exp", "ratio": 10}, val_per_class=3)
    bundle = build_bundle(src, cfg, 0, CPU)
    assert any("class 'a' has only 0 spare images" in n for n in bundle.notes)
    save_splits(bundle, tmp_path)
    counts = json.loads((tmp_path / "splits" / "counts.json").read_text())
    assert counts["labeled"][0] == 10 and counts["val"] == [0, 3, 3, 3]


# --- 4. --smoke applies the same checks ------------------------------------------------------
def test_smoke_rejects_a_split_the_full_run_rejects(registry):
    src = _source(torch.arange(4).repeat_interleave(10).tolist())
    cfg = _data_cfg(registry, split={"name": "counts", "labeled_head": 8, "labeled_ratio": 2,
                                     "unlabeled_head": 8, "unlabeled_ratio": 2})
    for smoke in (False, True):
        with pytest.raises(DataError, match=r"class '0' \(label 0\) needs 16 images .* has 10; "
                                             "lower data.split.labeled_head"):
            build_bundle(src, cfg, 0, CPU, smoke=smoke)


def test_smoke_keeps_the_full_runs_training_set_and_slices_val(registry):
    src = _source(torch.arange(4).repeat_interleave(30).tolist())
    cfg = _data_cfg(registry, longtail={"name": "exp", "ratio": 4}, val_per_class=6)
    full = build_bundle(src, cfg, 3, CPU)
    smoke = build_bundle(src, cfg, 3, CPU, smoke=True)
    assert torch.equal(full.splits.labeled, smoke.splits.labeled)
    assert _counts(src.train_labels, smoke.splits.val, 4) == [0, 2, 2, 2]
    assert set(smoke.splits.val.tolist()) <= set(full.splits.val.tolist())
    assert torch.equal(smoke.val_labels, src.train_labels[smoke.splits.val])


# --- 5. unlabeled_ratio ----------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 0.5, -0.5])
def test_unlabeled_ratio_below_one_in_magnitude_is_rejected(registry, ratio):
    with pytest.raises(RecipeError, match=r"^data\.split\.unlabeled_ratio: .* must be >= 1, or "
                                          "<= -1"):
        _data_cfg(registry, split={"name": "counts", "unlabeled_ratio": ratio})


def test_unlabeled_ratio_accepts_reversed_order(registry):
    assert _data_cfg(registry, split={"unlabeled_ratio": -1}).split.unlabeled_ratio == -1
    assert _data_cfg(registry, split={"unlabeled_ratio": 1}).split.unlabeled_ratio == 1


# --- 2. npz checks ---------------------------------------------------------------------------
def _npz(registry, tmp_path, layout="NHWC", **arrays):
    x = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    data = {"x_train": x, "y_train": np.array([0, 1, 2, 0, 1, 2]), "x_test": x[:3],
            "y_test": np.array([0, 1, 2]), **arrays}
    np.savez(tmp_path / "d.npz", **data)
    spec = registry.spec("source", {"name": "npz", "path": str(tmp_path / "d.npz"),
                                    "layout": layout}, "data.source")
    return registry.build(spec, seed=0)


def test_npz_image_and_label_counts_must_match(registry, tmp_path):
    with pytest.raises(DataError, match="x_train has 6 images but y_train has 5 labels; save one "
                                        "label per image"):
        _npz(registry, tmp_path, y_train=np.array([0, 1, 2, 0, 1]))


def test_npz_rejects_negative_and_unknown_test_labels(registry, tmp_path):
    with pytest.raises(DataError, match="y_train has label -1; labels must be class indices 0..C-1"):
        _npz(registry, tmp_path, y_train=np.array([0, 1, 2, 0, 1, -1]))
    with pytest.raises(DataError, match=r"y_test has label 5, which is not a training class "
                                        r"\(y_train has labels 0..2\)"):
        _npz(registry, tmp_path, y_test=np.array([0, 1, 5]))


def test_npz_layout_must_match_the_array(registry, tmp_path):
    nchw = np.zeros((6, 3, 8, 8), dtype=np.uint8)
    with pytest.raises(DataError, match=r"x_train has shape \(6, 3, 8, 8\), which is not NHWC "
                                        r"\(N, H, W, 3\); set data.source.layout = \"NCHW\""):
        _npz(registry, tmp_path, x_train=nchw)
    with pytest.raises(DataError, match=r"x_train has shape \(6, 8, 8, 3\), which is not NCHW .*"
                                        "layout = \"NHWC\""):
        _npz(registry, tmp_path, layout="NCHW", x_test=nchw[:3])
    with pytest.raises(DataError, match=r"\(6, 8, 8, 4\), which is not NHWC .*save them as"):
        _npz(registry, tmp_path, x_train=np.zeros((6, 8, 8, 4), dtype=np.uint8))
    with pytest.raises(RecipeError, match="data.source.layout: 'NHCW' .* not allowed.*did you mean 'NHWC'"):
        _npz(registry, tmp_path, layout="NHCW")


@pytest.mark.parametrize("layout, shape", [("NHWC", (6, 8, 8)), ("NHWC", (6, 8, 8, 1)),
                                           ("NCHW", (6, 1, 8, 8)), ("NCHW", (6, 8, 8))])
def test_npz_grayscale_becomes_three_channels(registry, tmp_path, layout, shape):
    x = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    test = np.zeros((3, 3, 8, 8) if layout == "NCHW" else (3, 8, 8, 3), dtype=np.uint8)
    src = _npz(registry, tmp_path, layout, x_train=x, x_test=test,
               y_train=np.array([[0], [1], [2], [0], [1], [2]]))  # (N, 1) labels are fine
    gray = torch.from_numpy(x.reshape(6, 8, 8))
    assert src.train_images.shape == (6, 3, 8, 8) and src.test_images.shape == (3, 3, 8, 8)
    assert all(torch.equal(src.train_images[:, k], gray) for k in range(3))
    assert src.train_labels.tolist() == [0, 1, 2, 0, 1, 2]


# --- 3. classes without training images ------------------------------------------------------
def test_npz_class_without_images_is_named(registry, tmp_path):
    src = _npz(registry, tmp_path, y_train=np.array([0, 1, 3, 0, 1, 3]))
    cfg = _data_cfg(registry)
    with pytest.raises(DataError, match=r"^class '2' \(label 2\) has no training images; add "
                                        "training images of that class, or remove empty classes "
                                        "so the labels run 0..2 without gaps$"):
        build_bundle(src, cfg, 0, CPU)


def test_empty_class_folder_is_named(registry, tmp_path):
    write_image_folder(tmp_path / "f" / "train", ["ant", "bee"], 3, size=8)
    (tmp_path / "f" / "train" / "cat").mkdir()
    write_image_folder(tmp_path / "f" / "val", ["ant", "bee", "cat"], 1, size=8)
    spec = registry.spec("source", {"name": "imagefolder", "root": str(tmp_path / "f"),
                                    "image_size": 8}, "data.source")
    src = registry.build(spec, seed=0)
    with pytest.raises(DataError, match=r"class 'cat' \(label 2\) has no training images") as e:
        build_bundle(src, _data_cfg(registry), 0, CPU)
    assert "val_per_class" not in str(e.value)


def test_listfile_labels_must_be_training_classes(registry, tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], 2, size=8)
    (tmp_path / "tr.txt").write_text("train/a/0000.png 0\ntrain/a/0001.png 0\n"
                                     "train/b/0000.png 1\n")
    (tmp_path / "te.txt").write_text("train/a/0000.png 0\n\ntrain/b/0001.png 2\n")
    (tmp_path / "neg.txt").write_text("train/a/0000.png -1\n")

    def build(train, test):
        spec = registry.spec("source", {"name": "listfile", "root": str(tmp_path),
                                        "train_list": train, "test_list": test,
                                        "image_size": 8, "in_memory": False}, "data.source")
        return registry.build(spec, seed=0)

    with pytest.raises(DataError, match=r"te.txt:3: label 2 is not a training class \(tr.txt has "
                                        r"labels 0..1\); fix the label or add training images"):
        build("tr.txt", "te.txt")
    with pytest.raises(DataError, match="neg.txt:1: label -1 is negative"):
        build("neg.txt", "tr.txt")
    with pytest.raises(DataError, match="neg.txt:1: label -1 is negative"):
        build("tr.txt", "neg.txt")
    (tmp_path / "gap.txt").write_text("train/a/0000.png 0\ntrain/b/0000.png 2\n")
    src = build("gap.txt", "tr.txt")
    with pytest.raises(DataError, match=r"class '1' \(label 1\) has no training images"):
        build_bundle(src, _data_cfg(registry), 0, CPU)


def test_multiple_split_names_the_largest_k_that_fits():
    import re

    import torch

    from ltframe.data.longtail import ProfileCfg, SplitCfg, make_splits
    from ltframe.errors import DataError

    labels = torch.arange(10).repeat_interleave(5000)
    prof = ProfileCfg(name="exp", ratio=100, n_max=1000)
    with pytest.raises(DataError, match="largest data.split.multiple that fits is") as err:
        make_splits(labels, 10, prof, SplitCfg(name="multiple", multiple=5), 0, 0)
    k = float(re.search(r"fits is ([0-9.]+)", str(err.value)).group(1))
    assert 3 < k < 5
    make_splits(labels, 10, prof, SplitCfg(name="multiple", multiple=k), 0, 0)
    with pytest.raises(DataError):
        make_splits(labels, 10, prof, SplitCfg(name="multiple", multiple=k + 0.01), 0, 0)
