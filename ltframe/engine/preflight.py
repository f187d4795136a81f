"""Checks made before the run directory exists: every stage the scheduler plans, against the data."""

from __future__ import annotations

from typing import Any

from ltframe.engine.labelling import check_offline, pool_index
from ltframe.engine.stages import StagePlan
from ltframe.errors import RecipeError


def plans_source(recipe: Any) -> list[tuple[Any, Any]]:
    """The (stage, optim) pairs a scheduler is built from."""
    return list(zip(recipe.stages, recipe.stage_optims, strict=True))


def check_plan_data(plan: StagePlan, has_unlabeled: bool, pool_labelled: bool) -> None:
    """A stage's `data` against the run's splits (before the run directory exists, and again
    when the stage starts): unlabeled batches need an unlabeled split, an online
    pseudo-labeler needs unlabeled batches, pseudo-labelled samples need an earlier labelling."""
    cfg = plan.cfg
    parts = cfg.data.split("+")
    where = f"stage '{plan.name}' (stage[{plan.index}])"
    if "unlabeled" in parts and not has_unlabeled:
        raise RecipeError(f"{where}.data = \"{cfg.data}\" uses unlabeled data but the split has "
                          "none; set data.split (e.g. name = \"fraction\")")
    if cfg.pseudo_labeler is not None and "unlabeled" not in parts:
        raise RecipeError(f"{where}.pseudo_labeler: an online pseudo-labeler needs unlabeled "
                          f"batches but data = \"{cfg.data}\"; use data = \"labeled+unlabeled\" "
                          "or drop pseudo_labeler (whole-pool labelling is stage.label)")
    if "pseudo" in parts and not pool_labelled:
        raise RecipeError(f"{where}.data = \"{cfg.data}\" trains on pseudo-labelled samples "
                          "but no earlier stage labelled the pool; set `label` on an earlier "
                          "stage (e.g. label = {name = \"threshold\"})")



#: at most this many stages are planned ahead by `preflight`
PREFLIGHT_STAGES = 1000


def preflight(run: Any) -> None:
    """Check the stages the scheduler plans against the data before the run directory exists.

    The scheduler is a pure function of the history, so it is asked for its stages with
    stand-in results ({"stage", "index"}); a scheduler that needs real results for a later
    stage stops the look-ahead there (that stage is still checked when it starts)."""
    scheduler = run.registry.build(run.recipe.scheduler, stages=plans_source(run.recipe))
    splits = run.data.splits
    history: list[dict] = []
    labelled = False
    while len(history) < PREFLIGHT_STAGES:
        try:
            plan = scheduler.next_stage(history)
        except Exception:
            if not history:  # the run's own first call would fail the same way
                raise
            return
        if plan is None:
            return
        check_plan_data(plan, splits.unlabeled.numel() > 0, labelled)
        if plan.cfg.label is not None:
            d = run.data
            check_offline(run.registry.build(plan.cfg.label, num_classes=d.num_classes,
                                             class_counts=d.labeled_counts, num_samples=len(d.train),
                                             labeled_counts=d.labeled_counts), plan)
            pool_index(d, plan.cfg.label_pool, plan, run.smoke)
            labelled = True
        history.append({"stage": plan.name, "index": plan.index})
