"""Plugin manager: loads the ``ltframe.plugins`` entry-point group, supports blocking."""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Iterable
from dataclasses import dataclass

import pluggy

from ltframe import hookspecs
from ltframe.errors import RegistryError, allowed, closest
from ltframe.registry import Registry

GROUP = "ltframe.plugins"


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the distribution (name, version) each plugin came from."""

    def __init__(self) -> None:
        super().__init__("ltframe")
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, tuple[str, str]] = {}


def make_plugin_manager(
    block: Iterable[str] = (), load_entry_points: bool = True
) -> tuple[PluginManager, Registry]:
    """Return a plugin manager with every installed plugin (minus `block`) and its registry."""
    pm = PluginManager()
    blocked = set(check_block(block) if load_entry_points else block)
    for name in blocked:
        pm.set_blocked(name)
    registry = Registry()
    if load_entry_points:
        for ep in sorted(_entry_points(), key=lambda e: (e.name != "builtin", e.name)):
            if ep.name in blocked or pm.has_plugin(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must say who it is
                raise RegistryError(
                    f"plugin '{ep.name}' ({ep.value}) failed to import: {exc}; "
                    f"fix or uninstall it, or block it with --block {ep.name}"
                ) from exc
            pm.register(module, name=ep.name)
            dist = ep.dist
            pm.distributions[ep.name] = (dist.name, dist.version) if dist else ("?", "?")
    _register_all(pm, registry)
    return pm, registry


def check_block(block: Iterable[str]) -> list[str]:
    """Every name in `block` must be an installed plugin (an entry point of the group)."""
    installed = sorted({ep.name for ep in _entry_points()})
    for name in block:
        if name not in installed:
            raise RegistryError(f"--block {name}: no installed plugin is called '{name}'"
                                f"{closest(name, installed)}; installed plugins: {allowed(installed)}")
    return list(block)


def register_plugin(pm: PluginManager, registry: Registry, plugin: object, name: str) -> None:
    """Register an extra plugin object (tests, notebooks) and let it fill the registry."""
    pm.register(plugin, name=name)
    registry.current_plugin = name
    impl = [i for i in pm.hook.ltframe_register.get_hookimpls() if i.plugin is plugin]
    for hi in impl:
        hi.function(registry=registry)


def _register_all(pm: pluggy.PluginManager, registry: Registry) -> None:
    for impl in pm.hook.ltframe_register.get_hookimpls():
        registry.current_plugin = impl.plugin_name
        impl.function(registry=registry)


def _entry_points() -> list[md.EntryPoint]:
    return list(md.entry_points(group=GROUP))


def list_plugins(pm: PluginManager) -> list[PluginInfo]:
    dists = pm.distributions
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        dist, version = dists.get(name, ("(registered in code)", "-"))
        out.append(PluginInfo(name, getattr(plugin, "__name__", type(plugin).__name__),
                              dist, version))
    return sorted(out, key=lambda p: p.name)


def plugin_versions(pm: PluginManager) -> dict[str, str]:
    return {p.name: f"{p.distribution} {p.version}" for p in list_plugins(pm)}
