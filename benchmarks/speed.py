"""Steady-state speed of ltframe's training steps, one table (issue 10).

Workloads (synthetic CIFAR-sized data by default, `--root` for the real CIFAR-10 export):

  (a) fixmatch    FixMatch, WRN-28-2, 64 labeled + 448 unlabeled (mu = 7), weak + strong views,
                  EMA 0.999, SGD (USB's / CReST's step);
  (b) supervised  CE, ResNet-32, CIFAR-10-LT (ratio 100), batch 128, pad-crop-flip view;
      supervised_wrn  the same with WRN-28-2 (USB's supervised counterpart; USB has no ResNet-32);
  (c) bmb         BMB's step: FixMatch base + auxiliary head + `bmb` memory loss, 64 + 64, Adam;
  (d) crest_pass  one CReST labelling pass (`crest_select`) over the unlabeled pool with WRN-28-2;
  (y) plain_torch the yardstick for (b): the same ResNet-32 and batch size in a plain PyTorch loop
                  (batch already on the device, no augmentation, no EMA, no logging).

`eval %` is one evaluation's share of wall time when evaluating once per protocol period (97
steps = one CIFAR-10-LT epoch at batch 128; FixMatch 1024; BMB 500). `--profile` adds each step
range's share (torch.profiler: data + augmentation, forward, losses, backward, optimizer, EMA);
`--sync-check` (CUDA) counts host synchronisations in the steady state. `--ops` prints the
kernel-launching aten ops per eager step by range (counted on the CPU with
`ltframe.probes.OpCounter` over the workload's own model and views at a tiny batch: the counts do
not depend on the batch size), without timing anything.

For (a)-(c) it runs `ltframe run` in-process on a temporary directory and times the steps with a
hook: the first `--warmup` steps (setup excluded; cudnn autotune, torch.compile, first-touch
allocation) are reported apart as warm-up, the next `--steps` as the steady state. On CUDA the
clock reads are preceded by a synchronize only at those two boundaries, so the steady state has
no extra host synchronisation. images/s counts every image forwarded (all views).

    .venv/bin/python benchmarks/speed.py                              # CPU: a small step count
    .venv/bin/python benchmarks/speed.py --steps 300 --warmup 50      # GPU
    .venv/bin/python benchmarks/speed.py --only supervised,plain_torch --json out.json
    .venv/bin/python benchmarks/speed.py --root .cache/cifar10        # real CIFAR-10 export
    .venv/bin/python benchmarks/speed.py --ops --only fixmatch,bmb    # launches per step by range
    .venv/bin/python benchmarks/speed.py --ops --compiled --only fixmatch  # + compiled views' kernels

`benchmarks/scaling.py` measures pseudo-labelling / selection / evaluation against pool size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ltframe import hookimpl, start_run
from ltframe.data import augment
from ltframe.engine import trainer as trainer_mod
from ltframe.plugins import make_plugin_manager
from ltframe.recipe import build_recipe
from ltframe.tomlw import dumps

WORKLOADS = ("fixmatch", "supervised", "supervised_wrn", "bmb", "crest_pass", "plain_torch")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _data(root: str | None, split: bool) -> dict[str, Any]:
    source = ({"name": "cifar10", "root": root} if root else
              {"name": "synthetic", "num_classes": 10, "train_per_class": 5000,
               "test_per_class": 100, "image_size": 32})
    data: dict[str, Any] = {"source": source, "longtail": {"name": "exp", "ratio": 100}}
    if split:  # DARP / USB CIFAR-10-LT: N_1 = 1500, M_1 = 3000, ratio 100
        data["longtail"] = {"name": "none"}
        data["split"] = {"name": "counts", "labeled_head": 1500, "labeled_ratio": 100,
                         "unlabeled_head": 3000, "unlabeled_ratio": 100}
    return data


def _recipe(workload: str, steps: int, root: str | None, device: str, out: Path) -> dict:
    run = {"name": workload, "seed": 0, "log_every": 10 ** 9, "device": device,
           "out_dir": str(out)}
    ssl = {"data": "labeled+unlabeled", "ema": 0.999, "unlabeled_pool": "unlabeled",
           "views": {"labeled": ["weak"], "unlabeled": ["weak", "strong"]},
           "pseudo_labeler": {"name": "threshold", "threshold": 0.95}}
    stage: dict[str, Any] = {"name": workload, "steps": steps, "steps_per_epoch": steps,
                             "eval_every": 0}
    sgd = {"name": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
           "schedule": {"name": "cosine"}}
    model: dict[str, Any] = {"backbone": "wrn28_2", "heads": {"main": {"name": "linear"}}}
    if workload in ("supervised", "supervised_wrn"):
        data = {**_data(root, split=False), "batch_size": 128}
        if workload == "supervised":
            model = {"backbone": "resnet32_cifar", "heads": {"main": {"name": "linear"}}}
        stage.update(views={"labeled": ["weak"]}, loss=[{"name": "ce"}])
        optim = {**sgd, "lr": 0.1, "nesterov": False}
    elif workload == "fixmatch":
        data = {**_data(root, split=True), "batch_size": 64}
        stage.update(ssl, unlabeled_ratio=7, loss=[{"name": "ce"}, {"name": "fixmatch"}])
        optim = sgd
    elif workload == "bmb":
        data = {**_data(root, split=True), "batch_size": 64}
        model["heads"] = {"main": {"name": "linear"}, "aux": {"name": "linear"}}
        model["eval_head"] = "aux"
        stage.update(ssl, unlabeled_ratio=1, loss=[
            {"name": "ce"}, {"name": "fixmatch"},
            {"name": "bmb", "head": "aux", "size": 256, "get": 128, "warmup": 0}])
        optim = {"name": "adam", "lr": 0.002, "schedule": {"name": "constant"}}
    elif workload == "crest_pass":
        data = {**_data(root, split=True), "batch_size": 64}
        stage.update(steps=1, steps_per_epoch=1, label={"name": "crest_select"})
        optim = sgd
    else:
        raise ValueError(workload)
    return {"run": run, "data": data, "model": model, "optim": optim, "stage": [stage]}


#: steps between evaluations in the papers' protocols: one CIFAR-10-LT epoch at batch 128 (the
#: supervised recipes), FixMatch / CReST's 1024-step "epoch", BMB's 500-step epoch
EVAL_PERIOD = {"supervised": 97, "supervised_wrn": 97, "fixmatch": 1024, "bmb": 500}
SPANS = ("ltframe.data", "ltframe.forward", "ltframe.losses", "ltframe.backward",
         "ltframe.optimizer", "ltframe.ema")


class _Clock:
    """Wall-clock marks at the end of the warm-up and of the last step (synchronised there);
    optionally a torch.profiler over the steady state and CUDA's sync debug mode."""

    def __init__(self, warmup: int, total: int, device: str, profile: bool = False,
                 sync_check: bool = False) -> None:
        self.warmup, self.total, self.device = warmup, total, device
        self.marks: dict[str, float] = {}
        self.images = 0
        self.profile, self.sync_check = profile, sync_check
        self.prof: Any = None
        self.sync_warnings = 0
        self._caught: Any = None

    def _start_window(self) -> None:
        if self.profile:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.startswith("cuda"):
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
        if self.sync_check and self.device.startswith("cuda"):
            import warnings

            self._caught = warnings.catch_warnings(record=True)
            self._log = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def _end_window(self) -> None:
        if self._caught is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.sync_warnings = sum("synchroniz" in str(w.message) for w in self._log)
            self._caught.__exit__(None, None, None)
        if self.prof is not None:
            self.prof.__exit__(None, None, None)

    def shares(self) -> dict[str, float]:
        """Each step range's share of the steady state (device time on CUDA, else CPU)."""
        if self.prof is None:
            return {}
        cuda = self.device.startswith("cuda")
        got = {e.key: (e.device_time_total if cuda else e.cpu_time_total)
               for e in self.prof.key_averages() if e.key in SPANS}
        total = (self.marks["end"] - self.marks["warm"]) * 1e6  # microseconds
        return {k.split(".")[1]: round(100 * v / total, 2) for k, v in got.items()}

    @hookimpl
    def ltframe_stage_start(self, run: Any, stage: Any) -> None:
        _sync(self.device)
        self.marks["start"] = time.perf_counter()

    @hookimpl
    def ltframe_step_end(self, run: Any, stage: Any, step: int, ctx: Any) -> None:
        if step + 1 == self.warmup:
            _sync(self.device)
            self.marks["warm"] = time.perf_counter()
            self._start_window()
        elif step + 1 > self.warmup:
            parts = {id(f): int(f.shape[0]) for f in ctx.features_by_part.values()}
            self.images += sum(parts.values())  # every image forwarded (aliases once)
        if step + 1 == self.total:
            _sync(self.device)
            self.marks["end"] = time.perf_counter()
            self._end_window()


