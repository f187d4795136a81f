"""Checkpoints without pickle: tensors in safetensors, everything else in a JSON sidecar.

Layout in ``RUN/checkpoints/``: ``<stem>.safetensors`` + ``<stem>.json`` (the sidecar records
the tensor file's SHA-256) and ``latest`` (the newest complete stem). Every file is written to
a temporary name, fsynced and renamed, and ``latest`` moves last, so a crash at any point
leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ltframe.errors import CheckpointError

FORMAT = 1
_TENSOR = "__tensor__"
#: sidecar keys every checkpoint must have (besides format, tensors and sha256)
REQUIRED = ("stage_index", "stage_name", "step", "history", "rng", "streams", "components")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def flatten_state(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested state by a reference; fill `tensors`."""
    if isinstance(obj, Tensor):
        key = prefix
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        return {str(k): flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise CheckpointError(f"cannot checkpoint {prefix}: {type(obj).__name__} is not a tensor "
                          "or JSON value; make state_dict() return tensors and plain values")


def unflatten_state(tree: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {_TENSOR}:
            return tensors[tree[_TENSOR]]
        return {k: unflatten_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


def save(ckpt_dir: Path, stem: str, tensors: dict[str, Tensor], meta: dict[str, Any],
         keep: int = 2) -> Path:
    """Write `<stem>.safetensors` + sidecar atomically, then point `latest` at it."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=ckpt_dir, prefix=f".{stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
            os.fsync(fh.fileno())
        os.replace(tmp, ckpt_dir / f"{stem}.safetensors")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sidecar = {"format": FORMAT, "tensors": f"{stem}.safetensors", "sha256": digest, **meta}
    atomic_write_json(ckpt_dir / f"{stem}.json", sidecar)
    atomic_write_text(ckpt_dir / "latest", stem + "\n")
    _prune(ckpt_dir, keep)
    return ckpt_dir / f"{stem}.safetensors"


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` step checkpoints; stage-end checkpoints ('stage*') stay."""
    steps = sorted(ckpt_dir.glob("step-*.json"), key=lambda p: p.stat().st_mtime_ns)
    latest = (ckpt_dir / "latest").read_text().strip()
    for js in steps[:-keep] if keep else []:
        if js.stem == latest:
            continue
        js.with_suffix(".safetensors").unlink(missing_ok=True)
        js.unlink(missing_ok=True)


def resolve(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir, a .safetensors or a .json -> the sidecar path."""
    p = Path(path)
    if p.is_dir():
        ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        latest = ck / "latest"
        if not latest.is_file():
            raise CheckpointError(f"no checkpoint in {p} (no {latest}); "
                                  "the run never finished an epoch, start it again")
        p = ck / f"{latest.read_text().strip()}.json"
    elif p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise CheckpointError(f"checkpoint sidecar {p} not found; pass a run directory or a "
                              "checkpoints/*.safetensors file written by ltframe")
    return p


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """Load and verify a checkpoint; returns (tensors, sidecar, sidecar path)."""
    side = resolve(path)
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint sidecar {side} is corrupt ({exc}); "
                              "use an earlier checkpoint or start the run again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{side} is not an ltframe checkpoint sidecar (format "
                              f"{meta.get('format') if isinstance(meta, dict) else '?'})")
    missing = [k for k in ("tensors", "sha256", *REQUIRED) if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint sidecar {side} lacks {', '.join(map(repr, missing))}; "
                              "it was not written by this ltframe: use an earlier checkpoint")
    tfile = side.parent / str(meta["tensors"])
    if not tfile.is_file():
        raise CheckpointError(f"checkpoint tensors {tfile} are missing (sidecar {side.name})")
    data = tfile.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {tfile} is corrupt (SHA-256 differs from its "
                              "sidecar); use an earlier checkpoint or start the run again")
    try:
        tensors = load_file(str(tfile))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {tfile} cannot be read: {exc}") from None
    return tensors, meta, side


def load_newest(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any], Path,
                                        list[tuple[Path, str]]]:
    """The newest checkpoint of `run_dir` that loads and verifies: `latest` first, then the
    others newest first. Returns (tensors, sidecar, sidecar path, [(skipped, reason)])."""
    ck = run_dir / "checkpoints"
    latest = ck / "latest"
    sidecars = sorted(ck.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    if latest.is_file():
        first = ck / f"{latest.read_text().strip()}.json"
        sidecars = [first] + [p for p in sidecars if p != first]
    if not sidecars:
        raise CheckpointError(f"no checkpoint in {ck}; the run never finished an epoch, "
                              "start it again")
    skipped: list[tuple[Path, str]] = []
    for side in sidecars:
        try:
            tensors, meta, path = load(side)
        except CheckpointError as exc:
            skipped.append((side, str(exc)))
            continue
        return tensors, meta, path, skipped
    raise CheckpointError(f"no usable checkpoint in {ck}: {skipped[0][1]}; start the run again")


def nonfinite(tensors: dict[str, Tensor], prefixes: tuple[str, ...] = ("model.", "ema.")
              ) -> list[str]:
    """Names of floating-point tensors under `prefixes` holding NaN or infinity."""
    names = [k for k, v in tensors.items() if k.startswith(prefixes) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).tolist()
    return [k for k, ok in zip(names, finite, strict=True) if not ok]


def load_module_state(module: torch.nn.Module, tensors: dict[str, Tensor], prefix: str,
                      source: str) -> None:
    """Strictly load `prefix.*` tensors into `module`, naming mismatched keys and shapes."""
    state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(extra[:3])}" if extra else "",
            f"shape {', '.join(shapes[:3])}" if shapes else "",
        ]))
        raise CheckpointError(f"checkpoint {source} does not match this model ({detail}); "
                              "use the recipe the checkpoint was trained with")
    module.load_state_dict(state, strict=True)
