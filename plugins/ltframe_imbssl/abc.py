"""Loss `abc`: the auxiliary balanced classifier of ABC (Lee, Shin & Kim, NeurIPS 2021, "ABC:
Auxiliary Balanced Classifier for Class-imbalanced Semi-supervised Learning"), following the
authors' LeeHyuck/ABC ABCcode0920/ABCfix.py (train(), `abcloss`, `abcloss1`, `abcloss2`).

The base branch is the recipe's FixMatch (`ce` + `fixmatch` on the main head); this term trains a
second linear head `head` (g) on the same features:

    L = mean_i M_i CE(g(x_i), y_i)                                  (labeled)
      + sum_views mean_j mask_j N_j (-sum_c q_jc log softmax(g(strong_j))_c)   (unlabeled)

- M_i ~ Bernoulli(n_min / n_{y_i}) with the labeled class counts, drawn every step;
- q = softmax(g(weak)) (detached), mask = [max q >= threshold], N_j ~ Bernoulli(1 - (t / T)
  (1 - n_min / n_{argmax q})) with t the stage epoch (0-based) and T = `horizon` (500, the
  authors' hard-coded number of epochs);
- the authors train against the soft q on both strong views (views.unlabeled = ["weak",
  "strong", "strong"]); `targets = "hard"` trains against argmax q as USB does
  (semilearn/imb_algorithms/abc), and USB's one strong view is a recipe with one strong view;
  USB's t / T is epoch / (its 256 epochs): set `horizon` to the stage's epochs.

Predict with the auxiliary head of the EMA model (`model.eval_head = "aux"`, `stage.ema`).
No state beyond the model: the Bernoulli masks come from a generator on the run's device
seeded with (seed, stage seed, step) and drawn for the global batch (each rank keeps its
rows), so a resumed run, and a run on W processes, draws the same masks as one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.engine.dist import gather_batch, world_size
from ltframe.engine.dist import info as dist_info
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_imbssl.prior import require_unlabeled, unlabeled_parts


@dataclass
class AbcParams:
    head: str = "aux"  # the auxiliary balanced head g (predictions: model.eval_head = "aux")
    threshold: float = param(0.95, ge=0, le=1)  # mask: max softmax(g(weak)) >= threshold
    targets: Literal["soft", "hard"] = "soft"  # authors: soft q; USB: argmax q
    horizon: int = param(500, ge=1, le=2**31)  # T in 1 - (t / T)(1 - n_min / n): authors 500
    # parts trained towards q; [] = every unlabeled view after the first (the weak one)
    strong: list[str] = field(default_factory=list)
    seed: int = param(0, ge=0, le=2**31)


def balance_ratio(counts: Tensor) -> Tensor:
    """n_min / n_c over the labeled counts (clamped to >= 1)."""
    n = counts.float().clamp_min(1.0)
    return n.min() / n


def unlabeled_keep_prob(ratio: Tensor, epoch: int, horizon: int) -> Tensor:
    """1 - (t / T) (1 - n_min / n_c) per class (ABCfix.py `ir22`), clamped to [0, 1]."""
    return (1.0 - (epoch / horizon) * (1.0 - ratio)).clamp(0.0, 1.0)


class AbcLoss:
    """ABC's auxiliary-head loss; see the module docstring."""

    def __init__(self, params: AbcParams, num_classes: int, class_counts: Tensor,
                 labeled_counts: Tensor | None = None, seed: int = 0,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        counts = labeled_counts if labeled_counts is not None else class_counts
        dev = torch.device(device) if device is not None else counts.device
        self.ratio = balance_ratio(counts).to(dev)
        self.device = self.ratio.device
        self.seed = seed * 1_000_003 + params.seed
        self._generator: torch.Generator | None = None

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "loss 'abc'")

    def _gen(self, step: int) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
        return self._generator.manual_seed(self.seed * 7_919 + step)

    def masks(self, targets: Tensor, pseudo: Tensor, epoch: int, step: int
              ) -> tuple[Tensor, Tensor]:
        """The labeled and unlabeled Bernoulli masks of one step (float 0/1), drawn for the
        global batch with the same generator on every rank; this rank keeps its rows (global
        positions r, r + W, ...), so W processes draw what one process would."""
        gen = self._gen(step)
        m_lab = torch.bernoulli(self.ratio[gather_batch(targets)], generator=gen)
        keep = unlabeled_keep_prob(self.ratio, epoch, self.p.horizon)
        m_unl = torch.bernoulli(keep[gather_batch(pseudo)], generator=gen)
        w = world_size()
        if w == 1:
            return m_lab, m_unl
        r = dist_info().rank
        return m_lab[r::w], m_unl[r::w]

    def __call__(self, ctx: StepContext) -> Tensor:
        p = self.p
        if ctx.targets is None:
            raise LtframeError("loss 'abc' needs a labeled batch: set the stage's data to "
                               "\"labeled+unlabeled\"")
        parts = unlabeled_parts(ctx, "loss 'abc'")
        strong = p.strong or parts[1:]
        if not strong:
            raise LtframeError("loss 'abc' needs a strong unlabeled view after the weak one; set "
                               "stage.views.unlabeled = [\"weak\", \"strong\"] (the authors: "
                               "[\"weak\", \"strong\", \"strong\"])")
        lab = ctx.logits("labeled", p.head).float()
        if lab.device != self.device:  # built on another device than the batches: moved once
            self.ratio, self.device, self._generator = self.ratio.to(lab.device), lab.device, None
        q = ctx.logits(parts[0], p.head).detach().float().softmax(1)
        conf, pl = q.max(1)
        m_lab, m_unl = self.masks(ctx.targets, pl, ctx.epoch, ctx.step)
        loss = (m_lab * F.cross_entropy(lab, ctx.targets, reduction="none")).mean()
        mask = (conf >= p.threshold).float() * m_unl
        for part in strong:
            logits = ctx.logits(part, p.head).float()
            if p.targets == "soft":
                per = -(q * F.log_softmax(logits, 1)).sum(1)
            else:
                per = F.cross_entropy(logits, pl, reduction="none")
            loss = loss + (mask * per).mean()
        return loss


def register(registry: Registry) -> None:
    registry.register("loss", "abc", AbcLoss, AbcParams)
