"""Checkpoints without pickle: tensors in safetensors, everything else in a JSON sidecar.

Layout in ``RUN/checkpoints/``: ``<stem>.safetensors`` + ``<stem>.json`` (the sidecar records
the tensor file's SHA-256 and, in ``sidecar_sha256``, its own content's) and ``latest`` (the
newest complete stem). Every file is written to a temporary name, fsynced and renamed, and
``latest`` moves last, so a crash at any point leaves the previous checkpoint intact and
loadable. A sidecar is size-capped, checked against a schema and its checksum before use; one
that fails is corrupt, and resume falls back to the previous checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ltframe.errors import CheckpointError, DiskWriteError

FORMAT = 2  # 2: the sidecar's own checksum (sidecar_sha256); 1 (without it) still loads
MAX_SIDECAR_BYTES = 16 * 2**20  # real sidecars are KBs; a larger one is refused unread
MAX_DEPTH = 64  # JSON nesting of a sidecar (real ones: < 10)
_TENSOR = "__tensor__"
#: sidecar keys every checkpoint must have (besides format, tensors and sha256)
REQUIRED = ("stage_index", "stage_name", "step", "history", "rng", "streams", "components")


def write_failed(path: Path | str, exc: BaseException) -> DiskWriteError:
    """A one-line DiskWriteError naming `path` for an OSError / SafetensorError of a write."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code is None and "No space left" in text:  # safetensors wraps the OS error in text
        code = errno.ENOSPC
    what = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(code or -1)
    if what is None:
        what = f"write failed ({getattr(exc, 'strerror', None) or text})"
    return DiskWriteError(f"{what} while writing {path}", str(path), code)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` through a fsynced temporary file and a rename; a failure raises
    DiskWriteError naming `path` and leaves the previous file as it was."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, DiskWriteError):
            raise write_failed(path, exc) from exc
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
    """Write `<stem>.safetensors` + sealed sidecar atomically, then point `latest` at it."""
    target = ckpt_dir / f"{stem}.safetensors"
    tmp = None
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=ckpt_dir, prefix=f".{stem}.", suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        with open(tmp, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError | SafetensorError) and not isinstance(exc, DiskWriteError):
            raise write_failed(target, exc) from exc
        raise
    sidecar = seal({"format": FORMAT, "tensors": f"{stem}.safetensors", "sha256": digest, **meta})
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


NO_CHECKPOINT = ("the run stopped before its first checkpoint was complete; start it again "
                 "with `ltframe run`")


def _plain(name: Any) -> bool:
    """A file name inside its folder: no separator, not '.', '..' or empty."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name)


def resolve(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir, a .safetensors or a .json -> the sidecar path."""
    p = Path(path)
    if p.is_dir():
        ck = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        latest = ck / "latest"
        if not latest.is_file():
            raise CheckpointError(f"no checkpoint in {p} (no {latest}): {NO_CHECKPOINT}")
        stem = latest.read_text(errors="replace").strip()
        if not _plain(stem + ".json"):
            raise CheckpointError(f"{latest} is corrupt (it names '{stem[:80]}', not a checkpoint "
                                  "of this folder); pass a checkpoints/*.safetensors file")
        p = ck / f"{stem}.json"
    elif p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise CheckpointError(f"checkpoint sidecar {p} not found; pass a run directory or a "
                              "checkpoints/*.safetensors file written by ltframe")
    return p


def _canonical(meta: dict[str, Any]) -> bytes:
    body = {k: v for k, v in meta.items() if k != "sidecar_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` (as JSON will read it back) with `sidecar_sha256` over its content."""
    plain = json.loads(json.dumps(meta))
    plain["sidecar_sha256"] = hashlib.sha256(_canonical(plain)).hexdigest()
    return plain


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of a JSON value, stopping past `limit`."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_num(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def schema_problem(meta: dict[str, Any]) -> str | None:
    """What in a sidecar breaks its schema (types and ranges of what resume reads), or None."""
    if _depth(meta, MAX_DEPTH) > MAX_DEPTH:
        return f"it is nested deeper than {MAX_DEPTH} levels"
    checks: list[tuple[str, bool]] = [
        ("tensors", _plain(meta["tensors"]) and str(meta["tensors"]).endswith(".safetensors")),
        ("sha256", isinstance(meta["sha256"], str) and len(meta["sha256"]) == 64),
        ("stage_index", _is_int(meta["stage_index"])),
        ("stage_name", isinstance(meta["stage_name"], str)),
        ("step", _is_int(meta["step"])),
        ("total_steps", _is_int(meta.get("total_steps", 0))),
        ("history", isinstance(meta["history"], list)),
        ("rng", isinstance(meta["rng"], dict)),
        ("components", isinstance(meta["components"], dict)),
        ("optimizer", meta.get("optimizer") is None or isinstance(meta["optimizer"], dict)),
        ("record", meta.get("record") is None or isinstance(meta["record"], dict)),
        ("ema", isinstance(meta.get("ema", False), bool)),
        ("metrics_bytes", meta.get("metrics_bytes") is None or _is_int(meta["metrics_bytes"])),
        ("world_size", _is_int(meta.get("world_size", 1), 1)),
        ("recipe_sha256", isinstance(meta.get("recipe_sha256", ""), str)),
        ("streams", isinstance(meta["streams"], dict) and all(
            isinstance(v, dict) and _is_int(v.get("epoch")) and _is_int(v.get("pos"))
            for v in meta["streams"].values())),
    ]
    bad = [k for k, ok in checks if not ok]
    if bad:
        return f"{bad[0]} = {json.dumps(meta.get(bad[0]))[:60]} is not what ltframe writes"
    for i, h in enumerate(meta["history"]):
        ok = (isinstance(h, dict) and isinstance(h.get("stage"), str) and _is_int(h.get("index"))
              and _is_int(h.get("steps", 0))
              and all(_is_num(h.get(k)) for k in ("top1", "many", "medium", "few"))
              and (isinstance(h.get("train_counts", []), list)
                   and all(_is_int(c) for c in h.get("train_counts", []))))
        if not ok:
            return f"history[{i}] is not a stage result ltframe writes"
    return None


def _read_sidecar(side: Path) -> dict[str, Any]:
    """The sidecar's JSON object: size-capped, parsed, format, keys, checksum and schema."""
    size = side.stat().st_size
    if size > MAX_SIDECAR_BYTES:
        raise CheckpointError(f"checkpoint sidecar {side} is corrupt ({size / 2**20:.0f} MB; "
                              f"real ones are far under {MAX_SIDECAR_BYTES // 2**20} MB); "
                              "use an earlier checkpoint")
    try:
        meta = json.loads(side.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"checkpoint sidecar {side} is corrupt ({why}); "
                              "use an earlier checkpoint or start the run again") from None
    if not isinstance(meta, dict) or meta.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{side} is not an ltframe checkpoint sidecar (format "
                              f"{meta.get('format') if isinstance(meta, dict) else '?'})")
    sealed = ("sidecar_sha256",) if meta["format"] >= 2 else ()
    missing = [k for k in ("tensors", "sha256", *REQUIRED, *sealed) if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint sidecar {side} lacks {', '.join(map(repr, missing))}; "
                              "it was not written by this ltframe: use an earlier checkpoint")
    if sealed and hashlib.sha256(_canonical(meta)).hexdigest() != meta["sidecar_sha256"]:
        raise CheckpointError(f"checkpoint sidecar {side} is corrupt (its content differs from "
                              "its sidecar_sha256: edited or damaged); use an earlier checkpoint")
    problem = schema_problem(meta)
    if problem:
        raise CheckpointError(f"checkpoint sidecar {side} is corrupt ({problem}); "
                              "use an earlier checkpoint")
    return meta


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """Load and verify a checkpoint; returns (tensors, sidecar, sidecar path)."""
    side = resolve(path)
    meta = _read_sidecar(side)
    tfile = side.parent / str(meta["tensors"])  # a plain name: inside the checkpoint's folder
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


