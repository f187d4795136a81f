"""Spread of the quickstart result under perturbations of the size another CPU makes.

Another CPU (other SIMD width, other libm, other BLAS blocking) changes the last bits of a few
sums, and training can amplify those bits into a different model. This benchmark cannot run on
other CPUs, so it makes comparable perturbations of one run and prints how far the printed
numbers move:

  seed K      run.seed = K (initialisation, batch order, augmentation; same data): the largest;
  weights K   run seed 0, every initial weight w -> w * (1 + 1e-6 * n), n ~ N(0, 1) drawn from
              a generator seeded with K (about 16 float32 ulps; batch order untouched);
  inputs K    run seed 0, 0.1 % of the training pixels moved by +-1 grey level (generator K), as
              a different rounding of the synthetic images would;
  threads N   run seed 0 with torch.set_num_threads(N) (float reduction order).

Every other run uses torch.set_num_threads(1), one run at a time, so that wall times compare on a
shared machine (`ltframe run` itself uses PyTorch's default thread count). The perturbations are
applied by wrapping the engine's data / model builders in this process (benchmark only).

For each run it prints overall/many/medium/few top-1 on the balanced test set without (tau 0) and
with post-hoc logit adjustment (tau 1) and the wall time; then min / max / mean / std per column
for each kind of perturbation and for all runs. Not a CI test: it prints numbers. Examples:

    .venv/bin/python benchmarks/quickstart_spread.py   # 4 seeds, 3 weights, 3 inputs, 2 threads
    .venv/bin/python benchmarks/quickstart_spread.py --seeds 0 --weights 1 2 3 4 5 --inputs --threads
    .venv/bin/python benchmarks/quickstart_spread.py --set stage.0.epochs=20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import ltframe.engine.run as engine_run
from ltframe import start_run
from ltframe.engine.setup import build_bundle

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"
COLS = ("top1", "many", "medium", "few")
TAUS = (0.0, 1.0)
WEIGHT_EPS = 1e-6  # relative weight noise
PIXEL_FRACTION = 1e-3  # share of training pixels moved by one grey level


@contextmanager
def perturbed(kind: str, k: int) -> Iterator[None]:
    """Wrap the engine's builders so that the run sees perturbed weights or inputs."""
    orig_model, orig_data = engine_run.build_model, engine_run.build_data

    def build_model(recipe, registry, num_classes):  # noqa: ANN001, ANN202
        model = orig_model(recipe, registry, num_classes)
        g = torch.Generator().manual_seed(1000 + k)  # own generator: the run's RNG is untouched
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + WEIGHT_EPS * torch.randn(p.shape, generator=g))
        return model

    def build_data(recipe, registry, device, smoke):  # noqa: ANN001, ANN202
        source = registry.build(recipe.data.source, seed=recipe.run.seed)
        x = source.train_images
        g = torch.Generator().manual_seed(2000 + k)
        hit = torch.rand(x.shape, generator=g) < PIXEL_FRACTION
        step = torch.randint(0, 2, x.shape, generator=g, dtype=torch.int16) * 2 - 1
        source.train_images = (x.to(torch.int16) + hit * step).clamp(0, 255).to(torch.uint8)
        return build_bundle(source, recipe.data, recipe.run.seed, device, smoke=smoke)

    if kind == "weights":
        engine_run.build_model = build_model
    elif kind == "inputs":
        engine_run.build_data = build_data
    try:
        yield
    finally:
        engine_run.build_model, engine_run.build_data = orig_model, orig_data


