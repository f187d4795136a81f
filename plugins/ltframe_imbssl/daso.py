"""DASO (Oh, Kim & Kweon, CVPR 2022, "DASO: Distribution-Aware Semantics-Oriented Pseudo-label
for Imbalanced Semi-Supervised Learning"), following the authors' ytaek-oh/daso
lib/models/daso_model.py (forward_train), lib/models/feature_queue.py (bal_queue),
lib/algorithm/daso.py (PRETRAIN_STEPS, PL_DIST_UPDATE_PERIOD) and lib/utils/dist_logger.py.

- pseudo_labeler `daso`: a balanced queue of the last `queue_size` EMA-model features of the
  labeled samples of each class (enqueued every step before the labels are made; the teacher
  runs with batch statistics: stage.teacher_bn = "batch", the code's EMA model in train mode),
  prototypes m_c = queue means, semantic pseudo-label q = softmax(cos(f_weak, m) / t_proto).
  From step `warmup` on (the code's PRETRAIN_STEPS) the linear p = softmax(z_weak) is blended:
  v = normalise(pi^(1 / t_dist)) / max, pi the distribution of the final pseudo-labels (argmax,
  confident or not) over the last `period` steps (refreshed every `period` steps), and for a
  sample with linear label k, p^ = (1 - v_k) p + v_k q (`dist_aware = false`: v_k = interp_alpha).
  Label argmax p^, mask [max p^ >= threshold].
- loss `daso`: DASO's unlabeled terms, replacing `fixmatch`: mean_j mask_j CE(z_strong_j, label_j)
  + psa_weight * mean_j (-sum_c q_jc log softmax(cos(f_strong_j, m) / t_proto)_c) (the semantic
  alignment loss, from step `warmup` on).

`blend = "usb"` is USB's behaviour (semilearn/imb_algorithms/daso): the semantic label of the
*previous* batch is blended (its probs_sim is computed after the pseudo-label hook) and the mask
comes from the unblended p; USB also uses warmup 5120 and t_dist 1.5 on every CIFAR-10 run.
One step differs even then: USB starts its semantic-alignment loss one step before the
blending (at num_pretrain_iter - 1); here both start at `warmup` (tests/test_usb_peer.py).

State (the labeler's; checkpointed): the queue (bank, fill, ring positions), pi, the open
window's counts and, for "usb", the previous batch's q. The queue takes the global labeled
batch (`dist.gather_batch`) and the window counts the global batch's labels (`dist.all_sum`), so
every rank holds the same state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PseudoLabels, StepContext
from ltframe.engine.dist import all_sum, gather_batch, world_size
from ltframe.engine.dist import info as dist_info
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_imbssl.prior import load_like, require_unlabeled, unlabeled_parts

KEY = "daso"  # ctx.extras: {"q": semantic labels, "prototypes": m, "active": bool}


class ClassQueue:
    """Per class, the last `size` feature vectors (a ring per class; vectorised enqueue, no host
    sync): the balanced queue of DASO's FeatureQueue(bal_queue=True)."""

    def __init__(self, num_classes: int, size: int, dim: int, device: torch.device) -> None:
        self.size, self.num_classes = size, num_classes
        self.bank = torch.zeros(num_classes, size + 1, dim, device=device)  # slot `size`: discard
        self.filled = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.ptr = torch.zeros(num_classes, dtype=torch.long, device=device)

    def enqueue(self, feats: Tensor, labels: Tensor) -> None:
        s, c = self.size, self.num_classes
        onehot = F.one_hot(labels, c)
        rank = (onehot.cumsum(0) - 1).gather(1, labels[:, None]).squeeze(1)  # order in its class
        n = onehot.sum(0)
        keep = rank >= n[labels] - s  # only a class's last `size` new items survive
        pos = torch.where(keep, (self.ptr[labels] + rank) % s, torch.full_like(rank, s))
        flat = self.bank.view(-1, self.bank.shape[-1])
        flat.index_copy_(0, labels * (s + 1) + pos, feats.to(flat.dtype))
        self.ptr = (self.ptr + n) % s
        self.filled = (self.filled + n).clamp_max(s)

    def prototypes(self) -> Tensor:
        """Queue means [C, D]; zero for a class with an empty queue (the code's initial value)."""
        return self.bank[:, :self.size].sum(1) / self.filled.clamp_min(1)[:, None].float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"bank": self.bank.clone(), "filled": self.filled.clone(), "ptr": self.ptr.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.bank = state["bank"].to(self.bank.device, torch.float32).clone()
        self.filled = state["filled"].to(self.filled.device).clone()
        self.ptr = state["ptr"].to(self.ptr.device).clone()


