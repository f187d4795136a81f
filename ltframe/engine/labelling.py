"""Whole-pool labelling between stages (`stage.label`).

The evaluation model predicts every sample of the pool (un-augmented), a pseudo-labeler in
offline mode (`label_pool`) keeps a subset with targets and weights, the run's target table
takes it (replacing the previous selection), and the selection is written to
`RUN/pseudo_labels/stage<i>-<name>.csv` (+ `.safetensors` with soft targets). Diagnostics
against the hidden labels (per-class precision / recall, counts) are returned and logged; they
never reach training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from ltframe.engine import dist
from ltframe.engine.checkpoint import atomic_write_bytes, atomic_write_text
from ltframe.engine.context import PoolLabels, PoolPredictions
from ltframe.engine.stages import StagePlan
from ltframe.errors import RecipeError
from ltframe.eval.evaluate import predict
from ltframe.eval.metrics import group_masks, pseudo_label_metrics

SMOKE_POOL = 256


def pool_index(data: Any, which: str, plan: StagePlan, smoke: bool) -> Tensor:
    splits = data.splits
    index = {"unlabeled": splits.unlabeled, "labeled": splits.labeled,
             "all": torch.cat([splits.labeled, splits.unlabeled])}[which]
    if index.numel() == 0:
        raise RecipeError(f"stage '{plan.name}'.label_pool = \"{which}\" but that split is empty; "
                          "set data.split (e.g. name = \"fraction\") or label_pool")
    return index[:SMOKE_POOL] if smoke else index


def check_offline(labeler: Any, plan: StagePlan) -> None:
    if not callable(getattr(labeler, "label_pool", None)):
        raise RecipeError(f"stage '{plan.name}'.label: pseudo-labeler '{plan.cfg.label.name}' "
                          "has no offline mode (no label_pool method); use one that has, "
                          "e.g. \"threshold\"")


def label_pool(trainer: Any, plan: StagePlan, model: torch.nn.Module) -> dict:
    """Label the stage's pool with `model`, update the target table, write the selection and
    return the diagnostics (also logged as a `pool_labels` event)."""
    cfg, d, run = plan.cfg, trainer.data, trainer.run
    counts = d.labeled_counts
    labeler = run.registry.build(cfg.label, num_classes=d.num_classes, class_counts=counts,
                                 num_samples=len(d.train), labeled_counts=counts)
    check_offline(labeler, plan)
    index = pool_index(d, cfg.label_pool, plan, run.smoke)
    head = cfg.label_head or cfg.eval_head or trainer.recipe.model.eval_head
    # float32 (no autocast): bf16 logits would tie many confidences and change the ranking
    logits = dist.sharded(lambda i: predict(model, d.train, i, d.source.mean, d.source.std,
                                            trainer.recipe.eval.batch_size, head, False,
                                            trainer.channels_last), index)
    pool = PoolPredictions(index=index, probs=logits.softmax(1), num_classes=d.num_classes,
                           class_counts=counts.cpu(), stage_index=plan.index, stage_name=plan.name,
                           logits=logits)
    sel: PoolLabels = labeler.label_pool(pool)
    trainer.table.apply(sel.index, sel.targets, sel.weight)
    if dist.is_main():
        _write(run.run_dir / "pseudo_labels", f"stage{plan.index}-{plan.name}", sel, d)
    ev = trainer.recipe.eval
    groups = group_masks(counts.cpu(), ev.many_threshold, ev.few_threshold, ev.groups, ev.rank_sizes)
    diag = diagnostics(sel, trainer.hidden.cpu(), trainer.table, d.num_classes, pool, groups)
    trainer.log("pool_labels", stage=plan.name, generation=trainer.table.generation, **diag)
    return diag


def diagnostics(sel: PoolLabels, hidden: Tensor, table: Any, num_classes: int,
                pool: PoolPredictions, groups: dict[str, Tensor] | None = None) -> dict:
    """Per-class precision / recall of the kept pseudo-labels of unlabeled samples against the
    hidden labels, how many were kept per class, and the argmax accuracy over the whole pool,
    also per class group (`groups`: name -> class mask; the pool's samples of those classes)."""
    unl = table.pseudo
    true, pl = hidden[unl], table.labels[unl]
    known = true >= 0  # images without a known label are left out of every comparison
    confusion = torch.bincount(true[known] * num_classes + pl[known], minlength=num_classes ** 2)
    out = pseudo_label_metrics(confusion.view(num_classes, num_classes))
    out["pl_selected"] = torch.bincount(pl, minlength=num_classes).tolist()
    is_unl = ~torch.isin(pool.index, table.labeled)  # unlabeled members of the pool
    if is_unl.any():
        arg = pool.probs[is_unl].argmax(1)
        truth = hidden[pool.index[is_unl]]
        have = truth >= 0
        out.update(hidden_label_note(int(have.sum()), int(have.numel())))
        hit = (arg[have] == truth[have]).float()
        out["pool_accuracy"] = round(100.0 * float(hit.mean()), 4) if have.any() else None
        if groups:
            member = {k: m[truth[have]] for k, m in groups.items()}
            out["pool_group_accuracy"] = {k: round(100.0 * float(hit[m].mean()), 4) if m.any() else None
                                          for k, m in member.items()}
        out["pool_predicted"] = torch.bincount(arg, minlength=num_classes).tolist()
    return out


def csv_field(text: str) -> str:
    """`text` as one CSV field (quoted when it holds a comma, quote or line break)."""
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def hidden_label_note(known: int, total: int) -> dict:
    """{"hidden_labels": ...} saying how far diagnostics against hidden labels are available:
    nothing when every image has a label, "not available" when none has."""
    if known == total:
        return {}
    return {"hidden_labels": "not available" if known == 0 else f"known for {known} of {total}"}


def _write(folder: Path, stem: str, sel: PoolLabels, data: Any) -> None:
    """The selection as CSV: training-set index, pseudo-label, weight, confidence and, where the
    source has files, which source the image is from and its path relative to that root."""
    soft = sel.targets.dim() == 2
    hard = sel.targets.argmax(1) if soft else sel.targets
    conf = sel.confidence if sel.confidence is not None else torch.full_like(sel.weight, float("nan"))
    files = data.source.train_files is not None
    rows = []
    for i, y, w, c in zip(sel.index.tolist(), hard.tolist(), sel.weight.tolist(), conf.tolist(),
                          strict=True):
        named = ",".join(csv_field(v) for v in data.file_name(i)) + "," if files else ""
        rows.append(f"{i},{named}{y},{w:.6g},{c:.6g}\n")
    head = "index,from,file,label,weight,confidence\n" if files else "index,label,weight,confidence\n"
    atomic_write_text(folder / f"{stem}.csv", head + "".join(rows))
    if soft:
        atomic_write_bytes(folder / f"{stem}.safetensors",
                           st_save({"index": sel.index.contiguous(),
                                    "soft": sel.targets.float().contiguous()}))
