"""Data sources: cifar10, cifar100, imagefolder, listfile, npz, synthetic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ltframe.data.sources import (
    IMAGENET_STATS,
    SourceData,
    load_cifar,
    load_images,
    make_synthetic,
    scan_class_folders,
)
from ltframe.errors import DataError
from ltframe.registry import Registry


@dataclass
class CifarParams:
    root: str = "data/cifar"
    download: bool = False


def cifar10(p: CifarParams, seed: int) -> SourceData:
    """CIFAR-10 (torchvision pickles, or a train/<class>/ test/<class>/ image export)."""
    return load_cifar(p.root, 10, p.download)


def cifar100(p: CifarParams, seed: int) -> SourceData:
    """CIFAR-100 (torchvision pickles, or a train/<class>/ test/<class>/ image export)."""
    return load_cifar(p.root, 100, p.download)


@dataclass
class SyntheticParams:
    num_classes: int = 10
    train_per_class: int = 500
    test_per_class: int = 100
    image_size: int = 32
    noise: float = 1.0
    seed: int = 0  # the data's own seed: the same data for every run seed


def synthetic(p: SyntheticParams, seed: int) -> SourceData:
    """Procedural images with class structure (offline default; learnable on a CPU)."""
    if p.num_classes < 2 or p.train_per_class < 1 or p.test_per_class < 1:
        raise DataError("data.source: synthetic needs num_classes >= 2 and >= 1 image per class")
    return make_synthetic(p.num_classes, p.train_per_class, p.test_per_class, p.image_size,
                          p.noise, p.seed)


@dataclass
class FolderParams:
    root: str = "data"
    train: str = "train"
    test: str = "val"
    image_size: int = 224  # images are resized (short side) and centre-cropped to this
    in_memory: bool | None = None  # None: decode into memory when it is small
    mean: tuple[float, float, float] = IMAGENET_STATS[0]
    std: tuple[float, float, float] = IMAGENET_STATS[1]


def imagefolder(p: FolderParams, seed: int) -> SourceData:
    """root/<train>/<class>/<image> and root/<test>/<class>/<image> (classes sorted)."""
    root = Path(p.root).expanduser()
    tr_paths, tr_labels, classes = scan_class_folders(root / p.train)
    te_paths, te_labels, _ = scan_class_folders(root / p.test, classes)
    return SourceData(load_images(tr_paths, p.image_size, p.in_memory), tr_labels,
                      load_images(te_paths, p.image_size, p.in_memory), te_labels, classes,
                      p.mean, p.std)


@dataclass
class ListParams:
    root: str = "data"
    train_list: str = "train.txt"
    test_list: str = "test.txt"
    val_list: str = ""  # optional separate validation list
    image_size: int = 224
    in_memory: bool | None = None
    mean: tuple[float, float, float] = IMAGENET_STATS[0]
    std: tuple[float, float, float] = IMAGENET_STATS[1]


def _read_list(root: Path, name: str, num_classes: int | None = None,
               train_list: str = "") -> tuple[list[str], torch.Tensor]:
    """'relative/path label' lines; labels must be >= 0 (and < num_classes when given)."""
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_file():
        raise DataError(f"list file {path} not found; set data.source.root / the list's name")
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{n}: expected 'relative/path label', got {line[:80]!r}")
        label = int(parts[1])
        if label < 0:
            raise DataError(f"{path}:{n}: label {label} is negative; labels must be class "
                            "indices 0..C-1, so renumber them from 0")
        if num_classes is not None and label >= num_classes:
            raise DataError(
                f"{path}:{n}: label {label} is not a training class ({train_list} has labels "
                f"0..{num_classes - 1}); fix the label or add training images of class {label}"
            )
        paths.append(str(root / parts[0]))
        labels.append(label)
    if not paths:
        raise DataError(f"{path} lists no images")
    return paths, torch.tensor(labels, dtype=torch.long)


def listfile(p: ListParams, seed: int) -> SourceData:
    """root + 'relative/path label' lines (ImageNet-LT / iNaturalist format).

    Classes are 0..max train label; test and val labels must be among them.
    """
    root = Path(p.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.source.root: {root} does not exist; set it to the image root")
    tr_paths, tr_y = _read_list(root, p.train_list)
    num_classes = int(tr_y.max()) + 1
    te_paths, te_y = _read_list(root, p.test_list, num_classes, p.train_list)
    val = _read_list(root, p.val_list, num_classes, p.train_list) if p.val_list else None
    return SourceData(
        load_images(tr_paths, p.image_size, p.in_memory), tr_y,
        load_images(te_paths, p.image_size, p.in_memory), te_y,
        [str(i) for i in range(num_classes)], p.mean, p.std,
        val_images=load_images(val[0], p.image_size, p.in_memory) if val else None,
        val_labels=val[1] if val else None,
    )


@dataclass
class NpzParams:
    path: str = "data.npz"
    layout: Literal["NHWC", "NCHW"] = "NHWC"  # of x_train/x_test; (N, H, W) is grayscale


_SHAPES = {"NHWC": "(N, H, W, 3)", "NCHW": "(N, 3, H, W)"}


def _npz_images(path: Path, name: str, x: torch.Tensor, layout: str) -> torch.Tensor:
    """uint8 images in `layout` (or grayscale (N, H, W)) -> uint8 [N, 3, H, W]."""
    if x.dtype != torch.uint8:
        raise DataError(f"{path}: {name} must be uint8 images, got {x.dtype}; save them as uint8 "
                        "(0..255)")
    channels = (3, 1) if layout == "NHWC" else (1, 3)  # axes holding the channels
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[channels[0]] in (1, 3):
        x = x.permute(0, 3, 1, 2) if layout == "NHWC" else x
    else:
        other = "NCHW" if layout == "NHWC" else "NHWC"
        fits_other = x.ndim == 4 and x.shape[channels[1]] in (1, 3)
        fix = (f'set data.source.layout = "{other}"' if fits_other else
               f"save them as {_SHAPES[layout]} (1 or 3 channels) or (N, H, W) grayscale")
        raise DataError(f"{path}: {name} has shape {tuple(x.shape)}, which is not {layout} "
                        f"{_SHAPES[layout]}; {fix}")
    return x.expand(-1, 3, -1, -1).contiguous()


def _npz_labels(path: Path, name: str, y: torch.Tensor, n: int, x_name: str) -> torch.Tensor:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.flatten()
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"{path}: {name} has shape {tuple(y.shape)} and dtype {y.dtype}; save "
                        "one integer class index per image, shape (N,)")
    if y.numel() != n:
        raise DataError(f"{path}: {x_name} has {n} images but {name} has {y.numel()} labels; "
                        "save one label per image")
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        raise DataError(f"{path}: {name} has label {int(y.min())}; labels must be class indices "
                        "0..C-1, so renumber them from 0")
    return y


def npz(p: NpzParams, seed: int) -> SourceData:
    """Arrays x_train, y_train, x_test, y_test in one .npz file.

    Images are uint8 in `layout`, or grayscale (N, H, W) / one channel, repeated to 3 channels.
    Classes are 0..max(y_train); y_test must be among them.
    """
    import numpy as np

    path = Path(p.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.source.path: {path} not found")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z]
        if missing:
            raise DataError(f"{path} lacks arrays {', '.join(missing)}")
        arrays = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}

    x_tr = _npz_images(path, "x_train", arrays["x_train"], p.layout)
    x_te = _npz_images(path, "x_test", arrays["x_test"], p.layout)
    y_tr = _npz_labels(path, "y_train", arrays["y_train"], x_tr.shape[0], "x_train")
    y_te = _npz_labels(path, "y_test", arrays["y_test"], x_te.shape[0], "x_test")
    if not y_tr.numel():
        raise DataError(f"{path}: x_train holds no images")
    num_classes = int(y_tr.max()) + 1
    if y_te.numel() and int(y_te.max()) >= num_classes:
        raise DataError(
            f"{path}: y_test has label {int(y_te.max())}, which is not a training class (y_train "
            f"has labels 0..{num_classes - 1}); fix y_test or add training images of that class"
        )
    unit = x_tr.float() / 255
    return SourceData(x_tr, y_tr, x_te, y_te, [str(i) for i in range(num_classes)],
                      tuple(unit.mean((0, 2, 3)).tolist()),
                      tuple(unit.std((0, 2, 3)).clamp_min(1e-3).tolist()))


def register(registry: Registry) -> None:
    registry.register("source", "cifar10", cifar10, CifarParams)
    registry.register("source", "cifar100", cifar100, CifarParams)
    registry.register("source", "synthetic", synthetic, SyntheticParams)
    registry.register("source", "imagefolder", imagefolder, FolderParams)
    registry.register("source", "listfile", listfile, ListParams)
    registry.register("source", "npz", npz, NpzParams)
