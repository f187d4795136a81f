"""Registry of named components: (kind, name) -> factory with a typed Params dataclass.

A factory is called as ``factory(params, **context)``; the context keywords each kind receives
are listed in ``KINDS``. Plugins fill the registry from their ``ltframe_register`` hook.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

from ltframe.config import INT_LIMIT, ComponentSpec, from_dict
from ltframe.errors import RecipeError, RegistryError, allowed, closest

#: kind -> (what it builds, context keywords passed to its factory)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sampler": ("an index sampler (ltframe.data.samplers.IndexSampler)",
                ("labels", "num_classes", "seed", "rank", "world_size")),
    # device: the run's torch.device; build state (buffers, memories) there at construction,
    # never copy it in a step (issue 19). class_counts / labeled_counts are on it too.
    # unlabeled_index: the dataset indices of the stage's unlabeled stream (empty without one)
    "pseudo_labeler": ("a callable(StepContext) -> PseudoLabels (and/or label_pool(pool))",
                       ("num_classes", "class_counts", "num_samples", "labeled_counts", "seed",
                        "device", "unlabeled_index")),
    "loss": ("a callable(StepContext) -> scalar tensor",
             ("num_classes", "class_counts", "num_samples", "labeled_counts", "seed", "device",
              "unlabeled_index")),
    "transform": ("a callable(StepContext) -> None run before the forward (may replace inputs)",
                  ("num_classes", "class_counts", "num_samples", "labeled_counts", "seed",
                   "device", "unlabeled_index")),
    "head": ("an nn.Module mapping features to logits", ("in_features", "num_classes")),
    "scheduler": ("a StageScheduler (next_stage(history) -> StagePlan | None)", ("stages",)),
    # unlabeled=True: built as [data] unlabeled (no test set needed); image_size: the labelled
    # source's image size there
    "source": ("a SourceData (train/test uint8 images and labels; -1 = no label)",
               ("seed", "unlabeled", "image_size")),
    "view": ("a callable(uint8 batch, generator) -> normalised float batch", ("mean", "std")),
    "optimizer": ("a torch.optim.Optimizer", ("params",)),
    "lr_schedule": ("a callable(step) -> lr factor", ("steps_per_epoch", "total_steps")),
    "logger": ("an object with event hookimpls (ltframe_run_start gives the run directory, "
               "ltframe_log every record) sending a run's records to a tracker; rank 0 only",
               ()),
}


def _accepted(factory: Callable[..., Any], context: dict[str, Any]) -> dict[str, Any]:
    """The context keywords `factory` accepts (all of them if it takes **kwargs), so a kind can
    gain context keywords without breaking factories written before."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return context
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return context
    return {k: v for k, v in context.items() if k in sig.parameters}


@dataclasses.dataclass
class NoParams:
    """For components without parameters."""


@dataclasses.dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    factory: Callable[..., Any]
    params: type
    plugin: str
    doc: str


#: modules that register backbones into timm when imported (plugins add them at registration)
BACKBONE_MODULES: list[str] = []


class Registry:
    """Named component factories, grouped by kind."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._aliases: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self.current_plugin = "?"

    def add_backbone_module(self, module: str) -> None:
        """A module that registers timm backbones when imported; imported only when a model
        is built (`ltframe.models.build_backbone`), so listing components stays light."""
        if module not in BACKBONE_MODULES:
            BACKBONE_MODULES.append(module)

    def register(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        params: type | None = None,
        *,
        aliases: tuple[str, ...] = (),
        plugin: str | None = None,
    ) -> None:
        """Add `factory` under (kind, name); a name registered twice is an error."""
        self._check_kind(kind)
        owner = plugin or self.current_plugin
        params = params or NoParams
        if not dataclasses.is_dataclass(params):
            raise RegistryError(f"{kind} '{name}' ({owner}): params must be a dataclass")
        for key in (name, *aliases):
            prev = self._entries[kind].get(key) or self._entries[kind].get(
                self._aliases[kind].get(key, "")
            )
            if prev is not None:
                raise RegistryError(
                    f"{kind} '{key}' is registered twice: by plugin '{prev.plugin}' and by "
                    f"plugin '{owner}'; block one of them (ltframe run --block NAME) or rename it"
                )
        doc = (factory.__doc__ or "").strip().splitlines()
        self._entries[kind][name] = Entry(kind, name, factory, params, owner, doc[0] if doc else "")
        for alias in aliases:
            self._aliases[kind][alias] = name

    def get(self, kind: str, name: str, path: str = "") -> Entry:
        self._check_kind(kind)
        key = self._aliases[kind].get(name, name)
        try:
            return self._entries[kind][key]
        except KeyError:
            names = self.names(kind)
            where = f"{path}: " if path else ""
            raise RegistryError(
                f"{where}unknown {kind} '{name}'; installed: {allowed(names)}{closest(name, names)}"
            ) from None

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted([*self._entries[kind], *self._aliases[kind]])

    def entries(self, kind: str | None = None) -> list[Entry]:
        kinds = [kind] if kind else list(KINDS)
        for k in kinds:
            self._check_kind(k)
        return [e for k in kinds for e in sorted(self._entries[k].values(), key=lambda e: e.name)]

    def spec(self, kind: str, table: Any, path: str) -> ComponentSpec:
        """Validate a recipe table (or bare name string) into a ComponentSpec."""
        if isinstance(table, str):
            table = {"name": table}
        if isinstance(table, ComponentSpec):
            return table
        if not isinstance(table, dict) or "name" not in table:
            raise RecipeError(
                f"{path}: expected a table with a 'name' key (a {kind}); installed {kind}s: "
                f"{allowed(self.names(kind))}"
            )
        body = dict(table)
        name = body.pop("name")
        if not isinstance(name, str):
            raise RecipeError(f"{path}.name: expected a string, got {name!r}")
        weight = 1.0
        if kind == "loss" and "weight" in body:
            weight = body.pop("weight")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise RecipeError(f"{path}.weight: expected a number, got {weight!r}")
            if not (isinstance(weight, int) or math.isfinite(weight)) or weight < 0:
                raise RecipeError(f"{path}.weight: {weight} is out of range; a loss weight must "
                                  "be a finite number >= 0 (0 = logged but not trained)")
        start = 0
        if kind == "loss" and "start" in body:
            start = body.pop("start")
            if (isinstance(start, bool) or not isinstance(start, int) or start < 0
                    or start > INT_LIMIT):
                raise RecipeError(f"{path}.start: expected a step count >= 0 (the stage step "
                                  f"from which the term counts), got {start!r}")
        try:
            entry = self.get(kind, name)
        except RegistryError as exc:
            raise RecipeError(f"{path}.name: {exc}") from None
        params = from_dict(entry.params, body, path)
        return ComponentSpec(kind, entry.name, params, float(weight), start)

    def build(self, spec: ComponentSpec | str, kind: str | None = None, **context: Any) -> Any:
        """Instantiate a component from a spec (or a name, with default params)."""
        if isinstance(spec, str):
            if kind is None:
                raise TypeError("build(name) needs kind=")
            spec = self.spec(kind, spec, kind)
        entry = self.get(spec.kind, spec.name)
        return entry.factory(spec.params, **_accepted(entry.factory, context))

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in KINDS:
            raise RegistryError(f"unknown component kind '{kind}'; kinds: {allowed(KINDS)}"
                                f"{closest(kind, KINDS)}")
