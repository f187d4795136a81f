"""The `decoupled` stage scheduler: representation learning, then classifier re-balancing on
the frozen backbone (Kang et al. 2020, facebookresearch/classifier-balancing).

Stage 1 is the recipe's first [[stage]]. Stage 2 is derived from it:
- crt: re-initialise the head, class-aware sampler (4 per class), cosine lr, `epochs` epochs;
- lws: train only the per-class scales of an `lws` head, class-aware sampler;
  in both, the frozen backbone runs in train mode (`frozen_bn = "update"`): its BatchNorm
  statistics are re-estimated on the class-balanced batches, as in classifier-balancing's
  run_networks.py (`fix` only turns off gradients; every network is put in train() each epoch);
- tau_norm: no training; tau searched on the val split (`tau_norm` head);
- ncm: no training; class means of the frozen features (an `ncm` head, used for evaluation).
A second [[stage]] in the recipe, if present, is used as is instead (full control).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ltframe.builtin.optim import CosineParams
from ltframe.config import ComponentSpec, param
from ltframe.engine.stages import StagePlan
from ltframe.recipe import OptimCfg, StageCfg
from ltframe.registry import Registry
from ltframe_classics.samplers import ClassAwareParams


@dataclass
class DecoupledParams:
    classifier: Literal["crt", "lws", "tau_norm", "ncm"] = "crt"
    epochs: int = param(10, ge=1)  # classifier stage (crt, lws)
    head: str = param("main", ref="head")  # the head re-balanced (ncm: the ncm head evaluated)
    per_class: int = param(4, ge=1, le=2**20)  # class-aware sampler
    lr: float = param(0.0, ge=0)  # classifier stage lr; 0 = the representation stage's lr
    frozen_bn: Literal["frozen", "update"] = "update"  # the frozen backbone's BatchNorm (crt, lws)


class Decoupled:
    """Representation stage, then a cRT / LWS / tau-norm / NCM classifier stage."""

    def __init__(self, params: DecoupledParams, stages: list[tuple[StageCfg, OptimCfg]]) -> None:
        self.p = params
        self.stages = stages

    def classifier_stage(self) -> tuple[StageCfg, OptimCfg]:
        if len(self.stages) > 1:
            return self.stages[1]
        p, (rep, optim) = self.p, self.stages[0]
        head = f"heads.{p.head}"
        sampler = ComponentSpec("sampler", "class_aware", ClassAwareParams(per_class=p.per_class))
        common: dict[str, Any] = dict(name=p.classifier, steps=0, ema=0.0, reset=[], fit=[])
        if p.classifier in ("crt", "lws"):
            common.update(epochs=p.epochs, sampler=sampler, data="labeled", frozen_bn=p.frozen_bn,
                          train=[head] if p.classifier == "crt" else [f"{head}.scale"],
                          reset=[head] if p.classifier == "crt" else [])
        else:
            common.update(epochs=0, train=[], fit=[head],
                          eval_head=p.head if p.classifier == "ncm" else rep.eval_head)
        opt_params = optim.optimizer.params
        if p.lr > 0:
            opt_params = dataclasses.replace(opt_params, lr=p.lr)
        new_optim = OptimCfg(dataclasses.replace(optim.optimizer, params=opt_params),
                             ComponentSpec("lr_schedule", "cosine", CosineParams()))
        return dataclasses.replace(rep, **common), new_optim

    def next_stage(self, history: list[dict]) -> StagePlan | None:
        if len(history) == 0:
            cfg, optim = self.stages[0]
        elif len(history) == 1:
            cfg, optim = self.classifier_stage()
        else:
            return None
        return StagePlan(index=len(history), name=cfg.name, cfg=cfg, optim=optim)


def register(registry: Registry) -> None:
    registry.register("scheduler", "decoupled", Decoupled, DecoupledParams)
