"""Long-tail profiles, splits, sources and views."""

import math

import pytest
import torch

from ltframe.data.longtail import ProfileCfg, SplitCfg, make_splits, profile_counts
from ltframe.errors import DataError
from ltframe.testing import write_cifar_folder, write_image_folder


def test_exp_profile_matches_cifar_lt_formula():
    counts = profile_counts(ProfileCfg("exp", ratio=100), 10, 5000)
    assert counts == [math.floor(5000 * 100 ** (-c / 9)) for c in range(10)]
    assert counts[0] == 5000 and counts[-1] == 50 and sum(counts) == 12406


def test_step_pareto_none_and_reverse():
    assert profile_counts(ProfileCfg("step", ratio=10), 4, 100) == [100, 100, 10, 10]
    assert profile_counts(ProfileCfg("none"), 3, 7) == [7, 7, 7]
    assert profile_counts(ProfileCfg("exp", ratio=10, reverse=True), 3, 100) == [10, 31, 100]
    p = profile_counts(ProfileCfg("pareto", n_max=1280, n_min=5, shape=6), 50, 1300, seed=1)
    assert p[0] == 1280 and min(p) >= 5 and p == sorted(p, reverse=True)


def _labels(per_class=100, classes=4):
    return torch.arange(classes).repeat_interleave(per_class)


def test_splits_are_disjoint_deterministic_and_follow_the_protocol():
    y = _labels()
    cfg = ProfileCfg("exp", ratio=10, n_max=80)
    s1 = make_splits(y, 4, cfg, SplitCfg("fraction", labeled_fraction=0.1), 5, seed=3)
    s2 = make_splits(y, 4, cfg, SplitCfg("fraction", labeled_fraction=0.1), 5, seed=3)
    s3 = make_splits(y, 4, cfg, SplitCfg("fraction", labeled_fraction=0.1), 5, seed=4)
    assert torch.equal(s1.labeled, s2.labeled) and not torch.equal(s1.labeled, s3.labeled)
    total = profile_counts(cfg, 4, 100)  # val (5 per class) comes from the unused images
    lab = torch.bincount(y[s1.labeled], minlength=4).tolist()
    unl = torch.bincount(y[s1.unlabeled], minlength=4).tolist()
    assert lab == [math.ceil(0.1 * n) for n in total]
    assert [a + b for a, b in zip(lab, unl, strict=True)] == total
    assert torch.bincount(y[s1.val], minlength=4).tolist() == [5] * 4
    all_idx = torch.cat([s1.labeled, s1.unlabeled, s1.val])
    assert all_idx.unique().numel() == all_idx.numel()


def test_counts_split_with_reversed_unlabeled_order():
    y = _labels(200)
    s = make_splits(y, 4, ProfileCfg(), SplitCfg("counts", labeled_head=60, labeled_ratio=10,
                                                  unlabeled_head=120, unlabeled_ratio=-10), 0, 0)
    assert torch.bincount(y[s.labeled], minlength=4).tolist() == [60, 27, 12, 6]
    assert torch.bincount(y[s.unlabeled], minlength=4).tolist() == [12, 25, 55, 120]


def test_multiple_split_has_k_times_the_labeled_total():
    y = _labels(500)
    s = make_splits(y, 4, ProfileCfg("exp", ratio=10, n_max=60),
                    SplitCfg("multiple", multiple=5, unlabeled_ratio=10), 0, 0)
    n_l, n_u = s.labeled.numel(), s.unlabeled.numel()
    assert abs(n_u - 5 * n_l) <= 4
    u = torch.bincount(y[s.unlabeled], minlength=4).tolist()
    assert u == sorted(u, reverse=True)


def test_too_few_images_is_a_clear_error():
    with pytest.raises(DataError, match="class '0' .label 0. needs 80 images .* but has 50; "
                                        "lower data.longtail.n_max"):
        make_splits(_labels(50), 4, ProfileCfg("balanced", n_max=80), SplitCfg(), 0, 0)
    with pytest.raises(DataError, match="lower data.val_per_class"):  # the older protocol
        make_splits(_labels(5), 4, ProfileCfg(), SplitCfg(), 10, 0, val_first=True)


