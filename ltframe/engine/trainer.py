"""The stage runner and step loop.

Path of a batch: sampler -> BatchStream (indices) -> ImageStore (uint8 on the device) ->
views (batched augmentation) -> one forward over all parts -> StepContext -> pseudo-labeler
-> weighted loss terms -> backward/step -> EMA -> step hooks. Loss values stay on the device
and are synced only every `run.log_every` steps and at epoch ends.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import refs
from ltframe.data.samplers import BatchStream
from ltframe.data.views import deferrable, elsewhere
from ltframe.engine import checkpoint as ckpt
from ltframe.engine import dist
from ltframe.engine.ckpt_writer import CheckpointWriter
from ltframe.engine.context import PoolPredictions, StepContext, split_outputs
from ltframe.engine.ema import EMA
from ltframe.engine.forward import forward_no_grad
from ltframe.engine.labelling import SMOKE_POOL, check_offline, label_pool, pool_index
from ltframe.engine.param_groups import param_groups
from ltframe.engine.preflight import check_plan_data, unlabeled_pool
from ltframe.engine.report import Reporter
from ltframe.engine.setup import set_cudnn_benchmark
from ltframe.engine.stage_state import Accumulators, Stage
from ltframe.engine.stages import StagePlan
from ltframe.engine.targets import TargetTable
from ltframe.errors import LtframeError, NonFiniteLossError, PeerDiedError, RecipeError
from ltframe.eval.evaluate import adjust_logits, evaluate_logits, extract_features, predict
from ltframe.eval.metrics import pseudo_label_metrics
from ltframe.eval.record import EvalRecord
from ltframe.recipe import channels_last_on

SMOKE_BATCH = 16


class Trainer:
    """Runs the stages of one run; owns everything that goes into a checkpoint."""

    def __init__(self, run: Any, reporter: Reporter) -> None:
        self.run = run
        self.reporter = reporter
        self.recipe = run.recipe
        self.model = run.model
        self.data = run.data
        self.device = run.device
        self.cuda = self.device.type == "cuda"
        self.autocast = self.cuda and self.recipe.run.precision == "bf16"
        self.channels_last = channels_last_on(self.device, self.recipe.run)
        self.dist = dist.info()
        set_cudnn_benchmark(self.device, self.recipe.run.cudnn_benchmark)  # CUDA only
        self.find_unused: bool | None = None  # DDP's find_unused_parameters of the stage
        # augmentation draws: one stream per rank (rank 0's is the single-process stream), on
        # the run's device, so views draw where the images are (no host <-> device sync)
        self.aug_gen = torch.Generator(device=self.device).manual_seed(
            self.recipe.run.seed + 1 + 7_919 * self.dist.rank)
        self.history: list[dict] = []
        self.record = EvalRecord(self.recipe.eval.report, self.recipe.eval.last_k)
        self.components: dict[str, Any] = {}
        self.ckpt_dir = run.run_dir / "checkpoints"
        self.writer = CheckpointWriter()  # checkpoints written on a background thread
        self._ckpt_clock = time.monotonic()  # when the last checkpoint was taken (run.checkpoint_minutes)
        self.images_per_s: float | None = None
        # true labels of the training pool: pseudo-label diagnostics only, never a training target
        self.hidden = run.data.hidden_labels.to(self.device)  # -1: unknown
        self.unknown_hidden = bool((run.data.hidden_unlabeled_labels < 0).any())
        # every training label comes from this table (labeled: true labels; pseudo: selected)
        d = run.data
        self.table = TargetTable(len(d.train), d.num_classes, d.splits.labeled, d.labeled_labels)
        self.position: tuple[str, int, int] = ("", 0, 0)  # (stage, step being run, total)
        # post-hoc adjustment prior: class counts of what the current stage trains on
        self.prior_counts: Tensor | None = None
        self.last_predictions: Tensor | None = None  # test-set predictions of the last evaluation
        self.pending: Any = None  # resume: changes files once the first stage is set up

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint this process wrote (waits for a write in flight)."""
        return self.writer.last

    def commit(self) -> None:
        """Run the pending resume commit (once)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending()

    # --- metrics file ---------------------------------------------------------------------
    def log(self, event: str, **data: Any) -> None:
        if not self.dist.main:  # only rank 0 writes
            return
        path = self.run.run_dir / "metrics.jsonl"
        try:
            with open(path, "a") as fh:
                fh.write(json.dumps({"event": event, **data}) + "\n")
        except OSError as exc:
            raise ckpt.write_failed(path, exc) from exc
        self.run.pm.hook.ltframe_log(run=self.run, event=event, data=data)

    # --- stage setup ----------------------------------------------------------------------
    def _parts_trainable(self, train: list[str]) -> list[str]:
        parts = ["backbone", *(f"heads.{n}" for n in self.model.heads)]
        for t in train:
            self.model.submodule(t)  # validates the name
        return [p for p in parts if any(p == t or p.startswith(t + ".") or t.startswith(p + ".")
                                         for t in train)]

    def set_mode(self, train: list[str], frozen_bn: str = "frozen") -> None:
        """Trainable parts get gradients. Frozen parts keep their weights; with
        `frozen_bn = "frozen"` they run in eval mode (BatchNorm uses and keeps its running
        statistics), with "update" in train mode (BatchNorm normalises with batch statistics and
        updates its running statistics on the stage's batches)."""
        self.model.train()
        self.model.requires_grad_(False)
        for t in train:
            self.model.submodule(t).requires_grad_(True)
        if frozen_bn == "update":
            return
        live = self._parts_trainable(train)
        for p in ["backbone", *(f"heads.{n}" for n in self.model.heads)]:
            if p not in live:
                self.model.submodule(p).eval()

    def _register_component(self, name: str, comp: Any) -> None:
        self.components[name] = comp
        pm = self.run.pm
        if not pm.is_registered(comp) and _has_hookimpls(comp):
            pm.register(comp, name=f"run:{name}")

    def _unregister_components(self) -> None:
        pm = self.run.pm
        for comp in self.components.values():
            if pm.is_registered(comp):
                pm.unregister(comp)
        self.components = {}

    # --- evaluation -----------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, head: str = "") -> dict:
        rc, d = self.recipe, self.data
        src = d.source
        logits = dist.sharded(lambda i: predict(model, d.test, i, src.mean, src.std,
                                                rc.eval.batch_size, head or rc.model.eval_head,
                                                self.autocast, self.channels_last),
                              torch.arange(d.test_labels.numel()))
        metrics = evaluate_logits(logits, d.test_labels, d.labeled_counts,
                                  rc.eval.many_threshold, rc.eval.few_threshold,
                                  rc.eval.posthoc_tau, self.prior_counts,
                                  rc.eval.groups, rc.eval.rank_sizes)
        # the predictions behind the reported metrics (first post-hoc tau), for reports
        tau = rc.eval.posthoc_tau[0] if isinstance(rc.eval.posthoc_tau, list) else rc.eval.posthoc_tau
        prior = self.prior_counts if self.prior_counts is not None else d.labeled_counts
        self.last_predictions = adjust_logits(logits, prior, tau).argmax(1)
        for extra in self.run.pm.hook.ltframe_evaluate(run=self.run, model=model, logits=logits,
                                                       labels=d.test_labels.cpu()):
            if extra:
                metrics.update(extra)
        return metrics

    def _record_eval(self, plan: StagePlan, model: torch.nn.Module, epoch: int, step: int) -> dict:
        """Evaluate, keep what the stage's reported number needs, log and report it."""
        metrics = {**self.evaluate(model, plan.cfg.eval_head), "stage": plan.name,
                   "epoch": epoch, "step": step}
        self.record.add(metrics)
        self.log("eval", **metrics)
        self.reporter.evaluation(plan.name, epoch, metrics)
        return metrics

    def fit_heads(self, model: torch.nn.Module, paths: list[str]) -> dict:
        """Call `fit(train_feats, train_labels, val_feats, val_labels)` on each listed head
        with un-augmented features of the labeled set (and the val split, if any)."""
        d, bs = self.data, self.recipe.eval.batch_size
        feats = dist.sharded(lambda i: extract_features(model, d.train, i, d.source.mean,
                                                        d.source.std, bs), d.splits.labeled)
        val_feats = (dist.sharded(lambda i: extract_features(model, d.val, i, d.source.mean,
                                                             d.source.std, bs), d.val_index)
                     if d.val is not None else None)
        out = {}
        for path in paths:
            head = model.get_submodule(path) if path.startswith("heads.") else None
            if head is None or not hasattr(head, "fit"):
                raise RecipeError(f"stage.fit: '{path}' is not a head with a fit() method "
                                  "(e.g. heads.main with name = \"ncm\" or \"tau_norm\")")
            out[path] = head.fit(feats, d.labeled_labels, val_feats, d.val_labels) or {}
        return out

    def _make_streams(self, plan: StagePlan, index: Tensor) -> dict[str, BatchStream]:
        """The supervised stream over `index` (labeled and/or pseudo-labelled samples, with
        the target table's labels) and/or the unlabeled stream, per the stage's `data`."""
        cfg, reg, d = plan.cfg, self.run.registry, self.data
        batch = cfg.batch_size or self.recipe.data.batch_size
        if self.run.smoke:
            batch = min(batch, SMOKE_BATCH)
        rank, world = self.dist.rank, self.dist.world_size
        if batch % world:
            raise RecipeError(f"stage '{plan.name}': the batch size {batch} is the global batch "
                              f"and must divide by the {world} processes; set data.batch_size "
                              f"(or stage.batch_size) to a multiple of {world}")
        batch //= world
        parts = cfg.data.split("+")
        seed = self.recipe.run.seed * 1000 + plan.index
        # with the default steps_per_epoch, stage epoch e is the main sampler's epoch e
        aligned = dict(epoch_aligned=not cfg.steps_per_epoch, drop_last=cfg.drop_last)
        streams: dict[str, BatchStream] = {}
        supervised = "labeled" in parts or "pseudo" in parts
        if supervised:
            sampler = reg.build(cfg.sampler, labels=self.table.labels[index],
                                num_classes=d.num_classes, seed=seed, rank=rank,
                                world_size=world)
            streams["labeled"] = BatchStream(sampler, index, batch, **aligned)
        if "unlabeled" in parts:
            pool = unlabeled_pool(d, cfg)
            unknown = torch.full((pool.numel(),), -1, dtype=torch.long)  # no labels reach it
            sampler_u = reg.build(cfg.unlabeled_sampler, labels=unknown, num_classes=d.num_classes,
                                  seed=seed + 500, rank=rank, world_size=world)
            u_batch = batch * (cfg.unlabeled_ratio if supervised else 1)
            if self.run.smoke:
                u_batch = min(u_batch, 2 * SMOKE_BATCH)
            streams["unlabeled"] = BatchStream(sampler_u, pool, u_batch,
                                               **({} if supervised else aligned))
        return streams

    def _stage_index(self, plan: StagePlan) -> Tensor:
        """The supervised samples of a stage (labeled and/or pseudo-labelled), checked."""
        cfg, d = plan.cfg, self.data
        parts = cfg.data.split("+")
        where = f"stage '{plan.name}' (stage[{plan.index}])"
        check_plan_data(plan, d.splits.unlabeled.numel() > 0,
                        self.table.pseudo.numel() > 0 or self.table.generation > 0)
        index = self.table.index([p for p in parts if p in ("labeled", "pseudo")])
        if ("labeled" in parts or "pseudo" in parts) and index.numel() == 0:
            raise RecipeError(f"{where}.data = \"{cfg.data}\": no samples to train on (the last "
                              "pool labelling kept none); lower its threshold or add \"labeled\"")
        return index

    def _gather_inputs(self, st: Stage, defer: bool = False) -> tuple[list, dict[str, str], dict]:
        """Next batch of every stream through every view: (entries (part, view, images, draws),
        aliases, {targets, weights, soft_targets, indices}). Views are applied here (entries'
        view None), or with `defer` a view that draws apart (`deferrable`) only draws here and
        `_view_inputs` applies it inside the (compiled) step."""
        entries: list[tuple[str, Any, Tensor, Any]] = []
        aliases: dict[str, str] = {}
        labels, weight, soft_pos, soft = self.table.on(self.device)
        out: dict[str, Any] = {"targets": None, "weights": None, "soft_targets": None,
                               "indices": {}}
        store = self.data.train
        taken: set[str] = set()
        for split, stream in st.streams.items():
            idx = stream.next()
            # the indices go to the device once (pinned on CUDA: an asynchronous copy), for
            # the image store, the targets and the components
            idx_d = (idx.pin_memory() if self.cuda else idx).to(self.device, non_blocking=True)
            x = store.get(idx, idx_d)
            if store.prefetches:  # file-backed: decode the next batch while this step runs
                store.prefetch(stream.peek())
            out["indices"][split] = idx_d
            if split == "labeled":  # targets from the run's table, never the source's labels
                out["targets"] = labels[idx_d]
                if st.weighted:
                    out["weights"] = weight[idx_d]
                if st.soft:  # rows without a soft target get their label one-hot
                    pos = soft_pos[idx_d]
                    rows = soft[pos.clamp_min(0)]
                    hot = F.one_hot(out["targets"].clamp_min(0), self.data.num_classes).to(rows.dtype)
                    out["soft_targets"] = torch.where((pos >= 0)[:, None], rows, hot)
            for j, (vname, view) in enumerate(st.views[split]):
                part = f"{split}:{vname}"
                part = part if part not in taken else f"{part}#{j}"
                taken.add(part)
                if defer and deferrable(view) and not elsewhere(self.aug_gen, x):
                    entries.append((part, view, x, view.draw(x.shape[0], self.aug_gen, x.device)))
                else:
                    entries.append((part, None, view(x, self.aug_gen), None))
                if j == 0:
                    aliases[split] = part
        return entries, aliases, out

    def _view_inputs(self, entries: list) -> tuple[Tensor, dict[str, int]]:
        """Apply the deferred views; all parts concatenated (channels-last with
        `run.channels_last`) + sizes."""
        inputs = [x if view is None else view.apply(x, draws) for _, view, x, draws in entries]
        sizes = {e[0]: xi.shape[0] for e, xi in zip(entries, inputs, strict=True)}
        x_all = torch.cat(inputs)
        if self.channels_last:
            x_all = x_all.contiguous(memory_format=torch.channels_last)
        return x_all, sizes

    # --- the stage loop -------------------------------------------------------------------
    def run_stage(self, plan: StagePlan, resume: tuple[dict, dict] | None = None) -> dict:
        """Set the stage up (or restore it mid-way), run its steps, then finish it."""
        st = self._setup_stage(plan, resume)
        self.commit()
        hook = self.run.pm.hook
        hook.ltframe_stage_start(run=self.run, stage=plan)
        self.reporter.stage_start(plan.name, st.total, st.start)
        extra = {} if self.find_unused is None else {"ddp_find_unused_parameters": self.find_unused}
        self.log("stage_start", stage=plan.name, index=plan.index, total_steps=st.total,
                 steps_per_epoch=st.spe, resumed_at=st.start, **extra)
        self._ckpt_clock = time.monotonic()
        for step in range(st.start, st.total):
            self.position = (plan.name, step, st.total)
            if not dist.agent_alive():
                raise PeerDiedError(f"the torchrun agent died, so this worker stops in stage "
                                    f"'{plan.name}' at step {step}; {self._kept()}: continue "
                                    f"with {dist.resume_hint(self.run.run_dir)}")
            epoch = step // st.spe
            if step % st.spe == 0:
                hook.ltframe_epoch_start(run=self.run, stage=plan, epoch=epoch)
            ctx = self._step(st, step, epoch)
            hook.ltframe_step_end(run=self.run, stage=plan, step=step, ctx=ctx)
            self._after_step(st, step + 1, epoch)
        return self._end_stage(st)

    # --- stage setup ----------------------------------------------------------------------
    def _setup_stage(self, plan: StagePlan, resume: tuple[dict, dict] | None) -> Stage:
        """Modes, streams, schedule, optimizer, loss terms, pseudo-labeler, views and EMA of
        a stage; restored from `resume` when the stage is continued mid-way."""
        cfg, rc, reg, d = plan.cfg, self.recipe, self.run.registry, self.data
        self.set_mode(cfg.train, cfg.frozen_bn)
        self.record = EvalRecord(rc.eval.report, rc.eval.last_k)  # this stage's evaluations
        index = self._stage_index(plan)
        if resume is None:
            for path in cfg.reset:
                self.model.reset(path)
        streams = self._make_streams(plan, index)
        main = streams["labeled" if "labeled" in streams else "unlabeled"]
        spe = cfg.steps_per_epoch or main.batches_per_epoch()
        total = cfg.steps or cfg.epochs * spe  # 0 for a fit-only stage
        if self.run.smoke:
            spe, total = 1, min(total, 2)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params and total > 0:
            raise RecipeError(f"stage[{plan.index}].train: nothing to train; "
                              "name parts such as 'backbone' or 'heads.main'")
        groups = param_groups(params, self.model, plan.optim.no_decay)
        optimizer = reg.build(plan.optim.optimizer, params=groups) if params else None
        # class counts of what the stage trains on (labeled, plus pseudo-labelled samples)
        counts = (self.table.class_counts(index) if index.numel() else d.labeled_counts)
        counts = counts.to(self.device)
        self.prior_counts = counts.cpu()
        ctx_kw = dict(num_classes=d.num_classes, class_counts=counts, num_samples=len(d.train),
                      seed=rc.run.seed * 1000 + plan.index,
                      labeled_counts=d.labeled_counts.to(self.device), device=self.device,
                      unlabeled_index=unlabeled_pool(d, plan.cfg).to(self.device))
        losses: list[tuple[str, float, int, Any]] = []
        for i, spec in enumerate(cfg.loss):
            taken = [n for n, *_ in losses]
            name = spec.name if spec.name not in taken else f"{spec.name}{i}"
            losses.append((name, spec.weight, spec.start, reg.build(spec, **ctx_kw)))
            self._register_component(f"loss.{name}", losses[-1][3])
        labeler = reg.build(cfg.pseudo_labeler, **ctx_kw) if cfg.pseudo_labeler else None
        if labeler is not None:
            self._register_component("pseudo_labeler", labeler)
        transform = reg.build(cfg.transform, **ctx_kw) if cfg.transform else None
        if transform is not None:
            self._register_component("transform", transform)
        if cfg.label is not None:  # fail before training, not after it
            check_offline(reg.build(cfg.label, **ctx_kw), plan)
            pool_index(d, cfg.label_pool, plan, self.run.smoke)
        mean, std = d.source.mean, d.source.std
        views = {split: [(v.name, reg.build(v, mean=mean, std=std)) for v in specs]
                 for split, specs in (("labeled", cfg.views.labeled),
                                      ("unlabeled", cfg.views.unlabeled))}
        for _, view in (pair for pairs in views.values() for pair in pairs):
            if callable(getattr(view, "to", None)):  # device constants now, not at step 0
                view.to(self.device)
        self.table.on(self.device)  # the table's device copy now, not at the first step
        st = Stage(
            plan=plan, spe=spe, total=total,
            schedule=reg.build(plan.optim.schedule, steps_per_epoch=spe, total_steps=total),
            optimizer=optimizer,
            base_lrs=[g["lr"] for g in optimizer.param_groups] if optimizer else [],
            counts=counts, losses=losses, labeler=labeler, views=views, streams=streams,
            ema=EMA(self.model, cfg.ema) if cfg.ema > 0 else None,
            acc=Accumulators(self.device, [n for n, *_ in losses], d.num_classes),
            transform=transform,
            teacher=_frozen_copy(self.model) if cfg.teacher == "start" else None,
            soft=self.table.has_soft(index), weighted=not self.table.unit_weights(index),
            train_forward=self._train_forward(plan) if params and total > 0 else None,
        )
        mode = compile_mode(rc.run, self.cuda)
        if rc.run.cuda_graph and not self.cuda and plan.index == 0:
            self.reporter.message("run.cuda_graph: CUDA graphs need a CUDA device; the step runs "
                                  "compiled without them")
        if mode is not None and rc.run.compile_scope == "step" and params and total > 0:
            # one compiled function per stage (its components and parts are the stage's)
            st.core = torch.compile(self._core, mode=None if mode == "default" else mode)
        if resume is not None:
            self._restore_stage(st, *resume)
        return st

    def _train_forward(self, plan: StagePlan) -> torch.nn.Module | None:
        """The training forward of a stage when it is not the plain model: wrapped in
        DistributedDataParallel (gradients averaged over ranks) under torchrun, and/or
        torch.compile'd (`run.compile`). Built per stage: the trainable parameters change.
        The model itself (checkpoints, EMA, evaluation) stays the eager module."""
        fwd: torch.nn.Module | None = None
        self.find_unused = None
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.cuda else None
            # heads outside a stage's losses (e.g. a rotation head) get no gradient: only then
            # does DDP need its per-step search of the autograd graph for unused parameters
            self.find_unused = needs_find_unused(self.model, plan.cfg.loss)
            fwd = DistributedDataParallel(self.model, device_ids=ids,
                                          find_unused_parameters=self.find_unused)
        mode = compile_mode(self.recipe.run, self.cuda)
        if mode is not None and self.recipe.run.compile_scope == "forward":
            fwd = torch.compile(self.model if fwd is None else fwd,
                                mode=None if mode == "default" else mode)
        return fwd

    def _restore_stage(self, st: Stage, tensors: dict[str, Tensor], meta: dict) -> None:
        st.start = st.acc.last_good = int(meta["step"])
        name = Path(str(meta.get("tensors", "checkpoint"))).stem
        if st.start >= st.total:  # an override made the stage end before the checkpoint
            raise RecipeError(
                f"stage '{st.plan.name}' now has {st.total} steps but checkpoint {name} is at "
                f"step {st.start}; an override cannot make a stage end before the step it "
                f"reached: resume without it, or give the stage more than {st.start} steps")
        if st.optimizer is None or not isinstance(meta.get("optimizer"), dict):
            raise ckpt.CheckpointError(f"checkpoint {name} is corrupt (no optimizer state for "
                                       "a mid-stage step); resume --from an earlier checkpoint")
        load_optimizer(st.optimizer, ckpt.unflatten_state(meta["optimizer"], tensors), name)
        for k, s in st.streams.items():
            s.load_state_dict(meta["streams"][k])
        where = meta.get("tensors", "checkpoint")
        if st.ema is not None:
            ckpt.load_module_state(st.ema.module, tensors, "ema", where)
        if st.teacher is not None:
            ckpt.load_module_state(st.teacher, tensors, "teacher", where)
        st.acc.load_state_tensors(tensors)
        self.record.load_state_dict(meta.get("record") or {})
        comp_state = ckpt.unflatten_state(meta.get("components", {}), tensors)
        for name, comp in self.components.items():
            if name in comp_state and hasattr(comp, "load_state_dict"):
                comp.load_state_dict(comp_state[name])

    # --- one step -------------------------------------------------------------------------
    def _step(self, st: Stage, step: int, epoch: int) -> StepContext:
        """lr, inputs (`_gather_inputs`), then `_core` (eager or compiled): views, input
        transform, one forward over all parts, pseudo-labels, loss terms; then the update and
        EMA."""
        factor = st.schedule(step)
        for g, lr0 in zip(st.optimizer.param_groups, st.base_lrs, strict=True):
            g["lr"] = lr0 * factor
        with _span("ltframe.data"):  # indices, images, targets, augmentation (or its draws)
            entries, aliases, got = self._gather_inputs(st, defer=st.core is not None)
        ctx = (st.core or self._core)(st, step, epoch, entries, aliases, got)
        loss = ctx.losses["total"]
        with _span("ltframe.backward"):
            st.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with _span("ltframe.optimizer"):
            st.optimizer.step()
        if st.ema is not None:
            with _span("ltframe.ema"):
                st.ema.update()
        st.acc.add(ctx.losses, sum(e[2].shape[0] for e in entries))
        return ctx

    def _core(self, st: Stage, step: int, epoch: int, entries: list, aliases: dict[str, str],
              got: dict) -> StepContext:
        """The device part of a step, free of generators and host reads: deferred views, the
        input transform, the training forward, pseudo-labels and the loss terms (their sum in
        ctx.losses['total']). `run.compile` compiles it whole (`_compile_core`).

        With bf16 autocast the step runs inside one outer autocast region that is itself
        disabled (losses stay float32) but keeps autocast's weight-cast cache alive across the
        step's forwards (no-grad guesses, teacher calls, the training forward), so each
        trainable weight is cast to bf16 once per step (tests/test_autocast_casts.py)."""
        if not self.autocast:
            return self._core_body(st, step, epoch, entries, aliases, got)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=False):
            return self._core_body(st, step, epoch, entries, aliases, got)

    def _core_body(self, st: Stage, step: int, epoch: int, entries: list,
                   aliases: dict[str, str], got: dict) -> StepContext:
        x_all, sizes = self._view_inputs(entries)
        x_parts = dict(zip(sizes, torch.split(x_all, list(sizes.values())), strict=True))
        for alias, part in aliases.items():
            x_parts[alias] = x_parts[part]
        ctx = StepContext(step=step, epoch=epoch, num_classes=self.data.num_classes,
                          class_counts=st.counts, targets=got["targets"],
                          features_by_part={}, logits_by_part={}, model=self.model,
                          total_steps=st.total, steps_per_epoch=st.spe,
                          inputs_by_part=x_parts, indices_by_part=got["indices"],
                          weights=got["weights"], soft_targets=got["soft_targets"],
                          teacher_model=st.teacher_model(), _teacher_on=self._teacher_on(st),
                          _teacher=self._teacher_fn(st, x_parts),
                          _student_no_grad=lambda x: forward_no_grad(self.model, x, True,
                                                                     self.autocast))
        if st.transform is not None:
            x_all = self._transformed(st, ctx, sizes, aliases, x_all)
        with _span("ltframe.forward"), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                      enabled=self.autocast):
            fwd = self.model if st.train_forward is None else st.train_forward
            feats, logits = fwd(x_all)
        logits = {k: v.float() for k, v in logits.items()}
        f_parts, l_parts = split_outputs(feats.float(), logits, sizes)
        for alias, part in aliases.items():
            f_parts[alias], l_parts[alias] = f_parts[part], l_parts[part]
        ctx.features_by_part, ctx.logits_by_part = f_parts, l_parts
        with _span("ltframe.losses"):  # pseudo-labels and loss terms
            if st.labeler is not None:
                ctx.pseudo = st.labeler(ctx)
                if "unlabeled" in ctx.indices_by_part:
                    st.acc.count_pseudo(ctx.pseudo, self.hidden[ctx.indices_by_part["unlabeled"]])
            loss = None
            for name, weight, start, term in st.losses:
                if ctx.step < start:  # the term's warm-up: not computed, logged as 0
                    ctx.losses[name] = st.acc.zero
                    continue
                value = term(ctx)
                ctx.losses[name] = value
                part = value if weight == 1 else weight * value
                loss = part if loss is None else loss + part
            ctx.losses["total"] = st.acc.zero if loss is None else loss
        return ctx

    def _teacher_fn(self, st: Stage, x_parts: dict[str, Tensor]) -> Any:
        on = self._teacher_on(st)
        return None if on is None else (lambda part: on(x_parts[part]))

    def _teacher_on(self, st: Stage) -> Any:
        """The stage teacher's no-grad forward on any batch (None without a teacher)."""
        teacher = st.teacher_model()
        if teacher is None:
            return None
        batch_stats = st.plan.cfg.teacher_bn == "batch"
        return lambda x: forward_no_grad(teacher, x, batch_stats, self.autocast)

    def _transformed(self, st: Stage, ctx: StepContext, sizes: dict[str, int],
                     aliases: dict[str, str], x_all: Tensor) -> Tensor:
        """Run the stage's input transform; the inputs it replaced (same batch sizes) are
        concatenated for the training forward."""
        before = dict(ctx.inputs_by_part)
        st.transform(ctx)
        for alias, part in aliases.items():  # a transform may write either name
            if ctx.inputs_by_part[alias] is not before[alias]:
                ctx.inputs_by_part[part] = ctx.inputs_by_part[alias]
            ctx.inputs_by_part[alias] = ctx.inputs_by_part[part]
        xs = [ctx.inputs_by_part[p] for p in sizes]
        for p, x in zip(sizes, xs, strict=True):
            if x.shape != before[p].shape:
                raise LtframeError(f"stage '{st.plan.name}'.transform changed the shape of "
                                   f"'{p}' from {tuple(before[p].shape)} to {tuple(x.shape)}; "
                                   "a transform must keep each part's batch and image size")
        if all(x is before[p] for p, x in zip(sizes, xs, strict=True)):
            return x_all
        x_all = torch.cat(xs)
        if self.channels_last:
            x_all = x_all.contiguous(memory_format=torch.channels_last)
        return x_all

    # --- after a step: logging, end of epoch, checkpoints ---------------------------------
    def _after_step(self, st: Stage, done: int, epoch: int) -> None:
        end_epoch = done % st.spe == 0 or done == st.total
        if done % self.recipe.run.log_every == 0 or end_epoch:
            self._log_train(st, done, epoch)
        if end_epoch:
            self._end_epoch(st, done, epoch)
        elif ((every := self.recipe.run.checkpoint_every) and done % every == 0) or (
                done % self.recipe.run.log_every == 0 and self._checkpoint_due(timed_only=True)):
            self._check_finite(st.acc.bad, st.acc.sums, st.plan, st.acc.last_good, done)
            self._checkpoint(st, done)

    def _checkpoint(self, st: Stage, done: int) -> None:
        """A mid-stage checkpoint (written on the background thread)."""
        self._save(st.plan, done, st.total, st.optimizer, st.streams, st.ema, teacher=st.teacher,
                   acc=st.acc)
        st.acc.last_good = done

    def _checkpoint_due(self, timed_only: bool = False) -> bool:
        """`run.checkpoint_minutes` have passed since the last checkpoint (0: every epoch end;
        `timed_only`: only a positive interval counts). Asked at log and epoch boundaries only;
        under torchrun rank 0's clock decides for every rank."""
        minutes = self.recipe.run.checkpoint_minutes
        if minutes == 0:
            return not timed_only
        due = time.monotonic() - self._ckpt_clock >= minutes * 60
        if self.dist.world_size > 1:
            due = bool(dist.broadcast_object(due))
        return due

    def _log_train(self, st: Stage, done: int, epoch: int) -> None:
        """Sync the accumulated loss terms (the only per-interval host sync), check them."""
        acc = st.acc
        if self.dist.world_size > 1:  # every rank logs the mean over ranks
            for k, v in acc.sums.items():
                acc.sums[k] = dist.all_sum(v) / self.dist.world_size
            acc.imgs = int(dist.all_sum(torch.tensor(acc.imgs)))
        self._check_finite(acc.bad, acc.sums, st.plan, acc.last_good, done)
        dt = time.perf_counter() - acc.t_log
        ips = acc.imgs / dt if dt > 0 else 0.0
        self.images_per_s = ips
        means = {k: float(v) / max(acc.n, 1) for k, v in acc.sums.items()}
        lr = st.optimizer.param_groups[0]["lr"]
        extra = {}
        if st.labeler is not None:  # online pseudo-labels: fraction of unlabeled samples kept
            counts = torch.stack([acc.pseudo[0], acc.pseudo[1] + acc.seen])
            kept, seen = (dist.all_sum(counts) if self.dist.world_size > 1 else counts).tolist()
            if seen:
                extra["mask_ratio"] = round(kept / seen, 5)
        self.log("train", stage=st.plan.name, step=done, epoch=epoch, loss=means, lr=lr,
                 images_per_s=round(ips, 1), **extra)
        self.reporter.progress(done, {**means, "lr": lr, "images_per_s": ips})
        acc.reset_interval()

    def _end_epoch(self, st: Stage, done: int, epoch: int) -> None:
        """Evaluation (per `eval_every`), pseudo-label diagnostics, checkpoint, epoch hook."""
        cfg, n = st.plan.cfg, self.data.num_classes
        metrics: dict[str, Any] = {}
        last = done == st.total
        # a stage that fits heads is evaluated once, after fitting
        if (last and not cfg.fit) or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            metrics = self._record_eval(st.plan, st.eval_model(self.model), epoch, done)
        if self.dist.world_size > 1:
            st.acc.confusion = dist.all_sum(st.acc.confusion)
        if st.labeler is not None and (st.acc.confusion.sum() > 0 or self.unknown_hidden):
            plm = pseudo_label_metrics(st.acc.confusion.view(n, n))
            if self.unknown_hidden:  # some unlabeled images have no label to compare with
                plm["hidden_labels"] = ("not available" if plm["pl_count"] == 0 else
                                        "only over unlabeled images with a known label")
            self.log("pseudo_labels", stage=st.plan.name, epoch=epoch, **plm)
            metrics.update(plm)
            st.online = plm
            st.acc.confusion.zero_()
        every = self.recipe.run.checkpoint_every
        if not last:
            self._epoch_pool(st, epoch)  # before a checkpoint: resume stays exact
            if self._checkpoint_due() or (every and done % every == 0):
                self._checkpoint(st, done)
        self.run.pm.hook.ltframe_epoch_end(run=self.run, stage=st.plan, epoch=epoch,
                                           metrics=metrics)

    def _epoch_pool(self, st: Stage, epoch: int) -> None:
        """Whole-pool predictions for components that update from them between epochs.

        A stage component (pseudo-labeler, loss term, transform) that defines
        `epoch_pool(pool: PoolPredictions, epoch: int)` gets, at the end of every epoch but the
        last (before the checkpoint, so its state is saved with the epoch), the softmax of the
        unlabeled split, un-augmented, float32, from `pool_model`: "model" (the training model
        in eval mode; default) or "ema" (the evaluation model); `pool_model = None` opts out
        (e.g. a mode that needs no pass); `pool_head` names the head (default: the eval
        head); `pool_splits` (default ("unlabeled",)) the splits it gets, one call each in
        the order listed: "unlabeled" and/or "val" (the held-out labeled split, with `labels`;
        e.g. DARP's BBSE estimate; preflight refuses it without a val split). One pass per model
        kind, head and split; sharded under torchrun, every rank gets every row. E.g. Adsh's
        per-class thresholds and USB's SAW weights."""
        comps = [c for c in (st.labeler, st.transform, *(t for *_, t in st.losses))
                 if callable(getattr(c, "epoch_pool", None))
                 and getattr(c, "pool_model", "model") is not None]
        d, plan = self.data, st.plan
        unl = d.splits.unlabeled[:SMOKE_POOL] if self.run.smoke else d.splits.unlabeled
        pools: dict[tuple[str, str, str], PoolPredictions] = {}
        for comp in comps:
            kind = getattr(comp, "pool_model", "model")
            head = getattr(comp, "pool_head", "") or plan.cfg.eval_head or self.recipe.model.eval_head
            for split in getattr(comp, "pool_splits", ("unlabeled",)):
                store, index, labels = ((d.val, d.val_index, d.val_labels) if split == "val"
                                        else (d.train, unl, None))
                if index is None or index.numel() == 0:
                    continue
                if (kind, head, split) not in pools:
                    model = st.eval_model(self.model) if kind == "ema" else self.model
                    logits = dist.sharded(lambda i, m=model, h=head, s=store: predict(
                        m, s, i, d.source.mean, d.source.std, self.recipe.eval.batch_size, h,
                        False, self.channels_last), index)
                    pools[kind, head, split] = PoolPredictions(
                        index=index, probs=logits.softmax(1), num_classes=d.num_classes,
                        class_counts=d.labeled_counts.cpu(), stage_index=plan.index,
                        stage_name=plan.name, logits=logits, split=split,
                        labels=None if labels is None else labels.cpu())
                comp.epoch_pool(pools[kind, head, split], epoch)

    # --- end of a stage -------------------------------------------------------------------
    def _end_stage(self, st: Stage) -> dict:
        """Fit heads, record the stage's result, keep the evaluated weights, checkpoint."""
        plan, cfg, rc = st.plan, st.plan.cfg, self.recipe
        total, ema = st.total, st.ema
        if cfg.fit or total == 0:  # fitted heads, or an evaluation-only stage (no steps)
            eval_model = st.eval_model(self.model)
            if cfg.fit:
                fitted = self.fit_heads(eval_model, cfg.fit)
                self.log("fit", stage=plan.name, **fitted)
            self._record_eval(plan, eval_model, max(total // st.spe - 1, 0), total)
        result = {"stage": plan.name, "index": plan.index, "steps": total,
                  "eval_head": cfg.eval_head or rc.model.eval_head,
                  "train_counts": st.counts.tolist(),  # the prior of post-hoc adjustment
                  **self.record.summary()}
        if st.online is not None:  # the last epoch's online pseudo-label precision / recall
            result["online_pseudo_labels"] = st.online
        if ema is not None:  # later stages continue from the weights that were evaluated
            self.model.load_state_dict(ema.module.state_dict())
        if cfg.label is not None:  # whole-pool labelling for later stages
            result["pool_labels"] = label_pool(self, plan, self.model)
        self.history.append(result)
        self._save_predictions(plan)
        # logged before the stage checkpoint, so the metrics it records include stage_end
        self.log("stage_end", **result)
        # the stage is done: the next checkpoint starts the next stage at step 0
        self._save(plan, 0, total, None, {}, None, stem=f"stage{plan.index}-{plan.name}",
                   next_stage=True, wait=True)
        self.run.pm.hook.ltframe_stage_end(run=self.run, stage=plan, result=result)
        self.reporter.stage_end(plan.name)
        self._unregister_components()
        return result

    def _save_predictions(self, plan: StagePlan) -> None:
        """RUN/predictions/stage<i>-<name>.safetensors: the stage's last test-set predictions
        and labels (confusion matrices and per-class plots in `ltframe report`)."""
        if self.last_predictions is None or not self.dist.main:
            return
        from safetensors.torch import save as st_save

        from ltframe.engine.labelling import csv_field

        pred, label = self.last_predictions.long().cpu(), self.data.test_labels.cpu().long()
        data = st_save({"pred": pred.contiguous(), "label": label.contiguous()})
        stem = self.run.run_dir / "predictions" / f"stage{plan.index}-{plan.name}"
        ckpt.atomic_write_bytes(stem.parent / f"{stem.name}.safetensors", data)
        files = self.data.test_files
        rows = "".join(f"{i},{csv_field(files[i]) if files else ''},{y},{p}\n"
                       for i, (y, p) in enumerate(zip(label.tolist(), pred.tolist(), strict=True)))
        ckpt.atomic_write_text(stem.parent / f"{stem.name}.csv", "index,file,label,pred\n" + rows)

    def _newest(self) -> str | None:
        """The newest complete checkpoint: written by this process, or found on disk."""
        if self.last_checkpoint is not None:
            return str(self.last_checkpoint)
        latest = self.ckpt_dir / "latest"
        return str(self.ckpt_dir / latest.read_text().strip()) if latest.is_file() else None

    def _kept(self) -> str:
        newest = self._newest()
        return (f"the last good checkpoint {newest} is kept" if newest
                else "no checkpoint had been written yet")

    def _then(self) -> str:
        """How to go on after a non-finite loss or weights: resume, or start again."""
        if self._newest():
            return f"then `ltframe resume {self.run.run_dir} --set optim.lr=...`"
        return "then start the run again (`ltframe run RECIPE --set optim.lr=...`)"

    def _check_finite(self, bad: Tensor, sums: dict[str, Tensor], plan: StagePlan,
                      last_good: int, done: int) -> None:
        if not bool(dist.all_sum(bad.to(torch.int32)) > 0):  # the same decision on every rank
            return
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in sums.items())
        kept = self._kept()
        self.log("error", stage=plan.name, step=done, error="non-finite loss", terms=terms)
        raise NonFiniteLossError(
            f"non-finite loss in stage '{plan.name}' between steps {last_good} and {done} "
            f"(summed terms: {terms}); {kept}. Lower optim.lr, check the data and loss "
            f"weights, or set run.precision = \"fp32\"; {self._then()}"
        )

    def _save(self, plan: StagePlan, step: int, total: int, optimizer: Any,
              streams: dict[str, BatchStream], ema: EMA | None, stem: str | None = None,
              next_stage: bool = False, teacher: torch.nn.Module | None = None,
              acc: Accumulators | None = None, wait: bool = False) -> None:
        """Checkpoint everything a resume needs; the files are written on the background
        thread (`wait`: complete on return, as at stage ends)."""
        tensors: dict[str, Tensor] = {}
        for k, v in self.model.state_dict().items():
            tensors[f"model.{k}"] = v
        if ema is not None:
            for k, v in ema.module.state_dict().items():
                tensors[f"ema.{k}"] = v
        if teacher is not None:
            for k, v in teacher.state_dict().items():
                tensors[f"teacher.{k}"] = v
        for k, v in self.table.state_dict().items():
            tensors[f"targets.{k}"] = v
        if acc is not None:  # the open log interval's loss sums and this epoch's pseudo-labels
            tensors.update(acc.state_tensors())
        rng = {"aug": self.aug_gen.get_state(), "torch": torch.get_rng_state()}
        if self.dist.world_size > 1:  # every rank's augmentation stream
            rng["aug_ranks"] = dist.gather_batch(self.aug_gen.get_state()[None])
        if self.cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        bad = ckpt.nonfinite({k: v for k, v in tensors.items()
                              if not k.startswith(("targets.", "acc."))})
        if bad:
            kept = self._kept()
            self.log("error", stage=plan.name, step=step, error="non-finite weights", tensors=bad[:5])
            raise NonFiniteLossError(
                f"the weights became non-finite in stage '{plan.name}' by step {step} "
                f"({', '.join(bad[:3])}); {kept}. Lower optim.lr or set run.precision = \"fp32\"; "
                f"{self._then()}")
        comps = {n: c.state_dict() for n, c in self.components.items() if hasattr(c, "state_dict")}
        meta = {
            "stage_index": plan.index + 1 if next_stage else plan.index,
            "stage_name": plan.name,
            "step": step,
            "total_steps": total,
            "history": self.history,
            "record": self.record.state_dict(),
            "streams": {k: s.state_dict() for k, s in streams.items()},
            "optimizer": ckpt.flatten_state(optimizer.state_dict(), "optim", tensors)
            if optimizer is not None else None,
            "rng": ckpt.flatten_state(rng, "rng", tensors),
            "components": ckpt.flatten_state(comps, "component", tensors),
            "ema": ema is not None,
            "metrics_bytes": self._metrics_size(),
            "world_size": self.dist.world_size,
            "recipe_sha256": getattr(self.run, "recipe_sha256", "") or "",
        }
        stem = stem or f"step-s{plan.index}-{step:08d}"
        if self.dist.main:  # only rank 0 writes
            self.writer.submit(self.ckpt_dir, stem, tensors, meta, wait=wait)
        self._ckpt_clock = time.monotonic()

    def _metrics_size(self) -> int:
        f = self.run.run_dir / "metrics.jsonl"
        return f.stat().st_size if f.is_file() else 0

    def _set_aug_state(self, state: Tensor) -> None:
        """Restore the augmentation generator; a state of another kind of generator (a
        checkpoint written on another device, or by a version whose generator was on the CPU)
        seeds it deterministically instead (the same augmentations on every such resume, not
        those of the original run)."""
        try:
            self.aug_gen.set_state(state)
        except RuntimeError:
            self.aug_gen.manual_seed(_aug_state_seed(state))

    def restore(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Model weights, RNG states and history from a checkpoint (optimizer: in run_stage)."""
        ckpt.load_module_state(self.model, tensors, "model", meta.get("tensors", "checkpoint"))
        rng = ckpt.unflatten_state(meta["rng"], tensors)
        ranks = rng.get("aug_ranks")
        if ranks is not None and ranks.shape[0] == self.dist.world_size:
            self._set_aug_state(ranks[self.dist.rank].clone())
        elif self.dist.rank == 0:
            self._set_aug_state(rng["aug"])
        torch.set_rng_state(rng["torch"])
        if self.cuda and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.history = list(meta.get("history", []))
        if any(k.startswith("targets.") for k in tensors):
            self.table.load_state_dict({k[8:]: v for k, v in tensors.items()
                                        if k.startswith("targets.")})


def _aug_state_seed(state: Tensor) -> int:
    """A seed derived from another kind of generator's state (deterministic: its SHA-256)."""
    digest = hashlib.sha256(state.detach().cpu().contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict, name: str) -> None:
    """Load a checkpoint's optimizer state after checking it fits the stage's parameters
    (a mismatch is a corrupt checkpoint, named, not an error at the next step)."""
    def corrupt(why: str) -> ckpt.CheckpointError:
        return ckpt.CheckpointError(f"checkpoint {name} is corrupt ({why}); resume --from an "
                                    "earlier checkpoint (ltframe resume RUN --from FILE)")

    if not isinstance(state.get("state"), dict) or not isinstance(state.get("param_groups"), list):
        raise corrupt("its optimizer state is not a state_dict")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        per_param = {int(k): v for k, v in state["state"].items()}  # JSON keys are text
    except (TypeError, ValueError):
        raise corrupt("its optimizer state has keys that are not parameter numbers") from None
    for i, slots in per_param.items():
        if not 0 <= i < len(params) or not isinstance(slots, dict):
            raise corrupt(f"optimizer state for parameter {i} of {len(params)}")
        for key, v in slots.items():
            if isinstance(v, Tensor) and v.dim() > 0 and v.shape != params[i].shape:
                raise corrupt(f"optimizer '{key}' of parameter {i} has shape {tuple(v.shape)}, "
                              f"the parameter {tuple(params[i].shape)}")
    try:
        optimizer.load_state_dict({**state, "state": per_param})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise corrupt(f"its optimizer state does not fit the stage: {exc}") from None


#: named step ranges for torch.profiler (benchmarks/speed.py --profile sets it)
PROFILE_SPANS = False


def compile_mode(run_cfg: Any, cuda: bool) -> str | None:
    """torch.compile mode of the training step (None: eager): `run.compile`, or
    "reduce-overhead" (CUDA graphs) with `run.cuda_graph` on CUDA."""
    if run_cfg.cuda_graph and cuda:
        return "reduce-overhead"
    if run_cfg.compile == "off":
        return "default" if run_cfg.cuda_graph else None
    return run_cfg.compile


def needs_find_unused(model: torch.nn.Module, losses: list) -> bool:
    """Whether DDP must look for unused parameters (`find_unused_parameters=True`) in a stage
    with the loss specs `losses` and the model's current `requires_grad` flags.

    Every head of `LTModel` is computed in the forward, but a head's parameters get a gradient
    only if a loss uses its logits. False (no per-step graph search) only when every head with
    a trainable parameter is named (`head` field or `param(ref="head"/"any_head")`) by a loss
    computed from the stage's first step (`start = 0`; a later-starting term leaves its head
    without gradient until then); pseudo-labelers and transforms name heads without
    gradient, so they do not count. True when no loss names any head (e.g. a loss without a
    `head` field). Assumed: a loss that names a head uses its logits with gradient at every
    step, and the backbone uses all its parameters (with False, DDP stops with an error at the
    next step otherwise)."""
    named = {value for spec in losses if getattr(spec, "start", 0) <= 0
             for _, ref, value in refs(spec.params) if ref in ("head", "any_head")}
    heads = getattr(model, "heads", None)
    if not named or heads is None:
        return True
    trainable = {name for name, head in heads.items()
                 if any(p.requires_grad for p in head.parameters())}
    return not trainable <= named


def _span(name: str) -> Any:
    """`torch.profiler.record_function(name)` when PROFILE_SPANS, else a no-op context."""
    return torch.profiler.record_function(name) if PROFILE_SPANS else contextlib.nullcontext()


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A no-grad, eval-mode copy of `model` (a teacher fixed at the start of a stage)."""
    copy_ = copy.deepcopy(model).eval()
    copy_.requires_grad_(False)
    return copy_


def _has_hookimpls(obj: Any) -> bool:
    return any(hasattr(getattr(type(obj), n, None), "ltframe_impl")
               for n in dir(type(obj)) if n.startswith("ltframe_"))
