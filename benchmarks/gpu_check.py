"""The GPU check of issue 19: one command, at most 8 minutes, JSON + Markdown results.

Run it through `benchmarks/gpu_check.sh` (which installs ltframe first); directly:

    python benchmarks/gpu_check.py                 # GPU (CUDA): the real sizes
    python benchmarks/gpu_check.py --dry-run       # CPU: tiny sizes, the same code path

Sections (each with its own time budget and try/except; results.json rewritten atomically
after each, so a failure or a timeout keeps the other sections' numbers):

  env        device, torch, timm, GPU name
  workloads  benchmarks/speed.py's workloads (fixmatch WRN-28-2 64 + 448, bmb, supervised
             ResNet-32, supervised_wrn WRN-28-2, crest_pass): steps/s and images/s (a run
             without profiler), then a short run with `--profile` spans (share of data / forward /
             losses / backward / optimizer / EMA, plus one evaluation's share per protocol
             period) and the host-sync check (CUDA: the profiled steady steps run under
             `torch.cuda.set_sync_debug_mode("error")`; on a sync the first one is reported and
             the run repeated in "warn" mode to count them; CPU: `ltframe.probes.probe_steps`'
             SyncProbe)
  compile    fixmatch eager vs the whole step compiled (`run.compile = "default"`) vs the
             compiled step in CUDA graphs (`run.cuda_graph = true`)
  cifar10_lt ResNet-32 CE on CIFAR-10-LT (recipes/cifar10_lt/ce.toml) on the carried export
             `.carry/cifar10-jpg.tar.gz` (extracted to .carry/cifar10/): the 200-epoch schedule
             compressed to the epochs the time budget allows (reported), time and top-1
  usb        USB's FixMatch steps/s (benchmarks/usb_speed.py) when `semilearn` is importable

Output: $OUT (else benchmarks/out/) gpu_check.json and gpu_check.md; the Markdown is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import signal
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402  (benchmarks/speed.py: the workloads, the clock, the profiler spans)

WORKLOADS = ("fixmatch", "bmb", "supervised", "supervised_wrn", "crest_pass")
SHARE_KEYS = ("data", "forward", "losses", "backward", "optimizer", "ema", "eval")
TOTAL_BUDGET = 480.0  # seconds: the whole check on a GPU


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after `seconds` (SIGALRM)."""
    def fire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"section time budget ({seconds:.0f} s) exceeded")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --- sizes -------------------------------------------------------------------------------------

def shrink(raw: dict, dry: bool, compile_mode: str | None = None, cuda_graph: bool = False) -> dict:
    """benchmarks/speed.py's recipe, made tiny for the CPU dry run (and/or compiled)."""
    if compile_mode:
        raw["run"]["compile"] = compile_mode
    if cuda_graph:
        raw["run"]["cuda_graph"] = True
    if not dry:
        return raw
    data = raw["data"]
    ssl = "split" in data
    data["batch_size"] = 4 if ssl else 8
    src = data["source"]
    if src.get("name") == "synthetic":
        src.update(train_per_class=150, test_per_class=10)
    if ssl:
        data["split"].update(labeled_head=50, labeled_ratio=10, unlabeled_head=100,
                             unlabeled_ratio=10)
    model = raw["model"]
    model["backbone"] = "test_resnet"  # timm's tiny ResNet (the CIFAR nets fix their depth)
    for stage in raw["stage"]:
        for loss in stage.get("loss", []):
            if loss.get("name") == "bmb":
                loss.update(size=32, get=16)
    return raw


@contextlib.contextmanager
def patched_recipe(dry: bool, compile_mode: str | None = None,
                   cuda_graph: bool = False) -> Iterator[None]:
    """speed.run_workload builds its recipe with speed._recipe: wrap it (restored after)."""
    inner = speed._recipe

    def wrapped(*a: Any, **k: Any) -> dict:
        return shrink(inner(*a, **k), dry, compile_mode, cuda_graph)

    speed._recipe = wrapped
    try:
        yield
    finally:
        speed._recipe = inner


# --- sections ----------------------------------------------------------------------------------

def section_env(cfg: argparse.Namespace) -> dict:
    import timm

    out = {"device": cfg.device, "torch": torch.__version__, "timm": timm.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "dry_run": cfg.dry_run, "steps": cfg.steps, "warmup": cfg.warmup}
    if cfg.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def cpu_sync_count(workload: str, cfg: argparse.Namespace) -> int:
    """Host syncs per step over a few steps under ltframe.probes' SyncProbe (CPU stand-in)."""
    from ltframe.probes import probe_steps
    from ltframe.tomlw import dumps

    with tempfile.TemporaryDirectory() as tmp:
        raw = shrink(speed._recipe(workload, 50, None, "cpu", Path(tmp) / "runs"), cfg.dry_run)
        path = Path(tmp) / "recipe.toml"
        path.write_text(dumps(raw))
        res = probe_steps(path, out_dir=Path(tmp) / "runs", steps=3, count_ops=False)
        return len(res.syncs(warmup=False))


