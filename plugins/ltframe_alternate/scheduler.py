"""Stage scheduler `alternate`: alternate sampling (paper 000, Sec. 3 "Alternate Sampling",
Fig. 2; training details Sec. 4.4; shared/METHODS.md "Alternate sampling (paper 000)").

Stages (a pure function of the history length):

- "init": the recipe's [[stage]] as given: instance-sampled CE training of the backbone f and
  the random-sampling classifier g' (`heads.<g_prime>`) (paper: 200 epochs, lr 0.1 cosine).
- "cls0": a new classifier g (`heads.<g>`, reset) on frozen features with the class-balanced
  sampler on the labeled data D; then the whole unlabeled pool gets hard argmax pseudo-labels
  from f and g (`label = threshold(threshold = 0)`, `label_head = g`): loop 1's step (1).
- per loop l = 1..L:
  "ft<l>": fine-tune f and g' on D + pseudo-labelled U (`data = "labeled+pseudo"`), random
  sampling, loss = CE(g') + lambda * consistency(g') (the per-sample memory is a new `consistency`
  loss per stage: uniform at each loop's start, as METHODS.md says);
  "cls<l>": update g class-balanced on D with f frozen (from the current g, as the paper's
  "we update the class-balanced classifier"; `classifier_reset = true` starts a new g); relabel
  the pool with f and g unless it is the last loop.
Predictions and pool labels come from g; the "ft" stages' evaluations use g' (g is stale
while f moves), every "cls" stage and the final number use g.

Ablations of paper 000 Table 3 by recipe values: `finetune_sampler` / `classifier_sampler`
(R+R: "random"/"random"; C+R; C+C: "class_balanced" for both) and `classifier_data =
"labeled+pseudo"` (the classifier trained on D plus pseudo-labelled U; "cls0" always uses D,
since no pool labelling exists before it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ltframe.config import ComponentSpec, param
from ltframe.engine.stages import StagePlan
from ltframe.errors import RecipeError
from ltframe.recipe import OptimCfg, StageCfg
from ltframe.registry import Registry


@dataclass
class AlternateParams:
    loops: int = param(5, ge=0, le=1000)  # L
    g: str = param("g", ref="head")  # the class-balanced classifier (predictions, pseudo-labels)
    g_prime: str = param("g_prime", ref="head")  # the random-sampling classifier (fine-tuned with f)
    classifier_epochs: int = param(10, ge=1)  # "cls" stages (paper: 10)
    finetune_epochs: int = param(40, ge=1)  # "ft" stages (paper: 40)
    # sampler names or tables (e.g. {name = "class_balanced", weighting = "effective_number"})
    classifier_sampler: str | dict[str, Any] = "class_balanced"
    finetune_sampler: str | dict[str, Any] = "random"
    classifier_data: Literal["labeled", "labeled+pseudo"] = "labeled"  # loops' "cls" stages
    consistency_weight: float = param(1.0, ge=0)  # lambda (paper: 1)
    consistency_form: Literal["ce", "kl"] = "kl"  # paper 000 eq. (3): KL
    classifier_lr: float = param(0.0, ge=0)  # 0 = the init stage's lr
    finetune_lr: float = param(0.0, ge=0)  # 0 = the init stage's lr
    frozen_bn: Literal["frozen", "update"] = "frozen"  # f's BatchNorm in the "cls" stages
    # loops' "cls" stages: False = continue from the current g (paper Sec. 3.4 Stage 3 "we
    # update the class-balanced classifier g"), True = a new g each loop (cRT-style); "cls0"
    # always starts a new g
    classifier_reset: bool = False


class Alternate:
    """init, cls0, then L x (ft<l>, cls<l>); see the module docstring."""

    def __init__(self, params: AlternateParams, stages: list[tuple[StageCfg, OptimCfg]],
                 registry: Registry) -> None:
        self.p = p = params
        if len(stages) != 1:
            raise RecipeError(f"scheduler alternate derives every stage from the representation "
                              f"stage; the recipe has {len(stages)} [[stage]] tables: keep one")
        self.init, self.optim = stages[0]
        if p.g == p.g_prime:
            raise RecipeError(f"scheduler.g and scheduler.g_prime name the same head '{p.g}'; "
                              "alternate sampling needs two heads")
        reg = registry
        self.cls_sampler = reg.spec("sampler", p.classifier_sampler, "scheduler.classifier_sampler")
        self.ft_sampler = reg.spec("sampler", p.finetune_sampler, "scheduler.finetune_sampler")
        self.cls_loss = [reg.spec("loss", {"name": "ce", "head": p.g}, "scheduler")]
        self.ft_loss = [
            reg.spec("loss", {"name": "ce", "head": p.g_prime}, "scheduler"),
            reg.spec("loss", {"name": "consistency", "head": p.g_prime,
                              "form": p.consistency_form, "weight": p.consistency_weight},
                     "scheduler"),
        ]
        self.labeler = reg.spec("pseudo_labeler", {"name": "threshold", "threshold": 0.0,
                                                   "head": p.g}, "scheduler")
        cosine = reg.spec("lr_schedule", "cosine", "scheduler")
        self.cls_optim = self._optim(p.classifier_lr, cosine)
        self.ft_optim = self._optim(p.finetune_lr, cosine)

    def _optim(self, lr: float, schedule: ComponentSpec) -> OptimCfg:
        opt = self.optim.optimizer
        if lr > 0:
            opt = dataclasses.replace(opt, params=dataclasses.replace(opt.params, lr=lr))
        return OptimCfg(opt, schedule, self.optim.no_decay)

    def _derived(self, **changes: Any) -> StageCfg:
        base = dict(steps=0, ema=0.0, fit=[], label=None, pseudo_labeler=None, transform=None,
                    eval_head=self.p.g, label_head="", label_pool="unlabeled")
        return dataclasses.replace(self.init, **{**base, **changes})

    def classifier(self, loop: int) -> StageCfg:
        p, head = self.p, f"heads.{self.p.g}"
        relabel = loop < p.loops
        return self._derived(
            name=f"cls{loop}", epochs=p.classifier_epochs, sampler=self.cls_sampler,
            data="labeled" if loop == 0 else p.classifier_data, train=[head],
            reset=[head] if loop == 0 or p.classifier_reset else [],
            frozen_bn=p.frozen_bn, loss=list(self.cls_loss),
            label=self.labeler if relabel else None, label_head=p.g if relabel else "")

    def finetune(self, loop: int) -> StageCfg:
        p = self.p
        return self._derived(
            name=f"ft{loop}", epochs=p.finetune_epochs, sampler=self.ft_sampler,
            data="labeled+pseudo", train=["backbone", f"heads.{p.g_prime}"], reset=[],
            loss=list(self.ft_loss), eval_head=p.g_prime)

    def next_stage(self, history: list[dict]) -> StagePlan | None:
        h = len(history)
        if h == 0:
            cfg, optim = dataclasses.replace(self.init, name="init"), self.optim
        elif h == 1:
            cfg, optim = self.classifier(0), self.cls_optim
        elif h < 2 + 2 * self.p.loops:
            loop = h // 2
            if h % 2 == 0:
                cfg, optim = self.finetune(loop), self.ft_optim
            else:
                cfg, optim = self.classifier(loop), self.cls_optim
        else:
            return None
        loop = (h // 2) if h > 1 else 0
        return StagePlan(index=h, name=cfg.name, cfg=cfg, optim=optim, extras={"loop": loop})


def register(registry: Registry) -> None:
    def alternate(params: AlternateParams, stages: list[tuple[StageCfg, OptimCfg]]) -> Alternate:
        return Alternate(params, stages, registry)

    registry.register("scheduler", "alternate", alternate, AlternateParams)
