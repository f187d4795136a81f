"""`ltframe report`: a Markdown report with PNG figures for one or more finished runs.

Figures (several runs side by side in the same axes):
- per_class.png: per-class top-1 against the class's labeled training count (log scale);
- groups.png: overall / many / medium / few bars;
- curves.png: loss terms, learning rate and evaluation top-1 against the run-wide step;
- confusion-<run>.png: the final stage's row-normalised confusion matrix (RUN/predictions/);
- pseudo_labels-<run>.png: per-class precision / recall of each whole-pool labelling
  (generations, loops), for runs that label pools.
matplotlib is the optional `plots` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ltframe.compare import METRICS, compare_rows, load_summary
from ltframe.errors import LtframeError


def _plt() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LtframeError("ltframe report draws with matplotlib, which is not installed; "
                           "install it with pip install 'ltframe[plots]' (or use "
                           "`ltframe compare` for the table only)") from None
    return plt


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.open() if line.strip()]


def _curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Series against a run-wide step (each stage starts where the previous one ended)."""
    out: dict[str, list[tuple[int, float]]] = {}
    offset = total = 0
    for r in records:
        if r["event"] == "stage_start":
            offset += total
            total = int(r.get("total_steps", 0))
        elif r["event"] == "train":
            for k, v in (r.get("loss") or {}).items():
                out.setdefault(f"loss/{k}", []).append((offset + r["step"], v))
            out.setdefault("lr", []).append((offset + r["step"], r["lr"]))
        elif r["event"] == "eval" and r.get("top1") is not None:
            out.setdefault("eval top-1", []).append((offset + r["step"], r["top1"]))
    return out


