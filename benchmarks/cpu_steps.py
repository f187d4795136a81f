"""Steady-state training steps per second of a recipe's first stage on this machine (CPU by
default): the wall time of a short and a long run differ only by their extra steps, so
(N_long - N_short) / (T_long - T_short) leaves set-up, evaluation and checkpoints out.

    .venv/bin/python benchmarks/cpu_steps.py recipes/cpu/fixmatch.toml
    .venv/bin/python benchmarks/cpu_steps.py recipes/cpu/fixmatch.toml --set run.channels_last=false

Each run is one epoch of N steps (`stage.0.steps = stage.0.steps_per_epoch = N`, logging off) in
a temporary folder; torch uses --threads threads (default 1, for stable numbers). Prints the
rate of each repeat.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from ltframe.engine.run import start_run


def run_seconds(recipe: str, steps: int, extra: list[str]) -> float:
    """Wall time of `recipe` cut to one epoch of `steps` steps."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        start_run(recipe, [f"stage.0.steps={steps}", f"stage.0.steps_per_epoch={steps}",
                           "run.log_every=1000000", *extra], out_dir=tmp)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--short", type=int, default=10, help="steps of the short run")
    ap.add_argument("--long", type=int, default=70, help="steps of the long run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="recipe overrides, KEY=VALUE")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run_seconds(a.recipe, 5, a.set)  # warm caches (imports, kernels)
    rates = []
    for _ in range(a.repeats):
        short, long = run_seconds(a.recipe, a.short, a.set), run_seconds(a.recipe, a.long, a.set)
        rates.append((a.long - a.short) / (long - short))
    print(f"{a.recipe}: steps/s " + ", ".join(f"{r:.2f}" for r in rates))


if __name__ == "__main__":
    main()
