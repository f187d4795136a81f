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
from ltframe.testing import tiny_recipe

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
