"""Accuracy benchmark: CIFAR-10-LT (ratio 100), ResNet-32, classic methods, one table.

Runs recipes/cifar10_lt/{ce,cb_ce,ldam_drw,la,crt,ssp_crt}.toml with the LDAM-DRW schedule
compressed to `--epochs` representation epochs (milestones at 80% / 90%, DRW from 80%,
warm-up 2.5%; SSP stages as long as the representation stage; cRT epochs = epochs / 20).
Not a CI test: it prints numbers. Example (real CIFAR-10 from shared/data, extracted):

    python benchmarks/cifar10_lt_accuracy.py --root .cache/cifar10 --epochs 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ltframe import start_run

ROOT = Path(__file__).resolve().parent.parent / "recipes" / "cifar10_lt"
DEFAULT = ["ce", "cb_ce", "ldam_drw", "la", "crt", "ssp_crt"]


def overrides(name: str, epochs: int, root: str) -> list[str]:
    m1, m2 = round(0.8 * epochs), round(0.9 * epochs)
    out = [f"data.source.root={root}", f"optim.schedule.milestones=[{m1}, {m2}]",
           f"optim.schedule.warmup_epochs={0.025 * epochs}", "run.log_every=100"]
    stages = ["ssp", "train", "crt"] if name == "ssp_crt" else ["train"]
    for i, stage in enumerate(stages):
        n = max(1, epochs // 20) if stage == "crt" else epochs
        out += [f"stage.{i}.epochs={n}", f"stage.{i}.eval_every={max(1, n)}"]
    if name == "ldam_drw":
        out.append(f"stage.0.loss.0.drw_epoch={m1}")
    if name == "crt":
        out.append(f"scheduler.epochs={max(1, epochs // 20)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="CIFAR-10 root (pickles or image folders)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--methods", nargs="*", default=DEFAULT)
    ap.add_argument("--out", default=".cache/bench")
    args = ap.parse_args()
    rows = []
    for name in args.methods:
        t0 = time.perf_counter()
        s = start_run(ROOT / f"{name}.toml", overrides(name, args.epochs, args.root),
                      out_dir=args.out)
        rows.append({"method": name, **{k: s.get(k) for k in ("top1", "many", "medium", "few")},
                     "images_per_s": s.get("images_per_s"), "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nCIFAR-10-LT r=100, ResNet-32, {args.epochs} representation epochs "
          "(overall = balanced top-1; many >100, medium 20-100 images)")
    print(f"{'method':<10}{'overall':>9}{'many':>8}{'medium':>8}{'img/s':>8}{'min':>6}")
    for r in rows:
        print(f"{r['method']:<10}{r['top1']:>9.2f}{r['many']:>8.2f}"
              f"{(r['medium'] if r['medium'] is not None else float('nan')):>8.2f}"
              f"{(r['images_per_s'] or 0):>8.0f}{r['seconds'] / 60:>6.1f}")


if __name__ == "__main__":
    main()
