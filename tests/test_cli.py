"""The command line: run/resume/eval/show/plugins/components and one-line errors."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ltframe.cli import main
from ltframe.config import param
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


# --- unexpected errors, --debug, interrupts -------------------------------------------------

INTERNAL = re.compile(r"error: internal error: (?P<what>.+) \(traceback in (?P<file>\S+); "
                      r"run with --debug to see it\)")


def error_lines(res):
    return [x for x in res.output.strip().splitlines() if x.strip()]


def raiser(exc):
    def fn(*args, **kwargs):
        raise exc
    return fn


def test_unexpected_error_is_one_line_naming_a_temp_traceback_file(tmp_path, monkeypatch):
    import ltframe.engine.run as engine

    monkeypatch.setattr(engine, "start_run", raiser(ValueError("bad\nvalue")))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the temp file lands here
    res = invoke("run", tiny_recipe(tmp_path))
    assert res.exit_code == 1
    lines = error_lines(res)
    assert len(lines) == 1 and "Traceback" not in res.output
    m = INTERNAL.fullmatch(lines[0])
    assert m and m["what"] == "ValueError: bad value", lines[0]
    log = Path(m["file"])
    assert log.parent == tmp_path and log.name.startswith("ltframe-error-")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ValueError: bad" in text


def test_unexpected_error_in_a_run_names_the_run_error_log(tmp_path, monkeypatch):
    from ltframe.engine.trainer import Trainer

    monkeypatch.setattr(Trainer, "run_stage", raiser(RuntimeError("kaboom")))
    res = invoke("run", tiny_recipe(tmp_path), "--quiet")
    assert res.exit_code == 1
    lines = error_lines(res)
    m = INTERNAL.fullmatch(lines[-1])
    assert len(lines) == 1 and m and m["what"] == "RuntimeError: kaboom", res.output
    assert Path(m["file"]) == tmp_path / "runs" / "tiny" / "error.log"
    assert "RuntimeError: kaboom" in Path(m["file"]).read_text()


def test_engine_attached_log_is_named_and_no_temp_file_is_written(tmp_path, monkeypatch):
    import ltframe.engine.run as engine

    log = tmp_path / "run" / "error.log"
    log.parent.mkdir()
    log.write_text("Traceback ...\nKeyError: 'x'\n")
    exc = KeyError("x")
    exc.ltframe_log = log
    monkeypatch.setattr(engine, "resume_run", raiser(exc))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    res = invoke("resume", tmp_path / "run")
    assert res.exit_code == 1
    assert error_lines(res) == [f"error: internal error: KeyError: 'x' (traceback in {log}; "
                                "run with --debug to see it)"]
    assert not (tmp_path / "tmp").exists()


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    import ltframe.engine.run as engine

    monkeypatch.setattr(engine, "start_run", raiser(ValueError("bad value")))
    res = invoke("--debug", "run", tiny_recipe(tmp_path))
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.output and "ValueError: bad value" in res.output
    assert "run with --debug" not in res.output
    assert "--debug" in invoke("--help").output


def test_interrupted_run_exits_130_with_the_resume_command(tmp_path, monkeypatch):
    from ltframe.engine.trainer import Trainer

    monkeypatch.setattr(Trainer, "run_stage", raiser(KeyboardInterrupt()))
    res = invoke("run", tiny_recipe(tmp_path), "--quiet")
    assert res.exit_code == 130, res.output
    lines = error_lines(res)
    run_dir = tmp_path / "runs" / "tiny"
    assert len(lines) == 1 and lines[0].startswith("error: interrupted in stage")
    assert lines[0].endswith(f"ltframe resume {run_dir}") and "Traceback" not in res.output


def test_run_interrupted_from_resume_exits_130(tmp_path, monkeypatch):
    import ltframe.engine.run as engine
    from ltframe.errors import RunInterrupted

    msg = "interrupted in stage 'train' at step 3; Continue with: ltframe resume runs/tiny"
    monkeypatch.setattr(engine, "resume_run", raiser(RunInterrupted(msg)))
    res = invoke("resume", tmp_path)
    assert res.exit_code == 130 and error_lines(res) == [f"error: {msg}"]


def test_bare_keyboard_interrupt_outside_a_run_exits_130(tmp_path, monkeypatch):
    import ltframe.recipe

    monkeypatch.setattr(ltframe.recipe, "load_recipe", raiser(KeyboardInterrupt()))
    res = invoke("show", tiny_recipe(tmp_path))
    assert res.exit_code == 130 and error_lines(res) == ["error: interrupted"]
    import ltframe.engine.run as engine

    monkeypatch.setattr(engine, "start_run", raiser(KeyboardInterrupt()))
    res = invoke("run", tiny_recipe(tmp_path))
    assert res.exit_code == 130 and error_lines(res) == ["error: interrupted"]


def test_ltframe_error_message_keeps_brackets_and_stays_one_line(tmp_path, monkeypatch):
    import ltframe.engine.run as engine
    from ltframe.errors import RecipeError

    monkeypatch.setattr(engine, "start_run", raiser(RecipeError("stage[0].epochs: expected int")))
    res = invoke("run", tiny_recipe(tmp_path))
    assert res.exit_code == 1 and error_lines(res) == ["error: stage[0].epochs: expected int"]


# --- eval --set, resume --from, results tables -----------------------------------------------


def table_rows(output: str) -> list[list[str]]:
    """The header and body rows of rich tables in `output`, as lists of stripped cells."""
    return [[c.strip() for c in line.strip().replace("┃", "│").strip("│").split("│")]
            for line in output.splitlines() if line.strip()[:1] in ("│", "┃")]


def test_run_table_shows_taus_report_and_last_row_and_eval_set_changes_taus(tmp_path):
    recipe = tiny_recipe(tmp_path)
    res = invoke("run", recipe, "--quiet", "--set", "eval.report=best",
                 "--set", "eval.posthoc_tau=[0, 1]")
    assert res.exit_code == 0, res.output
    assert "balanced test set, top-1 % (best evaluation)" in res.output
    rows = table_rows(res.output)
    assert rows[0] == ["", "tau", "overall", "many", "medium", "few"]
    assert [r[:2] for r in rows[1:]] == [["best", "0"], ["best", "1"], ["last", "0"], ["last", "1"]]
    run_dir = tmp_path / "runs" / "tiny"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows[1][2] == f"{summary['top1']:.2f}" and rows[3][2] == f"{summary['last']['top1']:.2f}"

    res = invoke("eval", run_dir, "--set", "eval.posthoc_tau=[0, 0.5, 2]", "--json")
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output)
    assert [r["posthoc_tau"] for r in metrics["rows"]] == [0, 0.5, 2]
    res = invoke("eval", run_dir, "--set", "eval.posthoc_tau=[0, 0.5, 2]")
    rows = table_rows(res.output)
    assert res.exit_code == 0 and rows[0] == ["tau", "overall", "many", "medium", "few"]
    assert [r[0] for r in rows[1:]] == ["0", "0.5", "2"]
    assert rows[1][1] == f"{metrics['rows'][0]['top1']:.2f}"

    res = invoke("eval", run_dir, "--set", "optim.lr=1")
    assert res.exit_code == 1 and "only [eval] values" in res.output


def test_eval_set_passes_overrides_to_the_engine(tmp_path, monkeypatch):
    import ltframe.engine.run as engine

    seen = {}

    def fake(target, overrides=None):
        seen.update(target=target, overrides=overrides)
        return {"checkpoint": "ck.safetensors", "top1": 50.0, "many": 60.0, "medium": 40.0,
                "few": None}

    monkeypatch.setattr(engine, "evaluate_checkpoint", fake)
    res = invoke("eval", tmp_path, "--set", "eval.posthoc_tau=1", "--set", "eval.batch_size=4")
    assert res.exit_code == 0, res.output
    assert seen == {"target": str(tmp_path),
                    "overrides": ["eval.posthoc_tau=1", "eval.batch_size=4"]}
    assert table_rows(res.output)[1] == ["50.00", "60.00", "40.00", "-"]


def test_resume_from_passes_the_checkpoint(tmp_path, monkeypatch):
    import ltframe.engine.run as engine

    seen = {}

    def fake(run_dir, overrides=None, *, from_checkpoint=None, reporter=None):
        seen.update(run_dir=run_dir, overrides=overrides, from_checkpoint=from_checkpoint)
        return {"run_dir": run_dir, "top1": 70.0, "many": 80.0, "medium": 60.0, "few": 50.0,
                "report": "mean_last_k", "evaluations": 3,
                "last": {"top1": 71.0, "many": 81.0, "medium": 61.0, "few": 51.0}}

    monkeypatch.setattr(engine, "resume_run", fake)
    ck = tmp_path / "checkpoints" / "stage0-train-e1.safetensors"
    res = invoke("resume", tmp_path, "--from", ck, "--set", "optim.lr=0.01", "--quiet")
    assert res.exit_code == 0, res.output
    assert seen == {"run_dir": str(tmp_path), "overrides": ["optim.lr=0.01"],
                    "from_checkpoint": str(ck)}
    assert "(mean of the last 3 evaluations)" in res.output
    assert table_rows(res.output)[1:] == [["mean_last_k", "70.00", "80.00", "60.00", "50.00"],
                                          ["last", "71.00", "81.00", "61.00", "51.00"]]


def test_results_table_without_report_or_rows_is_one_plain_row():
    from rich.console import Console

    from ltframe.cli import results_table

    console = Console(width=100, record=True)
    for summary in ({"top1": 1.0, "many": 2.0, "medium": 3.0, "few": 4.0},
                    {"top1": 1.0, "many": 2.0, "medium": 3.0, "few": 4.0, "report": "last",
                     "last": {"top1": 1.0}}):
        with console.capture() as cap:
            console.print(results_table(summary, "t"))
        text = cap.get()
        assert table_rows(text) == [["overall", "many", "medium", "few"],
                                    ["1.00", "2.00", "3.00", "4.00"]]
        assert "last" not in text.replace("(last evaluation)", "")


# --- --out and --block checks ------------------------------------------------------------------


def test_out_that_is_a_file_is_a_one_line_error(tmp_path):
    recipe = tiny_recipe(tmp_path)
    target = tmp_path / "notes.txt"
    target.write_text("x")
    res = invoke("run", recipe, "--out", target)
    assert res.exit_code == 1
    assert error_lines(res) == [f"error: --out {target}: is a file, not a folder; give a folder "
                                "for the run directories (it is created if missing)"]
    res = invoke("run", recipe, "--out", target / "sub")
    assert res.exit_code == 1 and f"{target} is a file, not a folder" in res.output
    assert not (tmp_path / "runs").exists()


def test_out_in_an_unwritable_folder_is_a_one_line_error(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    real_access = os.access  # root may write anyway: make the folder read-only for os.access too
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k:
                        False if Path(p) == locked else real_access(p, mode, *a, **k))
    try:
        res = invoke("run", recipe, "--out", locked / "runs")
    finally:
        locked.chmod(0o755)
    assert res.exit_code == 1
    assert error_lines(res) == [f"error: --out {locked / 'runs'}: cannot write in the folder {locked} "
                                "(permission denied); choose a folder you can write to"]
    assert not (tmp_path / "runs").exists() and not (locked / "runs").exists()


@pytest.mark.parametrize("command", [["run", "RECIPE"], ["show", "RECIPE"], ["components"],
                                     ["plugins"]])
def test_block_of_a_plugin_that_is_not_installed_is_a_one_line_error(tmp_path, command):
    args = [tiny_recipe(tmp_path) if a == "RECIPE" else a for a in command]
    res = invoke(*args, "--block", "clasics")
    assert res.exit_code == 1
    lines = error_lines(res)
    assert len(lines) == 1, res.output
    assert lines[0].startswith("error: --block clasics: no installed plugin is called 'clasics' "
                               "(did you mean 'classics'?); installed plugins: ")
    assert "builtin" in lines[0] and "rethink" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_block_of_an_installed_plugin_still_works():
    res = invoke("components", "sampler", "--block", "classics")
    assert res.exit_code == 0 and "class_balanced" not in res.output


def test_compare_prints_the_runs_side_by_side(tmp_path):
    assert invoke("run", tiny_recipe(tmp_path), "--quiet", "--out", tmp_path / "o").exit_code == 0
    a = json.loads((tmp_path / "o" / "tiny" / "summary.json").read_text())
    res = invoke("run", tiny_recipe(tmp_path, run={"name": "other", "seed": 1}), "--quiet",
                 "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    b = json.loads((tmp_path / "o" / "other" / "summary.json").read_text())
    res = invoke("compare", tmp_path / "o" / "tiny", tmp_path / "o" / "other")
    assert res.exit_code == 0, res.output
    lines = {line.split()[1]: line for line in res.output.splitlines()
             if line.strip().startswith("│") and ("tiny" in line or "other" in line)}
    for name, s in (("tiny", a), ("other", b)):
        for m in ("top1", "many", "medium", "few"):
            cell = "-" if s[m] is None else f"{s[m]:.2f}"
            assert f" {cell} " in lines[name], (name, m)
    rows = json.loads(invoke("compare", tmp_path / "o" / "tiny", "--stages", "--json").output)
    assert [r["stage"] for r in rows] == [st["stage"] for st in a["stages"]]
    assert rows[0]["top1"] == pytest.approx(a["stages"][0]["top1"])
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "missing")])
    assert res.exit_code != 0 and "no such run directory" in res.output


def test_predict_uses_the_eval_head_and_posthoc_adjustment(tmp_path):
    from PIL import Image

    from ltframe.engine import checkpoint as ckpt
    from ltframe.engine.setup import build_model
    from ltframe.plugins import make_plugin_manager
    from ltframe.recipe import load_recipe

    recipe = tiny_recipe(tmp_path, eval={"posthoc_tau": 1.0})
    assert invoke("run", recipe, "--quiet", "--out", tmp_path / "o").exit_code == 0
    run_dir = tmp_path / "o" / "tiny"
    _, reg = make_plugin_manager()
    rec = load_recipe(recipe, reg)
    src = reg.build(rec.data.source, seed=0)
    (tmp_path / "img" / "sub").mkdir(parents=True)
    for i in range(5):
        arr = src.test_images[i * 5].permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(tmp_path / "img" / ("sub" if i % 2 else "") / f"{i}.png")
    res = invoke("predict", run_dir, tmp_path / "img", "--json", "-k", "2")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) == 5 and all(len(r["top"]) == 2 for r in rows)
    # independently: final weights, the eval head, logits - tau * log(prior of the last stage)
    summary = json.loads((run_dir / "summary.json").read_text())
    tensors, _, _ = ckpt.load(run_dir)
    model = build_model(rec, reg, 4)
    ckpt.load_module_state(model, tensors, "model", "t")
    model.eval()
    mean, std = torch.tensor(src.mean)[:, None, None], torch.tensor(src.std)[:, None, None]
    prior = torch.tensor(summary["stages"][-1]["train_counts"], dtype=torch.float64)
    for r in rows:
        i = int(Path(r["file"]).stem)
        x = ((src.test_images[i * 5].float() / 255 - mean) / std)[None]
        with torch.no_grad():
            logits = model(x)[1][summary["stages"][-1]["eval_head"]].double()
        probs = (logits - (prior / prior.sum()).log()).softmax(1)[0]
        assert r["top"][0]["index"] == int(probs.argmax())
        assert r["top"][0]["prob"] == pytest.approx(float(probs.max()), abs=1e-4)
        assert r["top"][0]["class"] == summary["classes"][r["top"][0]["index"]]
    res = CliRunner().invoke(main, ["predict", str(run_dir), str(tmp_path / "nothing")])
    assert res.exit_code != 0 and "no such file or folder" in res.output


def test_progress_shows_the_latest_evaluation():
    from ltframe.cli import RichReporter

    rep = RichReporter()
    rep.stage_start("gen2", 10, 0)
    rep.progress(3, {"total": 1.5, "lr": 0.1, "images_per_s": 100.0})
    rep.evaluation("gen2", 0, {"top1": 51.234, "many": 70.0, "medium": None, "few": 12.5})
    rep.progress(5, {"total": 1.2, "lr": 0.1, "images_per_s": 100.0})
    info = rep.bar.tasks[0].fields["info"]
    rep.stage_end("gen2")
    assert "loss 1.2000" in info and "gen2 ep 1: top1 51.23 many 70.00 medium - few 12.50" in info


@pytest.mark.parametrize("stages, pattern", [
    ([{"name": "sup", "epochs": 1}, {"name": "semi", "epochs": 1, "data": "labeled+unlabeled"}],
     r"stage 'semi' \(stage\[1\]\)\.data = \"labeled\+unlabeled\" uses unlabeled data"),
    ([{"name": "st", "epochs": 1, "data": "labeled+pseudo"}], r"no earlier stage labelled the pool"),
    ([{"name": "l", "epochs": 1, "label": "threshold"}], r"label_pool = \"unlabeled\" but that split"),
])
def test_stage_data_errors_come_before_the_run_directory(tmp_path, stages, pattern):
    """Checked over every planned stage (not only the first) before anything is written."""
    res = invoke("run", tiny_recipe(tmp_path, stage=stages), "--quiet")
    assert res.exit_code == 1 and re.search(pattern, res.output), res.output
    assert "Traceback" not in res.output and not (tmp_path / "runs").exists()


def test_a_taken_run_name_says_which_directory_the_run_writes(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "s", "epochs": 1, "steps_per_epoch": 1}])
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "keep.txt").write_text("x")
    res = invoke("run", recipe)
    assert res.exit_code == 0, res.output
    runs = tmp_path / "runs"
    said = f"{runs / 'tiny'} exists; this run writes {runs / 'tiny-1'}"
    assert re.sub(r"\s", "", said) in re.sub(r"\s", "", res.output)  # however rich wraps it
    assert (runs / "tiny-1" / "summary.json").is_file() and (runs / "tiny" / "keep.txt").is_file()


def test_components_piped_prints_full_names_one_line_each_and_json():
    res = invoke("components", "sampler")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(re.match(r"sampler\s+class_balanced\s+classics\s+num_samples=0", x) for x in lines)
    assert any(re.match(r"sampler\s+random \(instance\)\s+classics", x) for x in lines)
    assert len(lines) == 1 + len(set(x.split()[1] for x in lines[1:]))  # header + one per sampler
    rows = json.loads(invoke("components", "sampler", "--json").output)
    cb = next(r for r in rows if r["name"] == "class_balanced")
    assert cb["plugin"] == "classics" and cb["description"].startswith("Class-balanced sampling")
    assert {"name": "num_samples", "type": "int", "required": False, "default": 0,
            "range": ">= 0 and <= 1000000000"}.items() <= next(
        p for p in cb["params"] if p["name"] == "num_samples").items()
    assert next(r for r in rows if r["name"] == "random")["aliases"] == ["instance"]


def test_components_kind_name_explains_each_parameter():
    res = invoke("components", "pseudo_labeler", "align")
    assert res.exit_code == 0, res.output
    row = next(x for x in res.output.splitlines() if x.startswith("threshold "))
    # inherited field (ThresholdParams): type, default, range and the field's comment
    assert re.match(r"threshold\s+float\s+0\.95\s+>= 0 and <= 1\s+keep max p >= threshold", row)
    assert re.search(r"^window\s+int\s+128\s+>= 1 and <= 1048576\s+window: number of batch means",
                     res.output, re.M)
    info = json.loads(invoke("components", "loss", "la", "--json").output)
    assert info["aliases"] == ["logit_adjusted"] and info["kind"] == "loss"
    assert "aliases: instance" in invoke("components", "sampler", "random").output
    res = invoke("components", "loss", "cee")
    assert res.exit_code == 1 and "did you mean 'ce'" in res.output


@dataclasses.dataclass
class _BaseDocParams:
    """Test params.

    gamma: focusing exponent
    """

    gamma: float = 2.0
    # the head whose logits are used;
    # "main" by default
    head: str = "main"  # any head name
    plain: int = 0


@dataclasses.dataclass
class _DocParams(_BaseDocParams):
    scale: float = param(1.0, gt=0, le=10)  # multiplies the logits
    plain: int = 1  # overridden here


def test_field_comments_above_after_docstring_and_inherited():
    from ltframe.paramdoc import field_comments, params_doc

    assert field_comments(_DocParams) == {
        "gamma": "focusing exponent",
        "head": 'the head whose logits are used; "main" by default any head name',
        "scale": "multiplies the logits",
        "plain": "overridden here",
    }
    scale = next(p for p in params_doc(_DocParams) if p["name"] == "scale")
    assert scale == {"name": "scale", "type": "float", "required": False, "default": 1.0,
                     "range": "> 0 and <= 10", "help": "multiplies the logits"}


def test_compare_shows_one_row_per_posthoc_tau(tmp_path):
    run = tmp_path / "la"
    run.mkdir()
    rows = [{"posthoc_tau": 0.0, "top1": 40.0, "many": 70.0, "medium": 30.0, "few": 10.0},
            {"posthoc_tau": 1.0, "top1": 45.0, "many": 60.0, "medium": 40.0, "few": 30.0}]
    last = [dict(r, top1=r["top1"] - 1) for r in rows]
    (run / "summary.json").write_text(json.dumps({**rows[0], "rows": rows, "report": "best",
                                                  "last": {"top1": 39.0, "rows": last}}))
    res = invoke("compare", run, "--json")
    got = [(r["posthoc_tau"], r["top1"], r["few"], r["last_top1"]) for r in json.loads(res.output)]
    assert got == [(0.0, 40.0, 10.0, 39.0), (1.0, 45.0, 30.0, 44.0)]
    res = invoke("compare", run)
    assert res.exit_code == 0 and "tau" in res.output
    assert re.search(r"la\s*│\s*best\s*│\s*1\s*│\s*45\.00", res.output), res.output