def load_newest(run_dir: Path, check: Callable[[dict[str, Tensor], dict[str, Any], Path], None]
                | None = None) -> tuple[dict[str, Tensor], dict[str, Any], Path,
                                        list[tuple[Path, str]]]:
    """The newest checkpoint of `run_dir` that loads, verifies and passes `check` (which
    raises CheckpointError): `latest` first, then the others newest first. Returns (tensors,
    sidecar, sidecar path, [(skipped, reason)])."""
    ck = run_dir / "checkpoints"
    latest = ck / "latest"
    sidecars = sorted(ck.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    stem = latest.read_text(errors="replace").strip() if latest.is_file() else ""
    if _plain(stem + ".json") and (ck / f"{stem}.json").is_file():
        first = ck / f"{stem}.json"
        sidecars = [first] + [p for p in sidecars if p != first]
    if not sidecars:
        raise CheckpointError(f"no checkpoint in {ck}: {NO_CHECKPOINT}")
    skipped: list[tuple[Path, str]] = []
    for side in sidecars:
        try:
            tensors, meta, path = load(side)
            if check is not None:
                check(tensors, meta, path)
        except CheckpointError as exc:
            skipped.append((side, str(exc)))
            continue
        return tensors, meta, path, skipped
    raise CheckpointError(f"no usable checkpoint in {ck} (the newest: {skipped[0][1]})")


def nonfinite(tensors: dict[str, Tensor], prefixes: tuple[str, ...] = ("model.", "ema.")
              ) -> list[str]:
    """Names of floating-point tensors under `prefixes` holding NaN or infinity."""
    names = [k for k, v in tensors.items() if k.startswith(prefixes) and v.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).tolist()
    return [k for k, ok in zip(names, finite, strict=True) if not ok]


def load_module_state(module: torch.nn.Module, tensors: dict[str, Tensor], prefix: str,
                      source: str, check_only: bool = False,
                      advice: str = "use the recipe the checkpoint was trained with") -> None:
    """Strictly load `prefix.*` tensors into `module` (or only check that they fit), naming
    mismatched keys and shapes."""
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
                              f"{advice}")
    if not check_only:
        module.load_state_dict(state, strict=True)
