"""A finished run's model outside the engine: `load_model` and `ltframe export`.

`load_model(RUN_DIR | FILE)` returns an `LTClassifier`: a plain `nn.Module` in eval mode whose
forward maps normalised images to the evaluation head's logits, adjusted post hoc by
`logits - tau * log(prior)` (`tau` selectable; the prior is the final stage's training class
counts). Its `classes`, `mean`, `std`, `image_size` and `prior` travel with it, and `preprocess`
turns uint8 images into the normalised input.

`export_run(RUN_DIR, FILE)` writes FILE.safetensors (the JSON below also in its metadata under
"ltframe") + FILE.json: classes, input size, mean/std, prior, tau. A head whose output is affine
in the features (checked numerically: linear, LWS, tau-norm, ...) is folded into the timm model's
own classifier, post-hoc tau into its bias (format "timm"); timm alone then loads it:

    timm.create_model(NAME, num_classes=C, pretrained=True,
                      pretrained_cfg_overlay=dict(file=FILE, num_classes=C, custom_load=False))

(the JSON's "timm" entry holds these arguments; ltframe's CIFAR backbones need `import
ltframe.models` first). Any other head keeps its ltframe module (format "ltframe"; `load_model`).
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ltframe.errors import LtframeError

FORMAT = 1


class LTClassifier(nn.Module):
    """Evaluation-head logits of normalised images, adjusted post hoc by `tau`.

    `net` maps a normalised float batch to logits that already carry `base_tau` (an export
    folds its tau into the classifier's bias); forward returns
    `net(x) - (tau - base_tau) * log(prior)`, i.e. the logits adjusted by `tau`."""

    def __init__(self, net: nn.Module, classes: list[str], mean: list[float], std: list[float],
                 image_size: int, prior: list[float] | Tensor, tau: float = 0.0,
                 base_tau: float = 0.0, info: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net
        counts = torch.as_tensor(prior).double().clamp_min(1)
        self.register_buffer("log_prior", (counts / counts.sum()).log().float())
        self.classes = list(classes)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.image_size = int(image_size)
        self.input_size = (3, self.image_size, self.image_size)
        self.prior = [float(v) for v in torch.as_tensor(prior).tolist()]
        self.tau = float(tau)
        self.base_tau = float(base_tau)
        self.info = dict(info or {})
        # what timm.data.resolve_data_config reads
        self.pretrained_cfg = {"input_size": self.input_size, "mean": tuple(self.mean),
                               "std": tuple(self.std), "num_classes": len(self.classes),
                               "crop_pct": 1.0, "interpolation": "bilinear"}
        self.eval()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        shift = self.tau - self.base_tau
        return logits - shift * self.log_prior.to(logits.dtype) if shift else logits

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) images of `image_size` -> the normalised float input."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std

    @torch.no_grad()
    def predict_proba(self, images: Tensor) -> Tensor:
        """Class probabilities of uint8 images (softmax of the adjusted logits)."""
        dev = self.log_prior.device
        return self(self.preprocess(images.to(dev))).float().softmax(1)


# --- loading ---------------------------------------------------------------------------------


def run_tau(recipe: Any) -> float:
    """The post-hoc tau a run reports with (the first of `eval.posthoc_tau`)."""
    tau = recipe.eval.posthoc_tau
    return float(tau[0] if isinstance(tau, list) else tau)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_run_classifier(run_dir: str | Path, overrides: list[str] | None = None,
                        device: str | torch.device | None = None, tau: float | None = None
                        ) -> tuple[LTClassifier, Any, dict[str, Any]]:
    """(classifier, recipe, summary) of a finished run: its final weights (EMA where the run
    kept them), the evaluation head of its final stage, its normalisation and input size."""
    from ltframe.compare import load_summary
    from ltframe.engine import checkpoint as ckpt
    from ltframe.engine.run import _prepare, load_run
    from ltframe.engine.setup import build_model, pick_device
    from ltframe.predict import source_info

    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    recipe, meta, pm, registry = load_run(run_dir, overrides)
    info = meta.get("source_info")
    if info is None:  # runs from before run.json recorded it: build the source once
        info = source_info(_prepare(recipe, pm, registry, run_dir, bool(meta.get("smoke"))))
    classes = info["classes"]
    tensors, side, side_path = ckpt.load(run_dir)
    model = build_model(recipe, registry, len(classes))
    prefix = "ema" if side.get("ema") and side.get("step", 0) > 0 else "model"
    ckpt.load_module_state(model, tensors, prefix, str(run_dir))
    final = (summary.get("stages") or [{}])[-1]
    head = final.get("eval_head") or recipe.model.eval_head
    prior = final.get("train_counts") or summary.get("labeled_counts")
    dev = pick_device(recipe.run.device) if device is None else _device(device)
    net = nn.Sequential(OrderedDict(backbone=model.backbone, head=model.heads[head]))
    extra = {"run_dir": str(run_dir), "checkpoint": str(side_path.with_suffix(".safetensors")),
             "backbone": recipe.model.backbone, "backbone_args": dict(recipe.model.backbone_args),
             "eval_head": head, "head": recipe.model.heads[head].to_table()}
    clf = LTClassifier(net, classes, info["mean"], info["std"], info["image_size"], prior,
                       run_tau(recipe) if tau is None else tau, 0.0, extra)
    return clf.to(dev).eval(), recipe, summary


def load_model(source: str | Path, tau: float | None = None,
               device: str | torch.device | None = "cpu") -> LTClassifier:
    """A finished run directory or an exported file -> `LTClassifier` in eval mode.

    `tau` is the post-hoc adjustment (None: the run's first `eval.posthoc_tau`, or the tau the
    file was exported with); `device` None: the run's `run.device` (CUDA when available for a
    file)."""
    p = Path(source).expanduser()
    if p.is_dir():
        return load_run_classifier(p, device=device, tau=tau)[0]
    tensors, meta, path = read_export(p)
    net = _export_net(meta, tensors, path)
    base = float(meta.get("tau", 0.0)) if meta.get("tau_folded") else 0.0
    clf = LTClassifier(net, meta["classes"], meta["mean"], meta["std"], meta["image_size"],
                       meta["prior"], float(meta.get("tau", 0.0)) if tau is None else tau, base,
                       {k: meta[k] for k in ("backbone", "backbone_args", "head", "format")
                        if k in meta} | {"file": str(path)})
    return clf.to(_device(device)).eval()


def _export_paths(out: str | Path) -> tuple[Path, Path]:
    p = Path(out).expanduser()
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def read_export(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], Path]:
    """(tensors, metadata, .safetensors path) of a file written by `ltframe export`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    st, side = _export_paths(path)
    if not st.is_file():
        raise LtframeError(f"{path}: no such exported model ({st} does not exist); pass a run "
                           "directory or the file `ltframe export` wrote")
    try:
        with safe_open(str(st), "pt") as fh:
            text = (fh.metadata() or {}).get("ltframe")
        tensors = load_file(str(st))
    except (SafetensorError, OSError) as exc:
        raise LtframeError(f"{st} cannot be read ({exc}); export the run again") from None
    if text is None and side.is_file():
        text = side.read_text()
    if text is None:
        raise LtframeError(f"{st} is not an ltframe export (no 'ltframe' metadata and no {side.name})"
                           "; load it with timm, or export a run with `ltframe export RUN --out FILE`")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LtframeError(f"{st}: its ltframe metadata is not JSON ({exc.msg}); export again") from None
    return tensors, meta, st


