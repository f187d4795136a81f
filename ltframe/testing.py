"""Helpers for ltframe's and plugins' tests: tiny recipes, fake datasets, a hook recorder."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ltframe.hookspecs import hookimpl
from ltframe.recipe import merge
from ltframe.tomlw import dumps

TINY_RECIPE: dict[str, Any] = {
    "run": {"name": "tiny", "seed": 0, "log_every": 2, "checkpoint_minutes": 0},
    "data": {
        "source": {"name": "synthetic", "num_classes": 4, "train_per_class": 24,
                   "test_per_class": 6, "image_size": 16},
        "longtail": {"name": "exp", "ratio": 4},
        "batch_size": 8,
    },
    "model": {"backbone": "resnet32_cifar", "backbone_args": {}},
    "optim": {"name": "sgd", "lr": 0.05, "schedule": {"name": "constant"}},
    "stage": [{"name": "train", "epochs": 2, "steps_per_epoch": 3, "eval_every": 1}],
}


def edge_case_images(b: int = 4, h: int = 32, w: int = 32) -> torch.Tensor:
    """Seeded uint8 RGB images with different statistics for augmentation tests: full-range
    noise, a low-contrast image, a smooth gradient with noise, and one with a two-level and a
    constant channel (the autocontrast / equalize edge cases); repeated when b > 4."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(b, 3, h, w, generator=g)
    x = torch.empty(b, 3, h, w)
    ramp = torch.linspace(0, 1, w)[None, None, :] * torch.linspace(0.2, 1, h)[None, :, None]
    for i in range(b):
        kind = i % 4
        if kind == 0:
            x[i] = u[i] * 255
        elif kind == 1:
            x[i] = 60 + u[i] * 80
        elif kind == 2:
            x[i] = 20 + 150 * ramp + 40 * u[i]
        else:
            x[i] = torch.where(u[i] < 0.3, 10.0, 200.0)
            x[i, 1] = 30 + u[i, 1] * 100
            x[i, 2] = 77
    return x.round().clamp(0, 255).to(torch.uint8)


def tiny_recipe(tmp_path: Path, name: str = "recipe.toml", **over: Any) -> Path:
    """Write a tiny CPU recipe (4 classes, 16x16 synthetic images) merged with `over`."""
    data = merge(copy.deepcopy(TINY_RECIPE), over)
    data["run"] = {**data["run"], "out_dir": str(tmp_path / "runs")}
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(data))
    return path


