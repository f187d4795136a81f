"""Every recipe in recipes/ runs each stage for two steps (`--smoke`) on the CPU."""

from pathlib import Path

import pytest

from ltframe import start_run
from ltframe.testing import write_cifar_folder, write_image_folder, write_list_dataset, write_own_data

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_cifar_folder(tmp_path_factory.mktemp("cifar"), per_class_train=6,
                              per_class_test=2)


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):  # CIFAR-100 is not on disk: a tiny image export
    root = tmp_path_factory.mktemp("cifar100")
    classes = [f"class{i:03d}" for i in range(100)]
    write_image_folder(root / "train", classes, 6, 32, seed=1)
    write_image_folder(root / "test", classes, 1, 32, seed=2)
    return root


@pytest.fixture(scope="module")
def list_root(tmp_path_factory):
    return write_list_dataset(tmp_path_factory.mktemp("listfile"))


@pytest.fixture(scope="module")
def own_root(tmp_path_factory):  # a user's own long-tailed folder and unlabeled images
    return write_own_data(tmp_path_factory.mktemp("own"), size=32)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_smoke(recipe, tmp_path, cifar_root, cifar100_root, list_root, own_root):
    overrides = []
    text = recipe.read_text()
    if 'name = "imagefolder"' in text or "own_folder.toml" in text:
        overrides += [f"data.source.root={own_root}", "data.source.image_size=32"]
    if 'name = "folder"' in text:
        overrides.append(f"data.unlabeled.root={own_root / 'unl'}")
    if 'extends = "finetune_la.toml"' in text:  # its data is an imagefolder too
        overrides += [f"data.source.root={own_root}", "data.source.image_size=32"]
    if "pretrained = true" in text or "finetune_la.toml" in text:  # no network: random weights
        overrides.append("model.pretrained=false")
    if 'name = "cifar100"' in text:
        overrides.append(f"data.source.root={cifar100_root}")
    elif 'name = "cifar' in text:
        overrides.append(f"data.source.root={cifar_root}")
    if 'name = "listfile"' in text:  # ImageNet layout at 32 px
        overrides += [f"data.source.root={list_root}", "data.source.image_size=32",
                      "data.source.train_list=train.txt", "data.source.test_list=val.txt"]
    if 'name = "crest"' in recipe.read_text():  # two generations show every step of a loop
        overrides.append("scheduler.generations=2")
    if 'name = "multiple"' in recipe.read_text():  # k x labeled must fit in 6 images per class
        overrides += ["data.longtail.n_max=1", "data.longtail.n_min=1", "data.split.multiple=1"]
    if 'name = "counts"' in recipe.read_text():  # DARP/USB heads need thousands of images
        overrides += ["data.split.labeled_head=3", "data.split.unlabeled_head=3"]
    summary = start_run(recipe, overrides, out_dir=tmp_path, smoke=True)
    assert summary["smoke"] and len(summary["stages"]) >= 1
    assert 0.0 <= summary["top1"] <= 100.0


def test_recipes_exist():
    names = {str(p.relative_to(ROOT)) for p in RECIPES}
    assert {"recipes/quickstart.toml", "recipes/cifar10_lt/ce.toml"} <= names


COMPOSITIONS = {  # methods mixed by recipe values only (no code)
    "bmb+crest": ("recipes/cpu/bmb.toml", ['scheduler={name="crest", generations=2, progressive=false}']),
    "bmb+la": ("recipes/cpu/bmb.toml", ['stage[0].loss[0]={name="la"}']),
    "ssd+crt": ("recipes/cpu/ssd.toml", ["scheduler.teacher=crt"]),
    "ssd+tau_norm": ("recipes/cpu/ssd.toml", [
        "scheduler.teacher=tau_norm", 'model.heads.main={name="tau_norm"}',
        'stage[0].train=["backbone", "heads.main", "heads.rot"]']),
    "ssd+moco": ("recipes/cpu/ssd.toml", [
        'model.heads.rot={name="mlp", out_features=16}',
        'stage[0].views={labeled=["weak", "moco", "moco"]}',
        'stage[0].loss=["ce", {name="moco", head="rot", query="labeled:moco", '
        'key="labeled:moco#2", queue_size=64, mask_same_label=true}]']),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_composition_smoke(name, tmp_path):
    recipe, overrides = COMPOSITIONS[name]
    summary = start_run(ROOT / recipe, overrides, out_dir=tmp_path, smoke=True)
    assert summary["smoke"] and 0.0 <= summary["top1"] <= 100.0
