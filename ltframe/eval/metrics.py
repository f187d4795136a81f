"""Metrics on a balanced test set: top-1, per-class recall, many/medium/few, top-5, and
per-class precision/recall of pseudo-labels against the hidden unlabeled labels."""

from __future__ import annotations

import torch
from torch import Tensor

#: the scalar metrics of an evaluation (percentages; None for an empty group)
SCALARS = ("top1", "balanced_acc", "many", "medium", "few", "top5")


def group_masks(train_counts: Tensor, many: int, few: int, by: str = "count",
                rank_sizes: tuple[int, ...] | list[int] = (3, 3)) -> dict[str, Tensor]:
    """by "count": many = count > `many`, few = count < `few`, medium the rest (defaults >100,
    <20; ImageNet-LT's convention). by "rank": classes ranked by training count (head first,
    ties in class order); many = the first rank_sizes[0], medium = the next rank_sizes[1], few
    = the rest (paper 000's CIFAR-10 split: 3 / 3 / 4)."""
    if by == "rank":
        order = torch.sort(train_counts, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        a, b = int(rank_sizes[0]), int(rank_sizes[1])
        return {"many": rank < a, "medium": (rank >= a) & (rank < a + b), "few": rank >= a + b}
    return {
        "many": train_counts > many,
        "medium": (train_counts <= many) & (train_counts >= few),
        "few": train_counts < few,
    }


def group_classes(train_counts: Tensor, many: int, few: int, by: str = "count",
                  rank_sizes: tuple[int, ...] | list[int] = (3, 3)) -> dict[str, list[int]]:
    """The class indices of each group (recorded in summary.json)."""
    masks = group_masks(train_counts.cpu(), many, few, by, rank_sizes)
    return {k: m.nonzero().flatten().tolist() for k, m in masks.items()}


def classification_metrics(logits: Tensor, labels: Tensor, train_counts: Tensor,
                           many: int = 100, few: int = 20, by: str = "count",
                           rank_sizes: tuple[int, ...] | list[int] = (3, 3)) -> dict:
    """All metrics as plain Python numbers (percentages); groups with no class get None."""
    num_classes = logits.shape[1]
    pred = logits.argmax(1)
    correct = pred == labels
    per_class_total = torch.bincount(labels, minlength=num_classes).float()
    per_class_hit = torch.bincount(labels[correct], minlength=num_classes).float()
    recall = per_class_hit / per_class_total.clamp_min(1)
    present = per_class_total > 0
    out: dict = {
        "top1": 100.0 * correct.float().mean().item(),
        "balanced_acc": 100.0 * recall[present].mean().item(),
        "per_class": [round(100.0 * r, 4) for r in recall.tolist()],
    }
    for name, mask in group_masks(train_counts.cpu(), many, few, by, rank_sizes).items():
        m = mask & present
        out[name] = 100.0 * recall[m].mean().item() if m.any() else None
    if num_classes >= 100:
        top5 = logits.topk(5, dim=1).indices.eq(labels[:, None]).any(1)
        out["top5"] = 100.0 * top5.float().mean().item()
    return out


def pseudo_label_metrics(confusion: Tensor) -> dict:
    """confusion[true, pseudo] over the samples that were pseudo-labeled (mask > 0)."""
    confusion = confusion.double().cpu()
    hits = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    total = confusion.sum()
    return {
        "pl_accuracy": 100.0 * (hits.sum() / total).item() if total > 0 else None,
        "pl_count": int(total.item()),
        "pl_predicted": [int(v) for v in predicted.tolist()],  # pseudo-labels per class
        "pl_precision": [round(100.0 * v, 4) if p > 0 else None
                         for v, p in zip((hits / predicted.clamp_min(1)).tolist(),
                                         predicted.tolist(), strict=True)],
        "pl_recall": [round(100.0 * v, 4) if a > 0 else None
                      for v, a in zip((hits / actual.clamp_min(1)).tolist(),
                                      actual.tolist(), strict=True)],
    }
