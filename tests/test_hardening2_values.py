"""Issue 18, "every bad value a clear error, before the run directory exists" and the name part
of "writes outside the run directory": recipe values and names are checked when the recipe is
read, and every stage the scheduler plans is resolved and its components built in preflight."""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from ltframe import hookimpl
from ltframe.config import check_plain_name, from_dict
from ltframe.engine.run import start_run
from ltframe.engine.stages import StagePlan
from ltframe.errors import LtframeError, RecipeError
from ltframe.plugins import make_plugin_manager
from ltframe.recipe import DataCfg, EvalCfg, ModelCfg, RunCfg, StageCfg, load_recipe
from ltframe.testing import tiny_recipe

STAGE = {"name": "train", "epochs": 1, "steps_per_epoch": 2,
         "views": {"labeled": [{"name": "weak", "pad": 2}]}, "loss": [{"name": "ce"}]}
SEMI_STAGE = {"name": "fixmatch", "epochs": 1, "steps_per_epoch": 2, "data": "labeled+unlabeled",
              "views": {"labeled": [{"name": "weak", "pad": 2}],
                        "unlabeled": [{"name": "weak", "pad": 2}, {"name": "strong", "pad": 2}]},
              "pseudo_labeler": {"name": "threshold"},
              "loss": [{"name": "ce"}, {"name": "fixmatch"}]}
SPLIT = {"split": {"name": "fraction", "labeled_fraction": 0.5}}

#: recipe variants (tiny_recipe overrides) the cases start from
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {"stage": [STAGE]},
    "semi": {"data": SPLIT, "stage": [SEMI_STAGE]},
    "moco": {"model": {"heads": {"main": {"name": "linear"},
                                 "proj": {"name": "mlp", "out_features": 16}}},
             "stage": [{**STAGE, "views": {"labeled": ["moco", "moco"]},
                        "loss": [{"name": "ce"}, {"name": "moco", "queue_size": 64}]}]},
    "ssd": {"model": {"heads": {"main": {"name": "lws"}, "soft": {"name": "lws"},
                                "rot": {"name": "linear", "out_features": 4}}},
            "scheduler": {"name": "ssd", "teacher_epochs": 1, "final_epochs": 1},
            "stage": [{**STAGE, "name": "joint",
                       "views": {"labeled": [{"name": "weak", "pad": 2}, "rotate"]},
                       "loss": [{"name": "ce"}, {"name": "rotation", "part": "labeled:rotate"}],
                       "train": ["backbone", "heads.main.fc", "heads.rot"]}]},
    "crest": {"data": SPLIT, "scheduler": {"name": "crest", "generations": 2},
              "stage": [{**SEMI_STAGE, "pseudo_labeler": {"name": "align"}}]},
    "alt": {"data": SPLIT,
            "model": {"heads": {"g": {"name": "linear"}, "g_prime": {"name": "linear"}},
                      "eval_head": "g_prime"},
            "scheduler": {"name": "alternate", "loops": 1, "classifier_epochs": 1,
                          "finetune_epochs": 1},
            "stage": [{**STAGE, "name": "init", "train": ["backbone", "heads.g_prime"],
                       "loss": [{"name": "ce", "head": "g_prime"}], "eval_head": "g_prime"}]},
    "two": {"stage": [{**STAGE, "name": "a"}, {**STAGE, "name": "b"}]},
    "decoupled": {"scheduler": {"name": "decoupled", "classifier": "tau_norm", "epochs": 1},
                  "stage": [STAGE]},
    "selftrain": {"data": SPLIT,
                  "stage": [{**STAGE, "name": "base", "label": {"name": "threshold",
                                                                "threshold": 0.0}},
                            {**STAGE, "name": "final", "data": "labeled+pseudo"}]},
}

