"""SAW, smoothed adaptive weighting (Lai et al., ICML 2022, "Smoothed Adaptive Weighting for
Imbalanced Semi-Supervised Learning"; ZJUJeffLai/SAW_SSL train_fix_cifar10.py with
imbOptim/classWeights.py getClassWeights and SemiLoss, run as train_example.sh).

Loss `saw`, one term per side (`on`):

- on = "labeled": mean_i w_{y_i} CE(z_i, y_i), w from the labeled class counts;
- on = "unlabeled": mean_i mask_i w_{y^_i} CE(z_s,i, y^_i) with the stage's pseudo-labels (the
  `threshold` labeler, 0.95), i.e. FixMatch's term re-weighted per pseudo-class.

Weights, the `--effective` scheme with `--normalize 1`: w_c = (1 - beta) / (1 - beta^{n_c})
(counts of 0 count 1), scaled so that sum_c w_c = normalize * C. beta = 0.99: the value
train_example.sh passes (`--effective 0.99`), which imbOptim/classWeights.py (the file the
training scripts import) uses whenever it is not 1; beta = 0 computes it as (N - 1) / N from the
mean count N, as USB and the repo's other copy (classWeights/classWeights.py) do.

Unlabeled counts, `counts = "stored"` (the authors'): each step stores the argmax of the weak
view's prediction (the training forward) per unlabeled sample (`ctx.indices`; the authors'
pseudo_orig buffer, gathered over ranks under torchrun); at the first step of each epoch the
weights come from the argmax counts of the stored rows (uniform weights in epoch 0). Samples not
seen yet are left out (the authors' buffer starts uniform, whose argmax is class 0).
`counts = "pool"` is USB's (semilearn/imb_algorithms/saw/utils.py SAWWeightsHook): after each
epoch the EMA model predicts the whole unlabeled pool (the engine's `epoch_pool` pass) and the
argmax counts (at least 1) give the weights; use it with beta = 0 for USB's rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PoolPredictions, StepContext
from ltframe.engine.dist import gather_batch
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_imbssl.prior import load_like, require_unlabeled
from ltframe_ssl.common import require_pseudo, soft_cross_entropy, state_device


def effective_weights(counts: Tensor, beta: float = 0.0, normalize: float = 1.0) -> Tensor:
    """(1 - beta) / (1 - beta^n_c) with n_c = 0 counted as 1, scaled to sum normalize * C;
    beta <= 0: beta = (N - 1) / N with N the mean of `counts` (before the 0 -> 1 change),
    clamped at 0. Float32, on `counts`' device, no host sync."""
    n = counts.float()
    mean = n.mean()
    n = torch.where(n == 0, torch.ones_like(n), n)
    if beta > 0:  # a Python scalar: no host-to-device copy
        w = (1 - beta) / (1 - torch.pow(beta, n))
    else:
        b = ((mean - 1) / mean).clamp_min(0.0)
        w = (1 - b) / (1 - b.pow(n))
    return normalize * n.numel() * w / w.sum()


@dataclass
class SawParams:
    on: Literal["labeled", "unlabeled"] = "unlabeled"  # the side this term weights
    beta: float = param(0.99, ge=0, lt=1)  # effective-number beta; 0 = (N - 1) / N (USB)
    normalize: float = param(1.0, gt=0, le=1e6)  # weights sum to normalize * C
    # unlabeled counts: stored weak-view argmax per sample (authors) or an EMA pass (USB)
    counts: Literal["stored", "pool"] = "stored"
    part: str = ""  # the trained logits: "" = "labeled" / "unlabeled:strong"
    weak_part: str = param("unlabeled", ref="part")  # stored: the view whose argmax is kept
    head: str = "main"


class SawLoss:
    """Class-weighted CE (labeled) or FixMatch term (unlabeled) with SAW's smoothed weights."""

    def __init__(self, params: SawParams, num_classes: int, num_samples: int = 0,
                 labeled_counts: Tensor | None = None, class_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        counts = labeled_counts if labeled_counts is not None else class_counts
        dev = state_device(device, counts)
        self.part = params.part or ("labeled" if params.on == "labeled" else "unlabeled:strong")
        if params.on == "labeled":
            if counts is None:
                raise LtframeError("loss 'saw' (on = \"labeled\") needs the labeled class counts")
            self.weights = effective_weights(counts.to(dev), params.beta, params.normalize)
        else:
            self.weights = torch.ones(num_classes, device=dev)
        stored = params.on == "unlabeled" and params.counts == "stored"
        self.pred = torch.full((num_samples if stored else 0,), -1, dtype=torch.long, device=dev)
        self.epoch = -1
        # the engine's between-epoch pool pass: only USB's counts need it
        self.pool_model = "ema" if params.on == "unlabeled" and params.counts == "pool" else None
        self.pool_head = params.head

    def preflight(self, info: Any) -> None:
        if self.p.on == "unlabeled":
            require_unlabeled(info, "loss 'saw' (on = \"unlabeled\")")

    def _to(self, device: torch.device) -> None:
        if self.weights.device != device:
            self.weights, self.pred = self.weights.to(device), self.pred.to(device)

    def stored_counts(self) -> Tensor:
        """Argmax counts [C] of the stored rows (unseen rows left out), without a host sync."""
        counts = torch.zeros(self.num_classes + 1, device=self.pred.device)
        counts.index_add_(0, self.pred + 1, torch.ones_like(self.pred, dtype=torch.float32))
        return counts[1:]

    def __call__(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.part, self.p.head)
        self._to(logits.device)
        if self.p.on == "labeled":
            if ctx.targets is None:
                raise LtframeError("loss 'saw' (on = \"labeled\") needs labeled batches")
            ce = F.cross_entropy(logits.float(), ctx.targets, reduction="none")
            return (self.weights[ctx.targets] * ce).mean()
        if ctx.epoch != self.epoch:  # a new epoch: last epoch's pseudo-label counts
            if self.epoch >= 0 and self.p.counts == "stored":
                self.weights = effective_weights(self.stored_counts(), self.p.beta, self.p.normalize)
            self.epoch = ctx.epoch
        if self.p.counts == "stored":
            weak = ctx.logits(self.p.weak_part, self.p.head).detach()
            if self.pred.numel():
                idx = gather_batch(ctx.indices(self.p.weak_part))
                self.pred[idx] = gather_batch(weak.argmax(1))
        pseudo = require_pseudo(ctx, "saw", logits.shape[0])
        hard = pseudo.targets if pseudo.targets.dim() == 1 else pseudo.targets.argmax(1)
        ce = soft_cross_entropy(logits.float(), pseudo.targets)
        return (ce * pseudo.mask * self.weights[hard]).mean()

    def epoch_pool(self, pool: PoolPredictions, epoch: int) -> None:
        """USB's counts: the pool's argmax counts (at least 1) after each epoch."""
        counts = torch.bincount(pool.probs.argmax(1), minlength=self.num_classes).clamp_min(1)
        self.weights = effective_weights(counts.to(self.weights.device), self.p.beta,
                                         self.p.normalize)

    def state_dict(self) -> dict[str, Tensor]:
        return {"weights": self.weights.clone(), "pred": self.pred.clone(),
                "epoch": torch.tensor(self.epoch, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.weights = load_like(state, "weights", self.weights, "loss 'saw'")
        self.pred = load_like(state, "pred", self.pred, "loss 'saw'")
        self.epoch = int(state["epoch"])


def register(registry: Registry) -> None:
    registry.register("loss", "saw", SawLoss, SawParams)
