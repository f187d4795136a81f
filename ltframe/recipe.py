"""TOML recipes -> validated, typed Recipe objects (stdlib tomllib; no code is ever evaluated).

A recipe only names installed components; every table that names one has a `name` key and its
other keys must match that component's Params dataclass.
"""

from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ltframe.config import ComponentSpec, check_plain_name, from_dict, param, to_plain
from ltframe.data.longtail import ProfileCfg, SplitCfg
from ltframe.errors import RecipeError, allowed, closest
from ltframe.registry import Registry
from ltframe.tomlw import dumps


def _c(kind: str, default: Any = None, factory: Any = None) -> Any:
    """A dataclass field holding a ComponentSpec of `kind` (default given as a name)."""
    meta = {"kind": kind}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


#: run.seed < this: per-stage seeds (seed * 1000 + index, + 500, + 7919 per rank) stay 64-bit
SEED_LIMIT = 2**48
#: run.device: auto, cpu, cuda, cuda:N
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")
#: a head name: a Python identifier (it is a module name, and a part path `heads.NAME`)
HEAD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: batch sizes (images per step) at most
MAX_BATCH = 2**20
#: a recipe's tables and lists nest at most this deep
MAX_DEPTH = 32


#: device types whose model and batches go channels-last under `run.channels_last` (on a 2-core
#: CPU, ResNet-32 / WRN-28-2 steps are ~25% faster channels-last than NCHW; tensor cores on CUDA)
CHANNELS_LAST_DEVICES = ("cuda", "cpu")


def channels_last_on(device: Any, run: RunCfg) -> bool:
    """Model and batches go channels-last on `device` (`run.channels_last`)."""
    return device.type in CHANNELS_LAST_DEVICES and run.channels_last


@dataclass
class RunCfg:
    name: str = "run"
    seed: int = param(0, ge=0, lt=SEED_LIMIT)  # stage seeds are seed * 1000 + stage index
    out_dir: str = "runs"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype on CUDA; the CPU runs fp32
    log_every: int = param(50, ge=1)  # steps between logged (synced) loss values
    checkpoint_every: int = param(0, ge=0)  # steps between checkpoints (0: none between epoch ends)
    # minutes between checkpoints, taken at the first log step or epoch end after they pass
    # (0: at the end of every epoch); stage ends always checkpoint. Written on a background thread
    checkpoint_minutes: float = param(10.0, ge=0, le=10**6)
    channels_last: bool = True  # model and batches channels-last (CHANNELS_LAST_DEVICES)
    # experiment trackers fed by the event hooks, e.g. [{ name = "tensorboard" }] (`logger` kind)
    loggers: list[ComponentSpec] = _c("logger", factory=list)
    # torch.compile mode of the training step; "off" = eager
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    # what run.compile compiles: the whole step (views, transform, forward, pseudo-labels and
    # losses, with their backward) or the training forward only (model and losses stay eager)
    compile_scope: Literal["step", "forward"] = "step"
    # capture the compiled step in CUDA graphs (torch.compile mode "reduce-overhead"; shapes must
    # be static, as ltframe's are within a stage); CUDA only: elsewhere the step runs compiled
    cuda_graph: bool = False
    # cuDNN autotuning on CUDA (torch.backends.cudnn.benchmark): faster convolutions; the chosen
    # algorithms may differ between processes, so false for bit-exact GPU resumes
    cudnn_benchmark: bool = True


@dataclass
class DataCfg:
    source: ComponentSpec = _c("source", "synthetic")
    # images without labels joined to the unlabeled split, e.g. { name = "folder", root = "..." }
    # (any source; its labels, if any, are not used for training)
    unlabeled: ComponentSpec | None = _c("source", None)
    longtail: ProfileCfg = field(default_factory=ProfileCfg)
    split: SplitCfg = field(default_factory=SplitCfg)
    # a balanced val split from images the long-tailed subset leaves unused
    val_per_class: int = param(0, ge=0, le=10**9)
    val_first: bool = False  # older protocol: val carved first, the profile from the rest
    batch_size: int = param(128, ge=1, le=MAX_BATCH)
    workers: int = param(4, ge=0, le=256)  # threads decoding file-backed images
    on_device: Literal["auto", "yes", "no"] = "auto"  # keep uint8 images on the GPU