def one_workload(w: str, cfg: argparse.Namespace) -> dict:
    cuda = cfg.device.startswith("cuda")
    with patched_recipe(cfg.dry_run):
        if w == "crest_pass":
            row = speed.run_workload(w, cfg.steps, cfg.warmup, cfg.root, cfg.device)
            row["syncs"] = "n/a (one labelling pass, not a training step)"
            row["shares"] = "n/a (one labelling pass)"
            return row
        sync_error = None
        try:  # CUDA: the profiled steps run under sync debug mode "error"
            prof = speed.run_workload(w, cfg.profile_steps, cfg.profile_warmup, cfg.root,
                                      cfg.device, profile=True, sync_check=cuda, sync_mode="error")
        except speed.SyncInStep as e:  # the first sync, located; then count them all
            sync_error = str(e).splitlines()[0][:300]
            prof = speed.run_workload(w, cfg.profile_steps, cfg.profile_warmup, cfg.root,
                                      cfg.device, profile=True, sync_check=cuda, sync_mode="warn")
        if cfg.dry_run:  # one run: steps/s measured under the profiler
            row = dict(prof, timed_under_profiler=True)
        else:
            row = speed.run_workload(w, cfg.steps, cfg.warmup, cfg.root, cfg.device)
    shares = dict(prof.get("step_share", {}))
    shares["eval"] = row["eval_share"]
    row["shares"] = {k: shares.get(k) for k in SHARE_KEYS}
    if cuda and sync_error is None:
        row["syncs"] = prof.get("sync_errors")
        row["syncs_how"] = f"CUDA sync debug mode 'error' over {cfg.profile_steps} steps: none"
    elif cuda:
        row["syncs"] = prof.get("sync_warnings")
        row["syncs_how"] = (f"CUDA sync debug mode 'error' raised ({sync_error}); warnings "
                            f"counted over {cfg.profile_steps} steps")
    else:
        row["syncs"] = cpu_sync_count(w, cfg)
        row["syncs_how"] = "SyncProbe over 2 steps after the first (CPU)"
    return row


def section_workloads(cfg: argparse.Namespace, budget: float, save: Callable[[], None],
                      into: dict) -> dict:
    t0 = time.perf_counter()
    for w in WORKLOADS:
        left = budget - (time.perf_counter() - t0)
        if left < 5:
            into[w] = {"skipped": "workloads time budget spent"}
            continue
        try:
            with time_limit(min(left, budget / 2)):
                into[w] = one_workload(w, cfg)
        except Exception as e:  # noqa: BLE001
            into[w] = {"error": f"{type(e).__name__}: {e}"[:500]}
        save()
    return into


