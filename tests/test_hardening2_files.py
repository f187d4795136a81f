"""Issue 18 (images, data files, data parameters): no code from image files, no hangs on
FIFOs, a pixel cap, damaged split files, listfile entries outside the root, bad data values."""

import copy
import os
from pathlib import Path

import pytest
import torch

from ltframe.data import bundle as bundle_mod
from ltframe.data import sources
from ltframe.errors import DataError, RecipeError
from ltframe.recipe import build_recipe, merge
from ltframe.testing import TINY_RECIPE, tiny_recipe, write_image_folder

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n")


@pytest.fixture
def no_eps(monkeypatch):
    """Fail the test if Pillow's EPS plugin (which runs Ghostscript) ever opens a file."""
    from PIL import EpsImagePlugin

    def refuse(self, *a, **k):
        raise AssertionError("the EPS plugin was invoked (Ghostscript would run)")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", refuse)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", refuse)


def _source(registry, table: dict, **context):
    return registry.build(registry.spec("source", table, "data.source"), seed=0, **context)


# --- 1. code from image files, hangs, bombs ----------------------------------------------------
def test_eps_content_named_png_is_refused_without_ghostscript(tmp_path, no_eps):
    (tmp_path / "x.png").write_bytes(EPS)
    with pytest.raises(DataError, match=r"x\.png is not a JPEG, PNG.*never opened"):
        sources.decode_image(str(tmp_path / "x.png"), 8)


def test_eps_among_training_images_is_refused(registry, tmp_path, no_eps):
    write_image_folder(tmp_path / "train", ["a", "b"], 2, 8)
    write_image_folder(tmp_path / "test", ["a", "b"], 1, 8)
    (tmp_path / "train" / "a" / "evil.png").write_bytes(EPS)
    with pytest.raises(DataError, match=r"evil\.png is not a JPEG"):
        _source(registry, {"name": "imagefolder", "root": str(tmp_path), "image_size": 8})


class _FakeModel:
    classes = ["a", "b"]
    image_size = 8

    def predict_proba(self, x):
        return torch.full((x.shape[0], 2), 0.5)


def test_predict_refuses_eps_and_fifos(tmp_path, monkeypatch, no_eps):
    from ltframe import export, predict

    monkeypatch.setattr(export, "load_run_classifier", lambda *a, **k: (_FakeModel(), None, {}))
    write_image_folder(tmp_path / "imgs", ["a"], 2, 8)
    os.mkfifo(tmp_path / "imgs" / "a" / "pipe.png")
    # a folder: the FIFO is skipped (it would block the open forever)
    assert [f.name for f in predict.image_files([tmp_path / "imgs"])] == ["0000.png", "0001.png"]
    rows = predict.predict_files(tmp_path, [tmp_path / "imgs"])
    assert [Path(r["file"]).name for r in rows] == ["0000.png", "0001.png"]
    # given explicitly: refused, never opened
    with pytest.raises(DataError, match=r"pipe\.png is a FIFO, not a regular file"):
        predict.predict_files(tmp_path, [tmp_path / "imgs" / "a" / "pipe.png"])
    (tmp_path / "x.png").write_bytes(EPS)
    with pytest.raises(DataError, match=r"x\.png is not a JPEG"):
        predict.predict_files(tmp_path, [tmp_path / "x.png"])


def test_eval_data_folder_skips_fifos(tmp_path):
    from ltframe import predict

    write_image_folder(tmp_path / "d", ["a", "b"], 1, 8)
    os.mkfifo(tmp_path / "d" / "b" / "pipe.png")
    files, labels = predict.folder_images(tmp_path / "d", ["a", "b"])
    assert [f.name for f in files] == ["0000.png", "0000.png"] and labels.tolist() == [0, 1]


def test_listfile_entry_that_is_a_fifo_is_refused_before_decoding(registry, tmp_path):
    write_image_folder(tmp_path / "img", ["a", "b"], 2, 8)
    os.mkfifo(tmp_path / "img" / "a" / "pipe.png")
    (tmp_path / "train.txt").write_text("img/a/0000.png 0\nimg/a/pipe.png 0\nimg/b/0000.png 1\n")
    (tmp_path / "test.txt").write_text("img/a/0001.png 0\nimg/b/0001.png 1\n")
    with pytest.raises(DataError, match=r"train\.txt:2: image .*pipe\.png is a FIFO"):
        _source(registry, {"name": "listfile", "root": str(tmp_path), "image_size": 8,
                           "in_memory": False, "mean": [0.5] * 3, "std": [0.2] * 3})


def test_walks_skip_fifos(tmp_path):
    write_image_folder(tmp_path / "a", ["x"], 1, 8)
    os.mkfifo(tmp_path / "a" / "x" / "pipe.png")
    assert [Path(p).name for p in sources.walk_images(tmp_path / "a")] == ["0000.png"]
    paths, _, _ = sources.scan_class_folders(tmp_path / "a")
    assert [Path(p).name for p in paths] == ["0000.png"]


