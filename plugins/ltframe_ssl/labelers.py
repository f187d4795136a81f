"""Pseudo-labelers: confidence thresholding (FixMatch) and distribution alignment (CReST+ /
ReMixMatch).

- threshold: Sohn et al. 2020, "FixMatch: Simplifying Semi-Supervised Learning with Consistency
  and Confidence". p = softmax(logits / temperature) of the detached logits of the weak view,
  mask = 1[max p >= threshold], targets = argmax p (hard) or p (soft) (USB
  semilearn/algorithms/fixmatch/fixmatch.py:48-98, hooks/masking.py:47-57,
  hooks/pseudo_label.py:37-52; google-research/crest fixmatch.py:74-102). USB's FixMatch passes
  its T = 0.5 to a pseudo-label hook that ignores it for soft labels, so USB's FixMatch is
  temperature 1; here `temperature` always applies.
- align: Berthelot et al. 2020, "ReMixMatch" distribution alignment, in the form of Wei et al.
  2021, "CReST" (CReST+, paper 003): p~ = normalize(p * (target + 1e-6) / (p_model + 1e-6)),
  then the threshold rule on p~ (google-research/crest util/semisup.py:306-404).

Both label whole pools offline too (`label_pool`, used by `stage.label`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PoolLabels, PoolPredictions, PseudoLabels, StepContext
from ltframe.engine.dist import all_sum, world_size
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_ssl.common import normalize, state_device

EPS = 1e-6  # in numerator and denominator, as both references


@dataclass
class ThresholdParams:
    threshold: float = param(0.95, ge=0, le=1)  # keep max p >= threshold (0 keeps all)
    temperature: float = param(1.0, gt=0)  # p = softmax(logits / temperature)
    hard: bool = True  # targets: argmax (int64) or the probabilities (soft)
    part: str = "unlabeled"  # the view whose logits are labelled ("unlabeled" = first = weak)
    head: str = "main"


class Threshold:
    """FixMatch pseudo-labels: hard (or soft) targets where the confidence reaches `threshold`."""

    def __init__(self, params: ThresholdParams, num_classes: int) -> None:
        self.p = params
        self.num_classes = num_classes

    def probs(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head).detach().float()
        return torch.softmax(logits / self.p.temperature, dim=1)

    def select(self, probs: Tensor) -> PseudoLabels:
        conf, pred = probs.max(1)
        mask = (conf >= self.p.threshold).to(probs.dtype)
        return PseudoLabels(pred if self.p.hard else probs, mask)

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        return self.select(self.probs(ctx))

    def pool_probs(self, pool: PoolPredictions) -> Tensor:
        if self.p.temperature == 1.0:
            return pool.probs.float()
        logits = pool.logits if pool.logits is not None else pool.probs.clamp_min(1e-30).log()
        return torch.softmax(logits.float() / self.p.temperature, dim=1)

    def keep(self, probs: Tensor, index: Tensor) -> PoolLabels:
        """Rows with max p >= threshold; hard or soft targets, weight 1, confidence max p."""
        conf, pred = probs.max(1)
        rows = torch.nonzero(conf >= self.p.threshold).squeeze(1)
        targets = pred[rows] if self.p.hard else probs[rows]
        return PoolLabels(index=index[rows], targets=targets,
                          weight=torch.ones(rows.numel(), dtype=torch.float32),
                          confidence=conf[rows])

    def label_pool(self, pool: PoolPredictions) -> PoolLabels:
        return self.keep(self.pool_probs(pool), pool.index)


@dataclass
class AlignParams(ThresholdParams):
    # alignment strength: target = normalize(labeled_counts ^ t); CReST+'s `crest` scheduler
    # sets t per generation (t_g, 1 -> t_min); t = 0 aligns to the uniform distribution
    t: float = param(1.0, ge=0)
    # target distribution: 0 = the labeled class counts of the stage; > 0 = the analytic
    # long-tail profile N_c / N_0 = ratio^(-r(c) / (C - 1)) (r(c): rank of class c by labeled
    # count, head first), as the CReST code's gt_p_data
    ratio: float = param(0.0, ge=0)
    p_model: Literal["window", "ema"] = "window"  # how the model's class marginal is estimated
    window: int = param(128, ge=1, le=2**20)  # window: number of batch means kept (CReST: 128)
    momentum: float = param(0.999, ge=0, lt=1)  # ema: p_model <- m p_model + (1 - m) mean p


def align_target(class_counts: Tensor, t: float, ratio: float = 0.0) -> Tensor:
    """normalize(n_c ^ t) with n_c the labeled counts, or the analytic profile (ratio > 0);
    float32 [C] on the CPU."""
    counts = class_counts.detach().double().cpu()
    if ratio > 0:
        c = counts.numel()
        order = torch.sort(counts, descending=True, stable=True).indices
        rank = torch.empty(c, dtype=torch.float64)
        rank[order] = torch.arange(c, dtype=torch.float64)
        counts = ratio ** (-rank / max(c - 1, 1))
    return normalize(counts.pow(t)).float()


def align(probs: Tensor, target: Tensor, p_model: Tensor) -> Tensor:
    """p~ = normalize(p * (target + 1e-6) / (p_model + 1e-6)) per row."""
    return normalize(probs * (target + EPS) / (p_model + EPS), dim=1)


class Align(Threshold):
    """Distribution alignment (CReST+), then FixMatch thresholding of the aligned p~.

    target = normalize(labeled_counts ^ t) (class counts of the stage, or the `ratio` profile).
    p_model, the model's running class marginal on the weak view (raw, unaligned p):

    - "window" (google-research/crest util/util.py:132-150, fixmatch.py:146): the mean of the
      last `window` batch means, in a buffer initialised to uniform rows; it is updated after it
      is used, so a batch is not aligned with its own mean.
    - "ema" (USB semilearn/algorithms/hooks/dist_align.py DistAlignEMAHook, as CReST+ in USB's
      imb_algorithms/crest uses it): p_model = m p_model + (1 - m) batch mean, initialised to
      the first batch's mean (not uniform) and updated before it is used (the current batch is
      included).

    The estimate is state (`state_dict`), so a resumed stage continues bit for bit; a new
    stage (e.g. a CReST generation) builds a new labeler and starts afresh, as the CReST code
    resets it per generation (USB's CReST+ keeps its EMA across generations). Offline
    (`label_pool`) the pool is aligned with the current p_model (a labeler built for
    `stage.label` is new: uniform for "window"; the pool's mean
    prediction for "ema", as a first batch would give), then thresholded.

    The target comes from the original labeled split's counts (`labeled_counts`; USB's CReST+),
    never from pseudo-labels, also in generations that train on "labeled+pseudo+..."; `ratio`
    uses the analytic profile instead, as the CReST code does.
    """

    def __init__(self, params: AlignParams, num_classes: int, class_counts: Tensor,
                 labeled_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(params, num_classes)
        self.p: AlignParams = params
        counts = labeled_counts if labeled_counts is not None else class_counts
        # the state lives on the run's device from the start: no copy in any step
        dev = state_device(device, counts)
        self.target = align_target(counts, params.t, params.ratio).to(dev)
        self.buffer = torch.full((params.window, num_classes), 1.0 / num_classes, device=dev)
        self.count = 0  # window: batch means written so far (ring position = count % window)
        self.ema: Tensor | None = None

    def _on(self, device: torch.device) -> None:
        """Fallback for a labeler built on another device than its batches: moved once."""
        if self.target.device != device:
            self.target = self.target.to(device)
            self.buffer = self.buffer.to(device)
            if self.ema is not None:
                self.ema = self.ema.to(device)

    def p_model_estimate(self) -> Tensor | None:
        """The current estimate (None: "ema" before its first batch)."""
        if self.p.p_model == "ema":
            return self.ema
        return normalize(self.buffer.mean(0))

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        probs = self.probs(ctx)
        self._on(probs.device)
        # the global batch's mean under torchrun (the same estimate on every rank)
        batch_mean = all_sum(probs.sum(0)) / (probs.shape[0] * world_size())
        if self.p.p_model == "ema":
            self.ema = (batch_mean.clone() if self.ema is None
                        else self.ema * self.p.momentum + batch_mean * (1.0 - self.p.momentum))
            return self.select(align(probs, self.target, self.ema))
        aligned = align(probs, self.target, normalize(self.buffer.mean(0)))
        self.buffer[self.count % self.p.window] = batch_mean  # after use (CReST)
        self.count += 1
        return self.select(aligned)

    def label_pool(self, pool: PoolPredictions) -> PoolLabels:
        probs = self.pool_probs(pool)
        p_model = self.p_model_estimate()
        p_model = probs.mean(0) if p_model is None else p_model.to(probs.device)
        return self.keep(align(probs, self.target.to(probs.device), p_model), pool.index)

    def state_dict(self) -> dict[str, Tensor]:
        c = self.num_classes
        return {"buffer": self.buffer.clone(), "count": torch.tensor(self.count, dtype=torch.long),
                "ema": self.ema if self.ema is not None else torch.zeros(0, c),
                "ema_ready": torch.tensor(self.ema is not None)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.target.device
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise LtframeError(f"pseudo_labeler 'align': the saved p_model window has shape "
                               f"{tuple(state['buffer'].shape)}, this recipe "
                               f"{tuple(self.buffer.shape)}; keep `window` when resuming")
        self.buffer = state["buffer"].to(device=device, dtype=torch.float32).clone()
        self.count = int(state["count"])
        self.ema = (state["ema"].to(device=device, dtype=torch.float32).clone()
                    if bool(state["ema_ready"]) else None)


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "threshold", Threshold, ThresholdParams)
    registry.register("pseudo_labeler", "align", Align, AlignParams)