# (case, recipe, --set overrides, expected part of the one-line error)
CASES = [
    # writes outside the run directory: names that become paths
    ("stage.name traversal", "tiny", ['stage[0].name="x/../../../escaped"'],
     "stage[0].name: 'x/../../../escaped' is not a plain name"),
    ("stage.name empty", "tiny", ['stage[0].name=""'], "stage[0].name: '' is not a plain name"),
    ("stage.name hidden", "tiny", ['stage[0].name=".x"'], "is not a plain name"),
    ("stage.name backslash", "tiny", ['stage[0].name="a\\\\b"'], "is not a plain name"),
    ("crest generation name", "crest", ['stage[0].name="../gen"'], "is not a plain name"),
    ("alternate stage name", "alt", ['stage[0].name="a/b"'], "is not a plain name"),
    ("ssd stage name", "ssd", ['stage[0].name="../j"'], "is not a plain name"),
    ("tensorboard subdir absolute", "tiny",
     ['run.loggers=[{name="tensorboard",subdir="/tmp/ltframe-tb-abs"}]'],
     "run.loggers[0]: subdir: '/tmp/ltframe-tb-abs' is not a folder inside the run directory"),
    ("tensorboard subdir ..", "tiny", ['run.loggers=[{name="tensorboard",subdir="a/../../up"}]'],
     "is not a folder inside the run directory"),
    # accepted silently before
    ("weak pad -3", "tiny", ['stage[0].views.labeled=[{name="weak",pad=-3}]'],
     "stage[0].views.labeled[0].pad: -3 is out of range; it must be >= 0"),
    ("strong n_ops -2", "semi", ['stage[0].views.unlabeled=["weak",{name="strong",n_ops=-2}]'],
     "stage[0].views.unlabeled[1].n_ops: -2 is out of range"),
    ("strong max_ops < n_ops", "semi",
     ['stage[0].views.unlabeled=["weak",{name="strong",n_ops=3,max_ops=2}]'],
     "max_ops = 2 is below n_ops = 3"),
    ("strong cutout 5", "semi", ['stage[0].views.unlabeled=["weak",{name="strong",cutout=5}]'],
     "stage[0].views.unlabeled[1].cutout: 5 is out of range; it must be >= 0 and <= 1"),
    ("moco view min_scale nan", "moco", ['stage[0].views.labeled=[{name="moco",min_scale=nan},'
                                         '"moco"]'],
     "stage[0].views.labeled[0].min_scale: nan is not allowed; give a finite number"),
    ("moco view jitter_prob nan", "moco",
     ['stage[0].views.labeled=[{name="moco",jitter_prob=nan},"moco"]'], "jitter_prob: nan"),
    ("loss weight -1", "tiny", ['stage[0].loss=[{name="ce",weight=-1}]'],
     "stage[0].loss[0].weight: -1 is out of range"),
    ("loss weight nan", "tiny", ['stage[0].loss=[{name="ce",weight=nan}]'],
     "stage[0].loss[0].weight: nan is out of range"),
    ("ssd student_epochs -1", "ssd", ["scheduler.student_epochs=-1"],
     "scheduler.student_epochs: -1 is out of range; it must be >= 0"),
    ("many_threshold < few_threshold", "tiny", ["eval.many_threshold=5", "eval.few_threshold=10"],
     "eval.few_threshold = 10 is above eval.many_threshold = 5"),
    ("synthetic noise nan", "tiny", ["data.source.noise=nan"],
     "data.source.noise: nan is not allowed"),
    ("ncm as a trained head without fit", "tiny", ['model.heads.main={name="ncm"}'],
     "head 'main' ('ncm') has no trained weights"),
    ("optim lr inf", "tiny", ["optim.lr=inf"], "optim.lr: inf is not allowed; give a finite number > 0"),
    ("optim momentum inf", "tiny", ["optim.momentum=inf"], "optim.momentum: inf is not allowed"),
    # internal errors before
    ("head named a.b", "tiny", ['model.heads={"a.b"={name="linear"}}', 'model.eval_head="a.b"'],
     "model.heads: 'a.b' is not a head name"),
    ("head named empty", "tiny", ['model.heads={""={name="linear"}}', 'model.eval_head=""'],
     "model.heads: '' is not a head name"),
    ("linear out_features -1", "tiny", ['model.heads.main={name="linear",out_features=-1}'],
     "model.heads.main.out_features: -1 is out of range"),
    ("mlp hidden -5", "moco", ['model.heads.proj={name="mlp",hidden=-5}'],
     "model.heads.proj.hidden: -5 is out of range"),
    ("mlp out_features 0", "moco", ['model.heads.proj={name="mlp",out_features=0}'],
     "model.heads.proj.out_features: 0 is out of range"),
    ("head size 10^12", "tiny", ['model.heads.main={name="linear",out_features=1000000000000}'],
     "model.heads.main.out_features: 1000000000000 is out of range"),
    ("class head of the wrong width", "tiny", ['model.heads.main={name="linear",out_features=3}'],
     "head 'main' gives 3 outputs but this needs one per class (4)"),
    ("rotation head with 3 outputs", "ssd", ['model.heads.rot={name="linear",out_features=3}'],
     "head 'rot' has 3 outputs but the rotation loss predicts 4 rotations"),
    ("views.labeled = []", "tiny", ["stage[0].views.labeled=[]"],
     "stage 'train' (stage[0]).views.labeled: [] but the stage trains on labeled batches"),
    ("views.unlabeled = [] with unlabeled data", "semi", ["stage[0].views.unlabeled=[]"],
     "views.unlabeled: [] but the stage trains on unlabeled batches"),
    ("loss = []", "tiny", ["stage[0].loss=[]"], "(stage[0]).loss: [] but the stage trains"),
    ("loss start past the stage", "tiny", ['stage[0].loss=[{name="ce",start=100}]'],
     "(stage[0]).loss[0].start: 100 is not before the stage's last step"),
    ("sqrt sampler power nan", "tiny", ['stage[0].sampler={name="sqrt",power=nan}'],
     "stage[0].sampler.power: nan is not allowed"),
    ("moco queue_size 0", "moco", ['stage[0].loss=[{name="ce"},{name="moco",queue_size=0}]'],
     "stage[0].loss[1].queue_size: 0 is out of range; it must be >= 1"),
    ("moco queue_size -4", "moco", ['stage[0].loss=[{name="ce"},{name="moco",queue_size=-4}]'],
     "stage[0].loss[1].queue_size: -4 is out of range"),
    ("moco queue_size 10^13", "moco",
     ['stage[0].loss=[{name="ce"},{name="moco",queue_size=10000000000000}]'],
     "queue_size: 10000000000000 is out of range"),
    ("bmb size 10^13", "semi", ['model.heads.aux={name="linear"}',
                                'stage[0].loss=[{name="ce"},{name="bmb",size=10000000000000}]'],
     "stage[0].loss[1].size: 10000000000000 is out of range"),
    ("data.workers 10^9", "tiny", ["data.workers=1000000000"], "data.workers: 1000000000 is out of range"),
    ("run.device meta", "tiny", ['run.device="meta"'], "run.device: 'meta' is not a training device"),
    ("seed 2^63-1", "tiny", ["run.seed=9223372036854775807"],
     "run.seed: 9223372036854775807 is out of range"),
    ("a 65-bit integer", "tiny", ["data.batch_size=36893488147419103232"],
     "data.batch_size: 36893488147419103232 does not fit a 64-bit integer"),
    ("backbone_args.cache_dir", "tiny", ['model.backbone_args.cache_dir="/tmp"'],
     "model.backbone_args.cache_dir: ltframe does not hand file paths"),
    ("image size the backbone cannot take", "tiny", ['model.backbone="vit_tiny_patch16_224"'],
     "model.backbone: 'vit_tiny_patch16_224' cannot take the data's 16x16 images"),
    ("backbone_args img_size 0", "tiny", ['model.backbone="vit_tiny_patch16_224"',
                                          "model.backbone_args.img_size=0"],
     "model.backbone_args: timm cannot build vit_tiny_patch16_224"),
    ("backbone_args nan", "tiny", ["model.backbone_args.drop_rate=nan"],
     "model.backbone_args.drop_rate: nan is not allowed"),
    # found only after training before
    ("label_head nope", "selftrain", ['stage[0].label_head="nope"'],
     "stage 'base' (stage[0]).label_head: 'nope' is not one of the model's heads (main)"),
    ("fit a head that cannot fit", "tiny", ['stage[0].fit=["heads.main"]'],
     "(stage[0]).fit[0]: 'heads.main' ('linear') has no fit() method"),
    ("fit a missing head", "tiny", ['stage[0].fit=["heads.nope"]'], "'heads.nope' is not a head"),
    ("fit without heads.", "tiny", ['stage[0].fit=["main"]'],
     "'main' is not a head; fit names heads as heads.NAME"),
    ("tau_norm search_steps 0", "decoupled", ['model.heads.main={name="tau_norm",search_steps=0}'],
     "model.heads.main.search_steps: 0 is out of range; it must be >= 1"),
    ("tau_norm search_min > search_max", "decoupled",
     ['model.heads.main={name="tau_norm",search_min=3.0}'], "search_min = 3.0 is above search_max"),
    ("eval.posthoc_tau = []", "tiny", ["eval.posthoc_tau=[]"], "eval.posthoc_tau = []: give one tau"),
    ("later stage's train part", "two", ['stage[1].train=["heads.nope"]'],
     "stage 'b' (stage[1]).train[0]: unknown model part 'heads.nope'"),
    ("later stage's reset part", "two", ['stage[1].reset=["bakbone"]'],
     "stage 'b' (stage[1]).reset[0]: unknown model part 'bakbone'"),
    ("alternate g", "alt", ['scheduler.g="nope"'], "scheduler.g: 'nope' is not one of the model's heads"),
    ("ssd student_train", "ssd", ['scheduler.student_train=["heads.nope"]'],
     "stage 'student' (stage[2]).train[0]: unknown model part 'heads.nope'"),
    # found after the run directory existed before
    ("sequence repeat 0", "tiny", ['scheduler={name="sequence",repeat=0}'],
     "scheduler.repeat: 0 is out of range; it must be >= 1"),
    ("crest t_min nan", "crest", ["scheduler.t_min=nan"], "scheduler.t_min: nan is not allowed"),
    ("ssd hard head", "ssd", ['scheduler.hard="nope"'], "scheduler.hard: 'nope' is not one of"),
    ("ssd temperature inf", "ssd", ["scheduler.temperature=inf"],
     "scheduler.temperature: inf is not allowed"),
    ("alternate g_prime", "alt", ['scheduler.g_prime="nope"'], "scheduler.g_prime: 'nope'"),
    ("decoupled head", "decoupled", ['scheduler.head="nope"'], "scheduler.head: 'nope'"),
    ("decoupled ncm on a linear head", "decoupled", ['scheduler.classifier="ncm"'],
     "(stage[1]).fit[0]: 'heads.main' ('linear') has no fit() method"),
    ("first stage's train part", "tiny", ['stage[0].train=["heads.nope"]'],
     "(stage[0]).train[0]: unknown model part 'heads.nope'"),
    ("first stage's reset part", "tiny", ['stage[0].reset=["heads.nope"]'],
     "(stage[0]).reset[0]: unknown model part 'heads.nope'"),
    ("loss head", "tiny", ['stage[0].loss=[{name="ce",head="nope"}]'],
     "(stage[0]).loss[0].head: 'nope' is not one of the model's heads"),
    ("loss part", "tiny", ['stage[0].loss=[{name="ce",part="unlabeled"}]'],
     "(stage[0]).loss[0].part: 'unlabeled' is not an input of this stage"),
    ("loss part missing from the views", "semi", ['stage[0].views.unlabeled=["weak"]'],
     "(stage[0]).loss[1].part: 'unlabeled:strong' is not an input of this stage"),
    ("pseudo-labeler head", "semi", ['stage[0].pseudo_labeler={name="threshold",head="nope"}'],
     "(stage[0]).pseudo_labeler.head: 'nope'"),
    ("pseudo-labeler part", "semi", ['stage[0].pseudo_labeler={name="threshold",part="labeled:x"}'],
     "(stage[0]).pseudo_labeler.part: 'labeled:x' is not an input"),
    ("transform head", "semi", ['stage[0].transform={name="mixmatch",head="nope"}'],
     "(stage[0]).transform.head: 'nope'"),
    ("mixmatch transform without unlabeled batches", "tiny", ['stage[0].transform={name="mixmatch"}'],
     "(stage[0]).transform: transform 'mixmatch' mixes labeled and unlabeled batches"),
    ("mean_teacher without a teacher", "semi", ['stage[0].loss=[{name="ce"},{name="mean_teacher"}]'],
     "(stage[0]).loss[1]: loss 'mean_teacher' needs a teacher model"),
    ("crest_select as an online pseudo-labeler", "semi",
     ['stage[0].pseudo_labeler={name="crest_select"}'],
     "(stage[0]).pseudo_labeler: pseudo_labeler 'crest_select' labels whole pools between stages"),
    ("distill without soft labels", "tiny", ['model.heads={main="linear",soft="linear"}',
                                            'stage[0].loss=[{name="ce"},{name="distill"}]'],
     "(stage[0]).loss[1]: loss distill needs soft labels"),
    ("longtail ratio nan", "tiny", ["data.longtail.ratio=nan"], "data.longtail.ratio: nan is not allowed"),
    ("split fraction inf", "semi", ["data.split.labeled_fraction=inf"],
     "data.split.labeled_fraction: inf is not allowed"),
    ("moco key part", "moco", ['stage[0].loss=[{name="ce"},{name="moco",key="labeled:x"}]'],
     "(stage[0]).loss[1].key: 'labeled:x' is not an input of this stage"),
]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    return {name: tiny_recipe(root, f"{name}.toml", **over) for name, over in RECIPES.items()}


