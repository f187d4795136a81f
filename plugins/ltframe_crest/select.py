"""CReST's class-rebalancing selection (paper 003 Sec. 3.2, Eq. 1; google-research/crest).

After a generation the model's argmax predictions split the unlabeled pool into classes; class c
(ranked head first by labeled count) keeps its floor(n^_c * mu_c) most confident members, with
mu_c = (N_{C-1-c} / N_0)^(1/alpha): head classes keep few of their predictions, tail classes
almost all. alpha = 3 as in the authors' code (`--alpha 3`, the paper's 1/3). The rates come
from the labeled class counts (`ratio = 0`), or, as in the authors' code, from the imbalance-
ratio formula N_c / N_0 = ratio^(-c / (C - 1)) (`ratio > 0`). No confidence threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PoolLabels, PoolPredictions, PseudoLabels, StepContext
from ltframe.errors import RecipeError
from ltframe.registry import Registry


@dataclass
class CrestSelectParams:
    alpha: float = param(3.0, gt=0)  # rate exponent 1 / alpha
    ratio: float = param(0.0, ge=0)  # 0: rates from the labeled counts; > 0: N_c/N_0 = ratio^(-c/(C-1))


def keep_rates(class_counts: Tensor, alpha: float, ratio: float = 0.0) -> Tensor:
    """mu_c = (N_{C-1-r(c)} / N_0)^(1/alpha), r(c) = the rank of class c by labeled count
    (head first); float64 [C]."""
    counts = class_counts.double().cpu()
    c = counts.numel()
    order = torch.sort(counts, descending=True, stable=True).indices
    rank = torch.empty(c, dtype=torch.long)
    rank[order] = torch.arange(c)
    if ratio > 0:
        rel = ratio ** (-(c - 1 - rank).double() / max(c - 1, 1))
    else:
        sorted_counts = counts[order]
        rel = sorted_counts[c - 1 - rank] / sorted_counts[0].clamp_min(1)
    return rel.pow(1.0 / alpha)


def select_top(probs: Tensor, rates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Positions (into `probs`' rows), labels and confidences of the floor(n^_c * mu_c) most
    confident samples predicted as each class c (vectorised; ties keep pool order)."""
    conf, pred = probs.max(1)
    c = probs.shape[1]
    n_pred = torch.bincount(pred, minlength=c)
    keep = torch.floor(n_pred.double() * rates.to(probs.device)).long()
    by_conf = torch.sort(conf, descending=True, stable=True).indices
    order = by_conf[torch.sort(pred[by_conf], stable=True).indices]  # class, then confidence
    starts = torch.cumsum(n_pred, 0) - n_pred
    rank_in_class = torch.arange(order.numel(), device=probs.device) - starts[pred[order]]
    chosen = order[rank_in_class < keep[pred[order]]]
    return chosen, pred[chosen], conf[chosen]


class CrestSelect:
    """Offline pseudo-labeler: CReST's per-class top-confidence selection (hard labels)."""

    def __init__(self, params: CrestSelectParams, num_classes: int, class_counts: Tensor) -> None:
        self.p = params
        self.rates = keep_rates(class_counts, params.alpha, params.ratio)

    def preflight(self, info: Any) -> None:
        """Before the run: refused as a stage's online pseudo_labeler."""
        if info.role == "pseudo_labeler":
            self(None)  # type: ignore[arg-type]

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        raise RecipeError("pseudo_labeler 'crest_select' labels whole pools between stages only; "
                          "use it as stage.label, and e.g. \"threshold\" or \"align\" as "
                          "stage.pseudo_labeler")

    def label_pool(self, pool: PoolPredictions) -> PoolLabels:
        pos, labels, conf = select_top(pool.probs, self.rates)
        return PoolLabels(index=pool.index[pos], targets=labels,
                          weight=torch.ones(pos.numel()), confidence=conf)


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "crest_select", CrestSelect, CrestSelectParams)
