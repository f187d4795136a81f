"""examples/ltframe_example_plugin installed into a fresh virtual environment and used from a
recipe: its loss is found through the entry point and its event hook writes its file.

The fresh environment sees this one's packages (torch, ltframe) through a .pth file, so the
test installs only the example (no download); the plugin itself comes from `pip install`.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "ltframe_example_plugin"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res


def test_example_plugin_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    # no pip of its own: the parent environment's pip and setuptools (via the .pth) install into it
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    parent = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    # addsitedir also runs the parent's .pth files (its editable ltframe install)
    lines = [f"import site; site.addsitedir({p!r})" for p in dict.fromkeys(parent)]
    Path(purelib.stdout.strip(), "parent_env.pth").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    before = _run([str(py), "-m", "ltframe", "components", "loss"], env=env).stdout
    assert "smooth_ce" not in before  # not installed yet
    src = tmp_path / "example"  # a copy: building writes egg-info next to the sources
    shutil.copytree(EXAMPLE, src)
    _run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
          str(src)], env=env)
    plugins = _run([str(py), "-m", "ltframe", "plugins"], env=env).stdout
    assert "example" in plugins
    _run([str(py), "-m", "ltframe", "run", str(src / "recipe.toml"), "--quiet",
          "--out", str(tmp_path / "runs")], env=env, cwd=tmp_path)
    run_dir = tmp_path / "runs" / "example_plugin"
    written = json.loads((run_dir / "example_plugin.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert written == {"evaluations": {"train": 2}, "top1": summary["top1"]}
    assert "smooth_ce" in (run_dir / "resolved.toml").read_text()