@pytest.mark.parametrize(("case", "recipe", "overrides", "expected"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_value_is_a_clear_error_before_the_run_directory(
        recipes: dict[str, Path], tmp_path: Path, case: str, recipe: str, overrides: list[str],
        expected: str) -> None:
    out = tmp_path / "out"
    with pytest.raises(LtframeError) as info:
        start_run(recipes[recipe], overrides, out_dir=out, smoke=True)
    msg = str(info.value)
    assert expected in msg, msg
    assert "\n" not in msg
    assert not out.exists() or not any(out.iterdir()), f"{case}: the run directory was made"


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\\b", "../x", "x/..",
                                  "/abs", "a b", "x" * 101, "é"])
def test_plain_name_rejects(name: str) -> None:
    with pytest.raises(RecipeError, match="is not a plain name"):
        check_plain_name(name, "stage[0].name")


@pytest.mark.parametrize("name", ["train", "gen-1", "stage_0.v2", "A+B", "x" * 100])
def test_plain_name_accepts(name: str) -> None:
    check_plain_name(name, "stage[0].name")


def _fields() -> list[tuple[str, str, type, str, Any]]:
    """(kind, name, Params, field, type) of every field of every registered component and of
    the recipe's own tables."""
    _, registry = make_plugin_manager([])
    items = [(e.kind, e.name, e.params) for e in registry.entries()]
    items += [("recipe", c.__name__, c) for c in (RunCfg, DataCfg, ModelCfg, StageCfg, EvalCfg)]
    out = []
    for kind, name, params in items:
        hints = typing.get_type_hints(params)
        for f in dataclasses.fields(params):
            out.append((kind, name, params, f.name, hints[f.name]))
    return out


