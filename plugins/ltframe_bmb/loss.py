"""Loss `bmb`: the auxiliary branch of BMB (paper 002 Sec. 4, Eq. for L^aux; shared/METHODS.md
"BMB (paper 002; formulas from the first author's code)").

The base branch is the recipe's FixMatch (`ce` + `fixmatch` on the base head). This component
adds, on the auxiliary head `head` (a second linear head on the same features):

    L^aux = L_L^aux + lambda_u L_U^aux + lambda_mem L_mem      (unlabeled terms after `warmup`)

- L_L^aux: CE of the labeled batch, each sample weighted w_y = (N_min / N_y)^p with the labeled
  counts of the stage (adaptive weighting, Sec. 4.3);
- L_U^aux: FixMatch on the auxiliary head — hard pseudo-label argmax of softmax(aux(weak view)),
  kept when its confidence >= threshold; masked CE of the strong view, weighted by
  w = (N^_min / N^_c)^p with N^ the estimated unlabeled class distribution;
- N^: accumulated counts of the kept auxiliary pseudo-labels (`estimate = "pseudo"`; the labeled
  counts until the first is kept) or the labeled counts (`estimate = "labeled"`);
- memory (`BalancedMemory`): the detached strong-view features of the kept samples are
  enqueued with their pseudo-labels (admission (min_k n_k / n_c)^beta_in, overflow removed by
  1 - p_in); `get` draws m items by (1 / N^_c)^beta_get and L_mem = CE(aux(features), labels).

Predict with the auxiliary head of the EMA model (`model.eval_head = "aux"`, `stage.ema`).
The memory and N^ are checkpointed; random draws are a function of (seed, step), so a resumed
run is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.engine.dist import gather_batch
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_bmb.memory import BalancedMemory


@dataclass
class BmbParams:
    head: str = "aux"  # the auxiliary head (predictions)
    weak: str = param("unlabeled", ref="part")  # the view the auxiliary pseudo-labels come from
    strong: str = param("unlabeled:strong", ref="part")  # trained towards them, stored in the memory
    threshold: float = param(0.95, ge=0, le=1)
    size: int = param(256, ge=1, le=2**20)  # S
    get: int = param(128, ge=1, le=2**20)  # m items drawn per step
    beta_in: float = param(1.0, ge=0)
    beta_get: float = param(1.0, ge=0)
    power: float = param(1.5, ge=0)  # p of the adaptive weights
    lambda_u: float = param(1.0, ge=0)
    lambda_mem: float = param(1.0, ge=0)
    warmup: int = param(0, ge=0)  # steps before the unlabeled and memory terms start
    estimate: Literal["pseudo", "labeled"] = "pseudo"
    seed: int = param(0, ge=0)  # combined with the stage's seed and the step


def adaptive_weights(counts: Tensor, power: float) -> Tensor:
    """w_c = (N_min / N_c)^p over classes with N_c clamped to >= 1."""
    n = counts.float().clamp_min(1.0)
    return (n.min() / n).pow(power)


class BmbLoss:
    """The auxiliary branch of BMB; see the module docstring."""

    def __init__(self, params: BmbParams, num_classes: int, class_counts: Tensor,
                 seed: int = 0, device: torch.device | str | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        # all state on the run's device from the start (`device`; without it, that of
        # `class_counts`, which the engine puts there): nothing is copied in a step
        dev = torch.device(device) if device is not None else class_counts.device
        self.labeled_counts = class_counts.float().to(dev)
        self.device = self.labeled_counts.device  # with its index ("cuda" -> "cuda:0")
        self.seed = seed * 1_000_003 + params.seed
        self.memory: BalancedMemory | None = None  # built at the first step (feature width)
        # accumulated kept pseudo-labels per class
        self.estimate = torch.zeros(num_classes, device=self.device)
        self._generator: torch.Generator | None = None

    def _gen(self, step: int) -> torch.Generator:
        """The step's generator, on the state's device, seeded with (seed, step)."""
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
        return self._generator.manual_seed(self.seed * 7_919 + step)

    def _to(self, device: torch.device) -> None:
        """Fallback for a loss built on another device than its batches: moved once."""
        self.device, self._generator = device, None
        self.labeled_counts = self.labeled_counts.to(device)
        self.estimate = self.estimate.to(device)
        if self.memory is not None:
            self.memory.to(device)

    def class_estimate(self) -> Tensor:
        """N^: accumulated pseudo-label counts, or the labeled counts (none kept yet / `labeled`)."""
        lab = self.labeled_counts
        if self.p.estimate == "labeled":
            return lab
        return torch.where(self.estimate.sum() > 0, self.estimate, lab)

    def __call__(self, ctx: StepContext) -> Tensor:
        p = self.p
        lab_logits = ctx.logits("labeled", p.head).float()
        dev = lab_logits.device
        if ctx.targets is None:
            raise LtframeError("loss bmb needs a labeled batch: set the stage's data to "
                               "\"labeled+unlabeled\"")
        if dev != self.device:
            self._to(dev)
        w_lab = adaptive_weights(self.labeled_counts, p.power)[ctx.targets]
        loss = (w_lab * F.cross_entropy(lab_logits, ctx.targets, reduction="none")).mean()
        if ctx.step < p.warmup:
            return loss
        probs = ctx.logits(p.weak, p.head).detach().float().softmax(1)
        conf, pl = probs.max(1)
        kept = conf >= p.threshold
        # the estimate and the memory see the global batch (identical on every rank)
        g_pl, g_kept = gather_batch(pl), gather_batch(kept)
        self.estimate.index_add_(0, g_pl, g_kept.float())
        est = self.class_estimate()
        w_u = adaptive_weights(est, p.power)[pl] * kept.float()
        strong = ctx.logits(p.strong, p.head).float()
        loss = loss + p.lambda_u * (w_u * F.cross_entropy(strong, pl, reduction="none")).mean()
        feats = gather_batch(ctx.features(p.strong).detach().float())
        if self.memory is None:  # allocated on the device (no copy)
            self.memory = BalancedMemory(p.size, feats.shape[1], self.num_classes, dev)
        gen = self._gen(ctx.step)
        self.memory.enqueue(feats, g_pl, g_kept, p.beta_in, gen)
        m_feats, m_labels, m_valid = self.memory.get(p.get, est, p.beta_get, gen)
        m_logits = ctx.model.heads[p.head](m_feats).float()  # the auxiliary head, with grad
        per = F.cross_entropy(m_logits, m_labels.clamp_min(0), reduction="none")
        l_mem = (per * m_valid.float()).sum() / m_valid.float().sum().clamp_min(1.0)
        return loss + p.lambda_mem * l_mem

    def state_dict(self) -> dict[str, Tensor]:
        out = {"estimate": self.estimate.clone()}
        if self.memory is not None:
            out.update({f"memory.{k}": v for k, v in self.memory.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.estimate = state["estimate"].to(self.device, torch.float32).clone()
        if "memory.feats" in state:
            feats = state["memory.feats"]
            self.memory = BalancedMemory(self.p.size, feats.shape[1], self.num_classes,
                                         self.device)
            self.memory.load_state_dict({"feats": feats, "labels": state["memory.labels"]})


def register(registry: Registry) -> None:
    registry.register("loss", "bmb", BmbLoss, BmbParams)
