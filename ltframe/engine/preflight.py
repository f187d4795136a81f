"""Checks made before the run directory exists: every stage the scheduler plans, with its heads,
parts, views and components built against the data and the model (nothing is trained)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch

from ltframe.config import ComponentSpec, check_plain_name, refs
from ltframe.engine.labelling import check_offline, pool_index
from ltframe.engine.param_groups import param_groups
from ltframe.engine.stages import StagePlan
from ltframe.errors import LtframeError, RecipeError, closest


def plans_source(recipe: Any) -> list[tuple[Any, Any]]:
    """The (stage, optim) pairs a scheduler is built from."""
    return list(zip(recipe.stages, recipe.stage_optims, strict=True))


def check_plan_data(plan: StagePlan, has_unlabeled: bool, pool_labelled: bool) -> None:
    """A stage's name and `data` against the run's splits (before the run directory exists, and
    again when the stage starts): a plain name; unlabeled batches need an unlabeled split, an online
    pseudo-labeler needs unlabeled batches, pseudo-labelled samples need an earlier labelling."""
    cfg = plan.cfg
    parts = cfg.data.split("+")
    # the name becomes part of file names: checked again whenever a stage starts
    check_plain_name(plan.name, f"stage[{plan.index}] name {plan.name!r} (from the "
                     "scheduler)", "part of checkpoint, predictions and pseudo_labels "
                     "file names; rename the recipe's [[stage]] it is derived from")
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
#: images a view is tried on before the run
VIEW_PROBE = 2
#: a smoke run's steps per stage at most (as the trainer runs it)
SMOKE_STEPS = 2


@dataclass
class StageInfo:
    """What a component's optional ``preflight(info)`` method sees before the run starts (it
    raises a RecipeError for a stage it cannot work in, e.g. a head of the wrong width)."""

    plan: StagePlan
    model: Any
    num_classes: int
    head_widths: dict[str, int]  # outputs of each model head
    parts: list[str]  # the stage's input parts: labeled, labeled:weak, unlabeled:strong, ...
    total_steps: int | None  # optimizer steps of the stage (None: not known before the run)
    extras: dict[str, Any] = field(default_factory=dict)
    role: str = ""  # how the stage uses the component: loss, pseudo_labeler, transform
    soft_labels: bool = False  # an earlier stage gave the training samples soft labels


def head_widths(model: Any) -> dict[str, int]:
    """Outputs of each head, from one forward of a zero feature vector."""
    out = {}
    for name, head in model.heads.items():
        dev = next((t.device for t in [*head.parameters(), *head.buffers()]), torch.device("cpu"))
        was = head.training
        head.eval()
        try:
            with torch.no_grad():
                out[name] = int(head(torch.zeros(2, model.num_features, device=dev)).shape[-1])
        except Exception as exc:  # noqa: BLE001 - reported with the head's name
            raise RecipeError(f"model.heads.{name}: the head cannot map {model.num_features} "
                              f"backbone features to logits ({type(exc).__name__}: {exc})") from None
        finally:
            head.train(was)
    return out


def probe_forward(run: Any) -> None:
    """One no-grad forward of two training images in eval mode (no statistics change, no
    random numbers drawn): the backbone must take the data's image size."""
    from ltframe.data.views import NoneParams, NoneView

    d, model = run.data, run.model
    n = min(VIEW_PROBE, len(d.train))
    if n == 0:
        return
    x = NoneView(NoneParams(), d.source.mean, d.source.std)(d.train.get(torch.arange(n)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # noqa: BLE001 - any failure here is the recipe's
        size = "x".join(str(v) for v in x.shape[-2:])
        raise RecipeError(f"model.backbone: '{run.recipe.model.backbone}' cannot take the data's "
                          f"{size} images ({type(exc).__name__}: {str(exc)[:200]}); set the "
                          "source's image_size to what the backbone expects, or pass it in "
                          "model.backbone_args (e.g. img_size)") from None
    finally:
        model.train(was)


def unlabeled_pool(data: Any, cfg: Any) -> torch.Tensor:
    """Dataset indices the stage's unlabeled stream draws from (empty when it has none): the
    unlabeled split, or labeled + unlabeled with `unlabeled_pool = "all"`. Components get it as
    the `unlabeled_index` context keyword (e.g. a per-sample table over the pool only)."""
    if "unlabeled" not in cfg.data.split("+"):
        return torch.zeros(0, dtype=torch.long)
    splits = data.splits
    return (splits.unlabeled if cfg.unlabeled_pool == "unlabeled"
            else torch.cat([splits.labeled, splits.unlabeled]))


def stage_parts(cfg: Any) -> dict[str, list[str]]:
    """Each stream's input parts as the trainer names them (`split:view`, `#j` for a repeated
    view, the bare split for the first view)."""
    data = cfg.data.split("+")
    streams = []
    if "labeled" in data or "pseudo" in data:
        streams.append(("labeled", cfg.views.labeled))
    if "unlabeled" in data:
        streams.append(("unlabeled", cfg.views.unlabeled))
    out: dict[str, list[str]] = {}
    for split, views in streams:
        names: list[str] = []
        for j, v in enumerate(views):
            part = f"{split}:{v.name}"
            names.append(part if part not in names else f"{part}#{j}")
        out[split] = ([split] if names else []) + names
    return out


def _steps(run: Any, plan: StagePlan) -> tuple[int, int | None]:
    """(steps per epoch, total steps) of the stage as the trainer computes them; the total is
    None when the number of samples is only known after an earlier stage's pool labelling; a
    smoke run's stages take at most 2 steps of 1-step epochs."""
    cfg, d = plan.cfg, run.data
    data = cfg.data.split("+")
    spe: int | None = cfg.steps_per_epoch or None
    if spe is None and "pseudo" not in data:
        batch = (cfg.batch_size or run.recipe.data.batch_size) // max(run.world_size, 1)
        if run.smoke:
            from ltframe.engine.trainer import SMOKE_BATCH  # the trainer imports this module

            batch = min(batch, SMOKE_BATCH)
        if "labeled" in data:
            n = d.splits.labeled.numel()
        else:
            n = (d.splits.unlabeled.numel() if cfg.unlabeled_pool == "unlabeled"
                 else d.splits.labeled.numel() + d.splits.unlabeled.numel())
        spe = max(n // batch if cfg.drop_last else -(-n // batch), 1) if batch > 0 else None
    if cfg.steps:
        total: int | None = cfg.steps
    else:
        total = cfg.epochs * spe if spe is not None else None if cfg.epochs else 0
    if run.smoke:
        return 1, (min(total, SMOKE_STEPS) if total is not None else None)
    return spe or 1, total


def _after_reset(fitted: set[str], reset: list[str]) -> set[str]:
    """The fitted heads a stage's `reset` leaves fitted (a reset head must be fitted again)."""
    if "heads" in reset:
        return set()
    return fitted - {p.removeprefix("heads.") for p in reset if p.startswith("heads.")}


class _Stage:
    """One planned stage's checks; `fitted` are the heads fitted so far (this stage's `fit`
    added at its end)."""

    def __init__(self, run: Any, plan: StagePlan, widths: dict[str, int], fitted: set[str],
                 soft_labels: bool = False):
        self.run, self.plan, self.cfg = run, plan, plan.cfg
        self.widths, self.fitted, self.soft_labels = widths, fitted, soft_labels
        self.model = run.model
        self.where = f"stage '{plan.name}' (stage[{plan.index}])"

    def fail(self, key: str, text: str) -> NoReturn:
        raise RecipeError(f"{self.where}.{key}: {text}")

    def check(self) -> None:
        cfg, model = self.cfg, self.model
        for key in ("train", "reset"):
            for i, part in enumerate(getattr(cfg, key)):
                self._part(f"{key}[{i}]", part)
        for i, path in enumerate(cfg.fit):
            self._fit(f"fit[{i}]", path)
        eval_head = cfg.eval_head or self.run.recipe.model.eval_head
        self._head("eval_head", eval_head, classes=True)
        fitted_now = (_after_reset(self.fitted, cfg.reset)
                      | {p.removeprefix("heads.") for p in cfg.fit})
        if self._needs_fit(eval_head) and eval_head not in fitted_now:
            self.fail("eval_head", f"head '{eval_head}' ({self._kind(eval_head)}) has no trained "
                      "weights: it is fitted at the end of a stage; add fit = "
                      f"[\"heads.{eval_head}\"] to this stage or an earlier one")
        if cfg.label is not None:
            self._head("label_head", cfg.label_head or eval_head, classes=True)
        parts = stage_parts(cfg)
        for split, names in parts.items():
            if not names:
                self.fail(f"views.{split}", f"[] but the stage trains on {split} batches "
                          f"(data = \"{cfg.data}\"); give at least one view, e.g. [\"weak\"]")
        self.parts = [p for names in parts.values() for p in names]
        self.spe, self.total = _steps(self.run, self.plan)
        trains = self.total > 0 if self.total is not None else bool(cfg.steps or cfg.epochs)
        params = [p for t in cfg.train for p in model.submodule(t).parameters()]
        if trains and not params:
            self.fail("train", f"{cfg.train} has no trainable parameters (a fitted head such as "
                      "ncm has none); name parts such as 'backbone' or 'heads.main', or set "
                      "epochs = 0 and fit = [...] for a fit-only stage")
        if trains and not cfg.loss:
            self.fail("loss", "[] but the stage trains (epochs or steps > 0); give at least "
                      "one loss term, e.g. [{ name = \"ce\" }], or set epochs = 0 for an "
                      "evaluation-only stage")
        late = [(i, s) for i, s in enumerate(cfg.loss)
                if self.total is not None and self.total > 0 and s.start >= self.total]
        # a smoke run only fails when no term counts at all (its stages are cut to 2 steps)
        if late and (not self.run.smoke or len(late) == len(cfg.loss)):
            i, spec = late[0]
            self.fail(f"loss[{i}].start", f"{spec.start} is not before the stage's last step "
                      f"(the stage has {self.total} steps{' in a smoke run' if self.run.smoke else ''}): "
                      f"the term '{spec.name}' would never count; lower start below "
                      f"{self.total} or remove the term")
        self._build(params)

    # --- names --------------------------------------------------------------------------
    def _part(self, key: str, path: str) -> None:
        try:
            self.model.submodule(path)
        except RecipeError as exc:
            self.fail(key, str(exc))

    def _kind(self, head: str) -> str:
        spec = self.run.recipe.model.heads.get(head)
        return f"'{spec.name}'" if isinstance(spec, ComponentSpec) else "a head"

    def _needs_fit(self, head: str) -> bool:
        """A head with fit() and no trainable weights (e.g. ncm) only works once fitted."""
        module = dict(self.model.heads.items()).get(head)
        return (module is not None and callable(getattr(module, "fit", None))
                and not any(True for _ in module.parameters()))

    def _fit(self, key: str, path: str) -> None:
        name = path.removeprefix("heads.")
        paths = [f"heads.{h}" for h in self.model.heads]
        if not path.startswith("heads.") or name not in self.model.heads:
            self.fail(key, f"'{path}' is not a head; fit names heads as heads.NAME (heads: "
                      f"{', '.join(paths)}){closest(path, paths)}")
        if not callable(getattr(self.model.heads[name], "fit", None)):
            self.fail(key, f"'{path}' ({self._kind(name)}) has no fit() method; only fitted "
                      "heads such as \"ncm\" or \"tau_norm\" can be listed in fit")

    def _head(self, key: str, head: str, classes: bool) -> None:
        heads = list(self.model.heads)
        if head not in heads:
            self.fail(key, f"'{head}' is not one of the model's heads ({', '.join(heads)})"
                      f"{closest(head, heads)}; add it under [model.heads] or fix the name")
        width, n = self.widths.get(head), self.run.data.num_classes
        if classes and width is not None and width != n:
            self.fail(key, f"head '{head}' gives {width} outputs but this needs one per class "
                      f"({n}); use a class head (e.g. {{ name = \"linear\" }} without "
                      "out_features)")

    def _refs(self, key: str, spec: ComponentSpec, parts: bool = True) -> None:
        for fname, ref, value in refs(spec.params):
            if ref == "part":
                if parts and value not in self.parts:
                    self.fail(f"{key}.{fname}", f"'{value}' is not an input of this stage "
                              f"(parts: {', '.join(self.parts) or 'none'}){closest(value, self.parts)}; "
                              "check the stage's data and views")
                continue
            self._head(f"{key}.{fname}", value, classes=ref == "head")
            if self._needs_fit(value):
                self.fail(f"{key}.{fname}", f"head '{value}' ({self._kind(value)}) has no "
                          "trained weights to learn from a loss; it is fitted (stage.fit); use a "
                          "trained head such as \"linear\"")

    # --- components ---------------------------------------------------------------------
    def _make(self, key: str, spec: ComponentSpec, **context: Any) -> Any:
        try:
            return self.run.registry.build(spec, **context)
        except LtframeError as exc:
            self.fail(key, str(exc))
        except Exception as exc:  # noqa: BLE001 - a component that cannot be built at all
            self.fail(key, f"{spec.kind} '{spec.name}' cannot be built with these parameters "
                      f"({type(exc).__name__}: {exc}); check its values (ltframe components "
                      f"{spec.kind} {spec.name})")

    def _build(self, params: list) -> None:
        run, cfg, d, plan = self.run, self.cfg, self.run.data, self.plan
        info = StageInfo(plan, self.model, d.num_classes, self.widths, self.parts, self.total,
                         plan.extras, soft_labels=self.soft_labels)
        seed = run.recipe.run.seed * 1000 + plan.index
        data = cfg.data.split("+")
        labels = d.labeled_labels.cpu()
        if "labeled" in data or "pseudo" in data:
            self._make("sampler", cfg.sampler, labels=labels, num_classes=d.num_classes,
                       seed=seed, rank=0, world_size=1)
        if "unlabeled" in data:
            n = max(d.splits.unlabeled.numel(), 1)
            self._make("unlabeled_sampler", cfg.unlabeled_sampler,
                       labels=torch.full((n,), -1, dtype=torch.long), num_classes=d.num_classes,
                       seed=seed + 500, rank=0, world_size=1)
        ctx_kw = dict(num_classes=d.num_classes, class_counts=d.labeled_counts,
                      num_samples=len(d.train), seed=seed, labeled_counts=d.labeled_counts,
                      unlabeled_index=unlabeled_pool(d, cfg))
        built = []
        for i, spec in enumerate(cfg.loss):
            self._refs(f"loss[{i}]", spec)
            built.append((f"loss[{i}]", self._make(f"loss[{i}]", spec, **ctx_kw)))
        for key in ("pseudo_labeler", "transform"):
            spec = getattr(cfg, key)
            if spec is not None:
                self._refs(key, spec)
                built.append((key, self._make(key, spec, **ctx_kw)))
        if cfg.label is not None:
            check_offline(self._make("label", cfg.label, **ctx_kw), plan)
            pool_index(d, cfg.label_pool, plan, run.smoke)
        self._views()
        if params and (self.total is None or self.total > 0):
            groups = param_groups(params, self.model, plan.optim.no_decay)
            optimizer = self._make("optim", plan.optim.optimizer, params=groups)
            total = self.total or max(cfg.steps, cfg.epochs * self.spe, 1)
            schedule = self._make("optim.schedule", plan.optim.schedule,
                                  steps_per_epoch=self.spe, total_steps=total)
            for step in sorted({0, total // 2, total - 1}):
                factor = float(schedule(step))
                if not math.isfinite(factor) or factor < 0:
                    self.fail("optim.schedule", f"the lr factor at step {step} is {factor}; "
                              "check the schedule's values")
            del optimizer
        for key, comp in built:
            self._pool_splits(key, comp)
            check = getattr(comp, "preflight", None)
            if callable(check):
                try:
                    check(dataclasses.replace(info, role=key.split("[")[0]))
                except LtframeError as exc:
                    self.fail(key, str(exc))

    def _pool_splits(self, key: str, comp: Any) -> None:
        """A component's `epoch_pool` splits (trainer._epoch_pool) exist in this run."""
        if not callable(getattr(comp, "epoch_pool", None)):
            return
        for split in getattr(comp, "pool_splits", ("unlabeled",)):
            if split not in ("unlabeled", "val"):
                self.fail(key, f"asks for predictions on the '{split}' split at epoch ends; "
                          "the splits are \"unlabeled\" and \"val\"")
            d = self.run.data
            if split == "val" and (d.val_labels is None or d.val_labels.numel() == 0):
                self.fail(key, "needs predictions on a held-out labeled val split, but this "
                          "run has none; set data.val_per_class (e.g. 10) or a source with a "
                          "val set")

    def _views(self) -> None:
        """Every view built and tried on a few training images (cheap; no run RNG is used)."""
        d, cfg = self.run.data, self.cfg
        idx = d.splits.labeled[:VIEW_PROBE]
        if idx.numel() == 0:
            idx = torch.arange(min(VIEW_PROBE, len(d.train)))
        x = d.train.get(idx) if idx.numel() else None
        gen = torch.Generator().manual_seed(0)
        for split, specs in (("labeled", cfg.views.labeled), ("unlabeled", cfg.views.unlabeled)):
            for j, spec in enumerate(specs):
                key = f"views.{split}[{j}]"
                view = self._make(key, spec, mean=d.source.mean, std=d.source.std)
                if x is None:
                    continue
                try:
                    y = view(x, gen)
                except LtframeError as exc:
                    self.fail(key, str(exc))
                except Exception as exc:  # noqa: BLE001 - reported with the view's name
                    self.fail(key, f"view '{spec.name}' fails on the training images "
                              f"({type(exc).__name__}: {exc}); check its values")
                if not torch.is_tensor(y) or y.ndim != 4 or not bool(torch.isfinite(y).all()):
                    self.fail(key, f"view '{spec.name}' gives no finite image batch for these "
                              "values; check them (ltframe components view "
                              f"{spec.name})")


def preflight(run: Any) -> None:
    """Check every planned stage (see `_preflight`) with the random number generators of torch,
    numpy and Python left as they were, so a run is the same with or without the checks."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    dev = next(run.model.parameters(), torch.empty(0)).device
    devices = [dev.index or 0] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            _preflight(run)
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _preflight(run: Any) -> None:
    """Check the stages the scheduler plans against the data and the model before the run
    directory exists: names, parts, heads, fitted heads, views, losses (and their start
    steps), samplers, pseudo-labelers, transforms, optimizer and schedule of every stage.

    The scheduler is a pure function of the history, so it is asked for its stages with
    stand-in results ({"stage", "index"}); a scheduler that needs real results for a later
    stage stops the look-ahead there (that stage is still checked when it starts)."""
    scheduler = run.registry.build(run.recipe.scheduler, stages=plans_source(run.recipe))
    splits = run.data.splits
    probe_forward(run)
    widths = head_widths(run.model)
    _scheduler_refs(run, widths)
    history: list[dict] = []
    labelled = False
    fitted: set[str] = set()
    soft = False
    while len(history) < PREFLIGHT_STAGES:
        try:
            plan = scheduler.next_stage(history)
        except LtframeError:
            raise
        except Exception:
            if not history:  # the run's own first call would fail the same way
                raise
            return
        if plan is None:
            break
        check_plan_data(plan, splits.unlabeled.numel() > 0, labelled)
        _Stage(run, plan, widths, fitted, soft).check()
        fitted = _after_reset(fitted, plan.cfg.reset) | {p.removeprefix("heads.")
                                                         for p in plan.cfg.fit}
        if plan.cfg.label is not None:
            labelled = True
            # soft targets for the labeled samples (e.g. ssd's teacher), replacing earlier ones
            soft = (getattr(plan.cfg.label.params, "hard", True) is False
                    and plan.cfg.label_pool in ("labeled", "all"))
        history.append({"stage": plan.name, "index": plan.index})
    if not history:
        raise RecipeError(f"scheduler '{run.recipe.scheduler.name}' plans no stage for this "
                          "recipe; check its values (e.g. sequence repeat >= 1) and the "
                          "[[stage]] tables")


def _scheduler_refs(run: Any, widths: dict[str, int]) -> None:
    """Heads named by the scheduler's parameters (e.g. ssd's hard / soft, alternate's g)."""
    spec, heads = run.recipe.scheduler, list(run.model.heads)
    n = run.data.num_classes
    for fname, ref, value in refs(spec.params):
        if ref == "part":
            continue
        if value not in heads:
            raise RecipeError(f"scheduler.{fname}: '{value}' is not one of the model's heads "
                              f"({', '.join(heads)}){closest(value, heads)}; add it under "
                              "[model.heads] or fix the name")
        if ref == "head" and widths[value] != n:
            raise RecipeError(f"scheduler.{fname}: head '{value}' gives {widths[value]} outputs "
                              f"but needs one per class ({n})")