def _takes_float(tp: Any) -> bool:
    if tp is float:
        return True
    return any(_takes_float(a) for a in typing.get_args(tp) if a is not type(None))


def _bad_values(tp: Any, bad: float) -> list[Any]:
    """Values of type `tp` holding `bad`: a scalar where a float is taken, lists of floats."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if tp is float:
        return [bad]
    if typing.get_origin(tp) in (list, tuple):
        n = len(args) if typing.get_origin(tp) is tuple and Ellipsis not in args else 2
        return [[bad] * n]
    return [v for a in args for v in _bad_values(a, bad)]


FLOATS = [(k, n, p, f, tp) for k, n, p, f, tp in _fields() if _takes_float(tp)
          and next(x for x in dataclasses.fields(p) if x.name == f).metadata.get("finite", True)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("kind", "name", "params", "field", "tp"), FLOATS,
                         ids=[f"{k}-{n}-{f}" for k, n, _, f, _ in FLOATS])
def test_every_float_field_rejects_nan_and_inf(kind: str, name: str, params: type, field: str,
                                               tp: Any, bad: float) -> None:
    for value in _bad_values(tp, bad):
        with pytest.raises(RecipeError, match=rf"x\.{field}(\[\d\])?: (nan|-?inf) is "
                                              "(not allowed|out of range)"):
            from_dict(params, {field: value}, "x")


INTS = [(k, n, p, f) for k, n, p, f, tp in _fields() if tp is int]
#: int fields that may be negative: -1 is their "automatic" sentinel (bounded ge=-1)
SIGNED: set[tuple[str, str]] = {("adsh", "start_epoch")}


@pytest.mark.parametrize(("kind", "name", "params", "field"), INTS,
                         ids=[f"{k}-{n}-{f}" for k, n, _, f in INTS])
def test_every_int_field_rejects_negatives_and_65_bit_values(kind: str, name: str, params: type,
                                                             field: str) -> None:
    with pytest.raises(RecipeError, match=rf"x\.{field}: 18446744073709551616 does not fit a 64-bit integer"):
        from_dict(params, {field: 2**64}, "x")
    if (name, field) in SIGNED or kind == "source":  # data source bounds: tests/test_data_checks
        return
    with pytest.raises(RecipeError, match=rf"x\.{field}: -1 is out of range"):
        from_dict(params, {field: -1}, "x")


#: counts and sizes that allocate memory, start threads or plan stages
SIZE_FIELD = re.compile(r"(.*_)?(size|samples|features|hidden|workers|ops|pad|loops|"
                        r"generations|repeat|get|per_class|search_steps|window)")
SIZES = [(k, n, p, f) for k, n, p, f in INTS if SIZE_FIELD.fullmatch(f) and k != "source"]


@pytest.mark.parametrize(("kind", "name", "params", "field"), SIZES,
                         ids=[f"{k}-{n}-{f}" for k, n, _, f in SIZES])
def test_every_size_field_has_an_upper_bound(kind: str, name: str, params: type,
                                             field: str) -> None:
    with pytest.raises(RecipeError, match=rf"x\.{field}: 10000000000000 is out of range"):
        from_dict(params, {field: 10**13}, "x")


def test_deeply_nested_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("[run]\nx = " + "[" * 5000 + "]" * 5000 + "\n")
    _, registry = make_plugin_manager([])
    with pytest.raises(RecipeError, match=f"{path}: tables or lists are nested too deeply"):
        load_recipe(path, registry)
    path.write_text("[run]\nx = " + "[" * 40 + "]" * 40 + "\n")
    with pytest.raises(RecipeError, match="nested more than 32 levels"):
        load_recipe(path, registry)


class _BadNames:
    """A scheduler plugin whose second stage's name would leave the run directory."""

    @hookimpl
    def ltframe_register(self, registry: Any) -> None:
        class Scheduler:
            def __init__(self, params: Any, stages: list) -> None:
                self.stages = stages

            def next_stage(self, history: list[dict]) -> StagePlan | None:
                if len(history) >= 2:
                    return None
                cfg, optim = self.stages[0]
                name = cfg.name if not history else f"../{cfg.name}"
                return StagePlan(len(history), name, dataclasses.replace(cfg, name=name), optim)

        registry.register("scheduler", "bad_names", Scheduler)


