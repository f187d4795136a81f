"""Starting weights for a new run: `[model] weights = "PATH"` and `[model] pretrained = true`.

`weights` reads a `.safetensors` file, a `.pth` / `.pt` / `.bin` file through
`torch.load(weights_only=True)` (nothing else is unpickled), an ltframe checkpoint
(`checkpoints/*.safetensors` with its sidecar) or a finished run directory (its final weights, the
EMA weights where the run kept them). Keys are matched to the model:

- a nested `state_dict_ema` / `model_ema` / `state_dict` / `model` table is used (EMA first, as
  timm's `load_checkpoint` does); the prefixes `module.`, `model.`, `backbone.`, `state_dict.` and
  `_orig_mod.` are stripped where that makes a key one of the backbone's;
- every backbone tensor must be in the file with its shape (BatchNorm's `num_batches_tracked`
  may be absent); a missing, unexpected or mis-shaped key is an error naming the first few;
- `heads.<name>.*` tensors (an ltframe run or export) load into the head of that name when its
  keys and shapes are the same, and are skipped otherwise;
- a classifier of a timm-style file (`fc`, `head`, `head.fc`, `classifier`, `last_linear` or the
  model's `pretrained_cfg["classifier"]`) loads into the evaluation head when that head "asks
  for it": the head is a plain linear layer (`weight` [+ `bias`]) of the same shape. Otherwise
  it is skipped (the usual case: a new task with other classes).

`pretrained` takes timm's published weights from the Hugging Face hub cache (`HF_HOME`,
`HF_HUB_CACHE`) without touching the network; when they are not cached it fails at once if
`HF_HUB_OFFLINE` is set or the hub cannot be reached, and otherwise lets timm download them.
Both are applied when a run starts; `ltframe resume` restores its checkpoint instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ltframe.errors import RecipeError

PREFIXES = ("module.", "model.", "backbone.", "state_dict.", "_orig_mod.")
CLASSIFIERS = ("fc", "head", "head.fc", "classifier", "last_linear")
NESTED = ("state_dict_ema", "model_ema", "state_dict", "model")
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_FIX = ("check that model.backbone (and backbone_args) name the architecture the file was "
        "trained with")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --- reading -------------------------------------------------------------------------------


def read_weights(path: str | Path, key: str = "model.weights") -> tuple[dict[str, Tensor], str]:
    """(tensors, SHA-256) of a weights file or a finished run directory; one-line errors."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _run_weights(p, key)
    if not p.is_file():
        raise RecipeError(f"{key}: {path} does not exist; give a .safetensors file, a "
                          ".pth/.pt/.bin state dict or a finished run directory")
    if p.suffix == ".safetensors":
        side = _ltframe_sidecar(p)
        if side is not None:
            return _checkpoint_weights(p, side, key)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p)), sha256_file(p)
        except (SafetensorError, OSError) as exc:
            raise RecipeError(f"{key}: {path} cannot be read as safetensors ({exc})") from None
    if p.suffix in TORCH_SUFFIXES:
        return _torch_weights(p, key), sha256_file(p)
    raise RecipeError(f"{key}: {path} is not a weights file ({p.suffix or 'no suffix'}); use "
                      f".safetensors, {', '.join(TORCH_SUFFIXES)} or a finished run directory")


def _ltframe_sidecar(p: Path) -> dict | None:
    side = p.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return meta if isinstance(meta, dict) and "stage_index" in meta and "tensors" in meta else None


def _final_prefix(side: dict) -> str:
    """An ltframe checkpoint's evaluation weights: EMA where the stage kept them."""
    return "ema" if side.get("ema") and side.get("step", 0) > 0 else "model"