def test_pixel_cap_checked_from_the_header(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (20, 10)).save(tmp_path / "big.png")
    monkeypatch.setattr(sources, "MAX_PIXELS", 199, raising=False)
    with pytest.raises(DataError, match=r"big\.png is too large \(20x10 pixels; the cap is 199"):
        sources.decode_image(str(tmp_path / "big.png"), 8)


def test_default_pixel_cap_refuses_a_huge_png(tmp_path):
    from PIL import Image

    Image.new("1", (8100, 8000)).save(tmp_path / "huge.png")  # 64.8 MP, a small file
    with pytest.raises(DataError, match=r"huge\.png is too large \(8100x8000 pixels"):
        sources.decode_image(str(tmp_path / "huge.png"), 8)


def test_pillow_decompression_bomb_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (20, 20)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 400 > 2 x 10: Pillow's error
    with pytest.raises(DataError, match=r"bomb\.png is too large \(over Pillow's"):
        sources.decode_image(str(tmp_path / "bomb.png"), 8)


def test_allowed_formats_still_decode_whatever_the_extension(tmp_path):
    from PIL import Image

    Image.new("RGB", (12, 10), (200, 10, 10)).save(tmp_path / "a.png", format="JPEG")
    Image.new("RGB", (12, 10)).save(tmp_path / "b.tif")
    assert sources.decode_image(str(tmp_path / "a.png"), 8).shape == (3, 8, 8)
    assert sources.decode_image(str(tmp_path / "b.tif"), None).shape == (3, 10, 12)


# --- 2. split files in the run directory ------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from ltframe import start_run

    tmp = tmp_path_factory.mktemp("splitrun")
    recipe = tiny_recipe(tmp, stage=[{"name": "train", "epochs": 1, "steps_per_epoch": 2}])
    summary = start_run(recipe)
    return Path(summary["run_dir"])


def _bundle(run_dir: Path):
    """The run's data bundle rebuilt as resume does (the tiny recipe's synthetic data)."""
    from ltframe.data.bundle import build_bundle
    from ltframe.plugins import make_plugin_manager
    from ltframe.recipe import load_recipe

    registry = make_plugin_manager()[1]
    recipe = load_recipe(run_dir / "resolved.toml", registry)
    src = registry.build(recipe.data.source, seed=recipe.run.seed)
    return build_bundle(src, recipe.data, recipe.run.seed, torch.device("cpu"))


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.replace("\n", "\nx\n", 1), r"labeled\.txt:2: 'x' is not a training-image index"),
    (lambda t: t[:-1], r"labeled\.txt is truncated"),
    (lambda t: t + "999999\n", r"labeled\.txt:\d+: index 999999 is out of range"),
    (lambda t: t + t.split()[0] + "\n", r"labeled\.txt:\d+: index \d+ is listed twice"),
    (lambda t: "\n".join(t.split("\n")[1:]), r"the labeled split differs from .*labeled\.txt"),
    (lambda t: "1e3\n", r"labeled\.txt:1: '1e3' is not"),
])
def test_damaged_split_file_names_the_file_and_the_fix(finished_run, tmp_path, damage, message):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    f = run_dir / "splits" / "labeled.txt"
    f.write_text(damage(f.read_text()))
    with pytest.raises(DataError, match=message) as info:
        bundle_mod.check_splits(_bundle(run_dir), run_dir)
    msg = str(info.value)
    assert "\n" not in msg and ("restore" in msg and "new run" in msg)


def test_resume_with_an_edited_split_file_is_a_clear_error(finished_run, tmp_path):
    import shutil

    from ltframe import resume_run

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    (run_dir / "summary.json").unlink()  # unfinished again: resume reads the split files
    (run_dir / "splits" / "val.txt").write_text("abc\n")
    with pytest.raises(DataError, match=r"val\.txt:1: 'abc' is not a training-image index.*"
                                        r"restore it"):
        resume_run(run_dir)


# --- 3. listfile entries outside the root ------------------------------------------------------
def test_listfile_entries_outside_the_root_get_a_note(registry, tmp_path):
    write_image_folder(tmp_path / "root" / "img", ["a", "b"], 2, 8)
    write_image_folder(tmp_path / "elsewhere", ["c"], 2, 8)
    outside_abs = tmp_path / "elsewhere" / "c" / "0000.png"
    (tmp_path / "root" / "train.txt").write_text(
        f"img/a/0000.png 0\n../elsewhere/c/0001.png 0\n{outside_abs} 1\nimg/b/0000.png 1\n")
    (tmp_path / "root" / "test.txt").write_text("img/a/0001.png 0\nimg/b/0001.png 1\n")
    src = _source(registry, {"name": "listfile", "root": str(tmp_path / "root"), "image_size": 8})
    notes = [n for n in src.notes if "outside data.source.root" in n]
    assert len(notes) == 1 and notes[0].startswith("listfile: 2 of 6 listed images lie outside")
    assert "'../elsewhere/c/0001.png'" in notes[0] and "read as given" in notes[0]