def test_scheduler_stage_names_are_plain(recipes: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"stage\[1\] name '\.\./train' \(from the scheduler\)"):
        start_run(recipes["tiny"], ['scheduler="bad_names"'], out_dir=out, smoke=True,
                  plugins=[("bad_names", _BadNames())])
    assert not out.exists()


class _LateBadName:
    """A scheduler that needs a real result (top1) to name its second stage '../escaped'."""

    @hookimpl
    def ltframe_register(self, registry: Any) -> None:
        class Scheduler:
            def __init__(self, params: Any, stages: list) -> None:
                self.stages = stages

            def next_stage(self, history: list[dict]) -> StagePlan | None:
                cfg, optim = self.stages[0]
                if not history:
                    return StagePlan(0, cfg.name, cfg, optim)
                if len(history) == 1 and history[0]["top1"] >= 0:  # no stand-in has top1
                    return StagePlan(1, "../escaped", dataclasses.replace(cfg, name="x"), optim)
                return None

        registry.register("scheduler", "late_bad_name", Scheduler)


def test_stage_name_is_checked_again_when_the_stage_starts(recipes: dict[str, Path],
                                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"stage\[1\] name '\.\./escaped' \(from the scheduler\)"):
        start_run(recipes["tiny"], ['scheduler="late_bad_name"'], out_dir=out, smoke=True,
                  plugins=[("late_bad_name", _LateBadName())])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing written above --out
    assert not list(out.rglob("*escaped*"))