@dataclass
class ModelCfg:
    backbone: str = "resnet32_cifar"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    heads: dict[str, ComponentSpec] = _c("head", factory=lambda: {"main": "linear"})
    eval_head: str = "main"
    # starting weights, applied when a run starts (resume restores its checkpoint instead):
    # a .safetensors file (.pth/.pt/.bin: torch.load(weights_only=True)) or a finished run dir
    weights: str = ""
    pretrained: bool = False  # timm's published weights for the backbone (hub cache / download)


@dataclass
class OptimCfg:
    """Resolved optimizer + lr schedule (from [optim] and its [optim.schedule])."""

    optimizer: ComponentSpec
    schedule: ComponentSpec
    # parameters kept out of weight decay: "bias" (every *.bias), "norm" (every parameter of a
    # normalisation layer); [] decays all (ltframe/engine/param_groups.py)
    no_decay: tuple[str, ...] = ()


@dataclass
class ViewsCfg:
    labeled: list[ComponentSpec] = _c("view", factory=lambda: ["weak"])
    unlabeled: list[ComponentSpec] = _c("view", factory=lambda: ["weak", "strong"])


@dataclass
class StageCfg:
    name: str = "train"
    epochs: int = param(0, ge=0)
    steps: int = param(0, ge=0)  # total optimizer steps; overrides epochs
    steps_per_epoch: int = param(0, ge=0)  # 0 = one pass over the stage's main data
    # labeled: the labeled split; pseudo: unlabeled samples selected by the last pool labelling
    # (with their pseudo-labels, see `label`); unlabeled: the whole unlabeled pool, no targets
    data: Literal["labeled", "unlabeled", "labeled+unlabeled", "labeled+pseudo",
                  "labeled+pseudo+unlabeled", "pseudo", "pseudo+unlabeled"] = "labeled"
    batch_size: int = param(0, ge=0, le=MAX_BATCH)  # 0 = data.batch_size
    unlabeled_ratio: int = param(1, ge=1, le=1024)  # unlabeled batch = ratio x batch_size (mu)
    sampler: ComponentSpec = _c("sampler", "random")
    unlabeled_sampler: ComponentSpec = _c("sampler", "random")
    # the unlabeled stream's samples: the unlabeled split, or every training sample (labeled
    # ones without their labels), as the CReST code's consistency term uses
    unlabeled_pool: Literal["unlabeled", "all"] = "unlabeled"
    views: ViewsCfg = field(default_factory=ViewsCfg)
    train: list[str] = field(default_factory=lambda: ["backbone", "heads"])
    reset: list[str] = field(default_factory=list)
    loss: list[ComponentSpec] = _c("loss", factory=lambda: ["ce"])
    pseudo_labeler: ComponentSpec | None = _c("pseudo_labeler", None)
    transform: ComponentSpec | None = _c("transform", None)  # before the forward (e.g. mixup)
    teacher: Literal["ema", "start"] = "ema"  # ctx.teacher_logits: EMA model or the model at stage start
    teacher_bn: Literal["running", "batch"] = "running"  # teacher BatchNorm: running or batch statistics
    # whole-pool labelling after the stage: a pseudo-labeler in offline mode keeps samples of
    # `label_pool` with targets for later stages (data = "labeled+pseudo", soft targets)
    label: ComponentSpec | None = _c("pseudo_labeler", None)
    label_pool: Literal["unlabeled", "labeled", "all"] = "unlabeled"
    label_head: str = ""  # head whose probabilities are handed over; "" = the stage's eval head
    optim: dict[str, Any] = field(default_factory=dict)  # overrides merged over [optim]
    ema: float = param(0.0, ge=0, lt=1)  # EMA decay of the weights used for evaluation; 0 = off
    drop_last: bool = False  # default epochs: skip each epoch's last, smaller batch
    frozen_bn: Literal["frozen", "update"] = "frozen"  # BatchNorm of parts not in `train`
    eval_every: int = param(1, ge=0)  # epochs; 0 = only at the end of the stage
    fit: list[str] = field(default_factory=list)  # heads fitted at the end (e.g. "heads.main")
    eval_head: str = ""  # head used for evaluation; "" = model.eval_head


