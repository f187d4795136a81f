"""Data sources: every source yields uint8 NCHW images (in memory or as files) and labels.

A training label of -1 marks an image without a label: it can only be in the unlabeled split.
"""

from __future__ import annotations

import bisect
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ltframe.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class FileImages:
    """Images kept on disk; decoded (and resized to `size`) on demand by index."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths = paths
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Tensor:
        return decode_image(self.paths[index], self.size)


class ConcatImages:
    """Several image sets (tensors and/or files) indexed as one; decoded by index like
    FileImages, so a store of them takes the file-backed (prefetching) path."""

    def __init__(self, parts: list[Tensor | FileImages], size: int) -> None:
        self.parts = parts
        self.size = size
        self.offsets = [0]
        for part in parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def load(self, index: int) -> Tensor:
        k = bisect.bisect_right(self.offsets, index) - 1
        part = self.parts[k]
        i = index - self.offsets[k]
        return part[i] if isinstance(part, Tensor) else part.load(i)


Images = Tensor | FileImages | ConcatImages


def image_size(images: Images) -> int:
    """The side of the (square) images a set delivers."""
    return int(images.shape[-1]) if isinstance(images, Tensor) else int(images.size)


def concat_images(parts: list[Images], names: list[str]) -> Images:
    """One image set of `parts` (all of one size; `names` name them in errors)."""
    parts = [p for p in parts if len(p)]
    if len(parts) == 1:
        return parts[0]
    sizes = [image_size(p) for p in parts]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{n} {s}px" for n, s in zip(names, sizes, strict=False))
        raise DataError(f"image sets of different sizes ({listed}); set the sources' image_size "
                        "to one size")
    if all(isinstance(p, Tensor) for p in parts):
        return torch.cat(parts)  # type: ignore[arg-type]
    flat: list[Tensor | FileImages] = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, ConcatImages) else [p])
    return ConcatImages(flat, sizes[0])


@dataclass
class SourceData:
    """What a source returns. Images are uint8 [N, 3, H, W] tensors or FileImages.

    `train_labels` is -1 for images without a label (they always go to the unlabeled split).
    `hidden_labels` (default: `train_labels`) are the true labels known for diagnostics only,
    -1 where unknown. `train_files` / `test_files` name the images (paths relative to the
    source's root) where the source has files, for pseudo-label and prediction files.
    """

    train_images: Images
    train_labels: Tensor
    test_images: Images
    test_labels: Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    val_images: Images | None = None
    val_labels: Tensor | None = None
    info: dict = field(default_factory=dict)
    hidden_labels: Tensor | None = None
    train_files: list[str] | None = None
    test_files: list[str] | None = None
    notes: list[str] = field(default_factory=list)  # one-line remarks for the run's log

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def hidden(self) -> Tensor:
        """True training labels for diagnostics (-1: unknown)."""
        return self.train_labels if self.hidden_labels is None else self.hidden_labels


#: the Pillow formats ltframe decodes (those of IMG_EXTENSIONS, whatever a file's extension):
#: nothing else is ever opened, so e.g. EPS content never reaches Ghostscript
IMG_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "WEBP", "TIFF")
#: the most pixels (width x height, read from the header before decoding) an image may have
MAX_PIXELS = 64_000_000


def check_regular_file(path: str | os.PathLike, what: str = "image") -> None:
    """DataError unless `path` is a regular file (a FIFO, socket or device would block or
    never end when opened; checked with stat, which does not open it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DataError(f"{what} {path} cannot be read ({exc.strerror or exc}); fix the path or "
                        "remove it from the list") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if
                stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise DataError(f"{what} {path} is {kind}, not a regular file; only image files are "
                        "read, so remove it or give an image file")


def decode_image(path: str, size: int | None) -> Tensor:
    """The image file `path` as uint8 [3, H, W] (resized: short side, centre crop, to `size`).

    Only regular files in IMG_FORMATS of at most MAX_PIXELS pixels are decoded; anything else
    is a one-line DataError naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    check_regular_file(path)
    try:
        with Image.open(path, formats=IMG_FORMATS) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DataError(_too_large(path, f"{w}x{h} pixels"))
            img = img.convert("RGB")
            if size and img.size != (size, size):
                img = _resize_center_crop(img, size)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
            return data.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous()
    except UnidentifiedImageError:
        raise DataError(f"image {path} is not a {', '.join(IMG_FORMATS[:-1])} or TIFF image "
                        "(other formats, e.g. EPS or PDF, are never opened); convert it to PNG or "
                        "JPEG, or remove it") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(_too_large(path, "over Pillow's decompression-bomb limit")) from None
    except OSError as exc:
        raise DataError(f"cannot read image {path}: {exc}; remove or replace the file") from None


def _too_large(path: str, dims: str) -> str:
    return (f"image {path} is too large ({dims}; the cap is {MAX_PIXELS:,} pixels, "
            "ltframe.data.sources.MAX_PIXELS); resize it or remove it")


def _resize_center_crop(img, size: int):
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))))
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def stack_images(paths: list[str], size: int | None) -> Tensor:
    """Decode all `paths` into one uint8 tensor (all images must share a size)."""
    if not paths:
        return torch.zeros(0, 3, size or 32, size or 32, dtype=torch.uint8)
    first = decode_image(paths[0], size)
    out = torch.empty((len(paths), *first.shape), dtype=torch.uint8)
    out[0] = first
    for i, p in enumerate(paths[1:], start=1):
        img = decode_image(p, size)
        if img.shape != first.shape:
            raise DataError(
                f"image {p} is {tuple(img.shape[1:])} but {paths[0]} is {tuple(first.shape[1:])}; "
                "set the source's image_size to resize them to one size"
            )
        out[i] = img
    return out


def walk_images(folder: Path) -> list[str]:
    """Every image file under `folder`, recursively, sorted; hidden entries and non-regular
    files (FIFOs, sockets, devices) are skipped, and a folder reached twice (a symlink loop)
    is walked once."""
    out: list[str] = []
    stack = [str(folder)]
    seen: set[tuple[int, int]] = set()
    while stack:
        d = stack.pop()
        st = os.stat(d)
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if e.is_dir():
                subdirs.append(e.path)
            elif e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS):
                out.append(e.path)
        stack.extend(reversed(subdirs))
    return out


def scan_class_folders(root: Path, classes: list[str] | None = None, *, test: bool = False,
                       key: str = "") -> tuple[list[str], Tensor, list[str]]:
    """root/<class>/<image> -> (paths, labels, classes); classes sorted unless given.

    With `test=True` (a test set scanned with the training classes) a class folder that the
    training set lacks, or an empty class folder, is an error naming the class. `key` is the
    recipe key that names the folder, for messages.
    """
    where = f"{key} = {root}" if key else str(root)
    if not root.is_dir():
        raise DataError(f"data folder {where} does not exist; check the source's root"
                        + (f" and {key}" if key else ""))
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if test and classes is not None:
        extra = [c for c in found if c not in classes]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise DataError(f"{where}: test class '{extra[0]}'{more} is not a training class; "
                            "remove it from the test set or add training images of that class")
    classes = classes or found
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"{where}: class folders missing: {', '.join(missing[:5])}")
    paths, labels = [], []
    for idx, cls in enumerate(classes):
        files = walk_images(root / cls)
        if test and not files:
            raise DataError(f"{where}: test class '{cls}' has no images; add test images of "
                            "that class (its accuracy would count as 0)")
        paths.extend(files)
        labels.extend([idx] * len(files))
    if not paths:
        raise DataError(f"{where}: no images found (extensions {', '.join(IMG_EXTENSIONS)})")
    return paths, torch.tensor(labels, dtype=torch.long), classes


def relative_names(paths: list[str], root: Path) -> list[str]:
    """`paths` relative to `root` (as given where a path lies elsewhere)."""
    base = os.path.abspath(root)
    out = []
    for p in paths:
        rel = os.path.relpath(os.path.abspath(p), base)
        out.append(p if rel.startswith("..") else rel)
    return out


def image_stats(images: Images, limit: int = 2000) -> tuple[tuple[float, float, float],
                                                           tuple[float, float, float], int]:
    """Per-channel mean and std (0..1 scale) of `images` (file-backed: `limit` of them, evenly
    spaced) and how many images they were computed from."""
    n = len(images)
    if n == 0:
        return (0.5,) * 3, (0.5,) * 3, 0  # type: ignore[return-value]
    pick = range(n) if n <= limit or isinstance(images, Tensor) else (
        (i * n) // limit for i in range(limit))
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    if isinstance(images, Tensor):
        batches = (images[i:i + 4096] for i in range(0, n, 4096))
    else:
        batches = (images.load(i)[None] for i in pick)
    count = 0
    for x in batches:
        x = x.double() / 255
        total += x.sum((0, 2, 3))
        squares += x.pow(2).sum((0, 2, 3))
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
        count += x.shape[0]
    mean = total / pixels
    std = (squares / pixels - mean.pow(2)).clamp_min(1e-6).sqrt()
    return (tuple(round(float(v), 4) for v in mean),  # type: ignore[return-value]
            tuple(round(float(v), 4) for v in std), count)


def physical_memory() -> int:
    """This machine's memory in bytes (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def load_images(paths: list[str], size: int, in_memory: bool | None) -> Images:
    """Decode into memory when asked, or automatically when the uint8 set is under 2 GB."""
    need = len(paths) * 3 * size * size
    if in_memory is None:
        in_memory = need < 2e9
    have = physical_memory()
    if in_memory and have and need > have:
        raise DataError(f"data: {len(paths):,} images of {size}x{size} need {need / 1e9:,.1f} GB "
                        f"in memory, more than this machine's {have / 1e9:.0f} GB; set the "
                        "source's in_memory = false (decoded batch by batch) or a smaller "
                        "image_size")
    return stack_images(paths, size) if in_memory else FileImages(paths, size)


# --- CIFAR ---------------------------------------------------------------------------------
def load_cifar(root: str, num_classes: int, download: bool) -> SourceData:
    """CIFAR-10/100 from torchvision's pickles or from a train/<class>/ test/<class>/ export."""
    base = Path(root).expanduser()
    stats = CIFAR10_STATS if num_classes == 10 else CIFAR100_STATS
    if (base / "train").is_dir() and (base / "test").is_dir():
        classes = CIFAR10_CLASSES if num_classes == 10 else None
        tr_paths, tr_labels, classes = scan_class_folders(base / "train", classes)
        te_paths, te_labels, _ = scan_class_folders(base / "test", classes, test=True)
        if len(classes) != num_classes:
            raise DataError(f"{base}: found {len(classes)} class folders, expected {num_classes}")
        return SourceData(stack_images(tr_paths, 32), tr_labels, stack_images(te_paths, 32),
                          te_labels, list(classes), *stats, info={"layout": "image folders"},
                          train_files=relative_names(tr_paths, base),
                          test_files=relative_names(te_paths, base))
    from torchvision import datasets

    cls = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
    try:
        train = cls(str(base), train=True, download=download)
        test = cls(str(base), train=False, download=download)
    except RuntimeError as exc:
        raise DataError(
            f"no CIFAR-{num_classes} found at '{base}' ({exc.args[0].split('.')[0]}); expected "
            f"torchvision's {cls.base_folder}/ or train/<class>/ and test/<class>/ image folders. "
            "Set data.source.root (e.g. --set data.source.root=PATH) or download = true"
        ) from None

    def to_tensor(ds) -> tuple[Tensor, Tensor]:
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return x, torch.tensor(ds.targets, dtype=torch.long)

    x_tr, y_tr = to_tensor(train)
    x_te, y_te = to_tensor(test)
    return SourceData(x_tr, y_tr, x_te, y_te, list(train.classes), *stats,
                      info={"layout": "torchvision"})


# --- synthetic -----------------------------------------------------------------------------
#: peak bytes per pixel (images x height x width) while make_synthetic renders (measured ~52)
SYNTHETIC_BYTES_PER_PIXEL = 64


def make_synthetic(
    num_classes: int, train_per_class: int, test_per_class: int, image_size: int,
    noise: float, seed: int,
) -> SourceData:
    """Procedural, learnable images: each class is a colour/orientation/frequency pattern.

    A class prototype is a sum of two oriented sinusoidal gratings with class-specific colours;
    each sample adds a random phase shift, contrast jitter and pixel noise, so the task needs
    real features (not a single pixel) and is still learnable in seconds on a CPU.
    """
    g = torch.Generator().manual_seed(seed)
    c = num_classes
    angles = torch.rand(c, 2, generator=g) * math.pi
    freqs = 1.5 + torch.rand(c, 2, generator=g) * 3.0
    colors = torch.rand(c, 2, 3, generator=g) * 2 - 1
    yy, xx = torch.meshgrid(torch.linspace(0, 1, image_size), torch.linspace(0, 1, image_size),
                            indexing="ij")

    def render(n_per_class: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        labels = torch.arange(c).repeat_interleave(n_per_class)
        n = labels.numel()
        a, f, col = angles[labels], freqs[labels], colors[labels]  # [n,2], [n,2], [n,2,3]
        phase = torch.rand(n, 2, generator=gen) * 2 * math.pi
        proj = (xx[None, None] * torch.cos(a)[..., None, None]
                + yy[None, None] * torch.sin(a)[..., None, None])  # [n,2,H,W]
        waves = torch.sin(2 * math.pi * f[..., None, None] * proj + phase[..., None, None])
        img = (waves[:, :, None] * col[..., None, None]).sum(1)  # [n,3,H,W]
        img = img * (0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen))
        img = img + noise * torch.randn(img.shape, generator=gen)
        x = ((img.clamp(-2, 2) + 2) / 4 * 255).round().to(torch.uint8)
        return x, labels

    x_tr, y_tr = render(train_per_class, g)
    x_te, y_te = render(test_per_class, g)
    mean = tuple(x_tr.float().mean((0, 2, 3)).div(255).tolist())
    std = tuple(x_tr.float().std((0, 2, 3)).div(255).clamp_min(1e-3).tolist())
    return SourceData(x_tr, y_tr, x_te, y_te, [f"class{i}" for i in range(c)], mean, std,
                      info={"layout": "synthetic"})