def _confusion(run_dir: Path, stage: dict) -> Any:
    import torch
    from safetensors.torch import load_file

    path = run_dir / "predictions" / f"stage{stage.get('index', 0)}-{stage.get('stage')}.safetensors"
    if not path.is_file():
        return None
    t = load_file(str(path))
    c = int(max(t["label"].max(), t["pred"].max())) + 1
    conf = torch.bincount(t["label"] * c + t["pred"], minlength=c * c).view(c, c).double()
    return (conf / conf.sum(1, keepdim=True).clamp_min(1)).numpy()


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write out/report.md and its figures; returns the Markdown file's path."""
    plt = _plt()
    dirs = [Path(d) for d in run_dirs]
    summaries = [load_summary(d) for d in dirs]
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        names = [f"{d.parent.name}/{d.name}" for d in dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, str]] = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, s) in enumerate(zip(names, summaries, strict=True)):
        counts, acc = s.get("labeled_counts"), s.get("per_class")
        if counts and acc:
            ax.scatter(counts, acc, label=name, s=18, color=f"C{i}")
    ax.set(xscale="log", xlabel="labeled training images of the class (log)",
           ylabel="per-class top-1 (%)", ylim=(-2, 102), title="per-class accuracy vs. class size")
    ax.legend(fontsize=7)
    figs.append(("per_class.png", "Per-class accuracy against training count"))
    fig.savefig(out / figs[-1][0], dpi=110, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(summaries)
    for i, (name, s) in enumerate(zip(names, summaries, strict=True)):
        vals = [s.get(m) if s.get(m) is not None else 0.0 for m in METRICS]
        ax.bar([j + i * width for j in range(len(METRICS))], vals, width, label=name,
               color=f"C{i}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METRICS))],
                  ["overall", "many", "medium", "few"])
    ax.set(ylabel="top-1 (%)", ylim=(0, 100), title="overall / many / medium / few")
    ax.legend(fontsize=7)
    figs.append(("groups.png", "Many / medium / few"))
    fig.savefig(out / figs[-1][0], dpi=110, bbox_inches="tight")
    plt.close(fig)

    curves = [_curves(_records(d)) for d in dirs]
    keys = sorted({k for c in curves for k in c if k.startswith("loss/")}) + ["lr", "eval top-1"]
    keys = [k for k in keys if any(k in c for c in curves)]
    if keys:
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True,
                                 squeeze=False)
        for ax, key in zip(axes[:, 0], keys, strict=True):
            for i, c in enumerate(curves):  # one colour per run in every panel
                if key in c:
                    xs, ys = zip(*c[key], strict=True)
                    ax.plot(xs, ys, color=f"C{i}", marker="o" if len(xs) < 3 else None, ms=3)
            ax.set_ylabel(key, fontsize=8)
        handles = [plt.Line2D([], [], color=f"C{i}", label=n) for i, n in enumerate(names)]
        axes[0, 0].legend(handles=handles, fontsize=7)
        axes[-1, 0].set_xlabel("step (run-wide)")
        figs.append(("curves.png", "Learning curves"))
        fig.savefig(out / figs[-1][0], dpi=110, bbox_inches="tight")
        plt.close(fig)

    for name, d, s in zip(names, dirs, summaries, strict=True):
        safe = name.replace("/", "_")
        final = (s.get("stages") or [{}])[-1]
        conf = _confusion(d, final)
        if conf is not None:
            fig, ax = plt.subplots(figsize=(4.5, 4))
            im = ax.imshow(conf, vmin=0, vmax=1, cmap="viridis")
            ax.set(xlabel="predicted", ylabel="true", title=f"{name}: confusion ({final['stage']})")
            _integer_ticks(plt, ax, "both")
            fig.colorbar(im, ax=ax, fraction=0.046)
            figs.append((f"confusion-{safe}.png", f"Confusion matrix, {name}"))
            fig.savefig(out / figs[-1][0], dpi=110, bbox_inches="tight")
            plt.close(fig)
        pls = [p for p in s.get("pseudo_labels", []) if p.get("pl_precision")]
        if pls:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
            for p in pls:
                for ax, key in zip(axes, ("pl_precision", "pl_recall"), strict=True):
                    ys = [v if v is not None else float("nan") for v in p[key]]
                    ax.plot(range(len(ys)), ys, marker="o", ms=3, label=p["stage"])
            n = len(pls[0]["pl_precision"])
            axes[0].set(title="pseudo-label precision", xlabel="class", ylabel="%",
                        xlim=(-0.5, n - 0.5))
            axes[1].set(title="pseudo-label recall", xlabel="class", xlim=(-0.5, n - 0.5))
            for ax in axes:
                _integer_ticks(plt, ax, "x")
            axes[1].legend(fontsize=7)
            figs.append((f"pseudo_labels-{safe}.png", f"Pseudo-labels per generation, {name}"))
            fig.savefig(out / figs[-1][0], dpi=110, bbox_inches="tight")
            plt.close(fig)

    md = ["# ltframe report", "", "Balanced test set, top-1 % (`report` = the protocol of the "
          "reported number; `last` = the last evaluation).", "",
          "| run | recipe | report | overall | many | medium | few | last |",
          "|---|---|---|---|---|---|---|---|"]
    for name, r in zip(names, compare_rows(dirs), strict=True):
        cells = [_cell(r[m]) for m in METRICS]
        md.append(f"| {name} | {r['recipe'] or '-'} | {r['protocol']} | " + " | ".join(cells)
                  + f" | {_cell(r['last_top1'])} |")
    stage_rows = compare_rows(dirs, stages=True)
    if len(stage_rows) > len(dirs):
        md += ["", "Stages:", "", "| run | stage | head | overall | many | medium | few |",
               "|---|---|---|---|---|---|---|"]
        for r in stage_rows:
            md.append(f"| {r['run']} | {r['stage']} | {r.get('eval_head') or '-'} | "
                      + " | ".join(_cell(r[m]) for m in METRICS) + " |")
    for file, title in figs:
        md += ["", f"## {title}", "", f"![{title}]({file})"]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    return path


def _integer_ticks(plt: Any, ax: Any, which: str) -> None:
    from matplotlib.ticker import MaxNLocator

    if which in ("x", "both"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if which in ("y", "both"):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"