def test_cifar_folder_export_is_detected(registry, tmp_path):
    root = write_cifar_folder(tmp_path / "c10", per_class_train=3, per_class_test=2)
    src = registry.build(registry.spec("source", {"name": "cifar10", "root": str(root)}, "s"),
                         seed=0)
    assert src.classes[0] == "airplane" and src.classes[-1] == "truck"
    assert src.train_images.shape == (30, 3, 32, 32) and src.train_images.dtype == torch.uint8
    assert src.train_labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert src.test_labels.numel() == 20 and src.info["layout"] == "image folders"
    assert src.mean == pytest.approx((0.4914, 0.4822, 0.4465))


def test_missing_cifar_root_says_what_to_do(registry, tmp_path):
    spec = registry.spec("source", {"name": "cifar10", "root": str(tmp_path / "none")}, "s")
    with pytest.raises(DataError, match="no CIFAR-10 found at .*data.source.root.*download = true"):
        registry.build(spec, seed=0)


def test_imagefolder_listfile_and_npz(registry, tmp_path):
    write_image_folder(tmp_path / "f" / "train", ["b", "a"], 3, size=20)
    write_image_folder(tmp_path / "f" / "val", ["b", "a"], 2, size=20)
    src = registry.build(registry.spec("source", {"name": "imagefolder", "root": str(tmp_path / "f"),
                                                  "image_size": 16}, "s"), seed=0)
    assert src.classes == ["a", "b"] and src.train_images.shape == (6, 3, 16, 16)
    lines = [f"train/{c}/{i:04d}.png {k}" for k, c in enumerate(["a", "b"]) for i in range(3)]
    (tmp_path / "f" / "tr.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "f" / "te.txt").write_text("val/a/0000.png 0\nval/b/0001.png 1\n")
    src = registry.build(registry.spec("source", {
        "name": "listfile", "root": str(tmp_path / "f"), "train_list": "tr.txt",
        "test_list": "te.txt", "image_size": 16, "in_memory": False}, "s"), seed=0)
    assert src.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and len(src.train_images) == 6
    assert src.train_images.load(0).shape == (3, 16, 16)
    (tmp_path / "f" / "bad.txt").write_text("train/a/0000.png\n")  # a path only: unlabeled
    with pytest.raises(DataError, match="bad.txt has no labelled lines"):
        registry.build(registry.spec("source", {"name": "listfile", "root": str(tmp_path / "f"),
                                                "train_list": "bad.txt"}, "s"), seed=0)
    import numpy as np

    x = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 2, 0, 1, 2]),
             x_test=x[:3], y_test=np.array([0, 1, 2]))
    src = registry.build(registry.spec("source", {"name": "npz", "path": str(tmp_path / "d.npz")},
                                       "s"), seed=0)
    assert src.train_images.shape == (6, 3, 8, 8) and src.num_classes == 3
    assert torch.equal(src.train_images[1].permute(1, 2, 0), torch.from_numpy(x[1]))


def test_synthetic_is_deterministic_and_class_structured(registry):
    spec = registry.spec("source", {"name": "synthetic", "num_classes": 3, "train_per_class": 20,
                                    "test_per_class": 5, "image_size": 16}, "s")
    a, b = registry.build(spec, seed=0), registry.build(spec, seed=99)
    assert torch.equal(a.train_images, b.train_images)  # the data has its own seed
    x = a.train_images.float()
    means = torch.stack([x[a.train_labels == c].mean(0) for c in range(3)])
    within = torch.stack([(x[a.train_labels == c] - means[c]).pow(2).mean() for c in range(3)]).mean()
    between = (means[0] - means[1]).pow(2).mean()
    assert between > 0.05 * within  # class means differ: learnable structure


