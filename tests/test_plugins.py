"""Plugin discovery through entry points, blocking, duplicate names, listing."""

import sys
import textwrap
from dataclasses import dataclass

import pytest

from ltframe import hookimpl
from ltframe.errors import RegistryError
from ltframe.plugins import list_plugins, make_plugin_manager, register_plugin
from ltframe.registry import KINDS, Registry


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """An installed-looking distribution 'ltframe-extra' (dist-info + module on sys.path),
    discovered by importlib.metadata exactly like a pip-installed package."""
    site = tmp_path / "site"
    pkg = site / "ltframe_extra_plugin.py"
    site.mkdir()
    pkg.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import torch.nn.functional as F
        from ltframe import hookimpl

        @dataclass
        class ScaledParams:
            scale: float = 2.0

        class ScaledCE:
            """CE on scaled logits (third-party test plugin)."""
            def __init__(self, params, num_classes, class_counts):
                self.scale = params.scale
            def __call__(self, ctx):
                return F.cross_entropy(ctx.logits() * self.scale, ctx.targets)

        @hookimpl
        def ltframe_register(registry):
            registry.register("loss", "scaled_ce", ScaledCE, ScaledParams)
    '''))
    dist = site / "ltframe_extra-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ltframe-extra\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[ltframe.plugins]\nextra = ltframe_extra_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    yield "extra"
    sys.modules.pop("ltframe_extra_plugin", None)


def test_first_party_plugins_come_from_entry_points():
    pm, registry = make_plugin_manager()
    names = {p.name: p for p in list_plugins(pm)}
    assert {"builtin", "classics"} <= set(names)
    assert names["classics"].distribution == "ltframe"
    assert registry.get("loss", "ce").plugin == "classics"
    assert registry.get("source", "synthetic").plugin == "builtin"


def test_third_party_plugin_is_discovered_listed_and_usable(third_party, tmp_path):
    pm, registry = make_plugin_manager()
    info = {p.name: p for p in list_plugins(pm)}[third_party]
    assert (info.distribution, info.version) == ("ltframe-extra", "1.2.3")
    entry = registry.get("loss", "scaled_ce")
    assert entry.plugin == "extra" and entry.params().scale == 2.0
    from ltframe import start_run
    from ltframe.testing import tiny_recipe

    recipe = tiny_recipe(tmp_path, stage=[{"name": "t", "steps": 2,
                                           "loss": [{"name": "scaled_ce", "scale": 3.0}]}])
    summary = start_run(recipe)
    assert summary["top1"] >= 0


def test_blocking_a_plugin_removes_its_components(third_party):
    pm, registry = make_plugin_manager(block=["extra"])
    assert "extra" not in {p.name for p in list_plugins(pm)}
    with pytest.raises(RegistryError, match="unknown loss 'scaled_ce'"):
        registry.get("loss", "scaled_ce")


def test_duplicate_names_are_an_error_naming_both_plugins():
    pm, registry = make_plugin_manager()

    class Dup:
        @hookimpl
        def ltframe_register(self, registry):
            registry.register("loss", "ce", lambda p, **k: None)

    with pytest.raises(RegistryError, match="loss 'ce' is registered twice: by plugin 'classics' "
                                            "and by plugin 'dup'"):
        register_plugin(pm, registry, Dup(), "dup")


def test_broken_plugin_import_names_the_plugin(tmp_path, monkeypatch):
    site = tmp_path / "s"
    (site / "broken-0.1.dist-info").mkdir(parents=True)
    (site / "broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\n"
                                                             "Version: 0.1\n")
    (site / "broken-0.1.dist-info" / "entry_points.txt").write_text(
        "[ltframe.plugins]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(RegistryError, match="plugin 'broken'.*failed to import.*--block broken"):
        make_plugin_manager()
    make_plugin_manager(block=["broken"])  # blocking it is the way out


def test_registry_rules():
    reg = Registry()

    @dataclass
    class P:
        a: int = 1

    reg.register("head", "h", lambda p, **k: p.a, P, aliases=("hh",), plugin="me")
    assert reg.build("hh", kind="head") == 1
    assert reg.names("head") == ["h", "hh"]
    with pytest.raises(RegistryError, match="unknown component kind 'heads'.*did you mean 'head'"):
        reg.get("heads", "h")
    with pytest.raises(RegistryError, match="params must be a dataclass"):
        reg.register("head", "x", lambda p: p, dict)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("head", "hh", lambda p: p, P, plugin="other")
    assert set(KINDS) == {"sampler", "pseudo_labeler", "loss", "head", "scheduler", "source",
                          "view", "optimizer", "lr_schedule", "transform", "logger"}


def test_blocking_a_plugin_that_is_not_installed_is_an_error():
    with pytest.raises(RegistryError, match="--block clasics: no installed plugin.*did you mean 'classics'"):
        make_plugin_manager(block=["clasics"])
