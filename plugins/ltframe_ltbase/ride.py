"""RIDE (Wang et al., ICLR 2021, "Long-tailed Recognition by Routing Diverse
Distribution-Aware Experts"), from frank-xwang/RIDE-LongTailRecognition (model/loss.py RIDELoss,
model/ldam_drw_resnets/ride_resnet_cifar.py, configs/config_imbalance_cifar100_ride.json).

- backbone `resnet32_experts` (ltframe_ltbase.backbones): shared stem + layer1, K experts of
  layer2 + layer3; features [f_1 ; ... ; f_K].
- head `experts`: one classifier per expert on its chunk of the features, cosine
  (NormedLinear, s = 30; `cosine = false`: linear, s = 1); the head's output (evaluation, other
  losses) is the experts' mean z_bar, as the model's final_out; `expert_logits(feats)` gives
  every expert's logits [K, B, C]. Under `ride`, any other head counts as a single expert.
- loss `ride`: sum over experts k of
    base_factor LDAM(z_k) (margin m_c ~ n_c^(-1/4), max 0.5, subtracted as s m_y from the
    s-scaled true logit; CB weights, beta 0.9999, from stage epoch `drw_epoch` = 160 on)
  + lambda T_mean^2 KL(softmax(z_bar / T) || softmax(z_k / T)) (batchmean, z_bar without
    gradient), lambda = `diversity_factor` (-0.2 the code default, -0.45 the CIFAR-100 config:
    negative, so the experts are pushed apart). From `drw_epoch` on, T is per class,
    T_c = base_T w_c with w_c = C pi_c 0.05 + 0.95 normalised by its max, T_mean = mean_c T_c.
  With lambda = 0 the LDAM term uses z_bar (as the reference).
Not done: the optional expert-assignment routing stage (EA) and RIDE + distillation.
Differences: T_mean stays on the device (the reference's .item() is a host sync); a class
without samples counts as one for its margin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.errors import RecipeError
from ltframe.registry import Registry
from ltframe_classics.losses import cb_weights
from ltframe_ltbase.branches import MAX_BRANCHES


@dataclass
class ExpertsParams:
    num_experts: int = param(1, ge=1, le=MAX_BRANCHES)  # = backbone_args.num_experts (RIDE: 3)
    cosine: bool = True  # NormedLinear per expert (RIDE's use_norm); false: nn.Linear, s = 1
    scale: float = param(30.0, gt=0, le=1e4)  # s of the cosine logits


class ExpertsHead(nn.Module):
    """K per-expert classifiers over K chunks of the features; output: their mean."""

    def __init__(self, p: ExpertsParams, in_features: int, num_classes: int) -> None:
        super().__init__()
        if in_features % p.num_experts:
            raise RecipeError(f"head experts: num_experts = {p.num_experts} must divide the "
                              f"{in_features} backbone features (set it to the backbone's "
                              "backbone_args.num_experts)")
        self.k = p.num_experts
        self.cosine = p.cosine
        self.scale = p.scale if p.cosine else 1.0
        d = in_features // p.num_experts
        if p.cosine:
            self.weight = nn.Parameter(torch.empty(p.num_experts, d, num_classes))
        else:
            self.linears = nn.ModuleList([nn.Linear(d, num_classes) for _ in range(p.num_experts)])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.cosine:  # NormedLinear's initialisation, per expert
                for w in self.weight:
                    w.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)
            else:  # ride_resnet_cifar's _weights_init: Kaiming-normal linear weights
                for lin in self.linears:
                    nn.init.kaiming_normal_(lin.weight)
                    lin.bias.zero_()

    def expert_logits(self, feats: Tensor) -> Tensor:
        """[K, B, C]: every expert's (scaled) logits."""
        chunks = feats.reshape(feats.shape[0], self.k, -1).transpose(0, 1)  # [K, B, d]
        if self.cosine:
            w = F.normalize(self.weight, dim=1).to(feats.dtype)
            return self.scale * torch.bmm(F.normalize(chunks, dim=2), w)
        return torch.stack([lin(c) for lin, c in zip(self.linears, chunks, strict=True)])

    def forward(self, feats: Tensor) -> Tensor:
        return self.expert_logits(feats).mean(0)


