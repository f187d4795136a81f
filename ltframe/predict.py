"""Classify image files with a finished run (`ltframe predict`): the run's evaluation head of
its final weights, with the post-hoc logit adjustment it was evaluated with (the first
`eval.posthoc_tau`, prior = the final stage's training class counts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ltframe.data.sources import IMG_EXTENSIONS, decode_image
from ltframe.errors import DataError, LtframeError


def image_files(items: list[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
            if not found:
                raise DataError(f"{item}: no images ({', '.join(IMG_EXTENSIONS)}) in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{item}: no such file or folder")
    return out


def source_info(run: Any) -> dict[str, Any]:
    """What predicting needs from the data source: image size, normalisation, class names."""
    src = run.data.source
    images = src.train_images
    size = int(images.shape[-1]) if isinstance(images, torch.Tensor) else int(images.size)
    return {"image_size": size, "mean": list(src.mean), "std": list(src.std),
            "classes": list(src.classes)}


def predict_files(run_dir: str | Path, items: list[str | Path], top_k: int = 5,
                  batch_size: int = 64) -> list[dict[str, Any]]:
    """[{file, top: [{class, index, prob}, ...]}] for every image of `items`."""
    from ltframe.compare import load_summary
    from ltframe.data.views import NoneParams, NoneView
    from ltframe.engine import checkpoint as ckpt
    from ltframe.engine.run import _prepare, load_run
    from ltframe.engine.setup import build_model, pick_device
    from ltframe.eval.evaluate import adjust_logits

    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    recipe, meta, pm, registry = load_run(run_dir)
    info = meta.get("source_info")
    if info is None:  # runs from before run.json recorded it: build the source once
        info = source_info(_prepare(recipe, pm, registry, run_dir, bool(meta.get("smoke"))))
    classes = info["classes"]
    tensors, side, _ = ckpt.load(run_dir)
    device = pick_device(recipe.run.device)
    model = build_model(recipe, registry, len(classes)).to(device)
    prefix = "ema" if side.get("ema") and side.get("step", 0) > 0 else "model"
    ckpt.load_module_state(model, tensors, prefix, str(run_dir))
    model.eval()
    final = (summary.get("stages") or [{}])[-1]
    head = final.get("eval_head") or recipe.model.eval_head
    tau = recipe.eval.posthoc_tau
    tau = float(tau[0] if isinstance(tau, list) else tau)
    prior = torch.tensor(final.get("train_counts") or summary.get("labeled_counts"))
    files = image_files(items)
    view = NoneView(NoneParams(), tuple(info["mean"]), tuple(info["std"]))
    k = max(1, min(top_k, len(classes)))
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            x = torch.stack([decode_image(str(f), info["image_size"]) for f in chunk]).to(device)
            logits = model(view(x))[1][head].float().cpu()
            probs = adjust_logits(logits, prior, tau).softmax(1)
            p, idx = probs.topk(k, dim=1)
            for f, pr, ix in zip(chunk, p.tolist(), idx.tolist(), strict=True):
                out.append({"file": str(f), "top": [{"class": classes[i], "index": i, "prob": q}
                                                    for q, i in zip(pr, ix, strict=True)]})
    if not out:
        raise LtframeError("no images to classify")
    return out
