"""Contract tests, parametrized over every registered component of every kind."""

import copy
import math

import numpy as np
import pytest
import torch

from ltframe.data.samplers import IndexSampler
from ltframe.engine.context import PoolLabels, PoolPredictions, PseudoLabels, StepContext
from ltframe.engine.forward import forward_no_grad
from ltframe.errors import DataError, RecipeError
from ltframe.plugins import make_plugin_manager
from ltframe.recipe import OptimCfg, StageCfg
from ltframe.testing import write_cifar_folder, write_image_folder

_, REGISTRY = make_plugin_manager()
C = 4


def entries(kind):
    return [pytest.param(e, id=e.name) for e in REGISTRY.entries(kind)]


class _ToyBackbone(torch.nn.Module):
    num_features = 8

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 8)

    def forward(self, x):
        return self.fc(x.flatten(1))


def toy_model():
    from ltframe.models import LTModel

    heads = {"main": torch.nn.Linear(8, C), "rot": torch.nn.Linear(8, 4),
             "proj": torch.nn.Linear(8, 5), "aux": torch.nn.Linear(8, C), "soft": torch.nn.Linear(8, C)}
    return LTModel(_ToyBackbone(), heads)


PARTS = ("labeled", "labeled:weak", "labeled:moco", "labeled:moco#1", "unlabeled",
         "unlabeled:weak", "unlabeled:strong")


COUNTS = torch.tensor([50, 10, 1, 0])


