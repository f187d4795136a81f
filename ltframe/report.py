"""`ltframe report`: a Markdown report with PNG figures for one or more finished runs.

Figures (several runs side by side in the same axes; classes always in the order of their
labeled training count, head first, named when there are at most MAX_NAMED):
- per_class.png: per-class top-1 bars (a class at 0 % gets a marker) with the training counts;
- groups.png: overall / many / medium / few bars;
- curves.png: loss terms, learning rate and evaluation top-1 against the run-wide step;
- pseudo_mask.png: the fraction of unlabeled samples the online pseudo-labeler kept (train
  records' `mask_ratio`), with the recipe's threshold, for stages with a pseudo_labeler;
- confusion-<run>.png: the final stage's row-normalised confusion matrix (RUN/predictions/);
- pseudo_labels-<run>.png: per-class precision / recall of each whole-pool labelling
  (generations, loops), for runs that label pools and know the pool's labels.
report.md: the numbers (one row per post-hoc tau when a run has several), per stage, and
per class by name. matplotlib is the optional `plots` extra.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from ltframe.compare import METRICS, compare_rows, load_summary
from ltframe.engine.checkpoint import atomic_write_text
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
            for key in PSEUDO_SERIES:  # online pseudo-labels (stages with a pseudo_labeler)
                if r.get(key) is not None:
                    out.setdefault(key, []).append((offset + r["step"], r[key]))
        elif r["event"] == "eval" and r.get("top1") is not None:
            out.setdefault("eval top-1", []).append((offset + r["step"], r["top1"]))
    return out


#: train-record keys of the online pseudo-labeler: the fraction of unlabeled samples kept
PSEUDO_SERIES = ("mask_ratio",)


def _order(counts: list[int]) -> list[int]:
    """Class indices by labeled training count, head (largest) first; ties by index."""
    return sorted(range(len(counts)), key=lambda c: (-counts[c], c))


def _class_names(s: dict[str, Any], n: int) -> list[str]:
    names = s.get("classes") or []
    return [str(names[c]) if c < len(names) else str(c) for c in range(n)]


def _thresholds(run_dir: Path) -> list[float]:
    """The fixed thresholds of the recipe's online pseudo-labelers (resolved.toml)."""
    try:
        raw = tomllib.loads((run_dir / "resolved.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return []
    found = []
    for stage in raw.get("stage") or []:
        pl = stage.get("pseudo_labeler") if isinstance(stage, dict) else None
        if isinstance(pl, dict) and isinstance(pl.get("threshold"), int | float):
            found.append(float(pl["threshold"]))
    return sorted(set(found))


def _confusion(run_dir: Path, stage: dict) -> Any:
    import torch
    from safetensors.torch import load_file

    path = run_dir / "predictions" / f"stage{stage.get('index', 0)}-{stage.get('stage')}.safetensors"
    if not path.is_file():
        return None
    t = load_file(str(path))
    keep = t["label"] >= 0  # test images without a label are left out
    label, pred = t["label"][keep], t["pred"][keep]
    if label.numel() == 0:
        return None
    c = int(max(label.max(), pred.max())) + 1
    conf = torch.bincount(label * c + pred, minlength=c * c).view(c, c).double()
    return (conf / conf.sum(1, keepdim=True).clamp_min(1)).numpy()


def _save(plt: Any, fig: Any, out: Path, figs: list[tuple[str, str]], file: str,
          title: str) -> None:
    figs.append((file, title))
    fig.savefig(out / file, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _class_ticks(ax: Any, names: list[str], order: list[int], axis: str = "x") -> None:
    """Class names as tick labels (head first) when they fit, else the rank by count."""
    n = len(order)
    if n <= MAX_NAMED:
        ticks, labels = list(range(n)), [names[c] for c in order]
        if axis == "x":
            ax.set_xticks(ticks, labels, rotation=90, fontsize=7 if n > 10 else 8)
        else:
            ax.set_yticks(ticks, labels, fontsize=7 if n > 10 else 8)
    else:
        from matplotlib.ticker import MaxNLocator

        (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


#: classes named on figure axes up to this many (beyond: rank by training count)
MAX_NAMED = 40
#: classes listed in report.md's per-class table up to this many
MAX_TABLE = 100
ZERO_LABEL = "0 % (no bar)"


def _per_class_figure(plt: Any, names: list[str], summaries: list[dict]) -> Any:
    """Per-class top-1 as bars, classes sorted by training count (head left); a class with 0 %
    gets a marker at the axis (a bar of height 0 would not show); the counts on a log axis."""
    first = next((s for s in summaries if s.get("labeled_counts")), summaries[0])
    counts = list(first.get("labeled_counts") or [])
    n = len(counts) or max(len(s.get("per_class") or []) for s in summaries)
    order = _order(counts) if counts else list(range(n))
    cls = _class_names(first, n)
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.3 * n * max(1, len(summaries)) + 2)), 4))
    width = 0.8 / len(summaries)
    zero_seen = False
    for i, (name, s) in enumerate(zip(names, summaries, strict=True)):
        acc = s.get("per_class") or []
        if len(acc) != n:
            continue
        xs = [j - 0.4 + width * (i + 0.5) for j in range(n)]
        vals = [acc[c] if acc[c] is not None else float("nan") for c in order]
        ax.bar(xs, vals, width, color=f"C{i}", label=name)
        zeros = [x for x, v in zip(xs, vals, strict=True) if v == 0]
        if zeros:
            zero_seen = True
            ax.scatter(zeros, [-2.5] * len(zeros), marker="^", s=28, color=f"C{i}",
                       edgecolors="black", linewidths=0.6, zorder=3, clip_on=False)
    if zero_seen:
        ax.scatter([], [], marker="^", color="white", edgecolors="black", label=ZERO_LABEL)
    ax.set(ylabel="per-class top-1 (%)", ylim=(-5, 102), xlim=(-0.6, n - 0.4),
           xlabel="class (by labeled training images, head left)",
           title="per-class accuracy, classes by training count")
    ax.axhline(0, color="black", linewidth=0.6)
    _class_ticks(ax, cls, order)
    pairs = sorted(zip(*ax.get_legend_handles_labels(), strict=True),
                   key=lambda hl: hl[1] == ZERO_LABEL)  # the runs, then the marker's meaning
    handles, labels = [h for h, _ in pairs], [lab for _, lab in pairs]
    if counts:
        from matplotlib.ticker import LogFormatter

        ax2 = ax.twinx()
        line = ax2.plot(range(n), [counts[c] for c in order], color="0.4", marker=".", ms=4,
                        linewidth=1)
        ax2.set_yscale("log")
        ax2.yaxis.set_major_formatter(LogFormatter())
        ax2.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax2.set_ylabel("labeled training images (log)", color="0.4", fontsize=8)
        handles, labels = [*handles, *line], [*labels, "labeled training images"]
    fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    return fig


