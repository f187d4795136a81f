"""A practitioner's own data: a folder with its own long tail used as it is, unlabeled images
without labels (folder, list lines without a label, npz x_unlabeled), counts printed and
recorded, diagnostics only where labels exist, file names in the CSVs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ltframe import start_run
from ltframe.data.bundle import build_bundle
from ltframe.data.longtail import ProfileCfg, SplitCfg, make_splits
from ltframe.errors import DataError, RecipeError
from ltframe.recipe import DataCfg
from ltframe.testing import OWN_COUNTS, write_image_folder, write_own_data

CPU = torch.device("cpu")
COUNTS = OWN_COUNTS  # the head sorts last by name


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    return write_own_data(tmp_path_factory.mktemp("own"))


def _data(registry, **over):
    from ltframe.config import from_dict

    def resolve(kind, value, path):
        return registry.spec(kind, value, path)

    return from_dict(DataCfg, over, "data", resolve)


def _bundle(registry, own, **over):
    cfg = _data(registry, source={"name": "imagefolder", "root": str(own), "image_size": 12}, **over)
    src = registry.build(cfg.source, seed=0)
    extra = (registry.build(cfg.unlabeled, seed=0, unlabeled=True, image_size=12)
             if cfg.unlabeled else None)
    return build_bundle(src, cfg, 0, CPU, unlabeled=extra)


def test_a_long_tailed_folder_is_used_as_it_is(registry, own):
    b = _bundle(registry, own)
    assert b.source.classes == ["ant", "cat", "dog", "zebra"]
    assert b.labeled_counts.tolist() == [12, 6, 3, 24]  # the folder's own counts (was 3 each)
    assert b.splits.unlabeled.numel() == 0
    assert "data: labeled 45 in 4 classes (head 'zebra' 24 ... tail 'dog' 3)" in b.notes[0]
    balanced = _bundle(registry, own, longtail={"name": "balanced"})
    assert balanced.labeled_counts.tolist() == [3, 3, 3, 3]  # the old meaning of "none"
    assert any("keeps 12 of the source's 45" in n for n in balanced.notes)


def test_profiles_order_classes_by_count_or_class_order():
    y = torch.tensor([0] * 5 + [1] * 20 + [2] * 20 + [3] * 10)
    s = make_splits(y, 4, ProfileCfg("exp", ratio=10), SplitCfg(), 0, 0,
                    classes=["a", "b10", "b9", "c"])
    # head: most images (b10 and b9 tie: the source's class order), then c, then a
    assert torch.bincount(y[s.labeled], minlength=4).tolist() == [2, 20, 9, 4]
    assert s.notes[0].startswith("long tail (exp): head class 'b10' (20 images), tail class 'a' (2)")
    s = make_splits(y, 4, ProfileCfg("exp", ratio=5, n_max=5, class_order=["a", "c", "b9", "b10"]),
                    SplitCfg(), 0, 0, classes=["a", "b10", "b9", "c"])
    assert torch.bincount(y[s.labeled], minlength=4).tolist() == [5, 1, 1, 2]  # a, b10, b9, c
    with pytest.raises(RecipeError, match="class_order: 'x' is not a class"):
        make_splits(y, 4, ProfileCfg("exp", class_order=["x"]), SplitCfg(), 0, 0,
                    classes=["a", "b10", "b9", "c"])
    with pytest.raises(RecipeError, match="class_order lacks 'c'"):
        make_splits(y, 4, ProfileCfg("exp", class_order=["a", "b9", "b10"]), SplitCfg(), 0, 0,
                    classes=["a", "b10", "b9", "c"])


def test_unlabeled_folder_flat_and_nested_without_labels(registry, own):
    b = _bundle(registry, own, unlabeled={"name": "folder", "root": str(own / "unl")})
    n_lab = 45
    assert len(b.train) == n_lab + 9 and b.n_source == n_lab  # the FIFO is skipped
    assert b.splits.unlabeled.tolist() == list(range(n_lab, n_lab + 9))
    assert (b.source.train_labels[n_lab:] == -1).all() and (b.hidden_unlabeled_labels == -1).all()
    assert b.file_name(n_lab) == ("unlabeled", "0000.png")
    assert b.file_name(n_lab + 8) == ("unlabeled", "deep/er/0003.jpg")
    assert b.train.get(torch.tensor([0, n_lab, n_lab + 8])).shape == (3, 3, 12, 12)
    c = b.counts()
    assert c["labeled"] == [12, 6, 3, 24] and c["unlabeled_without_labels"] == 9
    assert "unlabeled 9 (9 without labels)" in b.notes[0]


def test_unlabeled_lists_and_npz(registry, own, tmp_path):
    lines = [f"train/ant/{i:04d}.png 0" for i in range(4)] + [f"train/zebra/{i:04d}.png 1"
                                                             for i in range(4)]
    (own / "tr.txt").write_text("\n".join(lines + ["unl/0001.png", "unl/deep/er/0000.jpg"]) + "\n")
    (own / "te.txt").write_text("test/ant/0000.png 0\ntest/zebra/0001.png 1\n")
    (own / "u.txt").write_text("unl/0002.png\n")
    spec = registry.spec("source", {"name": "listfile", "root": str(own), "train_list": "tr.txt",
                                    "test_list": "te.txt", "unlabeled_list": "u.txt",
                                    "image_size": 12}, "s")
    src = registry.build(spec, seed=0)
    assert src.train_labels.tolist() == [0] * 4 + [1] * 4 + [-1] * 3
    s = make_splits(src.train_labels, 2, ProfileCfg(), SplitCfg(), 0, 0)
    assert s.labeled.numel() == 8 and s.unlabeled.tolist() == [8, 9, 10]

    x = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 0, 1, 0, 1]), x_test=x[:2],
             y_test=np.array([0, 1]), x_unlabeled=x[:3])
    src = registry.build(registry.spec("source", {"name": "npz", "path": str(tmp_path / "d.npz")},
                                       "s"), seed=0)
    assert src.train_labels.tolist() == [0, 1] * 3 + [-1] * 3 and src.num_classes == 2
    np.savez(tmp_path / "u.npz", x_unlabeled=x[:5])
    pool = registry.build(registry.spec("source", {"name": "npz", "path": str(tmp_path / "u.npz")},
                                        "s"), seed=0, unlabeled=True)
    assert len(pool.train_images) == 5 and (pool.train_labels == -1).all()


def test_an_external_pool_with_the_same_classes_keeps_hidden_labels_for_diagnostics(registry, own):
    b = _bundle(registry, own, unlabeled={"name": "imagefolder", "root": str(own), "test": "test",
                                          "image_size": 12})
    assert (b.source.train_labels[45:] == -1).all()  # never a training label
    assert b.hidden_unlabeled_labels.tolist() == b.source.train_labels[:45].tolist()
    assert b.unlabeled_known == 45


def test_test_set_errors_name_the_class(registry, tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], 2, 8)
    write_image_folder(tmp_path / "val", ["a", "b", "c"], 1, 8)
    spec = registry.spec("source", {"name": "imagefolder", "root": str(tmp_path), "image_size": 8},
                         "s")
    with pytest.raises(DataError, match="test class 'c' is not a training class"):
        registry.build(spec, seed=0)
    for f in (tmp_path / "val" / "c").iterdir():
        f.unlink()
    (tmp_path / "val" / "c").rmdir()
    for f in (tmp_path / "val" / "b").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="test class 'b' has no images"):
        registry.build(spec, seed=0)


def test_imagefolder_detects_test_or_val_names_missing_keys_and_computes_stats(registry, tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b"], 2, 8)
    spec = registry.spec("source", {"name": "imagefolder", "root": str(tmp_path), "image_size": 8},
                         "s")
    with pytest.raises(DataError, match="data.source.test: .* has no test/ or val/ folder"):
        registry.build(spec, seed=0)
    write_image_folder(tmp_path / "test", ["a", "b"], 1, 8)
    src = registry.build(spec, seed=0)
    assert src.test_files == ["test/a/0000.png", "test/b/0000.png"]
    x = src.train_images.double() / 255
    assert src.mean == pytest.approx(tuple(x.mean((0, 2, 3)).tolist()), abs=1e-4)
    assert src.notes and "mean/std computed from 4 training images" in src.notes[0]
    given = registry.build(registry.spec("source", {
        "name": "imagefolder", "root": str(tmp_path), "image_size": 8, "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25]}, "s"), seed=0)
    assert given.mean == (0.5, 0.5, 0.5) and not given.notes
    bad = registry.spec("source", {"name": "imagefolder", "root": str(tmp_path), "train": "tr"}, "s")
    with pytest.raises(DataError, match="data.source.train = .*tr does not exist"):
        registry.build(bad, seed=0)


def test_folder_alone_is_not_a_labelled_source(registry, own):
    with pytest.raises(DataError, match='"folder" has no labels; use it as \\[data\\] unlabeled'):
        registry.build(registry.spec("source", {"name": "folder", "root": str(own / "unl")}, "s"),
                       seed=0)


SSL_RECIPES = ["recipes/cpu/fixmatch.toml", "recipes/cpu/crest_plus.toml", "recipes/cpu/bmb.toml",
               "recipes/cpu/self_training.toml", "recipes/cpu/ssd.toml",
               "recipes/cifar10_sslt/alternate_cpu.toml"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", SSL_RECIPES)
def test_semi_supervised_recipes_run_on_an_unlabeled_folder(recipe, own, tmp_path):
    over = [f'data.source={{name="imagefolder", root="{own}", image_size=12}}',
            f'data.unlabeled={{name="folder", root="{own / "unl"}"}}',
            'data.split={name="supervised"}', 'data.longtail={name="none"}', "data.val_per_class=0"]
    if "crest" in recipe:
        over.append("scheduler.generations=2")
    if "alternate" in recipe:
        over.append("scheduler.loops=1")
    summary = start_run(Path(__file__).parent.parent / recipe, over, out_dir=tmp_path, smoke=True)
    run = Path(summary["run_dir"])
    counts = json.loads((run / "splits" / "counts.json").read_text())
    assert counts["labeled"] == [12, 6, 3, 24] and counts["unlabeled_without_labels"] == 9
    meta = json.loads((run / "run.json").read_text())
    assert meta["data"]["counts"]["labeled"] == [12, 6, 3, 24]
    for pl in summary["pseudo_labels"]:  # no hidden label exists: nothing is made up
        if "pool_accuracy" in pl:  # a pool with unlabeled images (SSD labels the labeled set)
            assert pl["hidden_labels"] == "not available" and pl["pool_accuracy"] is None
            assert pl["pl_accuracy"] is None
    for path in (run / "pseudo_labels").glob("*.csv"):
        rows = path.read_text().splitlines()
        assert rows[0] == "index,from,file,label,weight,confidence"
        for row in rows[1:]:
            index, origin, name = row.split(",")[:3]
            assert origin == ("unlabeled" if int(index) >= 45 else "source")
            assert (own / ("unl" if origin == "unlabeled" else "") / name).is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    online = [r for r in records if r.get("event") == "pseudo_labels"]
    assert all(r.get("hidden_labels") == "not available" for r in online)


def test_a_file_backed_pool_is_served_by_the_prefetching_path(registry, own):
    """An on-disk pool is never decoded as a whole: the store decodes batches by index on its
    threads, prefetched batches equal directly decoded ones, across the labeled/unlabeled seam."""
    from ltframe.data.sources import ConcatImages, FileImages

    b = _bundle(registry, own, unlabeled={"name": "folder", "root": str(own / "unl"),
                                          "in_memory": False}, workers=2)
    assert isinstance(b.source.train_images, ConcatImages) and b.train.prefetches
    assert isinstance(b.source.train_images.parts[1], FileImages)
    idx = torch.tensor([44, 45, 53, 0])
    b.train.prefetch(idx)
    assert torch.equal(b.train.get(idx), _bundle(registry, own, unlabeled={
        "name": "folder", "root": str(own / "unl"), "in_memory": True}).train.get(idx))
