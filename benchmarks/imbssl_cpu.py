"""CPU-sized imbalanced SSL runs on real CIFAR-10: FixMatch vs the ltframe_imbssl methods.

NOT paper numbers: the DARP / USB split (N_1 = 1500, M_1 = 3000, ratio 100 for both) is scaled
down (default N_1 = 300, M_1 = 600, ratio 100 kept), the backbone is ResNet-32 instead of
WRN-28-2, the batch is 32 + 2 x 32 and the schedule a few hundred steps instead of 256 x 1024.
Each method's recipes/cifar10_lt/<name>.toml is run with `--set` overrides (printed per method);
parameters counted in epochs or steps of the full schedule are scaled to the short one:

- EMA decay 0.999 (about 1000 steps of 262144) -> a time constant of `--ema-steps` steps;
- darp warmup (200 of 256 epochs) -> the same fraction of the epochs; `every` kept (10 batches);
- abc horizon (256 = the epochs) -> the epochs;
- daso warmup (5000 of 262144 steps) and period (100 steps, ~10% of an epoch) -> fractions of
  the short run (at least one epoch of warm-up so the queue holds features of every class);
- acr est_epoch (5 of 256 epochs) -> the same fraction of the epochs;
- debiaspl momentum 0.999 (q^ averages ~1 epoch of 1024 steps) -> 1 - 1 / steps_per_epoch;
- adsh (scores adapt from the third epoch), saw (weights from last epoch's counts) and simpro
  (priors updated each epoch, ema_u 0.9) are per epoch already: kept;
- tras start_epoch (11 of 256 epochs; 0-based) -> 30% of the epochs (3 of 10), so the TRAS head
  `aux` (the evaluated head) trains for most of the short run on the base head's labels;
- cossl (two stages: FixMatch 400 + CoSSL 100 epochs of 500 steps) -> the same total of
  `--epochs`, split 70 / 30 (7 + 3 of 10); the generic stage.0 overrides (steps, EMA, eval_every)
  are repeated for stage.1; TFE warm-up 10 x 500 (= the epoch length) head steps -> 10 x
  `--steps`; the teacher's EMA decay 0.999 -> the `--ema-steps` time constant.

A method added to `--methods` without an entry in `scaled` runs with the generic overrides only
(one stage, `stage.0.*`): give it one when it counts epochs or steps, or has several stages.

Reported: the last evaluation (end of the stage) of the EMA model, top-1 on the balanced test set
(10,000 images) overall and for many / medium / few = the 3 / 3 / 4 classes by labeled count.
Example (the real CIFAR-10 from shared/data, extracted into .cache/cifar10):

    python benchmarks/imbssl_cpu.py --root .cache/cifar10 --methods fixmatch darp abc
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from ltframe import start_run

ROOT = Path(__file__).resolve().parent.parent / "recipes" / "cifar10_lt"
DEFAULT = ["fixmatch", "debiaspl", "saw", "adsh", "darp", "abc", "acr", "daso", "simpro"]
FULL_EPOCHS, FULL_STEPS = 256, 1024  # the USB schedule of the recipes
# the baseline: USB's FixMatch (the DARP / USB split), as the methods' recipes restate it
RECIPE = {"fixmatch": "fixmatch_darp"}


def scaled(name: str, epochs: int, steps: int, ema_steps: float = 50.0, eval_every: int = 0) -> list[str]:
    """Overrides of the method's epoch- or step-counted parameters for the short schedule."""
    total = epochs * steps
    if name == "darp":
        return [f"stage.0.pseudo_labeler.warmup={max(0, round(200 / FULL_EPOCHS * epochs) - 1)}"]
    if name == "abc":
        return [f"stage.0.loss.2.horizon={epochs}"]
    if name == "daso":
        warm = max(steps, round(5000 / (FULL_EPOCHS * FULL_STEPS) * total))
        return [f"stage.0.pseudo_labeler.warmup={warm}",
                f"stage.0.pseudo_labeler.period={max(1, round(100 / FULL_STEPS * steps))}"]
    if name == "acr":
        return [f"stage.0.loss.1.est_epoch={round(5 / FULL_EPOCHS * epochs)}"]
    if name == "debiaspl":
        return [f"stage.0.pseudo_labeler.momentum={1 - 1 / steps:.6g}"]
    if name == "tras":
        return [f"stage.0.loss.2.start_epoch={round(0.3 * epochs)}"]
    if name == "cossl":
        first = max(1, round(0.7 * epochs))
        return [f"stage.0.epochs={first}", f"stage.1.epochs={max(1, epochs - first)}",
                f"stage.1.steps_per_epoch={steps}", f"stage.1.ema={1 - 1 / ema_steps:.6g}",
                f"stage.1.eval_every={eval_every}", f"stage.1.pseudo_labeler.warm_iters={steps}",
                f"stage.1.pseudo_labeler.ema={1 - 1 / ema_steps:.6g}"]
    return []


