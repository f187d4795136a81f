"""Recipe validation, overrides, extends and round-tripping."""

import tomllib

import pytest

from ltframe.errors import RecipeError
from ltframe.recipe import apply_overrides, build_recipe, load_recipe, parse_override
from ltframe.testing import TINY_RECIPE, tiny_recipe


def _raw(**over):
    import copy

    from ltframe.recipe import merge

    return merge(copy.deepcopy(TINY_RECIPE), over)


@pytest.mark.parametrize(
    "over, pattern",
    [
        ({"optim": {"lrr": 0.1}}, r"optim\.lrr: unknown key; allowed keys: .*did you mean 'lr'"),
        ({"run": {"seed": "zero"}}, r"run\.seed: expected an integer, got 'zero'"),
        ({"data": {"batchsize": 3}}, r"data\.batchsize: unknown key.*did you mean 'batch_size'"),
        ({"stage": [{"name": "x", "epochs": 1, "loss": [{"name": "cee"}]}]},
         r"stage\[0\]\.loss\[0\]\.name: unknown loss 'cee'; installed: .*ce.*did you mean 'ce'"),
        ({"stage": [{"name": "x", "epochs": 1, "sampler": {"name": "random", "k": 4}}]},
         r"stage\[0\]\.sampler\.k: unknown key"),
        ({"stage": [{"name": "x", "epochs": 1, "data": "labelled"}]},
         r"stage\[0\]\.data: 'labelled' .*allowed: 'labeled'.*did you mean 'labeled'"),
        ({"stage": [{"name": "x"}]}, r"stage\[0\]: set epochs or steps"),
        ({"data": {"longtail": {"name": "expo"}}}, r"data\.longtail\.name: 'expo'.*did you mean 'exp'"),
        ({"model": {"eval_head": "aux"}}, r"model\.eval_head: 'aux' is not one of the heads"),
        ({"stages": []}, r"stages: unknown top-level table.*did you mean 'stage'"),
        ({"optim": {"name": "sgd", "momentum": True}}, r"optim\.momentum: expected a number"),
        ({"scheduler": {"name": "sequnce"}}, r"scheduler\.name: unknown scheduler.*'sequence'"),
    ],
)
def test_bad_recipes_name_the_path_and_the_fix(registry, over, pattern):
    with pytest.raises(RecipeError, match=pattern):
        build_recipe(_raw(**over), registry)


def test_component_defaults_and_shorthand(registry):
    r = build_recipe(_raw(stage=[{"name": "x", "epochs": 1, "sampler": "class_balanced"}]), registry)
    st = r.stages[0]
    assert st.sampler.name == "class_balanced" and st.sampler.params.num_samples == 0
    assert [v.name for v in st.views.unlabeled] == ["weak", "strong"]
    assert st.loss[0].name == "ce" and st.loss[0].weight == 1.0
    assert r.optim.optimizer.params.lr == 0.05