def _strip(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _checkpoint_weights(p: Path, side: dict, key: str) -> tuple[dict[str, Tensor], str]:
    from ltframe.engine import checkpoint as ckpt
    from ltframe.errors import CheckpointError

    try:
        tensors, meta, _ = ckpt.load(p)
    except CheckpointError as exc:
        raise RecipeError(f"{key}: {exc}") from None
    return _strip(tensors, _final_prefix(meta)), str(meta["sha256"])


def _run_weights(run_dir: Path, key: str) -> tuple[dict[str, Tensor], str]:
    """A finished run's final weights (what `ltframe predict` uses)."""
    from ltframe.engine import checkpoint as ckpt
    from ltframe.errors import CheckpointError

    if not (run_dir / "summary.json").is_file():
        hint = (f"finish it with `ltframe resume {run_dir}` or pass one of its "
                "checkpoints/*.safetensors" if (run_dir / "checkpoints").is_dir()
                else "give a .safetensors file or a finished run directory")
        raise RecipeError(f"{key}: {run_dir} is not a finished run (no summary.json); {hint}")
    try:
        tensors, meta, _ = ckpt.load(run_dir)
    except CheckpointError as exc:
        raise RecipeError(f"{key}: {exc}") from None
    return _strip(tensors, _final_prefix(meta)), str(meta["sha256"])


def _torch_weights(p: Path, key: str) -> dict[str, Tensor]:
    import pickle

    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = " ".join(str(exc).split())[:160]
        raise RecipeError(f"{key}: {p} cannot be read with torch.load(weights_only=True) "
                          f"({first}); save only the state_dict, or convert it to .safetensors"
                          ) from None
    for _ in range(3):  # {"state_dict": {...}, "epoch": ...} and the like
        if not isinstance(obj, dict) or all(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in NESTED if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise RecipeError(f"{key}: {p} holds no state dict (a {type(obj).__name__}); save "
                          "model.state_dict() or a .safetensors file")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise RecipeError(f"{key}: {p} holds no tensors at its top level (keys "
                          f"{', '.join(map(str, list(obj)[:4]))}); save model.state_dict()")
    return tensors


# --- matching ------------------------------------------------------------------------------


def _variants(key: str) -> list[str]:
    """`key` and each form with one more known prefix stripped."""
    out = [key]
    while True:
        k = out[-1]
        nxt = next((k[len(p):] for p in PREFIXES if k.startswith(p)), None)
        if not nxt:
            return out
        out.append(nxt)


def _classifier_names(backbone: nn.Module) -> set[str]:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    named = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    extra = (named,) if isinstance(named, str) else tuple(named or ())
    return set(CLASSIFIERS) | set(extra)


def _listed(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def match_weights(model: nn.Module, tensors: dict[str, Tensor], eval_head: str = "main",
                  source: str = "the file", key: str = "model.weights"
                  ) -> tuple[dict[str, Tensor], list[str]]:
    """Map a file's tensors onto an `LTModel` (see the module docstring). Returns
    ({model key: tensor}, [skipped file keys]); raises RecipeError on a mismatch."""
    own_bb = model.backbone.state_dict()
    heads: dict[str, nn.Module] = dict(model.heads.items())
    backbone: dict[str, Tensor] = {}
    head_keys: dict[str, dict[str, tuple[str, Tensor]]] = {}
    rest: dict[str, tuple[str, Tensor]] = {}
    for k, t in tensors.items():
        forms = _variants(k)
        hit = next((f for f in forms if f in own_bb), None)
        if hit is not None:
            backbone[hit] = t
            continue
        hk = next((f for f in forms if f.startswith("heads.") and f.count(".") >= 2), None)
        if hk is not None:
            _, name, sub = hk.split(".", 2)
            head_keys.setdefault(name, {})[sub] = (k, t)
            continue
        rest[forms[-1]] = (k, t)
    loaded = {f"backbone.{k}": v for k, v in backbone.items()}
    skipped: list[str] = []
    for name, subs in head_keys.items():  # an ltframe head: the same name, keys and shapes
        own = heads[name].state_dict() if name in heads else None
        fits = own is not None and set(own) == set(subs) and all(
            own[s].shape == t.shape for s, (_, t) in subs.items())
        if fits:
            loaded.update({f"heads.{name}.{s}": t for s, (_, t) in subs.items()})
        else:
            skipped += [orig for orig, _ in subs.values()]
    names = _classifier_names(model.backbone)
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for k in list(rest):
        mod, _, leaf = k.rpartition(".")
        if mod in names and leaf in ("weight", "bias"):
            groups.setdefault(mod, {})[leaf] = rest.pop(k)
    target = heads.get(eval_head)
    own_head = target.state_dict() if target is not None else {}
    for subs in groups.values():  # a timm classifier: into a plain linear eval head of its shape
        asks = (own_head and set(own_head) <= {"weight", "bias"} and set(subs) == set(own_head)
                and all(own_head[s].shape == t.shape for s, (_, t) in subs.items())
                and not any(k.startswith(f"heads.{eval_head}.") for k in loaded))
        if asks:
            loaded.update({f"heads.{eval_head}.{s}": t for s, (_, t) in subs.items()})
        else:
            skipped += [orig for orig, _ in subs.values()]
    missing = [k for k in own_bb if k not in backbone and not k.endswith("num_batches_tracked")]
    shapes = [f"{k} {tuple(t.shape)} in the file vs {tuple(own_bb[k].shape)}"
              for k, t in backbone.items() if t.shape != own_bb[k].shape]
    unexpected = [orig for orig, _ in rest.values()]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"missing {_listed(missing)}" if missing else "",
            f"unexpected {_listed(unexpected)}" if unexpected else "",
            f"shape {_listed(shapes, 2)}" if shapes else "",
        ]))
        arch = getattr(model.backbone, "default_cfg", {}) or {}
        name = arch.get("architecture", type(model.backbone).__name__) if isinstance(arch, dict) \
            else type(model.backbone).__name__
        raise RecipeError(f"{key}: {source} does not fit the backbone {name} ({detail}); {_FIX}")
    return loaded, sorted(skipped)


