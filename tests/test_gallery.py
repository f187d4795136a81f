"""The README gallery is generated: its block equals the render of benchmarks/gallery.json, and
`collect` takes a run's command and numbers from its run directory."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ltframe import start_run
from ltframe.testing import tiny_recipe

ROOT = Path(__file__).resolve().parent.parent


def _gallery():
    spec = importlib.util.spec_from_file_location("gallery", ROOT / "benchmarks" / "gallery.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_gallery_is_the_render_of_the_collected_rows(tmp_path):
    g = _gallery()
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    readme.write_text(text)
    assert g.render(readme) == text  # rendering again changes nothing: the block is generated


def test_collect_takes_the_command_and_numbers_from_the_run(tmp_path):
    g = _gallery()
    recipe = tiny_recipe(tmp_path)
    summary = start_run(str(recipe), ["optim.lr=0.04"], out_dir=tmp_path / "runs")
    rows_file = tmp_path / "rows.json"
    rows = g.collect([Path(summary["run_dir"])], rows_file)
    (row,) = rows
    assert row["command"] == f"ltframe run {recipe} --set optim.lr=0.04"
    assert row["top1"] == summary["top1"] and json.loads(rows_file.read_text()) == rows
    readme = tmp_path / "R.md"
    readme.write_text(f"x\n{g.START}\nold\n{g.END}\ny\n")
    papers = tmp_path / "p.toml"
    papers.write_text(f'["{recipe}"]\nmethod = "CE"\npaper = "none"\npaper_number = "1.0"\n'
                      'paper_setting = "s"\n')
    out = g.render(readme, rows_file, papers)
    assert "old" not in out and f"{summary['top1']:.2f}" in out and "| CE |" in out
    assert out.startswith("x\n") and out.endswith("y\n")