def test_listfile_inside_the_root_has_no_note(registry, tmp_path):
    write_image_folder(tmp_path / "img", ["a", "b"], 2, 8)
    (tmp_path / "train.txt").write_text("img/a/0000.png 0\nimg/./b/0000.png 1\n")
    (tmp_path / "test.txt").write_text("img/a/0001.png 0\nimg/b/../b/0001.png 1\n")
    src = _source(registry, {"name": "listfile", "root": str(tmp_path), "image_size": 8,
                             "mean": [0.5] * 3, "std": [0.2] * 3})
    assert src.notes == []


def test_listfile_missing_image_is_found_when_the_list_is_read(registry, tmp_path):
    write_image_folder(tmp_path / "img", ["a", "b"], 1, 8)
    (tmp_path / "train.txt").write_text("img/a/0000.png 0\nimg/b/0000.png 1\nimg/b/gone.png 1\n")
    (tmp_path / "test.txt").write_text("img/a/0000.png 0\n")
    with pytest.raises(DataError, match=r"train\.txt:3: image .*gone\.png cannot be read"):
        _source(registry, {"name": "listfile", "root": str(tmp_path), "image_size": 8,
                           "in_memory": False, "mean": [0.5] * 3, "std": [0.2] * 3})


# --- 4. data parameters ------------------------------------------------------------------------
def _data(registry, **data):
    raw = merge(copy.deepcopy(TINY_RECIPE), {"data": data})
    return build_recipe(raw, registry).data


@pytest.mark.parametrize("data, message", [
    ({"source": {"name": "synthetic", "noise": float("nan")}}, r"data\.source\.noise: nan"),
    ({"source": {"name": "synthetic", "noise": -1.0}}, r"data\.source\.noise: -1.*>= 0"),
    ({"source": {"name": "synthetic", "image_size": 0}}, r"data\.source\.image_size: 0.*>= 1"),
    ({"source": {"name": "synthetic", "image_size": -4}}, r"data\.source\.image_size: -4"),
    ({"source": {"name": "synthetic", "num_classes": 1}}, r"data\.source\.num_classes: 1.*>= 2"),
    ({"source": {"name": "imagefolder", "image_size": 100000}},
     r"data\.source\.image_size: 100000.*<= 8000"),
    ({"longtail": {"name": "exp", "ratio": float("inf")}}, r"data\.longtail\.ratio: inf"),
    ({"longtail": {"name": "lomax", "shape": float("inf")}}, r"data\.longtail\.shape: inf"),
    ({"split": {"name": "multiple", "multiple": float("inf")}}, r"data\.split\.multiple: inf"),
    ({"split": {"name": "counts", "unlabeled_ratio": float("nan")}},
     r"data\.split\.unlabeled_ratio: nan"),
    ({"split": {"name": "counts", "unlabeled_ratio": float("inf")}},
     r"data\.split\.unlabeled_ratio: inf"),
])
def test_bad_data_values_are_recipe_errors(registry, data, message):
    with pytest.raises(RecipeError, match=message):
        _data(registry, **data)


def test_synthetic_too_large_to_allocate_is_refused_before_allocating(registry, monkeypatch):
    def no_render(*a, **k):
        raise AssertionError("make_synthetic was called")

    import ltframe.builtin.sources as builtin

    monkeypatch.setattr(builtin, "make_synthetic", no_render)
    with pytest.raises(DataError, match=r"synthetic would need about .* GB .*lower "
                                        r"data\.source\.train_per_class"):
        _source(registry, {"name": "synthetic", "train_per_class": 10**12})


def test_in_memory_decoding_larger_than_memory_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "physical_memory", lambda: 1000, raising=False)
    with pytest.raises(DataError, match=r"need .* GB in memory.*in_memory = false"):
        sources.load_images([str(tmp_path / "x.png")] * 10, 32, True)


@pytest.mark.parametrize("data, message", [
    ({"longtail": {"name": "pareto", "n_max": 5, "n_min": 10}},
     r"data\.longtail\.n_min = 10 is above n_max = 5"),
    ({"split": {"name": "multiple", "multiple": 1e308}}, r"data\.split\.multiple: .*<= 1000000"),
])
def test_long_tail_cross_field_and_range_checks(registry, data, message):
    with pytest.raises(RecipeError, match=message):
        _data(registry, **data)


@pytest.mark.parametrize("shape", [0.01, 1e300])
def test_pareto_shape_that_cannot_be_drawn_is_a_recipe_error(shape):
    from ltframe.data.longtail import ProfileCfg, SplitCfg, make_splits

    y = torch.arange(4).repeat_interleave(24)
    with pytest.raises(RecipeError, match=r"data\.longtail\.shape = .* out of the range pareto"):
        make_splits(y, 4, ProfileCfg(name="pareto", shape=shape), SplitCfg(), 0, 0)


def test_walk_survives_a_symlink_loop(tmp_path):
    write_image_folder(tmp_path / "a", ["x"], 1, 8)
    os.symlink(tmp_path / "a", tmp_path / "a" / "x" / "loop")
    assert [Path(p).name for p in sources.walk_images(tmp_path / "a")] == ["0000.png"]
