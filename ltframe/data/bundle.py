"""Everything a run needs from its data: images, the long-tailed splits, class counts.

Unlabeled samples keep their true labels (where known, else -1) in `hidden_unlabeled_labels`,
for pseudo-label diagnostics only: the engine never hands them to a component. Images of
`[data] unlabeled` are appended to the training store after the source's own images.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ltframe.data.longtail import Splits, class_counts, make_splits
from ltframe.data.sources import FileImages, Images, SourceData, concat_images
from ltframe.engine.checkpoint import atomic_write_json, atomic_write_text
from ltframe.errors import DataError


class ImageStore:
    """uint8 images by index, delivered on `device` (kept there when they fit)."""

    def __init__(self, images: Images, device: torch.device, on_device: bool, workers: int = 4):
        self.files = None if isinstance(images, Tensor) else images  # decoded by index
        # file-backed images: `workers` decoding threads (PIL releases the GIL while decoding
        # and resizing); 0 = decode in the calling thread
        self.pool = ThreadPoolExecutor(workers) if self.files and workers > 0 else None
        self._pending: dict[bytes, list[Future]] = {}  # prefetched batches by index
        self.device = device
        if self.files is None:
            assert isinstance(images, Tensor)
            self.images = images.to(device) if on_device else images
            if device.type == "cuda" and not on_device:
                self.images = self.images.pin_memory()

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else self.images.shape[0]

    @property
    def prefetches(self) -> bool:
        return self.pool is not None

    def prefetch(self, idx: Tensor) -> None:
        """Start decoding the batch `idx` in the background (file-backed images with workers);
        the next `get(idx)` collects it, so decoding overlaps the current step."""
        if self.pool is None or self.files is None or idx.numel() == 0:
            return
        key = idx.numpy().tobytes()
        if key not in self._pending:
            if len(self._pending) > 8:  # never collected (e.g. a stream was replaced)
                self._pending.clear()
            self._pending[key] = [self.pool.submit(self.files.load, i) for i in idx.tolist()]

    def get(self, idx: Tensor, idx_device: Tensor | None = None) -> Tensor:
        """The uint8 images `idx` (host indices) on the store's device; `idx_device`: the same
        indices already on the device (the trainer copies them once per batch), else copied."""
        if self.files is not None:
            jobs = self._pending.pop(idx.numpy().tobytes(), None)
            if jobs is not None:
                images = [j.result() for j in jobs]
            elif self.pool is not None:
                images = list(self.pool.map(self.files.load, idx.tolist()))
            else:
                images = [self.files.load(i) for i in idx.tolist()]
            batch = torch.stack(images)
            if self.device.type == "cuda":
                batch = batch.pin_memory()
            return batch.to(self.device, non_blocking=True)
        if self.images.device == self.device:
            if idx_device is None:
                cuda = self.device.type == "cuda"
                idx_device = (idx.pin_memory() if cuda else idx).to(self.device, non_blocking=True)
            return self.images[idx_device]
        batch = self.images[idx]
        if self.device.type == "cuda":  # pinned: the copy below is asynchronous
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)


@dataclass
class DataBundle:
    source: SourceData
    splits: Splits
    train: ImageStore
    test: ImageStore
    test_labels: Tensor
    val: ImageStore | None
    val_index: Tensor | None  # indices into `val` (the train store when val is carved from it)
    val_labels: Tensor | None
    n_source: int = 0  # training images of data.source; those after it come from data.unlabeled
    test_files: list[str] | None = None  # test image paths relative to the source's root

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def labeled_labels(self) -> Tensor:
        return self.source.train_labels[self.splits.labeled]

    @property
    def labeled_counts(self) -> Tensor:
        return class_counts(self.labeled_labels, self.num_classes)

    @property
    def notes(self) -> list[str]:
        """One-line remarks about the data (what the run trains on, the long tail's head, classes
        with a short val split, computed statistics) to show."""
        return self.count_lines() + self.source.notes + self.splits.notes

    @property
    def hidden_labels(self) -> Tensor:
        """True labels of every training image where known (-1: unknown): diagnostics only."""
        return self.source.hidden

    @property
    def hidden_unlabeled_labels(self) -> Tensor:
        """True labels of the unlabeled set (-1: unknown): diagnostics only, never for training."""
        return self.source.hidden[self.splits.unlabeled]

    @property
    def unlabeled_known(self) -> int:
        """How many unlabeled images have a known (hidden) label."""
        return int((self.hidden_unlabeled_labels >= 0).sum())

    def file_name(self, index: int) -> tuple[str, str]:
        """(origin, file) of training image `index`: "source" or "unlabeled" and its path
        relative to that source's root ("" without files)."""
        files = self.source.train_files
        origin = "source" if index < self.n_source else "unlabeled"
        return origin, files[index] if files is not None else ""

    def counts(self) -> dict:
        """Per-class counts of what the run trains and evaluates on."""
        c = self.num_classes
        hidden = self.hidden_unlabeled_labels
        return {
            "classes": self.source.classes,
            "labeled": self.labeled_counts.tolist(),
            "unlabeled": class_counts(hidden[hidden >= 0], c).tolist(),
            "unlabeled_without_labels": int((hidden < 0).sum()),
            "val": (class_counts(self.val_labels, c).tolist() if self.val_labels is not None
                    else [0] * c),
            "test": class_counts(self.test_labels, c).tolist(),
        }

    def count_lines(self) -> list[str]:
        """One line saying what the run trains on (printed at the start)."""
        lab = self.labeled_counts.tolist()
        names = self.source.classes
        order = sorted(range(len(lab)), key=lambda k: -lab[k])
        head, tail = order[0], order[-1]
        n_unl = self.splits.unlabeled.numel()
        unknown = n_unl - self.unlabeled_known
        unl = f"unlabeled {n_unl}" + (f" ({unknown} without labels)" if unknown else "")
        val = 0 if self.val_labels is None else self.val_labels.numel()
        return [f"data: labeled {sum(lab)} in {len(lab)} classes (head '{names[head]}' "
                f"{lab[head]} ... tail '{names[tail]}' {lab[tail]}), {unl}, val {val}, "
                f"test {self.test_labels.numel()} (per class: RUN/splits/counts.json)"]