@dataclass
class RideParams:
    head: str = param("main", ref="head")  # an `experts` head
    part: str = param("labeled", ref="part")
    max_margin: float = param(0.5, ge=0, le=100)  # LDAM max margin
    scale: float = param(30.0, gt=0, le=1e4)  # s the margin is multiplied by (the head's s)
    drw_epoch: int = param(160, ge=0)  # 0-based stage epoch from which CB weights and per-class T apply
    reweight: bool = True  # false: no CB weights and a constant temperature
    beta: float = param(0.9999, ge=0, lt=1)
    diversity_factor: float = param(-0.2, ge=-100, le=100)  # lambda (CIFAR-100 config -0.45)
    temperature: float = param(1.0, gt=0, le=1e3)  # base diversity temperature
    reweight_factor: float = param(0.05, ge=0, lt=1)  # T_c ~ C pi_c f + 1 - f
    base_factor: float = param(1.0, ge=0, le=1e3)  # weight of each expert's LDAM term


class RideLoss:
    """Per-expert LDAM-DRW + diversity KL to the (detached) expert mean (RIDELoss)."""

    def __init__(self, params: RideParams, num_classes: int, class_counts: Tensor) -> None:
        self.p = params
        n = class_counts.double().clamp_min(1)
        m = n.pow(-0.25)
        self.margins = (m * (params.max_margin / m.max())).float()
        self.cb = cb_weights(class_counts, params.beta)
        prior = n / n.sum()
        w = num_classes * prior * params.reweight_factor + 1 - params.reweight_factor
        self.temp_weights = (w / w.max()).float()

    def preflight(self, info: object) -> None:
        """Before the run: an `experts` head has as many experts as the backbone."""
        model = getattr(info, "model", None)
        heads = getattr(model, "heads", None)
        head = heads[self.p.head] if heads is not None and self.p.head in heads else None
        branches = getattr(getattr(model, "backbone", None), "num_branches", None)
        k = getattr(head, "k", None)
        if k is not None and branches is not None and k != branches:
            raise RecipeError(f"loss ride: head '{self.p.head}' has num_experts = {k} but the "
                              f"backbone has {branches}; set them equal")

    def expert_logits(self, ctx: StepContext, mean: Tensor) -> Tensor:
        """[K, B, C] from an `experts` head; any other head is one expert (z_k = z_bar)."""
        heads = getattr(ctx.model, "heads", None)
        head = heads[self.p.head] if heads is not None and self.p.head in heads else None
        if head is None or not hasattr(head, "expert_logits"):
            return mean[None]
        return head.expert_logits(ctx.features(self.p.part)).float()

    def __call__(self, ctx: StepContext) -> Tensor:
        y = ctx.targets
        mean = ctx.logits(self.p.part, self.p.head).float()  # z_bar, the head's output
        experts = self.expert_logits(ctx, mean)  # [K, B, C]
        dev = mean.device
        late = self.p.reweight and ctx.epoch >= self.p.drw_epoch
        weight = self.cb.to(dev) if late else None
        temp: Tensor | float = self.p.temperature  # a host number: no copy to the device
        t_mean: Tensor | float = temp
        if late:
            temp = self.p.temperature * self.temp_weights.to(dev)[None, :]
            t_mean = temp.mean()
        margin = self.p.scale * self.margins.to(dev)[y]
        onehot = F.one_hot(y, mean.shape[1]).to(mean.dtype)
        with torch.no_grad():
            target = F.softmax(mean / temp, dim=1)
        loss = mean.new_zeros(())
        for z in experts:
            base = mean if self.p.diversity_factor == 0 else z
            loss = loss + self.p.base_factor * F.cross_entropy(base - onehot * margin[:, None], y,
                                                               weight=weight)
            kl = F.kl_div(F.log_softmax(z / temp, dim=1), target, reduction="batchmean")
            loss = loss + self.p.diversity_factor * t_mean * t_mean * kl
        return loss


def register(registry: Registry) -> None:
    registry.register("head", "experts", ExpertsHead, ExpertsParams)
    registry.register("loss", "ride", RideLoss, RideParams)