@dataclass
class EvalCfg:
    many_threshold: int = param(100, ge=0)  # many: > this many labeled training images
    few_threshold: int = param(20, ge=0)  # few: < this many (<= many_threshold)
    # many/medium/few by labeled-count thresholds ("count") or by class rank ("rank": the first
    # rank_sizes[0] classes by count, the next rank_sizes[1], the rest; paper 000's CIFAR-10: 3/3/4)
    groups: Literal["count", "rank"] = "count"
    rank_sizes: list[int] = field(default_factory=lambda: [3, 3])

    def __post_init__(self) -> None:
        if len(self.rank_sizes) != 2 or any(n < 0 for n in self.rank_sizes):
            raise RecipeError(f"eval.rank_sizes: {self.rank_sizes} must be two counts >= 0 (many, "
                              "medium; few = the remaining classes), e.g. [3, 3]")
        if self.few_threshold > self.many_threshold:
            raise RecipeError(f"eval.few_threshold = {self.few_threshold} is above "
                              f"eval.many_threshold = {self.many_threshold}; few (< few_threshold "
                              "images) must lie below many (> many_threshold): lower few_threshold "
                              "or raise many_threshold")
        if isinstance(self.posthoc_tau, list) and not self.posthoc_tau:
            raise RecipeError("eval.posthoc_tau = []: give one tau or a non-empty list, e.g. "
                              "[0.0, 1.0] (0 = no post-hoc adjustment)")
    # images per evaluation forward (no gradients: logits stay on the device until the end)
    batch_size: int = param(1024, ge=1, le=MAX_BATCH)
    report: Literal["last", "best", "mean_last_k"] = "last"  # the final stage's number
    last_k: int = param(1, ge=1)  # mean_last_k: mean of the final stage's last k evaluations
    # post-hoc logit adjustment: logits - tau * log(labeled prior); a list gives one row per tau
    posthoc_tau: float | list[float] = param(0.0, ge=0)


@dataclass
class Recipe:
    run: RunCfg
    data: DataCfg
    model: ModelCfg
    optim: OptimCfg
    scheduler: ComponentSpec
    stages: list[StageCfg]
    eval: EvalCfg
    stage_optims: list[OptimCfg]
    raw: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "run": to_plain(self.run),
            "data": to_plain(self.data),
            "model": to_plain(self.model),
            "optim": _optim_table(self.optim),
            "scheduler": to_plain(self.scheduler),
            "eval": to_plain(self.eval),
            "stage": [to_plain(s) for s in self.stages],
        }
        # stage `optim` tables stay overrides of [optim], so `--set optim.lr=...` reaches them
        return out

    def to_toml(self) -> str:
        return dumps(self.to_dict())


TOP_KEYS = ("extends", "run", "data", "model", "optim", "scheduler", "stage", "eval")
#: `[optim] no_decay` entries (ltframe/engine/param_groups.py selects the parameters)
NO_DECAY = ("bias", "norm")
DEFAULT_OPTIM = {"name": "sgd", "lr": 0.1, "schedule": {"name": "constant"}}


def _optim_table(opt: OptimCfg) -> dict[str, Any]:
    extra = {"no_decay": list(opt.no_decay)} if opt.no_decay else {}
    return {**opt.optimizer.to_table(), **extra, "schedule": opt.schedule.to_table()}


def read_toml(path: str | Path, referrer: str | Path | None = None) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        if referrer is not None:
            raise RecipeError(f"{referrer}: extends = \"{p.name}\" but {p} does not exist; "
                              "fix the path (it is relative to the recipe that extends it)")
        raise RecipeError(f"recipe {p} not found; check the path (recipes live in recipes/)")
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{p}: invalid TOML: {exc}") from None
    except RecursionError:
        raise RecipeError(f"{p}: tables or lists are nested too deeply; a recipe nests at most "
                          f"{MAX_DEPTH} levels") from None
    check_depth(data, str(p))
    if not data:
        raise RecipeError(f"recipe {p} is empty; a recipe needs at least a [[stage]] table "
                          "(start from recipes/quickstart.toml)")
    return data


def check_depth(data: Any, where: str) -> None:
    """Tables and lists nested deeper than MAX_DEPTH are refused (without recursion)."""
    todo = [(data, 0)]
    while todo:
        node, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise RecipeError(f"{where}: tables or lists are nested more than {MAX_DEPTH} levels "
                              "deep; a recipe needs only a few")
        if isinstance(node, dict):
            todo.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            todo.extend((v, depth + 1) for v in node)