@pytest.mark.parametrize("name", ["none", "weak", "strong"])
def test_views_shapes_normalisation_and_per_sample_randomness(registry, name):
    view = registry.build(name, kind="view", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8).repeat(8, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = view(x, g)
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()
    same = all(torch.equal(out[0], out[i]) for i in range(1, 8))
    assert same == (name == "none")
    again = view(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # reproducible from the generator state
    if name == "none":
        assert torch.allclose(out, (x.float() / 255 - 0.5) / 0.25, atol=1e-6)  # float rounding


def test_lomax_profile_reproduces_the_imagenet_sslt_counts():
    # paper 000 Sec. 4.1: Lomax(shape 6, scale 1000), max 250, min 2 -> 41,134 labeled images,
    # 140 classes with n > 100, 433 with 10 < n <= 100, 427 with n <= 10
    cfg = ProfileCfg("lomax", n_max=250, n_min=2, shape=6, scale=1000)
    n = profile_counts(cfg, 1000, 1300)
    assert sum(n) == 41134 and max(n) == n[0] == 250 and min(n) == 2
    assert n == sorted(n, reverse=True)
    groups = (sum(x > 100 for x in n), sum(10 < x <= 100 for x in n), sum(x <= 10 for x in n))
    assert groups == (140, 433, 427)


def test_multiple_split_can_follow_the_labeled_profile():
    y = _labels(per_class=60, classes=5)
    cfg = ProfileCfg("lomax", n_max=10, n_min=2, shape=6, scale=2)
    s = make_splits(y, 5, cfg, SplitCfg("multiple", multiple=4, unlabeled_shape="labeled"), 0, seed=0)
    lab = torch.bincount(y[s.labeled], minlength=5)
    unl = torch.bincount(y[s.unlabeled], minlength=5)
    assert lab.tolist() == profile_counts(cfg, 5, 60)
    assert unl.tolist() == (4 * lab).tolist()
    with pytest.raises(DataError, match=r"largest data.split.multiple that fits is 5.00"):
        make_splits(y, 5, cfg, SplitCfg("multiple", multiple=6, unlabeled_shape="labeled"), 0, seed=0)


def test_resized_crop_is_identity_at_full_area_and_zooms_into_the_chosen_window():
    from ltframe.data.views import resized_crop

    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[1.0, 0.5, 0.5, 0.5]] * 2)  # area 1, ratio 1, centred
    assert torch.allclose(resized_crop(x, full, 0.08), x, atol=1e-6)
    # area 1/4, ratio 1, pushed to the top-left corner: the top-left 4 x 4 block, upsampled
    corner = torch.tensor([[0.0, 0.5, 0.0, 0.0]])
    img = torch.zeros(1, 3, 8, 8)
    img[..., :4, :4] = 1.0
    out = resized_crop(img, corner, 0.25)
    assert out[..., :6, :6].min() == 1.0 and out.mean() > 0.9  # only the block's edge blends


def test_file_store_prefetch_returns_the_same_batches(tmp_path):
    from ltframe.data.bundle import ImageStore
    from ltframe.data.samplers import BatchStream
    from ltframe.data.sources import FileImages
    from ltframe.registry import NoParams
    from ltframe.testing import write_list_dataset
    from ltframe_classics.samplers import RandomSampler

    root = write_list_dataset(tmp_path, num_classes=3, per_class_train=5, size=12)
    paths = [str(root / line.split()[0]) for line in (root / "train.txt").read_text().split("\n")
             if line]
    plain = ImageStore(FileImages(paths, 8), torch.device("cpu"), False, workers=0)
    fast = ImageStore(FileImages(paths, 8), torch.device("cpu"), False, workers=2)
    assert not plain.prefetches and fast.prefetches
    stream = BatchStream(RandomSampler(NoParams(), torch.zeros(15, dtype=torch.long), 3, seed=0),
                         torch.arange(15), 4)
    for _ in range(6):  # crosses an epoch boundary
        ahead = stream.peek()
        idx = stream.next()
        assert torch.equal(ahead, idx)
        fast.prefetch(stream.peek())
        assert torch.equal(fast.get(idx), plain.get(idx))
    assert len(fast._pending) == 1  # the next batch is being decoded
    nxt = stream.next()
    assert torch.equal(fast.get(nxt), plain.get(nxt)) and not fast._pending


# unlabeled distributions (SimPro's protocol, LeapLabTHU/SimPro dataset/cifar.py make_imb_data):
# consistent counts [100, 77, 59, 46, 35, 27, 21, 16, 12, 10] = floor(100 * 10^(-c/9)); middle
# takes positions [8, 6, 4, 2, 0, 1, 3, 5, 7, 9], headtail [1, 3, 5, 7, 9, 8, 6, 4, 2, 0]
UNL_COUNTS = {
    "consistent": [100, 77, 59, 46, 35, 27, 21, 16, 12, 10],
    "uniform": [100] * 10,
    "reversed": [10, 12, 16, 21, 27, 35, 46, 59, 77, 100],
    "middle": [12, 21, 35, 59, 100, 77, 46, 27, 16, 10],
    "headtail": [77, 46, 27, 16, 10, 12, 21, 35, 59, 100],
}