def one_run(recipe: Path, kind: str, k: int, extra: list[str], keep: Path | None = None) -> dict:
    """One training run; `kind` is seed / weights / inputs / threads, `k` its number; the run
    directory goes under `keep` (else a temporary directory)."""
    torch.set_num_threads(k if kind == "threads" else 1)
    seed = k if kind == "seed" else 0
    overrides = [f"run.seed={seed}", f"eval.posthoc_tau=[{TAUS[0]}, {TAUS[1]}]", *extra]
    with tempfile.TemporaryDirectory() as tmp, perturbed(kind, k):
        out = keep / f"{kind}{k}" if keep else tmp
        t0 = time.perf_counter()
        summary = start_run(recipe, overrides, out_dir=out, reporter=None)
        wall = time.perf_counter() - t0
    rows = {float(r["posthoc_tau"]): r for r in summary["rows"]}
    return {"kind": kind, "k": k, "label": f"{kind} {k}", "wall_s": wall,
            "tau": {str(t): {c: rows[t].get(c) for c in COLS} for t in TAUS}}


def fmt(v: float | None) -> str:
    return "    - " if v is None else f"{v:6.2f}"


def print_table(results: list[dict]) -> None:
    head = " ".join(f"{c:>6}" for c in COLS)
    print(f"\n{'run':<14} {'wall s':>6} | tau 0: {head} | tau 1: {head}")
    for r in results:
        cells = " | ".join("       " + " ".join(fmt(r["tau"][str(t)][c]) for c in COLS) for t in TAUS)
        print(f"{r['label']:<14} {r['wall_s']:6.1f} | {cells}")
    groups = {}
    for r in results:
        groups.setdefault(r["kind"], []).append(r)
    if len(groups) > 1:
        groups["all"] = results
    base = [r for r in results if r["kind"] == "seed" and r["k"] == 0]
    for name, subset in groups.items():
        if name in ("weights", "inputs", "threads") and base:
            subset = base + subset  # each perturbation against the unperturbed seed-0 run
        if len(subset) < 2:
            continue
        print("-" * 110)
        for stat in ("min", "max", "mean", "std"):
            cells = []
            for t in TAUS:
                vals = [[x["tau"][str(t)][c] for x in subset] for c in COLS]
                cells.append("       " + " ".join(
                    fmt(None) if None in v else fmt(
                        {"min": min, "max": max, "mean": statistics.fmean,
                         "std": statistics.pstdev}[stat](v)) for v in vals))
            label = f"{name} ({len(subset)})" if stat == "min" else ""
            print(f"{label:<14} {stat:>6} | " + " | ".join(cells))
    walls = [r["wall_s"] for r in results if r["kind"] != "threads"]
    if walls:
        print(f"\nwall time per 1-thread run: mean {statistics.fmean(walls):.1f} s, "
              f"min {min(walls):.1f} s, max {max(walls):.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3],
                    help="run seeds (default 0 1 2 3; seed 0 is the reference for the others)")
    ap.add_argument("--weights", type=int, nargs="*", default=[1, 2, 3],
                    help="weight-noise draws at seed 0 (default 1 2 3)")
    ap.add_argument("--inputs", type=int, nargs="*", default=[1, 2, 3],
                    help="input-noise draws at seed 0 (default 1 2 3)")
    ap.add_argument("--threads", type=int, nargs="*", default=[2],
                    help="thread counts at seed 0 (default 2)")
    ap.add_argument("--set", dest="extra", action="append", default=[],
                    help="extra recipe override key=value (repeatable)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    ap.add_argument("--keep", type=Path, help="keep the run directories under KEEP/<kind><k>/")
    args = ap.parse_args()

    plan = ([("seed", k) for k in args.seeds] + [("weights", k) for k in args.weights]
            + [("inputs", k) for k in args.inputs] + [("threads", k) for k in args.threads])
    results = []
    for kind, k in plan:
        r = one_run(args.recipe, kind, k, args.extra, args.keep)
        results.append(r)
        t0, t1 = r["tau"]["0.0"], r["tau"]["1.0"]
        print(f"{r['label']}: {r['wall_s']:.1f} s  tau0 top1 {t0['top1']:.2f} few {t0['few']:.2f}"
              f"  tau1 top1 {t1['top1']:.2f} few {t1['few']:.2f}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    print(f"\nrecipe: {args.recipe}  overrides: {args.extra}")
    print_table(results)


if __name__ == "__main__":
    main()