def build_bundle(source: SourceData, cfg, seed: int, device: torch.device,
                 smoke: bool = False, unlabeled: SourceData | None = None) -> DataBundle:
    """Make the splits of `source` described by the recipe's [data] table `cfg`.

    `unlabeled` (the built `[data] unlabeled` source) is appended to the training images
    without its labels; it joins the unlabeled split. `smoke` makes the same splits with the
    same checks as a full run, then keeps at most 2 val images per class and 8 test images per
    class.
    """
    n_source = len(source.train_images)
    if unlabeled is not None:
        source = add_unlabeled(source, unlabeled)
    if not source.num_classes or not len(source.test_images):
        raise DataError("data.source has no labelled classes or no test images; a labelled source "
                        "(imagefolder, listfile, npz, cifar10, ...) is needed beside data.unlabeled")
    labels = source.train_labels
    separate_val = source.val_labels is not None
    val_per_class = 0 if separate_val else cfg.val_per_class
    splits = make_splits(labels, source.num_classes, cfg.longtail, cfg.split, val_per_class, seed,
                         classes=source.classes,
                         val_first=cfg.val_first)
    if smoke:
        splits.val = _first_per_class(splits.val, labels, source.num_classes, 2)
    test_x, test_y = source.test_images, source.test_labels
    if smoke:  # a small balanced slice of the test set
        keep = _first_per_class(torch.arange(test_y.numel()), test_y, source.num_classes, 8)
        test_x = test_x[keep] if isinstance(test_x, Tensor) else FileImages(
            [test_x.paths[i] for i in keep.tolist()], test_x.size)
        test_y = test_y[keep]
    on_dev = device.type == "cuda" and cfg.on_device != "no"
    store = ImageStore(source.train_images, device, on_dev, cfg.workers)
    if separate_val:
        val = ImageStore(source.val_images, device, on_dev, cfg.workers)
        val_labels = source.val_labels
        val_index = torch.arange(val_labels.numel())
    elif splits.val.numel():
        val, val_index, val_labels = store, splits.val, labels[splits.val]
    else:
        val, val_index, val_labels = None, None, None
    return DataBundle(source, splits, store, ImageStore(test_x, device, on_dev, cfg.workers),
                      test_y, val, val_index, val_labels, n_source,
                      [source.test_files[i] for i in keep.tolist()] if smoke and source.test_files
                      else source.test_files)


