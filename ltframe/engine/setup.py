"""Run directory, device, data and model construction."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from ltframe.data.bundle import DataBundle, build_bundle
from ltframe.data.sources import image_size
from ltframe.engine.checkpoint import atomic_write_json, atomic_write_text
from ltframe.engine.runlock import LOCK_FILE, RunLock, try_lock
from ltframe.errors import LtframeError, RecipeError
from ltframe.models import LTModel, build_backbone
from ltframe.recipe import Recipe
from ltframe.registry import Registry


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RecipeError(f"run.device: '{name}' is not a device; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError("run.device: CUDA is not available here; use device = \"auto\" or \"cpu\"")
    return dev


def set_cudnn_benchmark(device: torch.device, enabled: bool = True) -> bool:
    """cuDNN autotuning (`torch.backends.cudnn.benchmark`) for a run on CUDA: each convolution
    shape picks its fastest algorithm once (the training shapes are static). Set once at run
    set-up; a CPU run leaves the flag as it is. Returns whether it was set."""
    if device.type != "cuda" or not enabled:
        return False
    torch.backends.cudnn.benchmark = True
    return True


def check_out_dir(out_dir: str | Path, label: str = "--out") -> None:
    """`--out` (or run.out_dir, named by `label`) must be a folder, or not exist yet, in a place
    we can write to; checked before any data is loaded or file written."""
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise LtframeError(f"{label} {out_dir}: is a file, not a folder; give a folder for the run "
                           "directories (it is created if missing)")
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise LtframeError(f"{label} {out_dir}: {folder} is a file, not a folder; "
                           "give a folder for the run directories")
    problem = None if os.access(folder, os.W_OK | os.X_OK) else "permission denied"
    if problem is None:
        try:  # os.access says yes to root even on read-only mounts: really try
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".ltframe-write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem is not None:
        raise LtframeError(f"{label} {out_dir}: cannot write in the folder {folder} ({problem}); "
                           "choose a folder you can write to")


def _in_use(path: Path) -> bool:
    """A path a new run cannot take: a file, or a folder with anything but the lock file."""
    return path.exists() and (not path.is_dir()
                              or any(p.name != LOCK_FILE for p in path.iterdir()))


def new_run_dir(out_dir: str | Path, name: str) -> tuple[Path, RunLock]:
    """out_dir/name, or name-1, name-2, ... so an earlier run is never overwritten; returned
    with its lock held (two runs started at once never share a folder)."""
    base = Path(out_dir) / name
    for i in range(100_000):
        path = base if i == 0 else base.with_name(f"{name}-{i}")
        if _in_use(path):
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = try_lock(path)
            probe = path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise LtframeError(f"cannot write the run directory {path} ({exc.strerror or exc}); pass a "
                               "writable folder with --out (or set run.out_dir)") from None
        if lock is None:  # another run took it a moment ago
            continue
        if _in_use(path):
            lock.release()
            continue
        return path, lock
    raise LtframeError(f"{base}: no free run directory name; choose another run.name")


def git_revision(where: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def write_run_files(run_dir: Path, recipe: Recipe, plugins: dict[str, str],
                    meta: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "resolved.toml", recipe.to_toml())
    import ltframe

    atomic_write_json(run_dir / "run.json", {
        "ltframe": ltframe.__version__,
        "torch": torch.__version__,
        "git_revision": git_revision(Path.cwd()),
        "plugins": plugins,
        **meta,
    })


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    f = run_dir / "run.json"
    if not f.is_file() or not (run_dir / "resolved.toml").is_file():
        raise LtframeError(f"{run_dir} is not an ltframe run directory (no run.json / "
                           "resolved.toml); pass the folder that `ltframe run` created")
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LtframeError(f"{f} is corrupt ({exc}); it records how the run was started: restore "
                           "it from a backup, or start a new run from the recipe") from None
    if not isinstance(meta, dict):
        raise LtframeError(f"{f} is corrupt (not a JSON object); restore it or start a new run")
    return meta


def build_data(recipe: Recipe, registry: Registry, device: torch.device,
               smoke: bool) -> DataBundle:
    source = registry.build(recipe.data.source, seed=recipe.run.seed)
    extra = None
    if recipe.data.unlabeled is not None:
        extra = registry.build(recipe.data.unlabeled, seed=recipe.run.seed, unlabeled=True,
                               image_size=image_size(source.train_images))
    return build_bundle(source, recipe.data, recipe.run.seed, device, smoke=smoke, unlabeled=extra)


def build_model(recipe: Recipe, registry: Registry, num_classes: int) -> LTModel:
    backbone = build_backbone(recipe.model.backbone, **recipe.model.backbone_args)
    heads = {
        name: registry.build(spec, in_features=int(backbone.num_features),
                             num_classes=num_classes)
        for name, spec in recipe.model.heads.items()
    }
    return LTModel(backbone, heads)
