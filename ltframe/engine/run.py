"""A run: recipe + plugins + data + model + run directory; start, resume and evaluate."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
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
from ltframe.engine.runlock import LOCK_FILE, RunLock, clean_tmp
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
from ltframe.errors import (
    CheckpointError,
    DiskWriteError,
    LtframeError,
    RecipeError,
    RunInterrupted,
)
from ltframe.eval.metrics import group_classes
from ltframe.models import LTModel
from ltframe.models.weights import apply_start_weights, check_start_weights, describe_weights
from ltframe.plugins import PluginManager, _entry_points, make_plugin_manager, plugin_versions
from ltframe.predict import source_info
from ltframe.recipe import (
    Recipe,
    apply_overrides,
    build_recipe,
    channels_last_on,
    load_recipe,
    read_toml,
)
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
    recipe_sha256: str = ""  # of resolved.toml as the run uses it (kept in checkpoints)

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
    if channels_last_on(device, recipe.run):
        model = model.to(memory_format=torch.channels_last)
    return Run(recipe, pm, registry, run_dir, device, data, model, smoke, info.rank,
               info.world_size)


def _build_loggers(run: Run) -> None:
    """Trackers of `run.loggers` (training runs only; built before any file is changed, so a
    missing package fails early)."""
    run.loggers = [run.registry.build(spec) for spec in run.recipe.run.loggers]


def _execute(run: Run, reporter: Reporter, resume: tuple[dict, dict] | None,
             commit: Callable[[], None] | None = None) -> dict:
    """Drive the stages; `commit` (resume) runs once the first stage is set up."""
    trainer = Trainer(run, reporter)
    trainer.pending = commit
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
        trainer.commit()  # resumed after the last stage: nothing was set up
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
    # rank 0 makes the run directory and holds its lock; every rank uses it
    made, lock = new_run_dir(out_dir or recipe.run.out_dir, recipe.run.name) if run.is_main \
        else (None, None)
    run.run_dir = run_dir = Path(dist.broadcast_object(str(made) if run.is_main else ""))
    run.recipe_sha256 = _sha256(recipe.to_toml().encode())
    reporter = reporter or Reporter()
    start_files: set[Path] | None = None  # what the run holds before training writes anything
    try:
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
                             "recipe_sha256": run.recipe_sha256,  # resolved.toml as written
                             "source_info": source_info(run),  # for `ltframe predict`
                             "weights": weights,  # the starting weights: path, sha256, ...
                             "data": {"counts": run.data.counts(), "notes": run.data.notes}})
            save_splits(run.data, run_dir)
            start_files = _files(run_dir)
        dist.barrier()
        return _guarded(run, lambda: _execute(run, reporter, None))
    except BaseException as exc:
        # a clear error before training leaves nothing worth keeping (an internal error
        # keeps the directory: its error.log holds the traceback)
        if run.is_main and isinstance(exc, LtframeError) and not isinstance(exc, RunInterrupted) \
                and _only_start_files(run_dir, start_files):
            shutil.rmtree(run_dir, ignore_errors=True)
            reporter.message(f"removed {run_dir}: the run stopped before it trained")
        raise
    finally:
        if lock is not None:
            lock.release()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files(run_dir: Path) -> set[Path]:
    """Files of a run directory, without the lock and unfinished temporary files."""
    return {p for p in run_dir.rglob("*") if p.is_file() and p.name != LOCK_FILE
            and not (p.name.startswith(".") and p.name.endswith(".tmp"))}


def _only_start_files(run_dir: Path, start: set[Path] | None) -> bool:
    """True when `run_dir` holds nothing but what start_run wrote before training: removing
    it loses nothing. `start` None: it failed while writing those."""
    if not run_dir.is_dir():
        return False
    extra = _files(run_dir) - (start or set())
    if start is None:
        extra = {p for p in extra if p.name not in ("run.json", "resolved.toml")
                 and p.parent.name != "splits"}
    return not extra


def _guarded(run: Run, body: Callable[[], dict]) -> dict:
    """Run `body`. A failed write names the file, the intact checkpoint and the fix; a dead
    torchrun peer is said so; any other unexpected exception gets its traceback written to
    RUN_DIR/error.log (named by the exception's `ltframe_log` attribute) and propagates."""
    try:
        return body()
    except DiskWriteError as exc:
        raise DiskWriteError(f"{exc}; {_recovery(run.run_dir, exc.code)}", exc.path,
                             exc.code) from None
    except (LtframeError, KeyboardInterrupt):
        raise
    except Exception as exc:
        peer = dist.peer_failure(exc, run.run_dir)
        if peer is not None:
            raise peer from exc
        rank = dist.info().rank  # under torchrun each rank keeps its own traceback
        log = run.run_dir / ("error.log" if rank == 0 else f"error.rank{rank}.log")
        try:
            with open(log, "a") as fh:
                fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n{traceback.format_exc()}")
        except OSError:  # a read-only or full disk: the command line saves it elsewhere
            raise exc from None
        exc.ltframe_log = log  # type: ignore[attr-defined]
        raise


def _recovery(run_dir: Path, code: int | None) -> str:
    """'checkpoint X is intact; free space and run ltframe resume RUN' (or how to start)."""
    fix = ("free space" if code in (errno.ENOSPC, errno.EDQUOT, None) else
           f"make {run_dir} writable")
    try:
        _, _, side = ckpt.load(run_dir)
    except LtframeError:
        return f"no complete checkpoint was written; {fix} and start the run again"
    return f"checkpoint {side.stem} is intact; {fix} and run `ltframe resume {run_dir}`"


def load_run(run_dir: str | Path, overrides: list[str] | None = None,
             plugins: list[tuple[str, object]] | None = None,
             reporter: Reporter | None = None) -> tuple[Recipe, dict, Any, Any]:
    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    blocked = [str(b) for b in meta.get("blocked", [])]
    installed = {ep.name for ep in _entry_points()}
    gone = [b for b in blocked if b not in installed]  # uninstalled since: nothing to block
    if gone and reporter is not None:
        reporter.message(f"plugin {', '.join(gone)} (blocked when the run started) is no "
                         "longer installed; nothing to block")
    pm, registry = make_plugin_manager([b for b in blocked if b in installed])
    for name, plugin in plugins or []:
        from ltframe.plugins import register_plugin

        register_plugin(pm, registry, plugin, name)
    raw = apply_overrides(read_toml(run_dir / "resolved.toml"), overrides or [])
    return build_recipe(raw, registry), meta, pm, registry


def resume_run(run_dir: str | Path, overrides: list[str] | None = None, *,
               from_checkpoint: str | Path | None = None,
               plugins: list[tuple[str, object]] | None = None,
               reporter: Reporter | None = None, accept_edited_recipe: bool = False) -> dict:
    """Continue a run from its newest valid checkpoint (or `from_checkpoint`); bit-for-bit on
    the same machine. A finished run is left untouched and its summary returned. The run's
    lock is held throughout (rank 0); a resolved.toml edited by hand is refused unless
    `accept_edited_recipe` (then recorded in run.json)."""
    run_dir = Path(run_dir)
    reporter = reporter or Reporter()
    recipe, meta, pm, registry = load_run(run_dir, overrides, plugins, reporter)
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        reporter.message(f"{run_dir} is finished (summary.json exists); nothing was changed. "
                         "Start a new run, or re-evaluate with `ltframe eval RUN_DIR --set eval...`")
        return json.loads(summary_file.read_text())
    lock = RunLock(run_dir).acquire() if dist.env_info().main else None
    try:
        return _resume_locked(run_dir, overrides or [], recipe, meta, pm, registry,
                              from_checkpoint, reporter, accept_edited_recipe)
    finally:
        if lock is not None:
            lock.release()


def _resume_locked(run_dir: Path, overrides: list[str], recipe: Recipe, meta: dict, pm: Any,
                   registry: Registry, from_checkpoint: str | Path | None, reporter: Reporter,
                   accept_edited: bool) -> dict:
    if dist.env_info().main:
        stale = clean_tmp(run_dir)
        if stale:
            reporter.message(f"removed {len(stale)} unfinished temporary file(s) of an "
                             f"interrupted write ({stale[0].relative_to(run_dir)})")
    if from_checkpoint is None and not list((run_dir / "checkpoints").glob("*.json")):
        raise CheckpointError(f"no checkpoint in {run_dir / 'checkpoints'}: the run stopped "
                              f"before its first checkpoint was complete; start it again: "
                              f"{_start_command(meta)}")
    toml_sha = _sha256((run_dir / "resolved.toml").read_bytes())
    known = {meta.get("recipe_sha256")} | {r.get("recipe_sha256") for r in meta.get("resumes", [])}
    run = _prepare(recipe, pm, registry, run_dir, bool(meta.get("smoke")))
    check_splits(run.data, run_dir)
    if overrides or accept_edited:  # a changed recipe gets the checks a new run gets
        preflight(run)
    _build_loggers(run)
    same_recipe = not overrides and not accept_edited
    if from_checkpoint is not None:
        tensors, side, path = ckpt.load(from_checkpoint)
        if path.parent.parent.resolve() != run_dir.resolve():
            raise CheckpointError(f"--from {from_checkpoint} is not a checkpoint of {run_dir}")
    else:  # with the recipe unchanged, tensors that do not fit the model mean a damaged file
        tensors, side, path, skipped = ckpt.load_newest(
            run_dir, (lambda t, s, p: _fits(run.model, t, p)) if same_recipe else None)
        for bad, reason in skipped:
            reporter.message(f"skipped checkpoint {bad.name}: {reason}")
    known = {h for h in known | {side.get("recipe_sha256")} if h}
    edited = bool(known) and toml_sha not in known
    if edited and not accept_edited:
        raise RecipeError(
            f"{run_dir / 'resolved.toml'} was edited after checkpoint {path.stem} was written; "
            f"undo the edit and pass the change with `ltframe resume {run_dir} --set KEY=VALUE` "
            "(recorded in run.json), or keep it with --accept-edited-recipe (also recorded)")
    # the checkpoint must fit the (possibly overridden) model before any file is changed
    ckpt.load_module_state(run.model, tensors, "model", str(path.with_suffix(".safetensors")))
    was = _world_size(side, tensors)
    if was != run.world_size:
        reporter.message(f"warning: checkpoint {path.stem} was written by {was} process(es), "
                         f"this resume runs {run.world_size}: augmentation draws and per-process "
                         "batch statistics change, so results will differ from an uninterrupted "
                         "run (recorded in run.json resumes)")
    reporter.message(f"resuming {run_dir} from {path.stem} (stage {side['stage_index']}, "
                     f"step {side['step']})")

    def commit() -> None:
        """Called once the resumed stage is set up (its step count checked against the
        checkpoint): only then does rank 0 change files."""
        dist.barrier()  # every rank has read the checkpoint before rank 0 changes any file
        if run.is_main:
            _truncate_metrics(run_dir, side.get("metrics_bytes"))
            if overrides:
                ckpt.atomic_write_text(run_dir / "resolved.toml", recipe.to_toml())
            entry = {"checkpoint": path.stem, "overrides": list(overrides),
                     "world_size": run.world_size,
                     "recipe_sha256": _sha256((run_dir / "resolved.toml").read_bytes()),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if edited:
                entry["edited_recipe"] = toml_sha
            if was != run.world_size:
                entry["world_size_changed"] = [was, run.world_size]
            meta.setdefault("resumes", []).append(entry)
            ckpt.atomic_write_json(run_dir / "run.json", meta)
        run.recipe_sha256 = _sha256((run_dir / "resolved.toml").read_bytes())

    run.recipe_sha256 = toml_sha
    return _guarded(run, lambda: _execute(run, reporter, (tensors, side), commit))


def _fits(model: LTModel, tensors: dict, path: Path) -> None:
    """Raise CheckpointError (the checkpoint is corrupt) when its model tensors do not fit."""
    ckpt.load_module_state(model, tensors, "model", path.stem, check_only=True,
                           advice="the recipe is the one it was written with, so the "
                                  "checkpoint is corrupt")


def _world_size(side: dict, tensors: dict) -> int:
    """How many processes wrote a checkpoint (recorded, or from the per-rank RNG states)."""
    if "world_size" in side:
        return int(side["world_size"])
    ranks = tensors.get("rng.aug_ranks")
    return int(ranks.shape[0]) if ranks is not None else 1


def _start_command(meta: dict) -> str:
    """`ltframe run RECIPE --set ...` as run.json records the start (or a generic hint)."""
    recipe = meta.get("recipe")
    if not recipe:
        return "`ltframe run RECIPE`"
    sets = " ".join(f"--set '{o}'" for o in meta.get("overrides", []))
    block = " ".join(f"--block {b}" for b in meta.get("blocked", []))
    return "`" + " ".join(filter(None, ["ltframe run", str(recipe), sets, block])) + "`"


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
