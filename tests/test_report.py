"""`ltframe report`: two short real runs rendered into report.md + PNG figures; the table's
numbers are the summaries'; the confusion matrix comes from the saved predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from ltframe import start_run
from ltframe.cli import main
from ltframe.hookspecs import hookimpl
from ltframe.testing import tiny_recipe, write_image_folder

pytest.importorskip("matplotlib")


def _runs(tmp_path: Path) -> list[Path]:
    out = []
    for name, seed in (("a", 0), ("b", 1)):
        recipe = tiny_recipe(tmp_path / name, run={"name": name, "seed": seed, "log_every": 2},
                             data={"split": {"name": "fraction", "labeled_fraction": 0.5}},
                             stage=[{"name": "train", "epochs": 2, "steps_per_epoch": 3,
                                     "label": {"name": "threshold", "threshold": 0.0}}])
        out.append(Path(start_run(recipe, out_dir=tmp_path / "runs")["run_dir"]))
    return out


def test_report_of_two_runs(tmp_path):
    a, b = _runs(tmp_path)
    res = CliRunner().invoke(main, ["report", str(a), str(b), "--out", str(tmp_path / "rep")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = tmp_path / "rep"
    md = (rep / "report.md").read_text()
    for run in (a, b):
        s = json.loads((run / "summary.json").read_text())
        row = next(line for line in md.splitlines() if line.startswith(f"| {run.name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        expect = ["-" if s[m] is None else f"{s[m]:.2f}" for m in ("top1", "many", "medium", "few")]
        assert cells[3:7] == expect
        # the saved predictions give the summary's per-class recall
        pred = load_file(str(run / "predictions" / "stage0-train.safetensors"))
        recall = [100 * float((pred["pred"][pred["label"] == c] == c).float().mean())
                  for c in range(4)]
        assert recall == pytest.approx(s["per_class"], abs=1e-3)
    pngs = {"per_class.png", "groups.png", "curves.png", "confusion-a.png", "confusion-b.png",
            "pseudo_labels-a.png", "pseudo_labels-b.png"}
    assert pngs <= {p.name for p in rep.iterdir()}
    for name in pngs:
        assert (rep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in md


def test_report_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *args, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "pip install 'ltframe[plots]'" in res.output


class _MaskProbe:
    """Records each step's online pseudo-label mask (what `mask_ratio` must summarise)."""

    def __init__(self):
        self.kept = {}

    @hookimpl
    def ltframe_step_end(self, run, stage, step, ctx):
        self.kept[step + 1] = float((ctx.pseudo.mask > 0).float().mean())  # 1-based in records


FIXMATCH_STAGE = {"name": "fm", "epochs": 1, "steps_per_epoch": 3, "data": "labeled+unlabeled",
                  "pseudo_labeler": {"name": "threshold", "threshold": 0.7},
                  "loss": ["ce", "fixmatch"]}


def test_mask_ratio_is_logged_also_without_hidden_labels_and_reported(tmp_path):
    probe = _MaskProbe()
    a = tiny_recipe(tmp_path / "a", run={"name": "known", "log_every": 1},
                    data={"split": {"name": "fraction", "labeled_fraction": 0.5}},
                    eval={"posthoc_tau": [0.0, 1.0]}, stage=[FIXMATCH_STAGE])
    run_a = Path(start_run(a, out_dir=tmp_path / "runs", plugins=[("probe", probe)])["run_dir"])
    records = [json.loads(x) for x in (run_a / "metrics.jsonl").open()]
    logged = {r["step"]: r["mask_ratio"] for r in records if r["event"] == "train"}
    assert logged == pytest.approx(probe.kept) and len(logged) == 3, logged
    assert len(set(logged.values())) > 1  # the threshold keeps more in some steps
    # unlabeled images without any label (a folder): the mask ratio needs none
    write_image_folder(tmp_path / "unl", ["."], 10, 16)
    b = tiny_recipe(tmp_path / "b", run={"name": "unknown", "log_every": 1},
                    data={"unlabeled": {"name": "folder", "root": str(tmp_path / "unl")}},
                    stage=[dict(FIXMATCH_STAGE, steps_per_epoch=2)])
    run_b = Path(start_run(b, out_dir=tmp_path / "runs")["run_dir"])
    train_b = [r for r in (json.loads(x) for x in (run_b / "metrics.jsonl").open())
               if r["event"] == "train"]
    assert len(train_b) == 2 and all(0 <= r["mask_ratio"] <= 1 for r in train_b)

    res = CliRunner().invoke(main, ["report", str(run_a), str(run_b), "--out", str(tmp_path / "r")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "](pseudo_mask.png)" in md and (tmp_path / "r" / "pseudo_mask.png").is_file()
    s = json.loads((run_a / "summary.json").read_text())
    for tau_row in s["rows"]:  # one table row per post-hoc tau, the summary's numbers
        line = next(x for x in md.splitlines()
                    if x.startswith("| known | ") and f"| {tau_row['posthoc_tau']:g} |" in x)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == f"{tau_row['top1']:.2f}"
    assert any(x.startswith("| unknown | ") and "| - |" in x for x in md.splitlines())
    # per-class table: class names, head (most training images) first
    counts, classes = s["labeled_counts"], s["classes"]
    table = [x for x in md.splitlines() if x.startswith("| class")]
    at = md.splitlines().index(table[0])
    named = [x.split("|")[1].strip() for x in md.splitlines()[at + 2: at + 2 + len(counts)]]
    assert named == [classes[c] for c in sorted(range(len(counts)), key=lambda c: -counts[c])]


def test_per_class_figure_sorts_by_count_names_classes_and_marks_zero():
    from ltframe.report import _per_class_figure, _plt

    plt = _plt()
    s = {"labeled_counts": [3, 12, 5, 8], "classes": ["ant", "bee", "cat", "dog"],
         "per_class": [50.0, 0.0, None, 100.0]}
    fig = _per_class_figure(plt, ["run"], [s])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["bee", "dog", "cat", "ant"]
    heights = [p.get_height() for p in ax.patches]
    assert heights[0] == 0 and heights[1] == 100 and heights[3] == 50  # head left
    marks = [c.get_offsets() for c in ax.collections if len(c.get_offsets())]
    assert len(marks) == 1 and marks[0][:, 0].tolist() == pytest.approx([0.0])  # only 'bee'
    assert all(y < 0 for y in marks[0][:, 1]) and ax.get_ylim()[0] < marks[0][0, 1]  # visible
    plt.close(fig)


@pytest.mark.slow
def test_mask_ratio_of_a_resumed_interval_equals_the_uninterrupted_run(tmp_path):
    from ltframe import resume_run
    from ltframe.errors import RunInterrupted
    from ltframe.testing import StopAt

    over = {"run": {"log_every": 3, "checkpoint_every": 2},
            "data": {"split": {"name": "fraction", "labeled_fraction": 0.5}},
            "stage": [dict(FIXMATCH_STAGE, epochs=2)]}

    def ratios(run_dir):
        return [(r["step"], r["mask_ratio"]) for r in map(json.loads, (run_dir / "metrics.jsonl").open())
                if r["event"] == "train"]

    full = Path(start_run(tiny_recipe(tmp_path / "a", **over))["run_dir"])
    with pytest.raises(RunInterrupted):  # checkpoint at step 2, inside the interval logged at 3
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(3))])
    resumed = Path(resume_run(tmp_path / "b" / "runs" / "tiny")["run_dir"])
    assert ratios(resumed) == ratios(full) and len(ratios(full)) == 2