def _export_net(meta: dict[str, Any], tensors: dict[str, Tensor], path: Path) -> nn.Module:
    import timm

    import ltframe.models  # noqa: F401  (registers the CIFAR backbones)
    from ltframe.models import build_backbone

    num_classes = len(meta["classes"])
    if meta.get("format") == "timm":
        net = timm.create_model(meta["backbone"], num_classes=num_classes,
                                **meta.get("backbone_args", {}))
    else:
        from ltframe.plugins import make_plugin_manager

        backbone = build_backbone(meta["backbone"], **meta.get("backbone_args", {}))
        registry = make_plugin_manager()[1]
        head = registry.build(registry.spec("head", meta["head"], "head"),
                              in_features=int(backbone.num_features), num_classes=num_classes)
        net = nn.Sequential(OrderedDict(backbone=backbone, head=head))
    result = net.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[:3]
        raise LtframeError(f"{path} does not match {meta['backbone']} (keys {', '.join(bad)}); "
                           "export the run again with this ltframe")
    return net.eval()


# --- export ------------------------------------------------------------------------------------


@torch.no_grad()
def affine_form(head: nn.Module, in_features: int) -> tuple[Tensor, Tensor] | None:
    """(W, b) with head(x) == x @ W.T + b for every x, or None when the head is not affine in
    its input (checked on random features in float64)."""
    h = copy.deepcopy(head).cpu().double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, in_features, generator=g, dtype=torch.float64) * 3
    try:
        b = h(torch.zeros(1, in_features, dtype=torch.float64))[0]
        w = (h(torch.eye(in_features, dtype=torch.float64)) - b).t()
        want = h(x)
        got = x @ w.t() + b
        scale = want.abs().max().clamp_min(1.0)
        if want.shape != got.shape or (want - got).abs().max() > 1e-7 * scale:
            return None
    except Exception:  # a head that needs more than a feature batch, or returns no tensor
        return None
    return w.float().contiguous(), b.float().contiguous()