def check_not_training(run_dir: Path) -> None:
    """A run another process is still writing has no final numbers yet: say so (never
    advise resuming it)."""
    from ltframe.engine.runlock import holder

    pid = holder(run_dir) if run_dir.is_dir() else None
    if pid is not None:
        raise LtframeError(f"{run_dir}: still training (process {pid} holds its lock); "
                           "wait for it to finish, then run this again")


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write out/report.md and its figures; returns the Markdown file's path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LtframeError(f"--out {out}: is a file, not a folder; give a folder for report.md "
                           "and its figures (it is created if missing)")
    dirs = [Path(d) for d in run_dirs]
    for d in dirs:
        check_not_training(d)
    plt = _plt()
    summaries = [load_summary(d) for d in dirs]
    names = [d.name for d in dirs]
    if len(set(names)) != len(names):
        names = [f"{d.parent.name}/{d.name}" for d in dirs]
    out.mkdir(parents=True, exist_ok=True)
    figs: list[tuple[str, str]] = []

    _save(plt, _per_class_figure(plt, names, summaries), out, figs, "per_class.png",
          "Per-class accuracy, classes by training count (head left)")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(summaries)
    for i, (name, s) in enumerate(zip(names, summaries, strict=True)):
        xs = [j + i * width for j in range(len(METRICS))]
        vals = [s.get(m) for m in METRICS]
        ax.bar(xs, [v if v is not None else float("nan") for v in vals], width, label=name,
               color=f"C{i}")
        for x, v in zip(xs, vals, strict=True):
            if v is None:  # a group without classes
                ax.text(x, 1, "n/a", ha="center", fontsize=7, rotation=90)
            elif v == 0:
                ax.scatter([x], [-2.5], marker="^", s=28, color=f"C{i}", edgecolors="black",
                           linewidths=0.6, zorder=3, clip_on=False)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(METRICS))],
                  ["overall", "many", "medium", "few"])
    ax.set(ylabel="top-1 (%)", ylim=(-5, 100), title="overall / many / medium / few")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=7)
    _save(plt, fig, out, figs, "groups.png", "Many / medium / few")

    curves = [_curves(_records(d)) for d in dirs]
    keys = sorted({k for c in curves for k in c if k.startswith("loss/")}) + ["lr", "eval top-1"]
    keys = [k for k in keys if any(k in c for c in curves)]
    handles = [plt.Line2D([], [], color=f"C{i}", label=n) for i, n in enumerate(names)]
    if keys:
        _save(plt, _series_figure(plt, curves, keys, handles), out, figs, "curves.png",
              "Learning curves")
    pseudo = [k for k in PSEUDO_SERIES if any(k in c for c in curves)]
    if pseudo:
        labels = []
        for i, (name, d) in enumerate(zip(names, dirs, strict=True)):
            if not any(k in curves[i] for k in pseudo):
                continue
            th = _thresholds(d)
            labels.append(plt.Line2D([], [], color=f"C{i}", label=name + (
                f" (threshold {', '.join(f'{t:g}' for t in th)})" if th else "")))
        fig = _series_figure(plt, curves, pseudo, labels,
                             {"mask_ratio": "unlabeled kept (mask ratio)"})
        fig.axes[0].set_ylim(-0.03, 1.03)
        _save(plt, fig, out, figs, "pseudo_mask.png",
              "Online pseudo-labels: fraction of unlabeled samples kept")

    for name, d, s in zip(names, dirs, summaries, strict=True):
        safe = name.replace("/", "_")
        counts = list(s.get("labeled_counts") or [])
        final = (s.get("stages") or [{}])[-1]
        conf = _confusion(d, final)
        if conf is not None:
            n = conf.shape[0]
            order = _order(counts) if len(counts) == n else list(range(n))
            cls = _class_names(s, n)
            conf = conf[order][:, order]  # head classes top left
            size = 4.5 if n <= 20 else 7
            fig, ax = plt.subplots(figsize=(size, size - 0.5))
            im = ax.imshow(conf, vmin=0, vmax=1, cmap="viridis")
            ax.set(xlabel="predicted", ylabel="true (head first)",
                   title=f"{name}: confusion ({final['stage']})")
            _class_ticks(ax, cls, order, "x")
            _class_ticks(ax, cls, order, "y")
            fig.colorbar(im, ax=ax, fraction=0.046)
            _save(plt, fig, out, figs, f"confusion-{safe}.png", f"Confusion matrix, {name}")
        pls = [p for p in s.get("pseudo_labels", [])
               if any(v is not None for v in p.get("pl_precision") or [])]
        if pls:
            n = len(pls[0]["pl_precision"])
            order = _order(counts) if len(counts) == n else list(range(n))
            cls = _class_names(s, n)
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharey=True)
            for p in pls:
                for ax, key in zip(axes, ("pl_precision", "pl_recall"), strict=True):
                    ys = [p[key][c] if p[key][c] is not None else float("nan") for c in order]
                    ax.plot(range(n), ys, marker="o", ms=3, label=p["stage"])
            axes[0].set(title="pseudo-label precision", ylabel="%", xlim=(-0.5, n - 0.5))
            axes[1].set(title="pseudo-label recall", xlim=(-0.5, n - 0.5))
            for ax in axes:
                ax.set_xlabel("class (head left)")
                _class_ticks(ax, cls, order)
            axes[1].legend(fontsize=7)
            _save(plt, fig, out, figs, f"pseudo_labels-{safe}.png",
                  f"Pseudo-labels per generation, {name}")

    md = ["# ltframe report", "", "Balanced test set, top-1 % (`report` = the protocol of the "
          "reported number; `last` = the last evaluation; `tau` = post-hoc logit adjustment).",
          ""]
    md += _results_table(names, dirs)
    md += _per_class_table(names, summaries)
    for file, title in figs:
        md += ["", f"## {title}", "", f"![{title}]({file})"]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def _series_figure(plt: Any, curves: list[dict], keys: list[str], handles: list[Any],
                   labels: dict[str, str] | None = None) -> Any:
    """One panel per series key, one colour per run, against the run-wide step."""
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True,
                             squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        for i, c in enumerate(curves):
            if key in c:
                xs, ys = zip(*c[key], strict=True)
                ax.plot(xs, ys, color=f"C{i}", marker="o" if len(xs) < 3 else None, ms=3)
        ax.set_ylabel((labels or {}).get(key, key), fontsize=8)
    axes[0, 0].legend(handles=handles, fontsize=7)
    axes[-1, 0].set_xlabel("step (run-wide)")
    return fig