def add_unlabeled(source: SourceData, extra: SourceData) -> SourceData:
    """`source` with the images of `extra` appended as unlabeled training images (label -1).
    Their true labels stay hidden for diagnostics only when `extra` has the same classes."""
    n = len(extra.train_images)
    same = bool(extra.classes) and extra.classes == source.classes
    hidden = extra.hidden if same else torch.full((n,), -1, dtype=torch.long)
    files = None
    if source.train_files is not None or extra.train_files is not None:
        files = ((source.train_files or [""] * len(source.train_images))
                 + (extra.train_files or [""] * n))
    return dataclasses.replace(
        source,
        train_images=concat_images([source.train_images, extra.train_images],
                                   ["data.source", "data.unlabeled"]),
        train_labels=torch.cat([source.train_labels, torch.full((n,), -1, dtype=torch.long)]),
        hidden_labels=torch.cat([source.hidden, hidden]),
        train_files=files,
        notes=source.notes + extra.notes,
    )


def _first_per_class(idx: Tensor, labels: Tensor, num_classes: int, k: int) -> Tensor:
    """The first `k` entries of `idx` of each class (by `labels[idx]`)."""
    y = labels[idx]
    return torch.cat([idx[y == c][:k] for c in range(num_classes)])


def save_splits(bundle: DataBundle, run_dir: Path) -> None:
    """splits/{labeled,unlabeled,val}.txt (train-set indices) and splits/counts.json."""
    d = run_dir / "splits"
    for name in ("labeled", "unlabeled", "val"):
        idx: Tensor = getattr(bundle.splits, name)
        atomic_write_text(d / f"{name}.txt", "".join(f"{i}\n" for i in idx.tolist()))
    atomic_write_json(d / "counts.json", bundle.counts())


def read_split_file(f: Path, n_train: int) -> list[int]:
    """The indices of a split file written by `save_splits`: one integer in 0..n_train-1 a
    line, none twice. A damaged or edited file is a DataError naming it and the fix."""
    fix = ("restore it (e.g. from a backup or a copy of the run), or start a new run with "
           "ltframe run")
    if not f.is_file():
        raise DataError(f"{f} is missing; the run directory is incomplete: {fix}")
    try:
        text = f.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{f} cannot be read ({exc}); {fix}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif text:
        raise DataError(f"{f} is truncated (its last line '{lines[-1][:20]}' has no line end); "
                        f"{fix}")
    out: list[int] = []
    seen: set[int] = set()
    for n, line in enumerate(lines, start=1):
        if not line.isdigit():
            raise DataError(f"{f}:{n}: {line[:20]!r} is not a training-image index; the file was "
                            f"edited or damaged: {fix}")
        i = int(line)
        if i >= n_train:
            raise DataError(f"{f}:{n}: index {i} is out of range (the training set has {n_train} "
                            f"images); the file was edited or damaged: {fix}")
        if i in seen:
            raise DataError(f"{f}:{n}: index {i} is listed twice; the file was edited or "
                            f"damaged: {fix}")
        seen.add(i)
        out.append(i)
    return out


def check_splits(bundle: DataBundle, run_dir: Path) -> None:
    """On resume: the saved split files must be intact and equal to the recomputed splits."""
    d = run_dir / "splits"
    n_train = len(bundle.train)
    for name in ("labeled", "unlabeled", "val"):
        f = d / f"{name}.txt"
        saved = read_split_file(f, n_train)
        now = getattr(bundle.splits, name).tolist()
        if saved != now:
            k = next((j for j, (a, b) in enumerate(zip(saved, now, strict=False)) if a != b),
                     min(len(saved), len(now)))
            raise DataError(
                f"the {name} split differs from {f} ({len(saved)} saved indices, {len(now)} now; "
                f"first difference at line {k + 1}): the file was edited, or the data or its "
                "options changed since the run started; restore the file or the data, or start "
                "a new run with ltframe run")
