"""A run: recipe + plugins + data + model + run directory; start, resume and evaluate."""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ltframe.data.bundle import DataBundle, check_splits, save_splits
from ltframe.engine import checkpoint as ckpt
from ltframe.engine import dist
from ltframe.engine.preflight import plans_source, preflight
from ltframe.engine.report import Reporter
from ltframe.engine.setup import (
    build_data,
    build_model,
    check_out_dir,
    new_run_dir,
    pick_device,
    read_run_meta,
    write_run_files,
)
from ltframe.engine.trainer import Trainer
from ltframe.errors import CheckpointError, LtframeError, RecipeError, RunInterrupted
from ltframe.eval.metrics import group_classes
from ltframe.models import LTModel
from ltframe.models.weights import apply_start_weights, check_start_weights, describe_weights
from ltframe.plugins import PluginManager, make_plugin_manager, plugin_versions
from ltframe.predict import source_info
from ltframe.recipe import Recipe, apply_overrides, build_recipe, load_recipe, read_toml
from ltframe.registry import Registry


@dataclass
class Run:
    """Handed to every event hook as `run`."""

    recipe: Recipe
    pm: PluginManager
    registry: Registry
    run_dir: Path
    device: torch.device
    data: DataBundle
    model: LTModel
    smoke: bool = False
    rank: int = 0  # this process under torchrun (0 in a single process)
    world_size: int = 1
    loggers: list = field(default_factory=list)  # built from run.loggers (`logger` kind)

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files (plugins writing logs check this)."""
        return self.rank == 0


def _prepare(recipe: Recipe, pm: PluginManager, registry: Registry, run_dir: Path,
             smoke: bool) -> Run:
    device = dist.local_device(pick_device(recipe.run.device))
    info = dist.init(device)
    torch.manual_seed(recipe.run.seed)
    data = build_data(recipe, registry, device, smoke)
    torch.manual_seed(recipe.run.seed)
    model = build_model(recipe, registry, data.num_classes).to(device)
    if device.type == "cuda" and recipe.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Run(recipe, pm, registry, run_dir, device, data, model, smoke, info.rank,
               info.world_size)


def _build_loggers(run: Run) -> None:
    """Trackers of `run.loggers` (training runs only; built before any file is changed, so a
    missing package fails early)."""
    run.loggers = [run.registry.build(spec) for spec in run.recipe.run.loggers]


def _execute(run: Run, reporter: Reporter, resume: tuple[dict, dict] | None) -> dict:
    trainer = Trainer(run, reporter)
    scheduler = run.registry.build(run.recipe.scheduler, stages=plans_source(run.recipe))
    partial = None
    if resume is not None:
        tensors, meta = resume
        trainer.restore(tensors, meta)
        if int(meta["step"]) > 0:
            partial = resume
    loggers = run.loggers if run.is_main else []
    for i, logger in enumerate(loggers):  # trackers receive the run's events like plugins
        run.pm.register(logger, name=f"run:logger{i}")
    try:
        return _stages(run, trainer, scheduler, partial)
    finally:
        for logger in loggers:
            run.pm.unregister(logger)
            if callable(getattr(logger, "close", None)):
                logger.close()


def _stages(run: Run, trainer: Trainer, scheduler: Any, partial: Any) -> dict:
    run.pm.hook.ltframe_run_start(run=run)
    t0 = time.perf_counter()
    try:
        while (plan := scheduler.next_stage(_for_scheduler(trainer.history))) is not None:
            trainer.run_stage(plan, partial)
            partial = None
    except KeyboardInterrupt:
        stage, step, total = trainer.position
        kept = (f"the last checkpoint is {trainer.last_checkpoint.stem}"
                if trainer.last_checkpoint else "the newest checkpoint on disk is kept")
        raise RunInterrupted(f"interrupted in stage '{stage}' during step {step + 1} of {total} "
                             f"({step} completed); {kept}. "
                             f"Continue with: ltframe resume {run.run_dir}") from None
    if not trainer.history:
        raise LtframeError("the stage scheduler produced no stage; add a [[stage]] table")
    final = trainer.history[-1]
    summary = {
        **{k: v for k, v in final.items() if k not in ("stage", "index", "steps", "eval_head")},
        "stages": trainer.history,
        # whole-pool labellings (per generation / loop): per-class precision / recall, counts
        "pseudo_labels": [{"stage": h["stage"], **h["pool_labels"]}
                          for h in trainer.history if "pool_labels" in h],
        "classes": run.data.source.classes,
        "labeled_counts": run.data.labeled_counts.tolist(),
        "grouping": _grouping(run),
        "images_per_s": trainer.images_per_s,
        "seconds": round(time.perf_counter() - t0, 2),
        "run_dir": str(run.run_dir),
        "smoke": run.smoke,
    }
    if run.is_main:
        ckpt.atomic_write_json(run.run_dir / "summary.json", summary)
    run.pm.hook.ltframe_run_end(run=run, summary=summary)
    return summary


def start_run(recipe_path: str | Path | None = None, overrides: list[str] | None = None, *,
              recipe: Recipe | None = None, out_dir: str | Path | None = None,
              smoke: bool = False, block: list[str] | None = None,
              plugins: list[tuple[str, object]] | None = None,
              reporter: Reporter | None = None) -> dict:
    """Start a new run from a recipe file (or Recipe); returns the summary dict."""
    pm, registry = make_plugin_manager(block or [])
    for name, plugin in plugins or []:
        from ltframe.plugins import register_plugin

        register_plugin(pm, registry, plugin, name)
    if recipe is None:
        if recipe_path is None:
            raise LtframeError("start_run needs a recipe path or a Recipe")
        recipe = load_recipe(recipe_path, registry, overrides)
    check_out_dir(out_dir or recipe.run.out_dir, "--out" if out_dir else "run.out_dir")
    check_start_weights(recipe.model)  # a missing file or unreachable hub fails before the data
    run = _prepare(recipe, pm, registry, Path(), smoke)  # bad data fails before any file is made
    weights = apply_start_weights(run.model, recipe.model)  # [model] weights / pretrained
    preflight(run)
    _build_loggers(run)
    # rank 0 makes the run directory; every rank uses it
    run.run_dir = run_dir = Path(dist.broadcast_object(
        str(new_run_dir(out_dir or recipe.run.out_dir, recipe.run.name)) if run.is_main else ""))
    reporter = reporter or Reporter()
    wanted = Path(out_dir or recipe.run.out_dir) / recipe.run.name
    reporter.message(f"{wanted} exists; this run writes {run_dir}" if run_dir != wanted
                     else f"run directory: {run_dir}")
    for line in run.data.notes:
        reporter.message(line)
    if weights is not None:
        reporter.message(describe_weights(weights))
    if run.is_main:
        write_run_files(run_dir, recipe, plugin_versions(pm),
                        {"smoke": smoke, "blocked": sorted(block or []),
                         "recipe": str(recipe_path) if recipe_path else None,
                         "overrides": list(overrides or []),
                         "world_size": run.world_size,
                         "source_info": source_info(run),  # for `ltframe predict`
                         "weights": weights,  # the starting weights: path, sha256, loaded, skipped
                         "data": {"counts": run.data.counts(), "notes": run.data.notes}})
        save_splits(run.data, run_dir)
    dist.barrier()
    return _guarded(run_dir, lambda: _execute(run, reporter, None))


def _guarded(run_dir: Path, body: Callable[[], dict]) -> dict:
    """Run `body`; an unexpected exception gets its traceback written to RUN_DIR/error.log
    (named by the exception's `ltframe_log` attribute) before it propagates."""
    try:
        return body()
    except (LtframeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        rank = dist.info().rank  # under torchrun each rank keeps its own traceback
        log = run_dir / ("error.log" if rank == 0 else f"error.rank{rank}.log")
        with open(log, "a") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}")
        exc.ltframe_log = log  # type: ignore[attr-defined]
        raise


def load_run(run_dir: str | Path, overrides: list[str] | None = None,
             plugins: list[tuple[str, object]] | None = None) -> tuple[Recipe, dict, Any, Any]:
    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    pm, registry = make_plugin_manager(meta.get("blocked", []))
    for name, plugin in plugins or []:
        from ltframe.plugins import register_plugin

        register_plugin(pm, registry, plugin, name)
    raw = apply_overrides(read_toml(run_dir / "resolved.toml"), overrides or [])
    return build_recipe(raw, registry), meta, pm, registry


def resume_run(run_dir: str | Path, overrides: list[str] | None = None, *,
               from_checkpoint: str | Path | None = None,
               plugins: list[tuple[str, object]] | None = None,
               reporter: Reporter | None = None) -> dict:
    """Continue a run from its newest valid checkpoint (or `from_checkpoint`); bit-for-bit on
    the same machine. A finished run is left untouched and its summary returned."""
    run_dir = Path(run_dir)
    reporter = reporter or Reporter()
    recipe, meta, pm, registry = load_run(run_dir, overrides, plugins)
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        reporter.message(f"{run_dir} is finished (summary.json exists); nothing was changed. "
                         "Start a new run, or re-evaluate with `ltframe eval RUN_DIR --set eval...`")
        return json.loads(summary_file.read_text())
    if from_checkpoint is not None:
        tensors, side, path = ckpt.load(from_checkpoint)
        if path.parent.parent.resolve() != run_dir.resolve():
            raise CheckpointError(f"--from {from_checkpoint} is not a checkpoint of {run_dir}")
    else:
        tensors, side, path, skipped = ckpt.load_newest(run_dir)
        for bad, reason in skipped:
            reporter.message(f"skipped checkpoint {bad.name}: {reason}")
    run = _prepare(recipe, pm, registry, run_dir, bool(meta.get("smoke")))
    check_splits(run.data, run_dir)
    _build_loggers(run)
    # the checkpoint must fit the (possibly overridden) model before any file is changed
    ckpt.load_module_state(run.model, tensors, "model", str(path.with_suffix(".safetensors")))
    reporter.message(f"resuming {run_dir} from {path.stem} (stage {side['stage_index']}, "
                     f"step {side['step']})")
    dist.barrier()  # every rank has read the checkpoint before rank 0 changes any file
    if run.is_main:
        _truncate_metrics(run_dir, side.get("metrics_bytes"))
        if overrides:
            ckpt.atomic_write_text(run_dir / "resolved.toml", recipe.to_toml())
        meta.setdefault("resumes", []).append({"checkpoint": path.stem,
                                               "overrides": list(overrides or []),
                                               "world_size": run.world_size,
                                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        ckpt.atomic_write_json(run_dir / "run.json", meta)
    return _guarded(run_dir, lambda: _execute(run, reporter, (tensors, side)))


def _grouping(run: Run) -> dict:
    """How many / medium / few were formed, and which classes each holds."""
    e = run.recipe.eval
    rule = ({"by": "rank", "rank_sizes": list(e.rank_sizes)} if e.groups == "rank" else
            {"by": "count", "many_threshold": e.many_threshold, "few_threshold": e.few_threshold})
    return {**rule, "classes": group_classes(run.data.labeled_counts, e.many_threshold,
                                             e.few_threshold, e.groups, e.rank_sizes)}


def _for_scheduler(history: list[dict]) -> list[dict]:
    """Stage results without the diagnostics computed from hidden labels."""
    hidden = ("pool_labels", "online_pseudo_labels")
    return [{k: v for k, v in h.items() if k not in hidden} for h in history]


def _truncate_metrics(run_dir: Path, size: int | None) -> None:
    """Drop metrics.jsonl lines written after the checkpoint being resumed (no duplicates)."""
    f = run_dir / "metrics.jsonl"
    if size is None or not f.is_file() or f.stat().st_size <= size:
        return
    ckpt.atomic_write_bytes(f, f.read_bytes()[:size])


def evaluate_checkpoint(target: str | Path, overrides: list[str] | None = None) -> dict:
    """Evaluate a run directory's latest checkpoint, or a given checkpoint file, on the test
    set; `overrides` may change `[eval]` values (e.g. eval.posthoc_tau=[0, 1]) only."""
    from ltframe.eval.evaluate import evaluate_logits, predict

    for item in overrides or []:
        if not item.strip().startswith("eval."):
            raise RecipeError(f"ltframe eval --set {item}: only [eval] values can change without "
                              "retraining (e.g. --set eval.posthoc_tau=1); use `ltframe run` for the rest")
    target = Path(target)
    side_path = ckpt.resolve(target)
    run_dir = side_path.parent.parent
    recipe, meta, pm, registry = load_run(run_dir, overrides)
    tensors, side, _ = ckpt.load(side_path)
    run = _prepare(recipe, pm, registry, run_dir, bool(meta.get("smoke")))
    prefix = "ema" if side.get("ema") and side.get("step", 0) > 0 else "model"
    ckpt.load_module_state(run.model, tensors, prefix, str(side_path.with_suffix(".safetensors")))
    d = run.data
    logits = predict(run.model, d.test, torch.arange(d.test_labels.numel()), d.source.mean,
                     d.source.std, recipe.eval.batch_size, _eval_head(recipe, side),
                     run.device.type == "cuda" and recipe.run.precision == "bf16")
    hist = side.get("history") or []
    prior = torch.tensor(hist[-1]["train_counts"]) if hist and "train_counts" in hist[-1] else None
    metrics = evaluate_logits(logits, d.test_labels, d.labeled_counts,
                              recipe.eval.many_threshold, recipe.eval.few_threshold,
                              recipe.eval.posthoc_tau, prior, recipe.eval.groups,
                              recipe.eval.rank_sizes)
    metrics["checkpoint"] = str(side_path.with_suffix(".safetensors"))
    return metrics


def _eval_head(recipe: Recipe, side: dict) -> str:
    """The head the checkpoint's stage evaluated with."""
    history = side.get("history") or []
    if side.get("step", 0) == 0 and history:
        return history[-1].get("eval_head") or recipe.model.eval_head
    idx = int(side.get("stage_index", 0))
    stage = recipe.stages[idx % len(recipe.stages)] if recipe.stages else None
    return (stage.eval_head if stage else "") or recipe.model.eval_head