class SyncInStep(RuntimeError):
    """A host<->device synchronisation inside a steady-state training step (CUDA sync debug
    mode "error")."""


def _strict_steps(warmup: int) -> Any:
    """A `Trainer._step` that runs every step from `warmup` on (stage-local) under
    `torch.cuda.set_sync_debug_mode("error")`: a host sync inside the step raises (log steps and
    epoch ends, which read values back on purpose, run outside `_step`)."""
    inner = trainer_mod.Trainer._step

    def step(self: Any, st: Any, i: int, epoch: int) -> Any:
        if i < warmup:
            return inner(self, st, i, epoch)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(self, st, i, epoch)
        except RuntimeError as e:
            if "synchroniz" in str(e):
                raise SyncInStep(f"step {i} of stage {st.plan.name!r}: {e}") from e
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return inner, step


def run_workload(workload: str, steps: int, warmup: int, root: str | None, device: str,
                 profile: bool = False, sync_check: bool = False,
                 sync_mode: str = "warn") -> dict[str, Any]:
    """One workload's steady-state numbers. `sync_check` on CUDA: with `sync_mode = "warn"`
    count the sync warnings over the steady state; with "error" run the steady steps under sync
    debug mode "error" (raises `SyncInStep` at the first sync inside a step)."""
    strict = sync_check and sync_mode == "error" and device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        total = warmup + steps
        raw = _recipe(workload, total, root, device, out / "runs")
        path = out / "recipe.toml"
        path.write_text(dumps(raw))
        if workload == "crest_pass":
            return _crest_pass(path, device)
        clock = _Clock(warmup, total, device, profile, sync_check and not strict)
        evals: list[float] = []
        inner = trainer_mod.Trainer.evaluate

        def timed_eval(self: Any, model: Any, head: str = "") -> dict:
            _sync(device)
            t = time.perf_counter()
            out = inner(self, model, head)
            _sync(device)
            evals.append(time.perf_counter() - t)
            return out

        trainer_mod.Trainer.evaluate = timed_eval  # type: ignore[method-assign]
        trainer_mod.PROFILE_SPANS = profile
        plain_step, strict_step = _strict_steps(warmup)
        if strict:
            trainer_mod.Trainer._step = strict_step  # type: ignore[method-assign]
        try:
            t0 = time.perf_counter()
            start_run(path, plugins=[("clock", clock)], reporter=None)
            wall = time.perf_counter() - t0
        finally:
            trainer_mod.Trainer.evaluate = inner  # type: ignore[method-assign]
            trainer_mod.Trainer._step = plain_step  # type: ignore[method-assign]
            trainer_mod.PROFILE_SPANS = False
        m = clock.marks
        steady = m["end"] - m["warm"]
        period = EVAL_PERIOD[workload] * steady / steps  # seconds of training per evaluation
        row = {"workload": workload, "steps": steps, "steps_per_s": steps / steady,
               "images_per_s": clock.images / steady, "warmup_s": m["warm"] - m["start"],
               "setup_s": m["start"] - t0, "wall_s": wall, "eval_s": evals[-1],
               "eval_share": round(100 * evals[-1] / (evals[-1] + period), 2)}
        if profile:
            row["step_share"] = clock.shares()
        if strict:
            row["sync_errors"] = 0  # every steady step ran under sync debug mode "error"
        elif sync_check and device.startswith("cuda"):
            row["sync_warnings"] = clock.sync_warnings
        return row


