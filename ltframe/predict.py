"""Classify image files with a finished run (`ltframe predict`): the run's evaluation head of
its final weights, with the post-hoc logit adjustment it was evaluated with (the first
`eval.posthoc_tau`, prior = the final stage's training class counts); `evaluate_folder`
(`ltframe eval RUN --data FOLDER`) scores it on another labelled folder. The model is the one
`ltframe.load_model(RUN_DIR)` returns (ltframe/export.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ltframe.data.sources import IMG_EXTENSIONS, check_regular_file, decode_image, walk_images
from ltframe.errors import DataError, LtframeError


def image_files(items: list[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (sorted; hidden entries and
    non-regular files such as FIFOs skipped). A file given explicitly must be a regular file."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(Path(f) for f in walk_images(p))
            if not found:
                raise DataError(f"{item}: no images ({', '.join(IMG_EXTENSIONS)}) in this folder")
            out += found
        elif p.exists() or p.is_symlink():
            check_regular_file(p)  # a FIFO or device would block when opened
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
    from ltframe.export import load_run_classifier

    model = load_run_classifier(run_dir)[0]  # the same model `ltframe.load_model` returns
    classes = model.classes
    files = image_files(items)
    k = max(1, min(top_k, len(classes)))
    out: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        x = torch.stack([decode_image(str(f), model.image_size) for f in chunk])
        probs = model.predict_proba(x).cpu()
        p, idx = probs.topk(k, dim=1)
        for f, pr, ix in zip(chunk, p.tolist(), idx.tolist(), strict=True):
            out.append({"file": str(f), "top": [{"class": classes[i], "index": i, "prob": q}
                                                for q, i in zip(pr, ix, strict=True)]})
    if not out:
        raise LtframeError("no images to classify")
    return out


def folder_images(root: str | Path, classes: list[str]) -> tuple[list[Path], torch.Tensor]:
    """root/<class>/<images> -> (files, labels as indices of `classes`); every class folder
    must be one of `classes` (a subset is fine)."""
    from ltframe.errors import closest

    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"--data {root}: no such folder; give a folder of <class>/<images> folders")
    found = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"--data {root}: no class folders; the layout is {root}/<class>/<images>")
    unknown = [c for c in found if c not in classes]
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DataError(f"--data {root}: class '{unknown[0]}'{more} is not one of the run's "
                        f"{len(classes)} classes{closest(unknown[0], classes)}; rename or remove "
                        "that folder (classes are matched by name)")
    files: list[Path] = []
    labels: list[int] = []
    for cls in found:
        got = image_files([base / cls])
        files += got
        labels += [classes.index(cls)] * len(got)
    return files, torch.tensor(labels, dtype=torch.long)


def evaluate_folder(run_dir: str | Path, root: str | Path,
                    overrides: list[str] | None = None) -> dict[str, Any]:
    """A finished run's metrics on another labelled folder (root/<class>/<images>, classes
    matched by name); `overrides` may change [eval] values (posthoc_tau, groups, ...)."""
    from ltframe.errors import RecipeError
    from ltframe.eval.evaluate import evaluate_logits
    from ltframe.export import load_run_classifier

    for item in overrides or []:
        if not item.strip().startswith("eval."):
            raise RecipeError(f"ltframe eval --set {item}: only [eval] values can change without "
                              "retraining (e.g. --set eval.posthoc_tau=1)")
    model, recipe, summary = load_run_classifier(run_dir, overrides, tau=0.0)
    files, labels = folder_images(root, model.classes)
    logits = []
    with torch.no_grad():
        for start in range(0, len(files), recipe.eval.batch_size):
            chunk = files[start:start + recipe.eval.batch_size]
            x = torch.stack([decode_image(str(f), model.image_size) for f in chunk])
            dev = model.log_prior.device
            logits.append(model(model.preprocess(x.to(dev))).float().cpu())
    e = recipe.eval
    counts = torch.tensor(summary["labeled_counts"])
    metrics = evaluate_logits(torch.cat(logits), labels, counts, e.many_threshold, e.few_threshold,
                              e.posthoc_tau, torch.tensor(model.prior).long(), e.groups,
                              e.rank_sizes)
    metrics.update(data=str(root), images=len(files), run_dir=str(run_dir),
                   checkpoint=model.info["checkpoint"])
    return metrics