def cosine_logits(feats: Tensor, protos: Tensor, t: float) -> Tensor:
    """cos(f_i, m_c) / t, with nn.CosineSimilarity's eps: 0 against a zero prototype."""
    dot = feats @ protos.t()
    norms = feats.norm(dim=1, keepdim=True) * protos.norm(dim=1)[None]
    return dot / norms.clamp_min(1e-8) / t


def blend_weights(pl_dist: Tensor, t_dist: float) -> Tensor:
    """v = normalise(pi^(1 / t_dist)) / max (0 everywhere while pi is still empty)."""
    v = pl_dist.float().pow(1.0 / t_dist)
    v = v / v.sum().clamp_min(1e-30)
    return v / v.max().clamp_min(1e-30)


@dataclass
class DasoParams:
    head: str = "main"
    threshold: float = param(0.95, ge=0, le=1)
    t_proto: float = param(0.05, gt=0, le=100)  # PROTO_TEMP
    t_dist: float = param(1.5, gt=0, le=100)  # DIST_TEMP: 1.5 C10 gamma_l = gamma_u, else 0.3
    dist_aware: bool = True  # WITH_DIST_AWARE; false: v = interp_alpha
    interp_alpha: float = param(0.5, ge=0, le=1)
    warmup: int = param(5000, ge=0, le=2**40)  # PRETRAIN_STEPS (USB: 5120)
    period: int = param(100, ge=1, le=2**31)  # PL_DIST_UPDATE_PERIOD
    queue_size: int = param(256, ge=1, le=2**20)  # QUEUE.MAX_SIZE per class
    blend: Literal["current", "usb"] = "current"