def load_weights(model: nn.Module, path: str | Path, eval_head: str = "main",
                 key: str = "model.weights") -> dict[str, Any]:
    """Read `path`, match it to `model` (an LTModel) and copy the tensors in; returns the
    record for run.json: {path, sha256, loaded, skipped}."""
    tensors, digest = read_weights(path, key)
    loaded, skipped = match_weights(model, tensors, eval_head, str(path), key)
    with torch.no_grad():
        result = model.load_state_dict(loaded, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return {"path": str(Path(path).expanduser().resolve()), "sha256": digest,
            "loaded": len(loaded), "skipped": skipped}


# --- timm's published weights ----------------------------------------------------------------


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    try:
        from huggingface_hub import constants

        return flag or bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - timm needs huggingface_hub for hub weights
        return flag


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can a TCP connection to `url`'s host be opened within `timeout` seconds? (True when a
    proxy is configured: the proxy decides.)"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host:
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    t.start()
    t.join(timeout + 1.0)
    return bool(ok and ok[0])


def _cached_hub_file(cfg: Any) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    repo, _, rev = str(cfg.hf_hub_id).partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors",
                                                                 "pytorch_model.bin"]
    for name in files:
        found = try_to_load_from_cache(repo, name, cache_dir=_hub_cache(), revision=rev or None)
        if isinstance(found, str):
            return found
    return None


def _cached_url_file(url: str) -> str | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    return str(path) if path.is_file() else None