def section_compile(cfg: argparse.Namespace, results: dict, budget: float = 600.0) -> dict:
    out: dict[str, Any] = {}
    if cfg.dry_run:
        out["skipped"] = ("dry run: torch.compile (inductor) takes minutes on a CPU; "
                          "the GPU run compares fixmatch eager vs the compiled step vs CUDA graphs "
                          "(tests/test_compile_step.py checks compiled == eager on the CPU)")
        return out
    eager = results.get("workloads", {}).get("fixmatch", {})
    steps, warmup = max(cfg.steps // 2, 1), max(cfg.warmup // 2, 1)  # warm-up holds the compile
    out.update(workload="fixmatch", steps=steps, eager_steps_per_s=eager.get("steps_per_s"))
    for key, graphs in (("compile", False), ("cuda_graph", True)):
        try:
            with time_limit(budget / 2), patched_recipe(cfg.dry_run, compile_mode="default",
                                                        cuda_graph=graphs):
                row = speed.run_workload("fixmatch", steps, warmup, cfg.root, cfg.device)
            out.update({f"{key}_steps_per_s": row["steps_per_s"], f"{key}_warmup_s": row["warmup_s"],
                        f"{key}_images_per_s": row["images_per_s"]})
        except Exception as e:  # noqa: BLE001 - one failed mode leaves the other's numbers
            out[f"{key}_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def cifar_root(cfg: argparse.Namespace, tmp: Path) -> tuple[str | None, str]:
    if cfg.dry_run:
        from ltframe.testing import write_cifar_folder

        return str(write_cifar_folder(tmp / "cifar", 30, 3)), "tiny fake CIFAR-10 export (dry run)"
    dest = Path(cfg.carry) / "cifar10"
    if (dest / "train").is_dir() and (dest / "test").is_dir():
        return str(dest), f"extracted export {dest}"
    tar = Path(cfg.carry) / "cifar10-jpg.tar.gz"
    if not tar.is_file():
        return None, f"no {tar} carried (see ../shared/data/README.md)"
    part = dest.with_name("cifar10.partial")
    part.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar) as t:
        try:
            t.extractall(part, filter="data")
        except TypeError:  # Python without extraction filters
            t.extractall(part)  # noqa: S202  (our own carried tarball)
    part.rename(dest)
    return str(dest), f"extracted {tar}"


def section_cifar(cfg: argparse.Namespace, results: dict, budget: float) -> dict:
    sys.path.insert(0, str(HERE))
    from cifar10_lt_accuracy import overrides

    from ltframe import start_run

    with tempfile.TemporaryDirectory() as tmp:
        root, where = cifar_root(cfg, Path(tmp))
        if root is None:
            return {"skipped": where}
        sup = results.get("workloads", {}).get("supervised", {})
        if cfg.cifar_epochs:
            epochs = cfg.cifar_epochs
        elif cfg.dry_run:
            epochs = 1
        else:  # 97 steps an epoch at batch 128 (12,406 images); x2 for checkpoints, JPEG data
            sps = sup.get("steps_per_s") or 10.0
            per_epoch = 2.0 * 97 / sps
            epochs = max(1, min(200, int((budget - 30) / per_epoch)))
        over = overrides("ce", epochs, root) + [f"run.device={cfg.device}"]
        if cfg.dry_run:
            over += ["data.batch_size=16", "model.backbone=test_resnet", "stage.0.drop_last=true"]
        from ltframe import hookimpl

        class Epochs:  # epoch-end times, so a timeout still reports s/epoch
            def __init__(self) -> None:
                self.done: list[float] = []

            @hookimpl
            def ltframe_epoch_end(self, run: Any, stage: Any, epoch: int, metrics: dict) -> None:
                self.done.append(time.perf_counter())

        ep = Epochs()
        t0 = time.perf_counter()
        try:
            s = start_run(ROOT / "recipes" / "cifar10_lt" / "ce.toml", over,
                          out_dir=Path(tmp) / "runs", plugins=[("gpu_check_epochs", ep)],
                          reporter=None)
        except (SectionTimeout, KeyboardInterrupt, Exception) as e:  # noqa: BLE001
            n = len(ep.done)
            per = (ep.done[-1] - t0) / n if n else None
            return {"data": where, "error": f"{type(e).__name__}: {e}"[:300],
                    "epochs_planned": epochs, "epochs_done": n, "s_per_epoch": per,
                    "projected_200_epoch_s": per * 200 if per else None, "top1": None}
        secs = time.perf_counter() - t0
    return {"data": where, "epochs_run": epochs, "epochs_full": 200, "seconds": secs,
            "projected_200_epoch_s": secs * 200 / epochs, "top1": s.get("top1"),
            "note": (f"schedule compressed to {epochs} epochs (milestones at 80%/90%)"
                     if epochs < 200 else "full 200-epoch schedule")}


def section_usb(cfg: argparse.Namespace, results: dict) -> dict:
    if importlib.util.find_spec("semilearn") is None:
        return {"skipped": "semilearn not importable (carry semilearn 0.3.2 and its run-time "
                           "deps as wheels in .carry/wheels; see benchmarks/setup_usb.sh)"}
    import usb_speed

    row = usb_speed.run("fixmatch", max(cfg.steps // 2, 1), max(cfg.warmup // 2, 1), 1, cfg.root)
    ours = results.get("workloads", {}).get("fixmatch", {}).get("steps_per_s")
    row["ltframe_steps_per_s"] = ours
    if ours:
        row["ltframe_over_usb"] = ours / row["steps_per_s"]
    return row


# --- output ------------------------------------------------------------------------------------

def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if math.isfinite(v) else str(v)
    return str(v)


def markdown(res: dict) -> str:
    env = res.get("env", {})
    lines = [f"# ltframe GPU check{' (dry run)' if env.get('dry_run') else ''}", "",
             f"device {env.get('device')} {env.get('gpu', '')}, torch {env.get('torch')}, "
             f"timm {env.get('timm')}, {env.get('steps')} steps after {env.get('warmup')} warm-up",
             "", "| workload | steps/s | images/s | syncs | "
             + " | ".join(f"{k} %" for k in SHARE_KEYS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(SHARE_KEYS)]
    for w, r in res.get("workloads", {}).items():
        if not isinstance(r, dict):
            r = {"error": str(r)}
        if "skipped" in r or "error" in r:
            lines.append(f"| {w} | {r.get('skipped') or r.get('error')} |")
            continue
        if w == "crest_pass":
            lines.append(f"| crest_pass (pool {r['pool']}, {r['pass_s']:.2f} s) | - | "
                         f"{r['images_per_s']:.1f} | n/a |" + " n/a |" * len(SHARE_KEYS))
            continue
        sh = r.get("shares", {})
        lines.append(f"| {w} | {_fmt(r['steps_per_s'])} | {_fmt(r['images_per_s'], 1)} | "
                     f"{_fmt(r.get('syncs'))} | " + " | ".join(_fmt(sh.get(k)) for k in SHARE_KEYS)
                     + " |")
    lines += ["", "Shares: % of steady-state wall time under torch.profiler (device time on CUDA); "
              "eval = one evaluation per protocol period (speed.py EVAL_PERIOD).", ""]
    for name in ("compile", "cifar10_lt", "usb"):
        r = res.get(name)
        if r is None:
            lines.append(f"- **{name}**: not run")
            continue
        body = ", ".join(f"{k} = {_fmt(v)}" for k, v in r.items() if k != "traceback")
        lines.append(f"- **{name}**: {body}")
    lines += ["", f"total {_fmt(res.get('total_s'), 1)} s"]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, a few steps")
    ap.add_argument("--device", default=None, help="default: cuda if available (cpu in a dry run)")
    ap.add_argument("--steps", type=int, default=0, help="0: 200 (GPU), 3 (dry run)")
    ap.add_argument("--warmup", type=int, default=0, help="0: 30 (GPU), 1 (dry run)")
    ap.add_argument("--budget", type=float, default=0, help="seconds in all (0: 480; dry run 75)")
    ap.add_argument("--root", default=None, help="CIFAR-10 export for the workloads (else synthetic)")
    ap.add_argument("--carry", default=str(ROOT / ".carry"), help="folder with carried files")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "out"))
    ap.add_argument("--cifar-epochs", type=int, default=0,
                    help="CIFAR-10-LT epochs (0: as many as the time budget allows, at most 200)")
    ap.add_argument("--only", default="workloads,compile,cifar10_lt,usb")
    cfg = ap.parse_args(argv)
    dry = cfg.dry_run
    cfg.device = cfg.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda")
    cfg.steps = cfg.steps or (3 if dry else 200)
    cfg.warmup = cfg.warmup or (1 if dry else 30)
    cfg.profile_steps, cfg.profile_warmup = (cfg.steps, cfg.warmup) if dry else (20, 10)
    total = cfg.budget or (75.0 if dry else TOTAL_BUDGET)
    if dry:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if cfg.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"env": section_env(cfg), "workloads": {}}

    def save() -> None:
        res["total_s"] = time.perf_counter() - t_start
        write_atomic(out / "gpu_check.json", json.dumps(res, indent=1, default=str))
        write_atomic(out / "gpu_check.md", markdown(res))

    save()
    only = cfg.only.split(",")
    # share of the total each section may use (what is left when it starts, at most this)
    shares = ({"workloads": 0.7, "compile": 0.0, "cifar10_lt": 0.25, "usb": 0.05} if dry else
              {"workloads": 0.4, "compile": 0.25, "cifar10_lt": 0.25, "usb": 0.1})
    plan: list[tuple[str, Callable[[float], dict]]] = [
        ("workloads", lambda b: section_workloads(cfg, b, save, res["workloads"])),
        ("compile", lambda b: section_compile(cfg, res, b)),
        ("cifar10_lt", lambda b: section_cifar(cfg, res, b)),
        ("usb", lambda b: section_usb(cfg, res)),
    ]
    for name, fn in plan:
        if name not in only:
            if name == "workloads":
                res[name].update({w: {"skipped": "not in --only"} for w in WORKLOADS})
            else:
                res[name] = {"skipped": "not in --only"}
            save()
            continue
        left = total - (time.perf_counter() - t_start)
        later = sum(shares[n] for n, _ in plan[[p for p, _ in plan].index(name) + 1:] if n in only)
        budget = left - later * total if name != "usb" else left
        budget = max(min(budget, left), 0.0)
        if name == "workloads":
            budget = max(budget, shares[name] * total)
        if budget < 5 and not (dry and name == "compile"):
            why = {"skipped": f"time budget spent ({left:.0f} s left)"}
            if name == "workloads":
                res[name].update({w: dict(why) for w in WORKLOADS})
            else:
                res[name] = why
            save()
            continue
        print(f"== {name} (budget {budget:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            # workloads set their own per-workload alarms (SIGALRM timers do not nest)
            with contextlib.nullcontext() if name == "workloads" else time_limit(budget):
                got = fn(budget)
            if name != "workloads":
                res[name] = got
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500],
                         "traceback": traceback.format_exc()[-2000:]}
        if isinstance(res.get(name), dict) and name != "workloads":
            res[name]["section_s"] = round(time.perf_counter() - t0, 1)
        save()
    save()
    print(markdown(res), flush=True)
    print(f"written: {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