#: top-level tables whose `name` is a plain value, not a choice of component: merged key by key
PLAIN_TABLES = ("run",)


def merge(base: dict[str, Any], over: dict[str, Any], top: bool = True) -> dict[str, Any]:
    """Deep merge of `over` into `base` (as `extends` does): tables merge key by key; a table
    whose `name` chooses what it is (a component, optimizer, schedule, long-tail profile or
    split) is replaced whole when `over` changes the name ([optim] keeps the base's schedule);
    arrays (e.g. [[stage]]) and other values are replaced. [run] always merges key by key."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        b = out.get(k)
        if isinstance(b, str) and isinstance(v, dict):  # sampler = "random" + [sampler] k = 4
            b = {"name": b}
        if not (isinstance(b, dict) and isinstance(v, dict)):
            out[k] = copy.deepcopy(v)
        elif (top and k in PLAIN_TABLES) or v.get("name", b.get("name")) == b.get("name"):
            out[k] = merge(b, v, top=False)
        else:  # another component
            out[k] = copy.deepcopy(v)
            if top and k == "optim" and "schedule" in b:
                out[k].setdefault("schedule", copy.deepcopy(b["schedule"]))
    return out


def load_raw(path: str | Path) -> dict[str, Any]:
    """Read a recipe and its optional single `extends` base (relative to the recipe)."""
    data = read_toml(path)
    ext = data.pop("extends", None)
    if ext is None:
        return data
    if not isinstance(ext, str):
        raise RecipeError(f"extends: expected a file name (string), got {ext!r}")
    base_path = (Path(path).parent / ext).resolve()
    base = read_toml(base_path, referrer=path)
    if "extends" in base:
        raise RecipeError(f"{base_path}: extends may only be one level deep; merge the files")
    return merge(base, data)


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """'a.b=1' / 'stage.0.epochs=5' / 'stage[0].epochs=5' -> (path, TOML-parsed value)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.lr=0.01")
    key, text = item.split("=", 1)
    key = key.strip().replace("[", ".").replace("]", "")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare strings need no quotes
    except RecursionError:
        raise RecipeError(f"--set {key}: the value is nested too deeply") from None
    check_depth(value, f"--set {key}")
    path: list[str | int] = [int(p) if p.isdigit() else p for p in key.split(".") if p]
    if not path:
        raise RecipeError(f"--set {item!r}: empty key")
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            nxt = path[i + 1]
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise RecipeError(f"--set {item}: no element {part} at {_dotted(path[:i])}")
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item}: {_dotted(path[:i])} is not a table")
            if isinstance(node.get(part), str) and not isinstance(nxt, int):
                node[part] = {"name": node[part]}  # sampler = "random" -> table
            node = node.setdefault(part, [] if isinstance(nxt, int) else {})
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise RecipeError(f"--set {item}: no element {last} at {_dotted(path[:-1])}")
        elif not isinstance(node, dict):
            raise RecipeError(f"--set {item}: {_dotted(path[:-1])} is not a table")
        node[last] = value
    return raw