def _pretrained_source(name: str) -> tuple[str, str | None, dict[str, Any], Any]:
    """(where, cached file or None, pretrained_cfg_overlay, cfg) of timm's weights for `name`;
    raises the one-line error when they are neither cached nor reachable."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    hub, url = (getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)) if cfg else (None, None)
    if not hub and not url:
        raise RecipeError(f"model.pretrained: timm has no published weights for {name}; set "
                          f"model.pretrained = false, or model.weights = \"PATH\" to a local "
                          ".safetensors file")
    where = hub or url
    path = _cached_hub_file(cfg) if hub else _cached_url_file(url)
    if path is not None:  # from the cache: no network at all
        overlay: dict[str, Any] = {"file": path}
        if hub and cfg.custom_load is True:  # the hub holds a plain state dict
            overlay["custom_load"] = False
        return where, path, overlay, cfg
    endpoint = url if not hub else _endpoint()
    cache = f"the hub cache ({_hub_cache()})" if hub else f"torch's cache ({torch.hub.get_dir()})"
    offline = hub and _offline()
    if offline or not _reachable(endpoint):
        why = "HF_HUB_OFFLINE is set" if offline else f"{urlparse(endpoint).hostname} cannot be reached"
        raise RecipeError(f"model.pretrained: timm's weights for {name} ({where}) are not in "
                          f"{cache} and {why}; download them where there is network (e.g. "
                          f"python -c \"import timm; timm.create_model('{name}', "
                          "pretrained=True)\" with the same HF_HOME), or set model.weights = "
                          "\"PATH\" to a local .safetensors file")
    return where, None, {}, cfg


def pretrained_backbone(name: str, backbone_args: dict[str, Any]) -> tuple[nn.Module, dict]:
    """timm's backbone `name` (num_classes=0) with its published weights, and the record
    {pretrained, path, sha256}; fails in seconds with one line when they cannot be had."""
    import timm

    where, path, overlay, cfg = _pretrained_source(name)
    kwargs = {k: v for k, v in backbone_args.items() if k != "pretrained"}
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay=overlay or None, **kwargs)
    except RecipeError:
        raise
    except Exception as exc:  # network, hub and file errors of every library involved
        msg = " ".join(str(exc).split())[:200]
        raise RecipeError(f"model.pretrained: loading timm's weights for {name} ({where}) failed "
                          f"({type(exc).__name__}: {msg}); retry where the hub can be reached, or "
                          "set model.weights = \"PATH\" to a local .safetensors file") from None
    if path is None:
        path = _cached_hub_file(cfg) if cfg.hf_hub_id else _cached_url_file(cfg.url)
    return model, {"pretrained": where, "path": path,
                   "sha256": sha256_file(path) if path else None}


def check_start_weights(model_cfg: Any) -> None:
    """Before any data is loaded: `weights` and `pretrained` exclusive, the file there, timm's
    weights cached or reachable (one-line errors, in seconds)."""
    if model_cfg.weights and model_cfg.pretrained:
        raise RecipeError("model.weights and model.pretrained are both set; keep one (weights "
                          "= \"PATH\" replaces timm's published weights)")
    if model_cfg.pretrained:
        _pretrained_source(model_cfg.backbone)
    elif model_cfg.weights:
        p = Path(model_cfg.weights).expanduser()
        if not p.exists():
            raise RecipeError(f"model.weights: {model_cfg.weights} does not exist; give a "
                              ".safetensors file, a .pth/.pt/.bin state dict or a finished run "
                              "directory")


def _endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def apply_start_weights(model: nn.Module, model_cfg: Any) -> dict[str, Any] | None:
    """`[model] pretrained` / `weights` into a freshly built LTModel (a run's start only);
    returns the run.json record, or None when neither is set."""
    check_start_weights(model_cfg)
    if model_cfg.pretrained:
        pre, record = pretrained_backbone(model_cfg.backbone, model_cfg.backbone_args)
        state = pre.state_dict()
        with torch.no_grad():
            model.backbone.load_state_dict(state, strict=True)
        return {**record, "loaded": len(state), "skipped": []}
    if model_cfg.weights:
        return load_weights(model, model_cfg.weights, model_cfg.eval_head)
    return None


def describe_weights(record: dict[str, Any]) -> str:
    """One line for the terminal: what was loaded, from where, what was skipped."""
    source = (f"timm's {record['pretrained']}" if record.get("pretrained")
              else str(record.get("path")))
    digest = f" (sha256 {record['sha256'][:12]})" if record.get("sha256") else ""
    skipped = record.get("skipped") or []
    tail = f"; skipped {_listed(skipped, 4)}" if skipped else ""
    return f"weights: loaded {record['loaded']} tensors from {source}{digest}{tail}"