def _results_table(names: list[str], dirs: list[Path]) -> list[str]:
    """The runs' (and their stages') numbers, one row per post-hoc tau where there are several."""
    by_dir = dict(zip((str(d) for d in dirs), names, strict=True))
    rows = compare_rows(dirs)
    taus = any(r["posthoc_tau"] is not None for r in rows)
    tau_h = ("tau | ", "---|") if taus else ("", "")
    md = [f"| run | recipe | report | {tau_h[0]}overall | many | medium | few | last |",
          f"|---|---|---|{tau_h[1]}---|---|---|---|---|"]
    for r in rows:
        tau = f"{_tau(r['posthoc_tau'])} | " if taus else ""
        md.append(f"| {by_dir[r['run_dir']]} | {r['recipe'] or '-'} | {r['protocol']} | {tau}"
                  + " | ".join(_cell(r[m]) for m in METRICS) + f" | {_cell(r['last_top1'])} |")
    stage_rows = compare_rows(dirs, stages=True)
    if len({(r["run_dir"], r["stage"]) for r in stage_rows}) > len(dirs):
        taus = any(r["posthoc_tau"] is not None for r in stage_rows)
        tau_h = ("tau | ", "---|") if taus else ("", "")
        md += ["", "Stages:", "", f"| run | stage | head | {tau_h[0]}overall | many | medium | few |",
               f"|---|---|---|{tau_h[1]}---|---|---|---|"]
        for r in stage_rows:
            tau = f"{_tau(r['posthoc_tau'])} | " if taus else ""
            md.append(f"| {by_dir[r['run_dir']]} | {r['stage']} | {r.get('eval_head') or '-'} | "
                      + tau + " | ".join(_cell(r[m]) for m in METRICS) + " |")
    return md


def _per_class_table(names: list[str], summaries: list[dict]) -> list[str]:
    """Per-class top-1 by class name, classes by training count (head first)."""
    first = next((s for s in summaries if s.get("labeled_counts")), None)
    if first is None:
        return []
    counts = list(first["labeled_counts"])
    n = len(counts)
    if n > MAX_TABLE:
        return []
    cls = _class_names(first, n)
    md = ["", "Per-class top-1 (%), classes by labeled training images:", "",
          "| class | train | " + " | ".join(names) + " |",
          "|---|---|" + "---|" * len(names)]
    for c in _order(counts):
        cells = [_cell((s.get("per_class") or [None] * n)[c])
                 if len(s.get("per_class") or []) == n else "-" for s in summaries]
        md.append(f"| {cls[c]} | {counts[c]} | " + " | ".join(cells) + " |")
    return md


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def _tau(v: Any) -> str:
    return "-" if v is None else f"{v:g}"