def toy_teacher(model):
    """A no-grad teacher that differs from the student (as an EMA model would)."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return teacher


def toy_ctx(model, targets: torch.Tensor) -> StepContext:
    x = torch.randn(targets.numel(), 3, 4, 4)
    feats, logits = model(x)
    teacher = toy_teacher(model)
    inputs = {p: x for p in PARTS}
    ctx = StepContext(step=0, epoch=0, num_classes=C, class_counts=COUNTS,
                      targets=targets, features_by_part={p: feats for p in PARTS},
                      logits_by_part={p: logits for p in PARTS}, model=model,
                      inputs_by_part=inputs,
                      indices_by_part={"labeled": torch.arange(targets.numel()),
                                       "unlabeled": torch.arange(100, 100 + targets.numel())},
                      _teacher=lambda part: forward_no_grad(teacher, inputs[part], False, False),
                      _student_no_grad=lambda xb: forward_no_grad(model, xb, True, False))
    ctx.pseudo = PseudoLabels(targets.clone(), torch.ones(targets.numel()))
    ctx.soft_targets = torch.softmax(torch.randn(targets.numel(), C), 1)  # a labelled table's rows
    # the mixed soft targets a `mixmatch`-style transform leaves for its loss
    soft = torch.softmax(torch.randn(targets.numel(), C), 1)
    ctx.extras["mixmatch"] = {"labeled:weak": soft, "unlabeled:weak": soft.flip(0),
                              "unlabeled:strong": soft.roll(1, 0)}
    ctx.extras["debiaspl"] = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))  # its labeler's margin
    return ctx


@pytest.mark.parametrize("entry", entries("loss"))
def test_loss_contract(entry):
    loss = REGISTRY.build(REGISTRY.spec("loss", entry.name, "loss"), num_classes=C,
                          class_counts=COUNTS, num_samples=200)
    model = toy_model()
    targets = torch.tensor([0, 0, 1, 2, 0, 1, 0, 1])  # class 2 has 1 sample, class 3 none
    for _ in range(2):  # twice: stateful losses (queues, trackers) see a second step
        model.zero_grad()
        value = loss(toy_ctx(model, targets))
        assert value.dim() == 0 and torch.isfinite(value)
        value.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    if hasattr(loss, "state_dict"):
        state = loss.state_dict()
        fresh = REGISTRY.build(REGISTRY.spec("loss", entry.name, "loss"), num_classes=C,
                               class_counts=COUNTS, num_samples=200)
        fresh.load_state_dict(state)


def _build(kind, name):
    return REGISTRY.build(REGISTRY.spec(kind, name, kind), num_classes=C, class_counts=COUNTS,
                          num_samples=200)


def _check_pseudo(pl, n):
    assert isinstance(pl, PseudoLabels)
    if pl.targets.dim() == 1:
        assert pl.targets.dtype == torch.long and pl.targets.shape == (n,)
        assert ((pl.targets >= 0) & (pl.targets < C)).all()
    else:
        assert pl.targets.is_floating_point() and pl.targets.shape == (n, C)
        assert torch.isfinite(pl.targets).all()
    assert pl.mask.is_floating_point() and pl.mask.shape == (n,)
    assert ((pl.mask >= 0) & (pl.mask <= 1)).all()
    assert not pl.targets.requires_grad and not pl.mask.requires_grad


@pytest.mark.parametrize("entry", entries("pseudo_labeler"))
def test_pseudo_labeler_contract(entry):
    labeler = _build("pseudo_labeler", entry.name)
    model = toy_model()
    targets = torch.tensor([0, 0, 1, 2, 0, 1, 0, 1])
    online = True
    for _ in range(2):  # twice: stateful labelers (running estimates) see a second step
        try:
            pl = labeler(toy_ctx(model, targets))
        except RecipeError:  # an offline-only labeler says so, and must have label_pool
            online = False
            break
        _check_pseudo(pl, targets.numel())
    assert online or callable(getattr(labeler, "label_pool", None))
    if hasattr(labeler, "state_dict"):
        fresh = _build("pseudo_labeler", entry.name)
        fresh.load_state_dict(labeler.state_dict())
        if online:
            ctx = toy_ctx(model, targets)
            a, b = labeler(ctx), fresh(ctx)
            assert torch.equal(a.targets, b.targets) and torch.equal(a.mask, b.mask)
    if callable(getattr(labeler, "label_pool", None)):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(30, C, generator=g) * 3
        index = torch.arange(40, 70)
        pool = PoolPredictions(index=index, probs=logits.softmax(1), num_classes=C,
                               class_counts=COUNTS, stage_index=0, stage_name="s", logits=logits)
        sel = labeler.label_pool(pool)
        assert isinstance(sel, PoolLabels)
        k = sel.index.numel()
        assert sel.index.dtype == torch.long and torch.isin(sel.index, index).all()
        assert sel.index.unique().numel() == k
        assert sel.targets.shape in ((k,), (k, C))
        assert sel.weight.shape == (k,) and torch.isfinite(sel.weight).all()
        assert sel.confidence is None or sel.confidence.shape == (k,)


@pytest.mark.parametrize("entry", entries("transform"))
def test_transform_contract(entry):
    transform = _build("transform", entry.name)
    model = toy_model()
    targets = torch.tensor([0, 0, 1, 2, 0, 1, 0, 1])
    for step in range(2):
        ctx = toy_ctx(model, targets)
        ctx.step = step
        ctx.features_by_part, ctx.logits_by_part = {}, {}  # before the forward
        before = {p: (x.shape, x.dtype) for p, x in ctx.inputs_by_part.items()}
        assert transform(ctx) is None
        assert set(ctx.inputs_by_part) == set(before)
        for p, x in ctx.inputs_by_part.items():
            assert (x.shape, x.dtype) == before[p], p
            assert torch.isfinite(x).all()


def _labels():
    return torch.tensor([0] * 20 + [1] * 5 + [2] * 1)  # class 2: one sample; class 3: none


@pytest.mark.parametrize("entry", entries("sampler"))
def test_sampler_contract(entry):
    spec = REGISTRY.spec("sampler", entry.name, "sampler")
    labels = _labels()
    s = REGISTRY.build(spec, labels=labels, num_classes=C, seed=0, rank=0, world_size=1)
    assert isinstance(s, IndexSampler)
    e0, e0b, e1 = s.epoch_indices(0), s.epoch_indices(0), s.epoch_indices(1)
    assert e0.dtype == torch.long and len(e0) == len(s) > 0
    assert e0.min() >= 0 and e0.max() < labels.numel()
    assert torch.equal(e0, e0b) and not torch.equal(e0, e1)
    shards = [REGISTRY.build(spec, labels=labels, num_classes=C, seed=0, rank=r, world_size=2)
              for r in range(2)]
    a, b = (sh.epoch_indices(0) for sh in shards)
    assert len(a) == len(b) == len(s) // 2  # every rank the same number of steps
    full = s.epoch_indices(0)[: 2 * len(a)]
    assert torch.equal(torch.sort(torch.cat([a, b])).values, torch.sort(full).values)


@pytest.mark.parametrize("entry", entries("head"))
def test_head_contract(entry):
    head = REGISTRY.build(REGISTRY.spec("head", entry.name, "head"), in_features=8, num_classes=C)
    x = torch.randn(5, 8, requires_grad=True)
    out = head(x)
    width = getattr(REGISTRY.spec("head", entry.name, "head").params, "out_features", 0) or C
    assert out.shape == (5, width) and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("entry", entries("view"))
def test_view_contract(entry):
    view = REGISTRY.build(REGISTRY.spec("view", entry.name, "view"), mean=(0.4, 0.4, 0.4),
                          std=(0.2, 0.2, 0.2))
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = view(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape[0] == 4 and torch.isfinite(out).all()


@pytest.mark.parametrize("entry", entries("optimizer"))
def test_optimizer_contract(entry):
    w = torch.nn.Parameter(torch.ones(3))
    opt = REGISTRY.build(REGISTRY.spec("optimizer", entry.name, "optim"), params=[w])
    (w ** 2).sum().backward()
    opt.step()
    assert (w < 1).all()
    assert "lr" in opt.param_groups[0]


@pytest.mark.parametrize("entry", entries("lr_schedule"))
def test_lr_schedule_contract(entry):
    f = REGISTRY.build(REGISTRY.spec("lr_schedule", entry.name, "s"), steps_per_epoch=10,
                       total_steps=200)
    values = [f(s) for s in range(200)]
    assert all(math.isfinite(v) and 0 <= v <= 1.0 + 1e-9 for v in values)
    assert values == [f(s) for s in range(200)]  # a pure function of the step


@pytest.mark.parametrize("entry", entries("scheduler"))
def test_scheduler_contract(entry):
    optim = OptimCfg(REGISTRY.spec("optimizer", "sgd", "optim"),
                     REGISTRY.spec("lr_schedule", "cosine", "optim.schedule"))
    stages = [(StageCfg(name=f"s{i}", epochs=1, data="labeled+unlabeled"), optim) for i in range(2)]
    spec = REGISTRY.spec("scheduler", entry.name, "scheduler")
    try:
        sched = REGISTRY.build(spec, stages=stages)
    except RecipeError:  # a scheduler may refuse a number of [[stage]] tables, with a reason
        sched = REGISTRY.build(spec, stages=stages[:1])
    history, seen = [], []
    while (plan := sched.next_stage(history)) is not None:
        assert plan.index == len(history)
        seen.append(plan.name)
        history.append({"stage": plan.name})
        assert len(history) < 100
    assert seen  # yields at least one stage
    # pure function of history: asking again gives the same plan
    assert sched.next_stage([]).name == seen[0]


def _source_params(name, tmp_path):
    if name == "cifar10":
        return {"root": str(write_cifar_folder(tmp_path, 2, 1))}
    if name == "cifar100":
        classes = [f"class{i:03d}" for i in range(100)]
        write_image_folder(tmp_path / "train", classes, 1, 8)
        write_image_folder(tmp_path / "test", classes, 1, 8)
        return {"root": str(tmp_path)}
    if name == "imagefolder":
        write_image_folder(tmp_path / "train", ["a", "b"], 2, 8)
        write_image_folder(tmp_path / "val", ["a", "b"], 1, 8)
        return {"root": str(tmp_path), "image_size": 8}
    if name == "listfile":
        write_image_folder(tmp_path / "img", ["a", "b"], 2, 8)
        (tmp_path / "train.txt").write_text("img/a/0000.png 0\nimg/b/0001.png 1\n")
        (tmp_path / "test.txt").write_text("img/a/0001.png 0\nimg/b/0000.png 1\n")
        return {"root": str(tmp_path), "image_size": 8}
    if name == "npz":
        x = np.zeros((4, 8, 8, 3), dtype=np.uint8)
        np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x[:2],
                 y_test=np.array([0, 1]))
        return {"path": str(tmp_path / "d.npz")}
    if name == "synthetic":
        return {"num_classes": 2, "train_per_class": 3, "test_per_class": 1, "image_size": 8}
    if name == "folder":
        write_image_folder(tmp_path / "u" / "nested", ["x"], 2, 8)
        return {"root": str(tmp_path / "u")}
    pytest.skip(f"no test data recipe for third-party source {name}")


def _check_source(src) -> None:
    assert src.train_labels.dtype == torch.long and len(src.train_images) == src.train_labels.numel()
    assert src.hidden.shape == src.train_labels.shape and len(src.mean) == len(src.std) == 3
    assert int(src.train_labels.min()) >= -1 and int(src.train_labels.max()) < src.num_classes
    assert src.train_files is None or len(src.train_files) == len(src.train_images)
    assert src.test_labels.numel() == len(src.test_images)


@pytest.mark.parametrize("entry", entries("source"))
def test_source_contract(entry, tmp_path):
    """Every source builds as [data] unlabeled (images, labels unused); a labelled one also as
    data.source with a test set; an unlabeled-only one refuses to be data.source."""
    params = _source_params(entry.name, tmp_path)
    spec = REGISTRY.spec("source", {"name": entry.name, **params}, "s")
    pool = REGISTRY.build(spec, seed=0, unlabeled=True, image_size=8)
    _check_source(pool)
    assert len(pool.train_images) > 0
    if not pool.num_classes:  # images without labels only
        with pytest.raises(DataError, match="has no labels"):
            REGISTRY.build(spec, seed=0)
        return
    src = REGISTRY.build(spec, seed=0)
    _check_source(src)
    assert src.test_labels.numel() > 0 and int(src.train_labels.max()) >= 0


@pytest.mark.parametrize("entry", entries("logger"))
def test_logger_contract(entry, tmp_path):
    """A logger builds from its defaults, implements event hooks, takes every kind of record
    after ltframe_run_start and writes under the run directory only."""
    from types import SimpleNamespace

    logger = REGISTRY.build(REGISTRY.spec("logger", {"name": entry.name}, "run.loggers[0]"))
    hooks = [n for n in dir(type(logger)) if n.startswith("ltframe_")
             and hasattr(getattr(type(logger), n), "ltframe_impl")]
    assert "ltframe_log" in hooks
    run = SimpleNamespace(run_dir=tmp_path / "run", is_main=True)
    run.run_dir.mkdir()
    if "ltframe_run_start" in hooks:
        logger.ltframe_run_start(run=run)
    records = [("stage_start", {"stage": "s", "total_steps": 4}),
               ("train", {"stage": "s", "step": 2, "loss": {"ce": 1.0, "total": 1.0}, "lr": 0.1}),
               ("eval", {"stage": "s", "step": 4, "top1": 50.0, "many": None}),
               ("pseudo_labels", {"stage": "s", "pl_accuracy": 90.0}),
               ("pool_labels", {"stage": "s", "pool_accuracy": 80.0}),
               ("stage_end", {"stage": "s", "top1": 50.0})]
    for event, data in records:
        logger.ltframe_log(run=run, event=event, data=data)
    if callable(getattr(logger, "close", None)):
        logger.close()
    assert all(p.is_relative_to(run.run_dir) for p in tmp_path.rglob("*") if p.is_file())