@pytest.mark.parametrize("dist", list(UNL_COUNTS))
def test_counts_split_unlabeled_distributions(dist):
    y = _labels(250, 10)
    split = SplitCfg("counts", labeled_head=20, labeled_ratio=10, unlabeled_head=100,
                     unlabeled_ratio=10, unlabeled_dist=dist)
    s = make_splits(y, 10, ProfileCfg(), split, 0, 0)
    assert torch.bincount(y[s.labeled], minlength=10).tolist() == [
        math.floor(20 * 10 ** (-c / 9)) for c in range(10)]  # the labeled set never changes
    assert torch.bincount(y[s.unlabeled], minlength=10).tolist() == UNL_COUNTS[dist]
    # a head named by class_order: the positions are ranks, head first
    names = [str(c) for c in range(10)]
    s = make_splits(y, 10, ProfileCfg(class_order=names[::-1]), split, 0, 0, classes=names)
    assert torch.bincount(y[s.unlabeled], minlength=10).tolist() == UNL_COUNTS[dist][::-1]


def test_consistent_counts_split_is_unchanged_and_negative_ratio_still_reverses():
    y = _labels(250, 10)
    base = dict(labeled_head=20, labeled_ratio=10, unlabeled_head=100)
    a = make_splits(y, 10, ProfileCfg(), SplitCfg("counts", unlabeled_ratio=10, **base), 0, 3)
    b = make_splits(y, 10, ProfileCfg(), SplitCfg("counts", unlabeled_ratio=10,
                                                  unlabeled_dist="consistent", **base), 0, 3)
    assert torch.equal(a.labeled, b.labeled) and torch.equal(a.unlabeled, b.unlabeled)
    neg = make_splits(y, 10, ProfileCfg(), SplitCfg("counts", unlabeled_ratio=-10, **base), 0, 3)
    rev = make_splits(y, 10, ProfileCfg(), SplitCfg("counts", unlabeled_ratio=10,
                                                    unlabeled_dist="reversed", **base), 0, 3)
    assert torch.equal(neg.unlabeled, rev.unlabeled) and torch.equal(neg.labeled, rev.labeled)


@pytest.mark.parametrize("dist, unl", [
    ("consistent", [80, 61, 47, 36, 28, 21, 16, 12, 9, 8]),
    ("uniform", [80] * 10),
    ("reversed", [8, 9, 12, 16, 21, 28, 36, 47, 61, 80]),
    ("middle", [9, 16, 28, 47, 80, 61, 36, 21, 12, 8]),
    ("headtail", [61, 36, 21, 12, 8, 9, 16, 28, 47, 80]),
])
def test_fraction_split_unlabeled_distributions(dist, unl):
    # total [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]; labeled ceil(0.2 n); unlabeled = the rest,
    # reordered over the classes (consistent: [80, 61, 47, 36, 28, 21, 16, 12, 9, 8])
    y = _labels(250, 10)
    s = make_splits(y, 10, ProfileCfg("exp", ratio=10, n_max=100),
                    SplitCfg("fraction", labeled_fraction=0.2, unlabeled_dist=dist), 0, 0)
    assert torch.bincount(y[s.labeled], minlength=10).tolist() == [20, 16, 12, 10, 7, 6, 5, 4, 3, 2]
    assert torch.bincount(y[s.unlabeled], minlength=10).tolist() == unl


def test_unlabeled_dist_bad_combinations_are_clear_errors():
    from ltframe.errors import RecipeError
    with pytest.raises(RecipeError, match="unlabeled_dist = \"middle\" needs the counts or fraction"):
        SplitCfg("multiple", unlabeled_dist="middle")
    with pytest.raises(RecipeError, match="unlabeled_ratio = -100 is negative .*positive"):
        SplitCfg("counts", unlabeled_ratio=-100, unlabeled_dist="reversed")
