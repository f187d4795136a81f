"""Stage scheduler `crest`: CReST / CReST+ generations (paper 003 Alg. 1; google-research/crest).

Generation g runs the recipe's stage (a FixMatch stage: labeled + unlabeled, an online
pseudo-labeler, EMA). Every generation but the last ends with a whole-pool labelling by the EMA
model (`stage.label` = `crest_select`), which replaces the previous selection; generations g > 0
train on labeled + selected ("labeled+pseudo+...") and, by default, from re-initialised weights
(as the code re-creates the model, optimizer and EMA per generation). CReST+ (`progressive`):
the stage's `align` pseudo-labeler gets t_g = (1 - g/(G-1)) * 1 + (g/(G-1)) * t_min.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ltframe.config import ComponentSpec, param
from ltframe.engine.stages import StagePlan
from ltframe.errors import RecipeError
from ltframe.recipe import OptimCfg, StageCfg
from ltframe.registry import Registry
from ltframe_crest.select import CrestSelectParams


@dataclass
class CrestParams:
    generations: int = param(6, ge=1, le=1000)  # G (CReST+ 6, CReST 15 in the paper)
    alpha: float = param(3.0, gt=0)  # selection rate exponent 1/alpha (the code's --alpha)
    ratio: float = param(0.0, ge=0)  # selection rates: 0 = labeled counts; > 0 = this imbalance ratio
    progressive: bool = True  # set `t` of the stage's pseudo-labeler per generation (CReST+)
    t_min: float = param(0.5, gt=0, le=1)  # t of the last generation
    reinit: bool = True  # generations g > 0 start from re-initialised backbone and heads


def temperature(g: int, generations: int, t_min: float) -> float:
    """CReST+'s progressive alignment strength t_g (1 at g = 0, t_min at the last)."""
    if generations <= 1:
        return 1.0
    f = g / (generations - 1)
    return (1 - f) * 1.0 + f * t_min


class Crest:
    """G generations of the recipe's first stage with class-rebalanced pseudo-labelled data."""

    def __init__(self, params: CrestParams, stages: list[tuple[StageCfg, OptimCfg]]) -> None:
        self.p = params
        if len(stages) != 1:
            raise RecipeError(f"scheduler crest repeats one [[stage]] table per generation; the "
                              f"recipe has {len(stages)}: keep only the generation's stage")
        self.template, self.optim = stages[0]
        labeler = self.template.pseudo_labeler
        if params.progressive and labeler is not None and not hasattr(labeler.params, "t"):
            raise RecipeError(f"scheduler.progressive = true sets the alignment strength `t` of "
                              f"the stage's pseudo-labeler, but '{labeler.name}' has none; use "
                              "pseudo_labeler = \"align\" (CReST+) or progressive = false (CReST)")
        data = self.template.data
        if "unlabeled" not in data.split("+"):
            raise RecipeError(f"scheduler crest: stage[0].data = \"{data}\" has no unlabeled "
                              "part; CReST trains a semi-supervised stage, e.g. "
                              "data = \"labeled+unlabeled\"")

    def generation(self, g: int) -> StageCfg:
        p, cfg = self.p, self.template
        parts = [x for x in cfg.data.split("+") if x != "pseudo"]
        if g > 0 and "labeled" in parts:
            parts.insert(parts.index("labeled") + 1, "pseudo")
        changes: dict = {"name": f"{cfg.name}{g}", "data": "+".join(parts)}
        if g < p.generations - 1:
            changes["label"] = ComponentSpec("pseudo_labeler", "crest_select",
                                             CrestSelectParams(alpha=p.alpha, ratio=p.ratio))
        else:
            changes["label"] = None
        if g > 0 and p.reinit:
            changes["reset"] = sorted({*cfg.reset, "backbone", "heads"})
        labeler = cfg.pseudo_labeler
        if p.progressive and labeler is not None and hasattr(labeler.params, "t"):
            t = temperature(g, p.generations, p.t_min)
            changes["pseudo_labeler"] = dataclasses.replace(
                labeler, params=dataclasses.replace(labeler.params, t=t))
        return dataclasses.replace(cfg, **changes)

    def next_stage(self, history: list[dict]) -> StagePlan | None:
        g = len(history)
        if g >= self.p.generations:
            return None
        return StagePlan(index=g, name=f"{self.template.name}{g}", cfg=self.generation(g),
                         optim=self.optim, extras={"generation": g})


def register(registry: Registry) -> None:
    registry.register("scheduler", "crest", Crest, CrestParams)
