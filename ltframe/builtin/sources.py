"""Data sources: cifar10, cifar100, imagefolder, listfile, npz, synthetic, folder.

Every source can also be `[data] unlabeled`: then its images are used without their labels
(factories that accept `unlabeled=True` skip what only a labelled source needs, e.g. a test set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ltframe.config import param
from ltframe.data.sources import (
    IMG_EXTENSIONS,
    SYNTHETIC_BYTES_PER_PIXEL,
    Images,
    SourceData,
    check_regular_file,
    image_stats,
    load_cifar,
    load_images,
    make_synthetic,
    physical_memory,
    relative_names,
    scan_class_folders,
    walk_images,
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


#: the largest image side a source may resize to (its square is ltframe's pixel cap)
MAX_SIDE = 8000


@dataclass
class SyntheticParams:
    num_classes: int = param(10, ge=2)
    train_per_class: int = param(500, ge=1)
    test_per_class: int = param(100, ge=1)
    image_size: int = param(32, ge=1, le=MAX_SIDE)
    noise: float = param(1.0, ge=0)  # std of the pixel noise added to the class patterns
    seed: int = 0  # the data's own seed: the same data for every run seed


def synthetic(p: SyntheticParams, seed: int) -> SourceData:
    """Procedural images with class structure (offline default; learnable on a CPU)."""
    if p.num_classes < 2 or p.train_per_class < 1 or p.test_per_class < 1:
        raise DataError("data.source: synthetic needs num_classes >= 2 and >= 1 image per class")
    n = p.num_classes * max(p.train_per_class, p.test_per_class)
    need = n * p.image_size**2 * SYNTHETIC_BYTES_PER_PIXEL
    have = physical_memory()
    if have and need > have:
        raise DataError(
            f"data.source: synthetic would need about {need / 1e9:,.0f} GB to generate "
            f"{p.num_classes} classes x {max(p.train_per_class, p.test_per_class):,} images of "
            f"{p.image_size}x{p.image_size}, more than this machine's {have / 1e9:.0f} GB; lower "
            "data.source.train_per_class, test_per_class, image_size or num_classes")
    return make_synthetic(p.num_classes, p.train_per_class, p.test_per_class, p.image_size,
                          p.noise, p.seed)


Stats = tuple[float, float, float]


def _stats(name: str, images: Images, mean: Stats | None, std: Stats | None
           ) -> tuple[Stats, Stats, list[str]]:
    """The given mean/std, or both computed from the training images (said in a note)."""
    if mean is not None and std is not None:
        return mean, std, []
    m, s, n = image_stats(images)
    note = (f"{name}: mean/std computed from {n} training images: mean "
            f"({', '.join(f'{v:.4f}' for v in m)}), std ({', '.join(f'{v:.4f}' for v in s)}); "
            "set data.source.mean and std to use others (e.g. a pretrained model's)")
    return (mean or m), (std or s), [note]


@dataclass
class FolderParams:
    root: str = "data"
    train: str = "train"
    test: str = ""  # "" = detect: "test" if root has it, else "val"
    image_size: int = param(224, ge=1, le=MAX_SIDE)  # images resized (short side), centre-cropped
    in_memory: bool | None = None  # None: decode into memory when it is small
    mean: Stats | None = None  # None: computed from the training images (the run says so)
    std: Stats | None = None


def imagefolder(p: FolderParams, seed: int, unlabeled: bool = False) -> SourceData:
    """root/<train>/<class>/<image> and root/<test>/<class>/<image> (classes sorted).

    The training set is used as it is (its own long tail). `test` defaults to "test" or, if
    absent, "val"; every test class must be a training class and have images.
    """
    root = Path(p.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.source.root: {root} does not exist; set it to the folder that holds "
                        f"{p.train}/ and test/ (or val/)")
    tr_paths, tr_labels, classes = scan_class_folders(root / p.train, key="data.source.train")
    train = load_images(tr_paths, p.image_size, p.in_memory)
    mean, std, notes = _stats("imagefolder", train, p.mean, p.std)
    names = relative_names(tr_paths, root)
    if unlabeled:
        return SourceData(train, tr_labels, load_images([], p.image_size, True),
                          torch.zeros(0, dtype=torch.long), classes, mean, std, train_files=names,
                          notes=notes)
    test = p.test or next((t for t in ("test", "val") if (root / t).is_dir()), "")
    if not test:
        raise DataError(f"data.source.test: {root} has no test/ or val/ folder; add one with "
                        "<class>/<image> folders, or set data.source.test to its name")
    te_paths, te_labels, _ = scan_class_folders(root / test, classes, test=True,
                                                key="data.source.test")
    return SourceData(train, tr_labels, load_images(te_paths, p.image_size, p.in_memory),
                      te_labels, classes, mean, std, train_files=names,
                      test_files=relative_names(te_paths, root), notes=notes)


@dataclass
class UnlabeledFolderParams:
    root: str = "unlabeled"
    image_size: int = param(0, ge=0, le=MAX_SIDE)  # 0 = the labelled source's image size
    # None: decode into memory when under 2 GB and at most 50,000 files; a larger pool stays
    # on disk and is decoded batch by batch on data.workers threads (prefetched)
    in_memory: bool | None = None


def folder(p: UnlabeledFolderParams, seed: int, image_size: int = 224,
           unlabeled: bool = False) -> SourceData:
    """Every image under root (recursively, any supported extension), without labels: for
    `[data] unlabeled = { name = "folder", root = ... }`. Large pools stay on disk."""
    if not unlabeled:
        raise DataError('data.source: "folder" has no labels; use it as [data] unlabeled = '
                        '{ name = "folder", root = ... } beside a labelled data.source (imagefolder, '
                        "listfile, npz, cifar10, ...)")
    root = Path(p.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.unlabeled.root: {root} does not exist; set it to the folder of "
                        "unlabeled images")
    paths = walk_images(root)
    if not paths:
        raise DataError(f"data.unlabeled.root: {root} holds no images (extensions "
                        f"{', '.join(IMG_EXTENSIONS)})")
    size = p.image_size or image_size
    in_memory = p.in_memory if p.in_memory is not None else (
        len(paths) <= 50_000 and len(paths) * 3 * size * size < 2e9)
    images = load_images(paths, size, in_memory)
    empty = torch.zeros(0, dtype=torch.long)
    return SourceData(images, torch.full((len(paths),), -1, dtype=torch.long),
                      load_images([], size, True), empty, [], (0.5,) * 3, (0.5,) * 3,
                      train_files=relative_names(paths, root))


@dataclass
class ListParams:
    root: str = "data"
    train_list: str = "train.txt"  # 'path label' lines; a line with a path only = an unlabeled image
    test_list: str = "test.txt"
    val_list: str = ""  # optional separate validation list
    unlabeled_list: str = ""  # optional list of unlabeled images ('path' lines)
    image_size: int = param(224, ge=1, le=MAX_SIDE)
    in_memory: bool | None = None
    mean: Stats | None = None  # None: computed from the training images (the run says so)
    std: Stats | None = None


def _read_list(root: Path, name: str, num_classes: int | None = None,
               train_list: str = "", unlabeled_ok: bool = False,
               outside: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """'relative/path label' lines; labels must be >= 0 (and < num_classes when given).
    With `unlabeled_ok` a line with a path only is an unlabeled image (label -1).

    Every listed image must be a regular file (checked with stat, never opened here). Entries
    that lie outside `root` (absolute or '../' paths) are read as given and appended to
    `outside` (for the source's note).
    """
    path = Path(name) if Path(name).is_absolute() else root / name
    if not path.is_file():
        raise DataError(f"list file {path} not found; set data.source.root / the list's name")
    base = os.path.abspath(root)
    paths, labels = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if unlabeled_ok and (len(parts) == 1 or not parts[1].lstrip("-").isdigit()):
            entry, label = line.strip(), -1
        else:
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{path}:{n}: expected 'relative/path label', got {line[:80]!r}")
            entry, label = parts[0], int(parts[1])
            if label < 0:
                raise DataError(f"{path}:{n}: label {label} is negative; labels must be class "
                                "indices 0..C-1, so renumber them from 0")
            if num_classes is not None and label >= num_classes:
                raise DataError(
                    f"{path}:{n}: label {label} is not a training class ({train_list} has labels "
                    f"0..{num_classes - 1}); fix the label or add training images of class {label}"
                )
        image = str(root / entry)
        check_regular_file(image, f"{path}:{n}: image")
        full = os.path.abspath(image)  # normalised, symlinks not followed
        if outside is not None and os.path.commonpath([base, full]) != base:
            outside.append(entry)
        paths.append(image)
        labels.append(label)
    if not paths:
        raise DataError(f"{path} lists no images")
    return paths, torch.tensor(labels, dtype=torch.long)


def _outside_note(root: Path, outside: list[str], total: int) -> list[str]:
    """A note saying how many list entries lie outside the root (read as given)."""
    if not outside:
        return []
    return [f"listfile: {len(outside)} of {total} listed images lie outside data.source.root "
            f"{root} (absolute or '../' paths, e.g. {outside[0]!r}); they are read as given"]


def listfile(p: ListParams, seed: int, unlabeled: bool = False) -> SourceData:
    """root + 'relative/path label' lines (ImageNet-LT / iNaturalist format); lines with a path
    only (in train_list or unlabeled_list) are unlabeled images.

    Classes are 0..max train label; test and val labels must be among them. Entries outside
    root (absolute or '../' paths) are allowed; a note says how many there are.
    """
    root = Path(p.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.source.root: {root} does not exist; set it to the image root")
    outside: list[str] = []
    tr_paths, tr_y = _read_list(root, p.train_list, unlabeled_ok=True, outside=outside)
    if p.unlabeled_list:
        u_paths, _ = _read_list(root, p.unlabeled_list, unlabeled_ok=True, outside=outside)
        tr_paths, tr_y = tr_paths + u_paths, torch.cat([tr_y, torch.full((len(u_paths),), -1)])
    num_classes = int(tr_y.max()) + 1
    if num_classes == 0 and not unlabeled:
        raise DataError(f"{p.train_list} has no labelled lines ('path label'); a labelled "
                        "data.source needs some (use a list of paths only as data.unlabeled)")
    train = load_images(tr_paths, p.image_size, p.in_memory)
    labelled = (tr_y >= 0).nonzero().flatten().tolist()
    mean, std, notes = _stats("listfile", _subset(train, labelled), p.mean, p.std)
    names = relative_names(tr_paths, root)
    classes = [str(i) for i in range(num_classes)]
    if unlabeled:
        return SourceData(train, tr_y, load_images([], p.image_size, True),
                          torch.zeros(0, dtype=torch.long), classes, mean, std,
                          train_files=names,
                          notes=notes + _outside_note(root, outside, len(tr_paths)))
    te_paths, te_y = _read_list(root, p.test_list, num_classes, p.train_list, outside=outside)
    val = (_read_list(root, p.val_list, num_classes, p.train_list, outside=outside)
           if p.val_list else None)
    total = len(tr_paths) + len(te_paths) + (len(val[0]) if val else 0)
    return SourceData(
        train, tr_y, load_images(te_paths, p.image_size, p.in_memory), te_y, classes, mean, std,
        val_images=load_images(val[0], p.image_size, p.in_memory) if val else None,
        val_labels=val[1] if val else None, train_files=names,
        test_files=relative_names(te_paths, root),
        notes=notes + _outside_note(root, outside, total),
    )


def _subset(images: Images, index: list[int]) -> Images:
    if len(index) == len(images):
        return images
    return images[index] if isinstance(images, torch.Tensor) else _Picked(images, index)


class _Picked:
    """`images` restricted to `index` (for statistics over the labelled images only)."""

    def __init__(self, images: Images, index: list[int]) -> None:
        self.images, self.index, self.size = images, index, images.size

    def __len__(self) -> int:
        return len(self.index)

    def load(self, i: int) -> torch.Tensor:
        return self.images.load(self.index[i])


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


def npz(p: NpzParams, seed: int, unlabeled: bool = False) -> SourceData:
    """Arrays x_train, y_train, x_test, y_test (and optionally x_unlabeled) in one .npz file.

    Images are uint8 in `layout`, or grayscale (N, H, W) / one channel, repeated to 3 channels.
    Classes are 0..max(y_train); y_test must be among them. x_unlabeled holds images without
    labels (the unlabeled split). As `[data] unlabeled` only x_unlabeled (and x_train, if
    present, without its labels) is read.
    """
    import numpy as np

    path = Path(p.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.source.path: {path} not found")
    with np.load(path, allow_pickle=False) as z:
        need = ("x_unlabeled",) if unlabeled and "x_train" not in z else (
            ("x_train", "y_train") if unlabeled else ("x_train", "y_train", "x_test", "y_test"))
        missing = [k for k in need if k not in z]
        if missing:
            raise DataError(f"{path} lacks arrays {', '.join(missing)}")
        arrays = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}

    empty = torch.zeros(0, dtype=torch.long)
    if "x_train" in arrays:
        x_tr = _npz_images(path, "x_train", arrays["x_train"], p.layout)
        y_tr = _npz_labels(path, "y_train", arrays["y_train"], x_tr.shape[0], "x_train")
    else:
        x_tr, y_tr = None, empty
    if x_tr is not None and not y_tr.numel() and not unlabeled:
        raise DataError(f"{path}: x_train holds no images")
    num_classes = int(y_tr.max()) + 1 if y_tr.numel() else 0
    if "x_unlabeled" in arrays:
        x_u = _npz_images(path, "x_unlabeled", arrays["x_unlabeled"], p.layout)
        if x_tr is not None and x_u.shape[1:] != x_tr.shape[1:]:
            raise DataError(f"{path}: x_unlabeled images are {tuple(x_u.shape[2:])} but x_train's "
                            f"are {tuple(x_tr.shape[2:])}; save both at one size")
        x_tr = x_u if x_tr is None else torch.cat([x_tr, x_u])
        y_tr = torch.cat([y_tr, torch.full((x_u.shape[0],), -1, dtype=torch.long)])
    assert x_tr is not None
    if unlabeled:
        x_te, y_te = x_tr[:0], empty
    else:
        x_te = _npz_images(path, "x_test", arrays["x_test"], p.layout)
        y_te = _npz_labels(path, "y_test", arrays["y_test"], x_te.shape[0], "x_test")
        if y_te.numel() and int(y_te.max()) >= num_classes:
            raise DataError(
                f"{path}: y_test has label {int(y_te.max())}, which is not a training class "
                f"(y_train has labels 0..{num_classes - 1}); fix y_test or add training images "
                "of that class"
            )
    unit = x_tr[y_tr >= 0].float() / 255 if num_classes else x_tr.float() / 255
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
    registry.register("source", "folder", folder, UnlabeledFolderParams)
