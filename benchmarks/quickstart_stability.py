"""Stability of the quickstart result: the same recipe under perturbations larger than
cross-CPU float noise, one table.

A CPU of another make sums floats in another order; training amplifies those last-bit
differences, so one seed's number can move between machines. This benchmark cannot run on other
CPUs; it uses conservative proxies instead:

  (a) float reduction order: torch.set_num_threads(1) against 2 threads, same seed;
  (b) run seed: run.seed = 0..3 (model initialisation, batch order, augmentation; the synthetic
      data has its own seed and stays the same), a much larger perturbation than float noise.

For each run it prints overall/many/medium/few top-1 (balanced test set) without (tau 0) and with
post-hoc logit adjustment (tau 1), the wall and CPU time, then the spread (max - min) per column.
A spread of about 2 points across seeds is strong evidence that the number is stable across
machines. Not a CI test: it prints numbers. Examples:

    .venv/bin/python benchmarks/quickstart_stability.py            # 5 runs: 1 and 2 threads, seeds 1-3
    .venv/bin/python benchmarks/quickstart_stability.py --threads 1 --json out.json   # 4 runs
    .venv/bin/python benchmarks/quickstart_stability.py --recipe old.toml --set data.batch_size=32

Seed runs use the first thread count (1 by default) so that their wall times are comparable on
a loaded machine; `ltframe run` itself uses PyTorch's default thread count.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ltframe import start_run

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"
COLS = ("top1", "many", "medium", "few")
TAUS = (0.0, 1.0)


def one_run(recipe: Path, seed: int, threads: int, extra: list[str]) -> dict:
    torch.set_num_threads(threads)
    overrides = [f"run.seed={seed}", f"eval.posthoc_tau=[{TAUS[0]}, {TAUS[1]}]", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = start_run(recipe, overrides, out_dir=tmp, reporter=None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = {float(r["posthoc_tau"]): r for r in summary["rows"]}
    return {"seed": seed, "threads": threads, "wall_s": wall, "cpu_s": cpu,
            "report": summary.get("report"),
            "tau": {str(t): {c: rows[t].get(c) for c in COLS} for t in TAUS}}


def fmt(v: float | None) -> str:
    return "   -  " if v is None else f"{v:6.2f}"


def print_table(results: list[dict]) -> None:
    head = "  ".join(f"{c:>6}" for c in COLS)
    print(f"\n{'run':<16} {'wall s':>7} {'cpu s':>7} | tau 0: {head} | tau 1: {head}")
    for r in results:
        cells = " | ".join("       " + "  ".join(fmt(r["tau"][str(t)][c]) for c in COLS)
                           for t in TAUS)
        print(f"{r['label']:<16} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} | {cells}")

    def spread(subset: list[dict], name: str) -> None:
        cells = []
        for t in TAUS:
            vals = [[x["tau"][str(t)][c] for x in subset] for c in COLS]
            cells.append("       " + "  ".join(
                fmt(max(v) - min(v)) if None not in v else fmt(None) for v in vals))
        print(f"{name:<16} {'':>7} {'':>7} | " + " | ".join(cells))

    print("-" * 118)
    threads = [r for r in results if r["seed"] == results[0]["seed"]]
    seeds = [r for r in results if r["threads"] == results[0]["threads"]]
    if len(threads) > 1:
        spread(threads, "spread threads")
    if len(seeds) > 1:
        spread(seeds, "spread seeds")
    spread(results, "spread all")
    walls = [r["wall_s"] for r in results]
    print(f"wall time per run: mean {sum(walls) / len(walls):.1f} s, "
          f"min {min(walls):.1f} s, max {max(walls):.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                    help="run seeds, with --threads[0] threads (default 0 1 2 3)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                    help="thread counts, each at the first seed; the first also runs the other "
                         "seeds (default 1 2)")
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="extra recipe override key=value (repeatable)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args()

    plan = [(args.seeds[0], t) for t in args.threads]
    plan += [(s, args.threads[0]) for s in args.seeds[1:]]
    results = []
    for seed, threads in plan:
        r = one_run(args.recipe, seed, threads, args.extra)
        r["label"] = f"seed {seed} thr {threads}"
        results.append(r)
        t0, t1 = r["tau"]["0.0"], r["tau"]["1.0"]
        print(f"{r['label']}: {r['wall_s']:.1f} s  tau0 {t0}  tau1 {t1}", flush=True)
    print(f"\nrecipe: {args.recipe}  overrides: {args.extra}  report: {results[0]['report']}")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
