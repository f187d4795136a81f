"""The command line: run/resume/eval/show/plugins/components and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ltframe.cli import main
from ltframe.testing import tiny_recipe


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_then_eval_and_resume(tmp_path):
    recipe = tiny_recipe(tmp_path)
    res = invoke("run", recipe, "--quiet", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert "overall" in res.output and "many" in res.output and "few" in res.output
    run_dir = tmp_path / "out" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    res = invoke("eval", run_dir, "--json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert metrics["top1"] == pytest.approx(summary["top1"])  # same weights, same test set
    res = invoke("resume", run_dir, "--quiet")  # already complete: no stage runs again
    assert res.exit_code == 0, res.output
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["top1"] == summary["top1"] and again["stages"] == summary["stages"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    assert sum(r["event"] == "stage_start" for r in rows) == 1


def test_errors_are_one_line_with_nonzero_exit(tmp_path):
    recipe = tiny_recipe(tmp_path)
    res = invoke("run", recipe, "--set", "optim.lrr=1")
    assert res.exit_code == 1
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) <= 2 and "optim.lrr: unknown key" in res.output and "Traceback" not in res.output
    res = invoke("run", tmp_path / "missing.toml")
    assert res.exit_code != 0
    res = invoke("eval", tmp_path)
    assert res.exit_code == 1 and "no checkpoint" in res.output


def test_show_prints_the_resolved_recipe(tmp_path):
    res = invoke("show", tiny_recipe(tmp_path), "--set", "optim.lr=0.2")
    assert res.exit_code == 0
    assert "lr = 0.2" in res.output and "[[stage]]" in res.output and 'name = "random"' in res.output


def test_plugins_and_components_listing():
    res = invoke("plugins")
    assert res.exit_code == 0 and "classics" in res.output and "builtin" in res.output
    res = invoke("components", "sampler")
    assert res.exit_code == 0
    assert "class_balanced" in res.output and "num_samples=0" in res.output
    assert "linear" not in res.output
    res = invoke("components", "samplers")
    assert res.exit_code == 1 and "did you mean 'sampler'" in res.output


def test_smoke_flag_limits_steps(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "long", "epochs": 50}])
    res = invoke("run", recipe, "--smoke", "--quiet")
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    assert max(r["step"] for r in rows if r["event"] == "train") == 2
    assert json.loads((run_dir / "summary.json").read_text())["smoke"] is True


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "ltframe", "--help"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parent)
    assert "resume" in out.stdout and "components" in out.stdout