def _timm_state(clf: LTClassifier, name: str, args: dict[str, Any], tau: float
                ) -> tuple[dict[str, Tensor], str] | tuple[None, str]:
    """The run as a plain timm model's state dict (classifier = the folded head), or a reason."""
    import timm

    backbone, head = clf.net.backbone, clf.net.head
    form = affine_form(head, int(backbone.num_features))
    if form is None:
        return None, f"the head '{clf.info.get('eval_head')}' is not linear in the features"
    w, b = form
    b = b - tau * clf.log_prior.cpu()
    full = timm.create_model(name, num_classes=clf.num_classes, **args)
    fc = full.get_classifier() if hasattr(full, "get_classifier") else None
    if not isinstance(fc, nn.Linear) or fc.bias is None or fc.weight.shape != w.shape:
        return None, f"timm's {name} has no linear classifier of {tuple(w.shape)} with a bias"
    fc_name = next(n for n, m in full.named_modules() if m is fc)
    own = {k: v.detach().cpu().clone().contiguous() for k, v in backbone.state_dict().items()}
    state = {**own, f"{fc_name}.weight": w, f"{fc_name}.bias": b}
    if set(full.state_dict()) != set(state):
        return None, f"timm's {name} with a classifier has other weights than the backbone"
    full.load_state_dict(state, strict=True)
    return state, ""


def _same_outputs(a: nn.Module, b: nn.Module, size: int) -> bool:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ya, yb = a.cpu().eval()(x).float(), b.cpu().eval()(x).float()
    return ya.shape == yb.shape and bool(torch.allclose(ya, yb, rtol=1e-4, atol=1e-4))


def timm_arguments(meta: dict[str, Any], file: Path) -> dict[str, Any]:
    """`timm.create_model` keyword arguments that load an exported "timm" file."""
    c = len(meta["classes"])
    return {"model_name": meta["backbone"], "num_classes": c, **meta.get("backbone_args", {}),
            "pretrained": True,
            "pretrained_cfg_overlay": {"file": str(file), "num_classes": c, "custom_load": False,
                                       "input_size": [3, meta["image_size"], meta["image_size"]],
                                       "mean": meta["mean"], "std": meta["std"]}}


def _write(st: Path, side: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save

    from ltframe.engine.checkpoint import atomic_write_bytes, atomic_write_json

    atomic_write_bytes(st, save(tensors, metadata={"ltframe": json.dumps(meta)}))
    atomic_write_json(side, meta)


def export_run(run_dir: str | Path, out: str | Path, tau: float | None = None,
               fmt: str = "auto") -> dict[str, Any]:
    """Write RUN_DIR's final model to OUT.safetensors + OUT.json; returns the JSON (with
    "files"). `tau` None: the run's post-hoc tau. `fmt` "auto" (timm where the head folds),
    "timm" (an error when it cannot) or "ltframe"."""
    import ltframe
    from ltframe.engine.checkpoint import atomic_write_json
    from ltframe.models.weights import sha256_file

    if fmt not in ("auto", "timm", "ltframe"):
        raise LtframeError(f"--format {fmt}: use auto, timm or ltframe")
    clf, recipe, summary = load_run_classifier(run_dir, device="cpu", tau=0.0)
    tau = run_tau(recipe) if tau is None else float(tau)
    st, side = _export_paths(out)
    if st.parent.exists() and not st.parent.is_dir():
        raise LtframeError(f"--out {out}: {st.parent} is not a folder")
    name, args = recipe.model.backbone, dict(recipe.model.backbone_args)
    meta: dict[str, Any] = {
        "ltframe_export": FORMAT, "ltframe": ltframe.__version__, "format": "ltframe",
        "backbone": name, "backbone_args": args, "num_classes": clf.num_classes,
        "classes": clf.classes, "image_size": clf.image_size,
        "input_size": list(clf.input_size), "mean": clf.mean, "std": clf.std,
        "prior": clf.prior, "tau": tau, "tau_folded": False,
        "eval_head": clf.info["eval_head"], "head": clf.info["head"],
        "run_dir": str(Path(run_dir).resolve()), "checkpoint": clf.info["checkpoint"],
    }
    state, why = (None, "--format ltframe") if fmt == "ltframe" else _timm_state(clf, name, args, tau)
    if state is not None:
        meta.update(format="timm", tau_folded=True)
        meta["timm"] = timm_arguments(meta, st.resolve())
        _write(st, side, state, meta)
        loaded = _timm_load(meta["timm"])
        ref = copy.deepcopy(clf)
        ref.tau = tau
        if _same_outputs(loaded, ref, clf.image_size):
            meta["sha256"] = sha256_file(st)
            atomic_write_json(side, meta)
            return {**meta, "files": [str(st), str(side)]}
        state, why = None, f"timm's loader does not reproduce the run's {name} outputs"
        meta.update(format="ltframe", tau_folded=False)
        meta.pop("timm")
    if fmt == "timm":
        raise LtframeError(f"cannot export {run_dir} as a plain timm model: {why}; use "
                           "--format auto (keeps the ltframe head; load it with ltframe.load_model)")
    meta["reason"] = why
    tensors = {k: v.detach().cpu().clone().contiguous()
               for k, v in clf.net.state_dict().items()}
    _write(st, side, tensors, meta)
    meta["sha256"] = sha256_file(st)
    atomic_write_json(side, meta)
    return {**meta, "files": [str(st), str(side)]}


def _timm_load(kwargs: dict[str, Any]) -> nn.Module:
    import timm

    import ltframe.models  # noqa: F401

    kw = dict(kwargs)
    return timm.create_model(kw.pop("model_name"), **kw)
