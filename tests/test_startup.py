"""Start-up cost: `ltframe --help` must not import torch; `show`/`components` must not import
timm or torchvision (each check runs in a fresh interpreter, so nothing is already imported)."""

import json
import subprocess
import sys
from pathlib import Path

from ltframe.testing import tiny_recipe

HEAVY = ("torch", "timm", "torchvision")


def imported_after(code: str) -> dict:
    """Run `code` in a fresh interpreter; return {module: imported?} for the heavy modules
    and whatever the code put in the variable `result`."""
    script = (
        "import json, sys\nresult = None\n" + code +
        f"\nprint(json.dumps({{'mods': {{m: m in sys.modules for m in {HEAVY!r}}}, "
        "'result': result}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cli(args: list[str]) -> str:
    """Code that runs `ltframe ARGS` in-process and keeps its exit code in `result`."""
    return (
        "from ltframe.cli import main\n"
        "try:\n"
        f"    result = main({args!r}, standalone_mode=False)\n"
        "except SystemExit as exc:\n"
        "    result = exc.code\n"
    )


def test_import_ltframe_is_lazy_and_keeps_its_public_names():
    out = imported_after(
        "import ltframe\n"
        "lazy = not any(m in sys.modules for m in ('torch', 'timm', 'torchvision'))\n"
        "hook = ltframe.hookimpl\n"
        "result = {'lazy': lazy, 'hookimpl': callable(hook), 'version': ltframe.__version__,\n"
        "          'all': sorted(ltframe.__all__)}\n"
    )
    assert out["result"]["lazy"] is True
    assert out["result"]["hookimpl"] is True and out["result"]["version"]
    assert not out["mods"]["torch"]  # hookimpl comes from hookspecs (pluggy only)
    assert out["result"]["all"] == sorted([
        "ComponentSpec", "LtframeError", "PseudoLabels", "Recipe", "Registry", "StepContext",
        "evaluate_checkpoint", "hookimpl", "load_model", "load_recipe", "make_plugin_manager",
        "resume_run", "start_run"])


def test_public_names_resolve_on_first_access():
    out = imported_after(
        "import ltframe\n"
        "from ltframe.engine.context import StepContext\n"
        "from ltframe.engine.run import start_run\n"
        "result = [ltframe.StepContext is StepContext, ltframe.start_run is start_run,\n"
        "          all(hasattr(ltframe, n) for n in ltframe.__all__)]\n"
        "try:\n"
        "    ltframe.no_such_name\n"
        "except AttributeError:\n"
        "    result.append(True)\n"
    )
    assert out["result"] == [True, True, True, True]


def test_help_does_not_import_torch():
    for args in (["--help"], ["run", "--help"], ["resume", "--help"], ["eval", "--help"]):
        out = imported_after(cli(args))
        assert out["result"] in (0, None), args
        assert not any(out["mods"].values()), (args, out["mods"])


def test_import_cli_does_not_import_torch():
    out = imported_after("import ltframe.cli")
    assert not any(out["mods"].values()), out["mods"]


def test_show_and_components_do_not_import_timm_or_torchvision(tmp_path):
    recipe = tiny_recipe(tmp_path)
    for args in (["show", str(recipe)], ["components"], ["components", "sampler"], ["plugins"]):
        out = imported_after(cli(args))
        assert out["result"] in (0, None), args
        assert not out["mods"]["timm"] and not out["mods"]["torchvision"], (args, out["mods"])