def _dotted(path: list[str | int]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _resolve_optim(registry: Registry, table: Any, path: str) -> OptimCfg:
    if not isinstance(table, dict):
        raise RecipeError(f"{path}: expected a table like {{ name = 'sgd', lr = 0.1 }}")
    body = dict(table)
    schedule = body.pop("schedule", {"name": "constant"})
    no_decay = body.pop("no_decay", [])
    if not isinstance(no_decay, list) or not all(isinstance(r, str) for r in no_decay):
        raise RecipeError(f"{path}.no_decay: expected a list of names, e.g. [\"bias\", \"norm\"]")
    for rule in no_decay:
        if rule not in NO_DECAY:
            raise RecipeError(f"{path}.no_decay: unknown entry {rule!r}; allowed: "
                              f"{allowed(NO_DECAY)}{closest(rule, NO_DECAY)}")
    body.setdefault("name", "sgd")
    return OptimCfg(
        registry.spec("optimizer", body, path),
        registry.spec("lr_schedule", schedule, f"{path}.schedule"),
        tuple(dict.fromkeys(no_decay)),
    )


def build_recipe(raw: dict[str, Any], registry: Registry) -> Recipe:
    """Validate plain recipe data into a Recipe; errors name the TOML path and the fix."""
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        k = unknown[0]
        raise RecipeError(f"{k}: unknown top-level table; allowed: {allowed(TOP_KEYS)}"
                          f"{closest(k, TOP_KEYS)}")
    resolver = registry.spec
    run = from_dict(RunCfg, raw.get("run"), "run", resolver)
    data = from_dict(DataCfg, raw.get("data"), "data", resolver)
    model = from_dict(ModelCfg, raw.get("model"), "model", resolver)
    optim_raw = merge(DEFAULT_OPTIM, raw.get("optim", {}) or {})
    optim = _resolve_optim(registry, optim_raw, "optim")
    scheduler = registry.spec("scheduler", raw.get("scheduler", "sequence"), "scheduler")
    stages_raw = raw.get("stage", [{}])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError("stage: expected one or more [[stage]] tables")
    stages, stage_optims = [], []
    for i, table in enumerate(stages_raw):
        path = f"stage[{i}]"
        stage = from_dict(StageCfg, table, path, resolver)
        if stage.epochs <= 0 and stage.steps <= 0 and not stage.fit:
            raise RecipeError(f"{path}: set epochs or steps (a positive integer)")
        stages.append(stage)
        base = optim_raw
        if stage.optim.get("name", base["name"]) != base["name"]:  # another optimizer
            base = {"schedule": optim_raw.get("schedule", {"name": "constant"})}
        stage_optims.append(_resolve_optim(registry, merge(base, stage.optim), f"{path}.optim"))
    _check_plain_name(run.name)
    _check_device(run.device)
    _check_backbone_args(model.backbone_args)
    for name in model.heads:
        if not HEAD_NAME.fullmatch(name):
            raise RecipeError(f"model.heads: {name!r} is not a head name; use a Python identifier "
                              "(letters, digits, '_'; up to 64 characters), e.g. \"main\" or "
                              "\"aux\" (a head is the model part heads.NAME)")
    for i, stage in enumerate(stages):
        check_plain_name(stage.name, f"stage[{i}].name",
                         "part of checkpoint, predictions and pseudo_labels file names")
    heads = ", ".join(model.heads)
    if model.eval_head not in model.heads:
        raise RecipeError(f"model.eval_head: '{model.eval_head}' is not one of the heads ({heads})")
    for i, stage in enumerate(stages):
        if stage.eval_head and stage.eval_head not in model.heads:
            raise RecipeError(f"stage[{i}].eval_head: '{stage.eval_head}' is not one of the heads "
                              f"({heads}){closest(stage.eval_head, model.heads)}")
    ev = from_dict(EvalCfg, raw.get("eval"), "eval", resolver)
    return Recipe(run, data, model, optim, scheduler, stages, ev, stage_optims, raw)


def _check_plain_name(name: str) -> None:
    """run.name becomes a folder under --out: no separators, no '..', no absolute path."""
    ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name) is not None and ".." not in name
    if not ok:
        raise RecipeError(f"run.name: {name!r} is not a plain name; use letters, digits and "
                          "'._+-' (the run directory is OUT/NAME; choose the folder with --out)")


#: timm keyword arguments that make it read a file (timm unpickles some formats)
_FILE_ARGS = ("checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "file", "url",
              "cache_dir", "dir", "path", "root")


def _check_device(device: str) -> None:
    if not DEVICE.fullmatch(device):
        raise RecipeError(f"run.device: {device!r} is not a training device; use \"auto\", "
                          "\"cpu\", \"cuda\" or \"cuda:N\"")


def _check_backbone_args(args: dict[str, Any]) -> None:
    for key in args:
        if key in _FILE_ARGS or key.endswith(("_path", "_file", "_url", "_dir")):
            raise RecipeError(f"model.backbone_args.{key}: ltframe does not hand file paths or "
                              "URLs to timm's loaders; remove it (model.weights = \"PATH\" reads "
                              "a local file, model.pretrained = true timm's published weights)")
        if key == "pretrained":
            raise RecipeError("model.backbone_args.pretrained: use model.pretrained = true "
                              "(applied when a run starts; resume restores its checkpoint)")


def load_recipe(
    path: str | Path, registry: Registry, overrides: list[str] | None = None
) -> Recipe:
    """Read, extend, override and validate a recipe file."""
    raw = apply_overrides(load_raw(path), overrides or [])
    return build_recipe(raw, registry)