def _crest_pass(path: Path, device: str) -> dict[str, Any]:
    """Time `label_pool` (predict the whole unlabeled pool + crest_select + writing)."""
    timings: list[tuple[float, int]] = []
    inner = trainer_mod.label_pool

    def timed(trainer: Any, plan: Any, model: Any) -> dict:
        _sync(device)
        t = time.perf_counter()
        out = inner(trainer, plan, model)
        _sync(device)
        timings.append((time.perf_counter() - t, int(trainer.data.splits.unlabeled.numel())))
        return out

    trainer_mod.label_pool = timed
    try:
        start_run(path, reporter=None)
    finally:
        trainer_mod.label_pool = inner
    secs, pool = timings[0]
    return {"workload": "crest_pass", "steps": 1, "pool": pool, "pass_s": secs,
            "images_per_s": pool / secs}


def plain_torch(steps: int, warmup: int, device: str, batch: int = 128) -> dict[str, Any]:
    """ResNet-32 + linear head, SGD, CE on one fixed batch already on the device."""
    pm, reg = make_plugin_manager()
    rec = build_recipe({"model": {"backbone": "resnet32_cifar"},
                        "stage": [{"name": "x", "steps": 1}]}, reg)
    from ltframe.engine.setup import build_model

    model = build_model(rec, reg, 10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    def step() -> None:
        _, logits = model(x)
        loss = F.cross_entropy(logits["main"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    steady = time.perf_counter() - t1
    return {"workload": "plain_torch", "steps": steps, "steps_per_s": steps / steady,
            "images_per_s": steps * batch / steady, "warmup_s": t1 - t0, "setup_s": 0.0,
            "wall_s": time.perf_counter() - t0}


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'workload':<12} {'steps/s':>9} {'images/s':>10} {'warm-up s':>10} {'setup s':>8} "
            f"{'eval %':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["workload"] == "crest_pass":
            lines.append(f"{'crest_pass':<12} {'':>9} {r['images_per_s']:>10.1f} "
                         f"{'':>10} {'':>8}  (pool {r['pool']}, {r['pass_s']:.2f} s)")
            continue
        lines.append(f"{r['workload']:<12} {r['steps_per_s']:>9.2f} {r['images_per_s']:>10.1f} "
                     f"{r['warmup_s']:>10.2f} {r['setup_s']:>8.2f} {r.get('eval_share', 0):>7.2f}"
                     + (f"  steps: {r['step_share']}" if r.get("step_share") else "")
                     + (f"  syncs: {r['sync_warnings']}" if "sync_warnings" in r else ""))
    by = {r["workload"]: r for r in rows}
    if "supervised" in by and "plain_torch" in by:
        ratio = by["supervised"]["steps_per_s"] / by["plain_torch"]["steps_per_s"]
        lines.append(f"supervised / plain_torch steps/s: {ratio:.2f}")
    return "\n".join(lines)


def usb_table(rows: list[dict[str, Any]], usb: list[dict[str, Any]]) -> str:
    """ltframe against USB on the workloads both have (same machine, same split sizes)."""
    ours = {r["workload"]: r for r in rows}
    lines = [f"{'workload':<15} {'ltframe steps/s':>16} {'USB steps/s':>12} {'ltframe/USB':>12}"]
    for u in usb:
        r = ours.get(u["workload"])
        if r is None:
            continue
        lines.append(f"{u['workload']:<15} {r['steps_per_s']:>16.3f} {u['steps_per_s']:>12.3f} "
                     f"{r['steps_per_s'] / u['steps_per_s']:>12.2f}")
    return "\n".join(lines)


#: the ranges of the op table (a view's range is data/view:<name>)
OP_COLUMNS = ("data", "forward", "pseudo_labeler", "losses", "backward", "optimizer", "ema", "other")


def op_counts(workload: str) -> dict[str, float]:
    """Kernel-launching ops per steady eager step by range, counted on the CPU (3 probed
    steps, the first left out) with the workload's model, views and losses at batch 4."""
    from ltframe.probes import probe_steps

    with tempfile.TemporaryDirectory() as tmp:
        raw = _recipe(workload, 8, None, "cpu", Path(tmp) / "runs")
        raw["data"]["batch_size"] = 4
        raw["data"]["source"].update(train_per_class=150, test_per_class=4)
        if "split" in raw["data"]:
            raw["data"]["split"].update(labeled_head=50, labeled_ratio=10, unlabeled_head=100,
                                        unlabeled_ratio=10)
        if raw.get("optim", {}).get("name") in ("sgd", "adam", "adamw"):
            # CUDA's "auto" is the fused kernel, the CPU's default a loop over the tensors: count
            # the multi-tensor version (Adam's bias corrections still read each step counter,
            # `_local_scalar_dense`: host scalars on CUDA, no kernel)
            raw["optim"]["impl"] = "foreach"
        for loss in raw["stage"][0].get("loss", []):
            if loss["name"] == "bmb":
                loss.update(size=32, get=16)
        path = Path(tmp) / "recipe.toml"
        path.write_text(dumps(raw))
        fast, augment.CPU_FAST_PATHS = augment.CPU_FAST_PATHS, False  # CUDA's kernel sequence
        try:
            res = probe_steps(path, out_dir=Path(tmp) / "runs", steps=3)
        finally:
            augment.CPU_FAST_PATHS = fast
    row: dict[str, float] = {}
    for k, v in res.totals(depth=2).items():
        top = k.split("/")[0]
        col = ("losses" if top.startswith("loss:") else top if top in OP_COLUMNS else "other")
        row[col] = row.get(col, 0) + v
        if k.startswith("data/view:"):
            row[k[5:]] = row.get(k[5:], 0) + v
    row["total"] = sum(v for k, v in row.items() if k in OP_COLUMNS)
    return {k: round(v, 1) for k, v in row.items()}


def compiled_view_kernels(batch: int = 8) -> dict[str, int]:
    """Kernels inductor generates (CPU, CUDA's code path) for FixMatch's views compiled alone
    (`strong` n_ops 2 with Cutout, `weak`): what the augmentation costs inside the compiled
    step (`run.compile`), beside the eager counts of `op_counts`. About a minute on a CPU."""
    from torch._inductor import metrics

    from ltframe.data import views

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    out = {}
    fast, augment.CPU_FAST_PATHS = augment.CPU_FAST_PATHS, False  # CUDA's code path
    try:
        for name, view in (("strong", views.StrongView(views.StrongParams(n_ops=2), (0.5,) * 3, (0.25,) * 3)),
                           ("weak", views.WeakView(views.WeakParams(), (0.5,) * 3, (0.25,) * 3))):
            view.to("cpu")
            draws = view.draw(batch, gen, x.device)
            torch._dynamo.reset()
            metrics.reset()
            got = torch.compile(view.apply, fullgraph=True)(x, draws)
            assert torch.allclose(got, view.apply(x, draws), atol=1e-4)
            out[name] = metrics.generated_kernel_count
    finally:
        augment.CPU_FAST_PATHS = fast
    return out


def ops_table(rows: dict[str, dict[str, float]]) -> str:
    views = sorted({k for r in rows.values() for k in r if k.startswith("view:")})
    cols = [*OP_COLUMNS[:1], *views, *OP_COLUMNS[1:], "total"]
    out = ["| workload | " + " | ".join(c.replace("view:", "of which ") for c in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for w, r in rows.items():
        out.append(f"| {w} | " + " | ".join(f"{r.get(c, 0):g}" for c in cols) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=0, help="steady-state steps (0: 20 CPU, 300 GPU)")
    ap.add_argument("--warmup", type=int, default=0, help="warm-up steps (0: 3 CPU, 50 GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--root", default=None, help="a CIFAR-10 export instead of synthetic data")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--profile", action="store_true",
                    help="share of each step range (data, forward, losses, backward, optimizer, "
                         "ema) from torch.profiler over the steady state")
    ap.add_argument("--usb", default=None,
                    help="rows from benchmarks/usb_speed.py (JSON) for the ltframe/USB ratios")
    ap.add_argument("--sync-check", action="store_true",
                    help="CUDA: count host synchronisations in the steady state")
    ap.add_argument("--ops", action="store_true",
                    help="only the kernel-launching ops per eager step by range (CPU count)")
    ap.add_argument("--compiled", action="store_true",
                    help="with --ops: also the kernels of FixMatch's views compiled (inductor, CPU)")
    args = ap.parse_args()
    if args.ops:
        names = [w for w in args.only.split(",") if w not in ("plain_torch", "crest_pass")]
        print(ops_table({w: op_counts(w) for w in names}))
        if args.compiled:
            k = compiled_view_kernels()
            print(f"compiled views (inductor kernels, CPU): strong {k['strong']}, weak {k['weak']}")
        return
    gpu = args.device.startswith("cuda")
    steps = args.steps or (300 if gpu else 20)
    warmup = args.warmup or (50 if gpu else 3)
    rows = []
    for w in args.only.split(","):
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
        r = (plain_torch(steps, warmup, args.device) if w == "plain_torch" else
             run_workload(w, steps, warmup, args.root, args.device, args.profile,
                          args.sync_check))
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"device: {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(table(rows))
    if args.usb:
        print(usb_table(rows, json.loads(Path(args.usb).read_text())))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