def test_tensorboard_subdir_cannot_leave_through_a_link(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from ltframe_tensorboard.logger import TensorBoardLogger, TensorBoardParams

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tb").symlink_to(tmp_path)
    logger = TensorBoardLogger(TensorBoardParams(subdir="tb/x"))
    with pytest.raises(RecipeError, match="outside the run directory"):
        logger.ltframe_run_start(run=SimpleNamespace(run_dir=run_dir))


RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
SYNTHETIC = sorted(p for p in RECIPES_DIR.rglob("*.toml") if "synthetic" in p.read_text())


@pytest.mark.parametrize("path", SYNTHETIC, ids=[str(p.relative_to(RECIPES_DIR)) for p in SYNTHETIC])
def test_shipped_synthetic_recipes_pass_preflight(path: Path) -> None:
    """No false alarms: every stage of the shipped CPU recipes passes the checks."""
    from ltframe.engine.preflight import preflight
    from ltframe.engine.run import _prepare

    pm, registry = make_plugin_manager([])
    recipe = load_recipe(path, registry)
    preflight(_prepare(recipe, pm, registry, Path(), smoke=True))


def test_preflight_leaves_the_random_generators_as_they_were(recipes: dict[str, Path]) -> None:
    """A run is the same with or without the checks (components are built, views tried)."""
    import random

    import numpy as np
    import torch

    from ltframe.engine.preflight import preflight
    from ltframe.engine.run import _prepare

    pm, registry = make_plugin_manager([])
    run = _prepare(load_recipe(recipes["moco"], registry), pm, registry, Path(), smoke=True)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    preflight(run)
    assert torch.equal(before[0], torch.get_rng_state())
    assert before[1] == random.getstate()
    assert (before[2] == np.random.get_state()[1]).all()