def ddp_recipe(tmp_path: Path, stages: list[dict[str, Any]]) -> Path:
    """A tiny semi-supervised recipe for comparing torchrun runs with one process: a two-block
    ViT with `main` and `aux` heads, 4 synthetic classes, half of them labeled, batch 8."""
    return tiny_recipe(
        tmp_path,
        run={"name": "ddp", "seed": 0, "log_every": 2},
        data={"source": {"name": "synthetic", "num_classes": 4, "train_per_class": 12,
                         "test_per_class": 5, "image_size": 16},
              "longtail": {"name": "none"},
              "split": {"name": "fraction", "labeled_fraction": 0.5}, "batch_size": 8},
        model={"backbone": "vit_tiny_patch16_224",
               "backbone_args": {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32,
                                 "num_heads": 2},
               "heads": {"main": {"name": "linear"}, "aux": {"name": "linear"}},
               "eval_head": "aux"},
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": {"name": "constant"}},
        stage=stages)


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 32,
                       seed: int = 0, ext: str = "png") -> None:
    """root/<class>/<i>.<ext> with random images (for folder-based source tests)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8)
            arr[..., c % 3] = (255 - 20 * c) % 256  # some class signal
            Image.fromarray(arr.numpy()).save(root / cls / f"{i:04d}.{ext}")


OWN_COUNTS = {"zebra": 24, "ant": 12, "cat": 6, "dog": 3}  # the head class sorts last by name


def write_own_data(root: Path, size: int = 12) -> Path:
    """A user's own data: root/train/<class> with its own long tail (`OWN_COUNTS`, one image
    grayscale), root/test/<class> (2 each), root/unl/ with flat and nested unlabeled images of
    two sizes and a FIFO (which must be skipped)."""
    import os

    from PIL import Image

    for k, (cls, n) in enumerate(OWN_COUNTS.items()):
        write_image_folder(root / "train", [cls], n, size, seed=k)
        write_image_folder(root / "test", [cls], 2, size, seed=10 + k)
    gray = root / "train" / "ant" / "0000.png"
    Image.open(gray).convert("L").save(gray)
    write_image_folder(root / "unl", ["."], 5, size + 4, seed=20)  # flat, another size
    write_image_folder(root / "unl" / "deep", ["er"], 4, size, seed=21, ext="jpg")  # nested
    os.mkfifo(root / "unl" / "fifo.png")
    return root


def write_cifar_folder(root: Path, per_class_train: int = 6, per_class_test: int = 2) -> Path:
    """A tiny CIFAR-10 image export (train/<class>/, test/<class>/) under `root`."""
    from ltframe.data.sources import CIFAR10_CLASSES

    write_image_folder(root / "train", CIFAR10_CLASSES, per_class_train, 32, seed=1)
    write_image_folder(root / "test", CIFAR10_CLASSES, per_class_test, 32, seed=2)
    return root


def write_list_dataset(root: Path, num_classes: int = 4, per_class_train: int = 6,
                       per_class_test: int = 2, size: int = 32) -> Path:
    """A tiny `listfile` dataset: root/train.txt and root/val.txt ('relative/path label' lines
    over images in root/train/<class>/ and root/val/<class>/), ImageNet's layout."""
    classes = [f"c{k:03d}" for k in range(num_classes)]
    for split, n, seed in (("train", per_class_train, 1), ("val", per_class_test, 2)):
        write_image_folder(root / split, classes, n, size, seed=seed)
        lines = [f"{split}/{c}/{i:04d}.png {k}" for k, c in enumerate(classes) for i in range(n)]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


class HookRecorder:
    """A plugin that records every event hook call as (hook name, key arguments)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def ltframe_run_start(self, run: Any) -> None:
        self.calls.append(("run_start", None))

    @hookimpl
    def ltframe_run_end(self, run: Any, summary: dict) -> None:
        self.calls.append(("run_end", summary.get("top1")))

    @hookimpl
    def ltframe_stage_start(self, run: Any, stage: Any) -> None:
        self.calls.append(("stage_start", stage.name))

    @hookimpl
    def ltframe_stage_end(self, run: Any, stage: Any, result: dict) -> None:
        self.calls.append(("stage_end", stage.name))

    @hookimpl
    def ltframe_epoch_start(self, run: Any, stage: Any, epoch: int) -> None:
        self.calls.append(("epoch_start", epoch))

    @hookimpl
    def ltframe_epoch_end(self, run: Any, stage: Any, epoch: int, metrics: dict) -> None:
        self.calls.append(("epoch_end", epoch))

    @hookimpl
    def ltframe_step_end(self, run: Any, stage: Any, step: int, ctx: Any) -> None:
        self.calls.append(("step_end", step))

    @hookimpl
    def ltframe_evaluate(self, run: Any, model: Any, logits: Any, labels: Any) -> dict:
        self.calls.append(("evaluate", int(labels.numel())))
        return {"recorder_seen": int(labels.numel())}

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class StopAt:
    """A plugin that presses Ctrl-C after `n` steps of stage `stage_index` (resume tests)."""

    def __init__(self, n: int, stage_index: int = 0) -> None:
        self.n = n
        self.stage_index = stage_index

    @hookimpl
    def ltframe_step_end(self, run: Any, stage: Any, step: int, ctx: Any) -> None:
        if stage.index == self.stage_index and step + 1 == self.n:
            raise KeyboardInterrupt