class DasoLabeler:
    """DASO's blended pseudo-labels; see the module docstring."""

    def __init__(self, params: DasoParams, num_classes: int,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.queue: ClassQueue | None = None  # built at the first step (feature width)
        self.pl_dist = torch.zeros(num_classes, device=self.device)
        self.window = torch.zeros(num_classes, device=self.device)
        self.prev_q: Tensor | None = None

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "pseudo_labeler 'daso'")
        cfg = info.plan.cfg
        if cfg.teacher == "ema" and cfg.ema <= 0:
            raise LtframeError("pseudo_labeler 'daso' queues EMA-model features: set stage.ema > 0 "
                               "(0.999) and stage.teacher_bn = \"batch\"")

    def _to(self, device: torch.device) -> None:
        self.device = device
        self.pl_dist, self.window = self.pl_dist.to(device), self.window.to(device)
        if self.prev_q is not None:
            self.prev_q = self.prev_q.to(device)

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        p = self.p
        if ctx.targets is None:
            raise LtframeError("pseudo_labeler 'daso' queues labeled features: set the stage's "
                               "data to \"labeled+unlabeled\"")
        weak_part = unlabeled_parts(ctx, "pseudo_labeler 'daso'")[0]
        logits = ctx.logits(weak_part, p.head).detach().float()
        if logits.device != self.device:
            self._to(logits.device)
        lab_feats = ctx.teacher_features("labeled").detach().float()
        if self.queue is None:
            self.queue = ClassQueue(self.num_classes, p.queue_size, lab_feats.shape[1], self.device)
        self.queue.enqueue(gather_batch(lab_feats), gather_batch(ctx.targets))
        protos = self.queue.prototypes()
        q = torch.softmax(cosine_logits(ctx.features(weak_part).detach().float(), protos,
                                        p.t_proto), 1)
        probs = torch.softmax(logits, 1)
        active = ctx.step >= p.warmup
        if active:
            pred = probs.argmax(1)
            if p.dist_aware:
                v = blend_weights(self.pl_dist, p.t_dist)[pred][:, None]
            else:
                v = torch.full_like(probs[:, :1], p.interp_alpha)
            sem = q
            if p.blend == "usb":  # the previous batch's semantic labels (USB's order of calls)
                prev = self.prev_q  # the global batch's: this rank's rows
                w = world_size()
                prev = prev if prev is None or w == 1 else prev[dist_info().rank::w]
                sem = prev if prev is not None and prev.shape == q.shape else q
            blended = (1.0 - v) * probs + v * sem
        else:
            blended = probs
        conf, label = blended.max(1)
        if p.blend == "usb":
            conf = probs.max(1).values  # USB masks with the unblended probabilities
            self.prev_q = gather_batch(q)  # the same state on every rank
        mask = (conf >= p.threshold).float()
        counts = torch.zeros_like(self.window).index_add_(0, label, torch.ones_like(conf))
        self.window = self.window + all_sum(counts)  # the global batch's (the same on every rank)
        if (ctx.step + 1) % p.period == 0:
            self.pl_dist = self.window
            self.window = torch.zeros_like(self.window)
        ctx.extras[KEY] = {"q": q, "prototypes": protos, "active": active}
        return PseudoLabels(label, mask)

    def state_dict(self) -> dict[str, Tensor]:
        out = {"pl_dist": self.pl_dist.clone(), "window": self.window.clone()}
        if self.queue is not None:
            out.update({f"queue.{k}": v for k, v in self.queue.state_dict().items()})
        if self.prev_q is not None:
            out["prev_q"] = self.prev_q.clone()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        who = "pseudo_labeler 'daso'"
        self.pl_dist = load_like(state, "pl_dist", self.pl_dist, who)
        self.window = load_like(state, "window", self.window, who)
        if "queue.bank" in state:
            bank = state["queue.bank"]
            if tuple(bank.shape[:2]) != (self.num_classes, self.p.queue_size + 1):
                raise LtframeError(f"{who}: the saved queue has shape {tuple(bank.shape)}; keep "
                                   "queue_size when resuming")
            self.queue = ClassQueue(self.num_classes, self.p.queue_size, bank.shape[2], self.device)
            self.queue.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("queue.")})
        self.prev_q = state["prev_q"].to(self.device).clone() if "prev_q" in state else None


@dataclass
class DasoLossParams:
    head: str = "main"
    part: str = ""  # the strong view ("" = the second unlabeled view)
    psa_weight: float = param(1.0, ge=0, le=1e6)  # PSA_LOSS_WEIGHT
    t_proto: float = param(0.05, gt=0, le=100)  # as the labeler's


class DasoLoss:
    """DASO's unlabeled terms: CE towards the blended labels + semantic alignment."""

    def __init__(self, params: DasoLossParams) -> None:
        self.p = params

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "loss 'daso'")
        labeler = info.plan.cfg.pseudo_labeler
        if labeler is None or labeler.name != "daso":
            raise LtframeError("loss 'daso' trains on DASO's pseudo-labels and prototypes: set the "
                               "stage's pseudo_labeler = \"daso\"")

    def __call__(self, ctx: StepContext) -> Tensor:
        p = self.p
        if ctx.pseudo is None:
            raise LtframeError("loss 'daso' needs pseudo-labels: set the stage's pseudo_labeler = "
                               "\"daso\"")
        parts = unlabeled_parts(ctx, "loss 'daso'")
        part = p.part or (parts[1] if len(parts) > 1 else "")
        if not part:
            raise LtframeError("loss 'daso' needs a strong unlabeled view; set "
                               "stage.views.unlabeled = [\"weak\", \"strong\"]")
        logits = ctx.logits(part, p.head).float()
        loss = (F.cross_entropy(logits, ctx.pseudo.targets, reduction="none")
                * ctx.pseudo.mask).mean()
        extra = ctx.extras.get(KEY)
        if extra is not None and extra["active"] and p.psa_weight > 0:
            sim = cosine_logits(ctx.features(part).float(), extra["prototypes"], p.t_proto)
            loss = loss + p.psa_weight * (-(extra["q"] * F.log_softmax(sim, 1)).sum(1)).mean()
        return loss


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "daso", DasoLabeler, DasoParams)
    registry.register("loss", "daso", DasoLoss, DasoLossParams)