def test_overrides_parse_values_and_index_lists(registry, tmp_path):
    assert parse_override("optim.lr=0.01") == (["optim", "lr"], 0.01)
    assert parse_override("stage[0].epochs=3") == (["stage", 0, "epochs"], 3)
    assert parse_override("run.name=hello") == (["run", "name"], "hello")
    assert parse_override("x.y=[1, 2]") == (["x", "y"], [1, 2])
    path = tiny_recipe(tmp_path)
    r = load_recipe(path, registry, ["optim.lr=0.01", "stage.0.epochs=7",
                                     "stage.0.sampler.name=class_balanced"])
    assert r.optim.optimizer.params.lr == 0.01
    assert r.stages[0].epochs == 7 and r.stages[0].sampler.name == "class_balanced"
    with pytest.raises(RecipeError, match="no element 3"):
        apply_overrides(_raw(), ["stage.3.epochs=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_override("optim.lr")


def test_stage_optim_overrides_merge_and_replace(registry):
    r = build_recipe(_raw(stage=[
        {"name": "a", "epochs": 1},
        {"name": "b", "epochs": 1, "optim": {"lr": 0.2, "schedule": {"name": "cosine"}}},
        {"name": "c", "epochs": 1, "optim": {"name": "adam"}},
    ]), registry)
    a, b, c = r.stage_optims
    assert a.optimizer.params.lr == 0.05 and a.schedule.name == "constant"
    assert b.optimizer.name == "sgd" and b.optimizer.params.lr == 0.2 and b.schedule.name == "cosine"
    assert c.optimizer.name == "adam" and c.optimizer.params.lr == 1e-3  # replaced, not merged


def test_extends_merges_one_base(registry, tmp_path):
    base = tiny_recipe(tmp_path, "base.toml")
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[optim]\nlr = 0.3\n[run]\nname = "child"\n')
    r = load_recipe(child, registry)
    assert r.optim.optimizer.params.lr == 0.3 and r.run.name == "child"
    assert r.data.source.params.num_classes == 4  # from the base
    grand = tmp_path / "grand.toml"
    grand.write_text('extends = "child.toml"\n')
    with pytest.raises(RecipeError, match="one level deep"):
        load_recipe(grand, registry)
    assert base.exists()


def test_resolved_recipe_round_trips(registry, tmp_path):
    r = load_recipe(tiny_recipe(tmp_path), registry, ["stage.0.ema=0.5"])
    text = r.to_toml()
    again = build_recipe(tomllib.loads(text), registry)
    assert again.to_toml() == text
    assert again.stages[0].ema == 0.5


def test_missing_and_invalid_files(registry, tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.toml", registry)
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=1")
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(bad, registry)


def test_recipes_never_import_code(registry):
    """A component name that looks like a module path is just an unknown name."""
    with pytest.raises(RecipeError, match="unknown loss 'os.system'"):
        build_recipe(_raw(stage=[{"name": "x", "epochs": 1, "loss": ["os.system"]}]), registry)


def test_extends_merges_plain_tables_key_by_key(registry, tmp_path):
    """A child setting run.name keeps the base's seed, log_every, out_dir (issue 17)."""
    tiny_recipe(tmp_path, "base.toml", run={"seed": 3, "log_every": 7},
                data={"source": {"name": "synthetic", "num_classes": 5}},
                stage=[{"name": "a", "epochs": 1}, {"name": "b", "epochs": 2}])
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[run]\nname = "child"\n'
                     '[data.source]\ntrain_per_class = 30\n[data.longtail]\nratio = 2\n')
    r = load_recipe(child, registry)
    assert r.run.name == "child" and r.run.seed == 3 and r.run.log_every == 7
    assert r.run.out_dir == str(tmp_path / "runs")
    src = r.data.source.params  # same component: merged
    assert src.num_classes == 5 and src.train_per_class == 30 and src.image_size == 16
    assert r.data.longtail.name == "exp" and r.data.longtail.ratio == 2
    assert [s.name for s in r.stages] == ["a", "b"]  # no [[stage]] in the child: the base's


def test_extends_replaces_renamed_components_and_stage_arrays(registry, tmp_path):
    tiny_recipe(tmp_path, "base.toml", scheduler="sequence",
                optim={"name": "sgd", "lr": 0.3, "momentum": 0.5, "schedule": {"name": "cosine"}},
                stage=[{"name": "a", "epochs": 1}, {"name": "b", "epochs": 2}])
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[optim]\nname = "adam"\n'
                     '[data.longtail]\nname = "step"\n[scheduler]\nrepeat = 2\n'
                     '[[stage]]\nname = "only"\nepochs = 1\n')
    r = load_recipe(child, registry)
    adam = r.optim.optimizer  # replaced: the base's lr = 0.3 is gone, the schedule stays
    assert adam.name == "adam" and adam.params.lr == 0.1 and r.optim.schedule.name == "cosine"
    assert r.data.longtail.name == "step" and r.data.longtail.ratio == 100  # not the base's 4
    assert r.scheduler.name == "sequence" and r.scheduler.params.repeat == 2  # "sequence" + table
    assert [s.name for s in r.stages] == ["only"]  # a child's [[stage]] list replaces the base's