def method_state(run_dir: str) -> dict[str, object]:
    """The components' checkpointed state at the end (evidence that a switch fired): vectors of
    at most 10 numbers as they are, [N, C] matrices as the histogram of their row argmax."""
    from safetensors.torch import load_file

    out: dict[str, object] = {}
    for f in sorted(Path(run_dir, "checkpoints").glob("stage*.safetensors")):
        for k, v in load_file(f).items():
            if not k.startswith("component.") or not v.is_floating_point() and v.numel() > 1:
                continue
            if v.numel() <= 10:
                out[k[10:]] = [round(x, 3) for x in v.double().flatten().tolist()]
            elif v.dim() == 2 and v.shape[1] <= 10:
                out[k[10:] + ".argmax_hist"] = torch.bincount(v.argmax(1), minlength=v.shape[1]).tolist()
    return out


def overrides(name: str, args: argparse.Namespace) -> list[str]:
    out = [f"data.source.root={args.root}", "data.workers=0",
           f"data.split.labeled_head={args.n1}", f"data.split.unlabeled_head={2 * args.n1}",
           "data.split.labeled_ratio=100", "data.split.unlabeled_ratio=100",
           f"data.batch_size={args.batch}", "model.backbone=resnet32_cifar",
           f"run.seed={args.seed}", "run.device=cpu", f"run.log_every={args.steps}",
           f"stage.0.epochs={args.epochs}", f"stage.0.steps_per_epoch={args.steps}",
           f"stage.0.ema={1 - 1 / args.ema_steps:.6g}", f"stage.0.eval_every={args.eval_every}",
           'eval.report="last"', 'eval.groups="rank"', "eval.rank_sizes=[3, 3]"]
    return out + scaled(name, args.epochs, args.steps, args.ema_steps, args.eval_every)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="CIFAR-10 root (pickles or image folders)")
    ap.add_argument("--methods", nargs="*", default=DEFAULT)
    ap.add_argument("--n1", type=int, default=300, help="labeled head count (M_1 = 2 x N_1)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30, help="steps per epoch")
    ap.add_argument("--batch", type=int, default=32, help="labeled batch (unlabeled: 2 x)")
    ap.add_argument("--ema-steps", type=float, default=50.0, help="EMA time constant in steps")
    ap.add_argument("--eval-every", type=int, default=0, help="epochs (0: at the end only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=".cache/bench_imbssl")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.methods:
        sets = overrides(name, args) + args.set
        print(f"# {name}: " + " ".join(f"--set '{s}'" for s in sets), flush=True)
        short = scaled(name, args.epochs, args.steps, args.ema_steps, args.eval_every)
        print(f"# {name} scaled to the short schedule: {short or 'nothing'}", flush=True)
        t0 = time.perf_counter()
        try:
            s = start_run(ROOT / f"{RECIPE.get(name, name)}.toml", sets, out_dir=args.out)
        except Exception as e:  # noqa: BLE001 - one failing method must not stop the others
            traceback.print_exc()
            rows.append({"method": name, "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append({"method": name, **{k: s.get(k) for k in ("top1", "many", "medium", "few")},
                     "seconds": time.perf_counter() - t0, "pl_accuracy": s.get("pl_accuracy"),
                     "pl_count": s.get("pl_count"), "run_dir": s.get("run_dir")})
        print(json.dumps(rows[-1]), flush=True)
        print(f"# {name} state: {json.dumps(method_state(s['run_dir']))}", flush=True)
    print(f"\nNOT paper numbers. CIFAR-10, N_1 = {args.n1}, M_1 = {2 * args.n1}, ratio 100, "
          f"ResNet-32, {args.batch} + 2 x {args.batch}, {args.epochs} x {args.steps} steps, seed "
          f"{args.seed}; last evaluation of the EMA model; many / medium / few = 3 / 3 / 4 classes")
    print(f"| {'method':<9}| overall |  many | medium |   few | minutes |")
    print("|----------|---------|-------|--------|-------|---------|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']:<9}| failed: {r['error'][:60]} |")
            continue
        print(f"| {r['method']:<9}| {r['top1']:7.2f} | {r['many']:5.2f} | {r['medium']:6.2f} "
              f"| {r['few']:5.2f} | {r['seconds'] / 60:7.1f} |")


if __name__ == "__main__":
    main()
