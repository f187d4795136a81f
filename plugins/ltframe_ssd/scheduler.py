"""Stage scheduler `ssd`: Self Supervision to Distillation (paper 004, Sec. 3; MCG-NJU/SSD-LT;
shared/METHODS.md "SSD (paper 004)").

Stages (a pure function of the history length), derived from the recipe's one [[stage]]:

- I "joint": the recipe's stage as given — CE plus a self-supervised loss (e.g. `rotation` on a
  "rotate" view, or `moco` with label-masked negatives), instance sampling;
- II "teacher": any decoupled classifier on the frozen stage-I model, built by the `decoupled`
  scheduler (`teacher = "lws"` (paper), "crt", "tau_norm", ...). When it ends, the teacher's
  soft labels softmax(z / T) for the whole training set go into the run's target table
  (`label`: a soft `threshold` labeler at temperature T on `label_pool = "labeled"`, evaluation
  model, no augmentation), are written to RUN/pseudo_labels/ and checkpointed, so a resumed run
  trains on the same labels;
- III "student": a new network from scratch (backbone and heads reset), instance sampling, the
  stage-I view without the self-supervised views; hard head CE(y) + soft head
  T^2 KL(y~ || softmax(z_soft / T)) (loss `distill`), weights `hard_weight` / `soft_weight`;
  it evaluates the soft head;
- "student_hard": no training, evaluates stage III's hard head (paper 004 Table 4 "III-hard");
- IV "final": the `final` decoupled classifier (default "lws", paper's IV-LWS) on the frozen
  stage-III model's `final_head` (`final = "none"` skips it).

summary.json `stages` has one entry per stage: "student" = III-soft, "student_hard" = III-hard,
"final" = IV.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ltframe.config import param
from ltframe.engine.stages import StagePlan
from ltframe.errors import RecipeError
from ltframe.recipe import OptimCfg, StageCfg, ViewsCfg
from ltframe.registry import Registry


@dataclass
class SsdParams:
    hard: str = param("main", ref="head")  # the teacher's head in I-II and the student's hard head
    soft: str = param("soft", ref="head")  # the student's soft head (stage III predictions)
    temperature: float = param(2.0, gt=0, le=1000)  # T of the soft labels and the distillation
    teacher: str = "lws"  # decoupled classifier of stage II: lws, crt, tau_norm, ...
    teacher_epochs: int = param(10, ge=1)
    final: str = "lws"  # decoupled classifier of stage IV, or "none"
    final_head: str = param("soft", ref="head")  # the stage-III head that stage IV re-balances
    final_epochs: int = param(10, ge=1)
    # stages II and IV: lr (0 = stage I's), class-aware samples per class, batch (0 = stage I's);
    # SSD_LT ssd_stage_ii.py (ImageNet-LT): lr 0.2, 2 per class, batch 512
    classifier_lr: float = param(0.0, ge=0)
    classifier_per_class: int = param(4, ge=1, le=2**20)
    classifier_batch_size: int = param(0, ge=0, le=2**20)
    student_epochs: int = param(0, ge=0)  # 0 = stage I's epochs
    hard_weight: float = param(1.0, ge=0)
    soft_weight: float = param(1.0, ge=0)
    # the parts stage III trains; [] = the backbone and every head part stage I trained,
    # with the hard head's parts repeated for the soft head (e.g. heads.main.fc -> heads.soft.fc)
    student_train: list[str] = field(default_factory=list)


class Ssd:
    """I joint, II teacher (+ soft labels), III student, III-hard evaluation, IV final."""

    def __init__(self, params: SsdParams, stages: list[tuple[StageCfg, OptimCfg]],
                 registry: Registry) -> None:
        self.p = p = params
        if len(stages) != 1:
            raise RecipeError(f"scheduler ssd derives stages II-IV from the joint stage I; the "
                              f"recipe has {len(stages)} [[stage]] tables: keep one")
        if p.temperature <= 0:
            raise RecipeError(f"scheduler.temperature: {p.temperature} must be > 0 (paper: 2)")
        if p.hard == p.soft:
            raise RecipeError(f"scheduler.hard and scheduler.soft name the same head '{p.hard}'; "
                              "SSD's student needs two heads")
        self.joint, self.optim = stages[0]
        self.registry = registry
        self.teacher = self._decoupled(p.teacher, p.hard, p.teacher_epochs, "scheduler.teacher")
        self.final = (None if p.final == "none" else
                      self._decoupled(p.final, p.final_head, p.final_epochs, "scheduler.final"))
        self.labeler = registry.spec("pseudo_labeler", {
            "name": "threshold", "threshold": 0.0, "hard": False, "temperature": p.temperature,
            "head": p.hard, "part": "labeled"}, "scheduler")
        self.student_loss = [
            registry.spec("loss", {"name": "ce", "head": p.hard, "weight": p.hard_weight}, "scheduler"),
            registry.spec("loss", {"name": "distill", "head": p.soft, "temperature": p.temperature,
                                   "weight": p.soft_weight}, "scheduler"),
        ]

    def _decoupled(self, classifier: str, head: str, epochs: int, where: str) -> Any:
        p = self.p
        spec = self.registry.spec("scheduler", {
            "name": "decoupled", "classifier": classifier, "head": head, "epochs": epochs,
            "lr": p.classifier_lr, "per_class": p.classifier_per_class}, where)
        return self.registry.build(spec, stages=[(self.joint, self.optim)])

    def _ce(self, head: str) -> Any:
        return self.registry.spec("loss", {"name": "ce", "head": head}, "scheduler")

    def _views(self) -> ViewsCfg:
        """Stage I's first labeled view only (no self-supervised views)."""
        return ViewsCfg(labeled=list(self.joint.views.labeled[:1]), unlabeled=[])

    def _student_train(self) -> list[str]:
        p = self.p
        if p.student_train:
            return list(p.student_train)
        hard = f"heads.{p.hard}"
        parts = ["backbone"]
        for part in self.joint.train:
            if part == hard or part.startswith(hard + "."):
                parts += [part, f"heads.{p.soft}" + part[len(hard):]]
            elif part == "heads":
                parts.append(part)
        return parts

    def student(self) -> StageCfg:
        p = self.p
        return dataclasses.replace(
            self.joint, name="student", epochs=p.student_epochs or self.joint.epochs, steps=0,
            data="labeled", sampler=self.registry.spec("sampler", "random", "scheduler"),
            views=self._views(), reset=["backbone", "heads"], train=self._student_train(),
            loss=list(self.student_loss),
            label=None, pseudo_labeler=None, transform=None, fit=[], eval_head=p.soft)

    def next_stage(self, history: list[dict]) -> StagePlan | None:
        h, p = len(history), self.p
        if h == 0:
            cfg, optim = dataclasses.replace(self.joint, name="joint"), self.optim
        elif h == 1:
            plan = self.teacher.next_stage([{}])
            cfg = dataclasses.replace(plan.cfg, name="teacher", label=self.labeler,
                                      label_pool="labeled", label_head=p.hard,
                                      loss=[self._ce(p.hard)], views=self._views(),
                                      eval_head=plan.cfg.eval_head if p.teacher == "ncm" else p.hard,
                                      batch_size=p.classifier_batch_size or self.joint.batch_size)
            optim = plan.optim
        elif h == 2:
            cfg, optim = self.student(), self.optim
        elif h == 3:
            cfg = dataclasses.replace(self.student(), name="student_hard", epochs=0, train=[],
                                      reset=[], loss=[], eval_head=p.hard)
            optim = self.optim
        elif h == 4 and self.final is not None:
            plan = self.final.next_stage([{}])
            cfg = dataclasses.replace(plan.cfg, name="final", data="labeled", label=None,
                                      eval_head=p.final_head,
                                      loss=[self._ce(p.final_head)], views=self._views(),
                                      batch_size=p.classifier_batch_size or self.joint.batch_size)
            optim = plan.optim
        else:
            return None
        return StagePlan(index=h, name=cfg.name, cfg=cfg, optim=optim)


def register(registry: Registry) -> None:
    def ssd(params: SsdParams, stages: list[tuple[StageCfg, OptimCfg]]) -> Ssd:
        return Ssd(params, stages, registry)

    registry.register("scheduler", "ssd", ssd, SsdParams)
