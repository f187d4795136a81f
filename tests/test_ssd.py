"""SSD (paper 004): the stage plan, the soft labels softmax(z_teacher / T) stored once, the
T^2-scaled distillation loss, and a stage III network that starts from scratch."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ltframe import hookimpl, resume_run, start_run
from ltframe.engine.context import PoolPredictions, StepContext
from ltframe.errors import LtframeError, RecipeError
from ltframe.plugins import make_plugin_manager
from ltframe.recipe import OptimCfg, StageCfg
from ltframe.testing import StopAt, tiny_recipe

_, REG = make_plugin_manager()


def _scheduler(**kw):
    rep = StageCfg(name="rep", epochs=4, train=["backbone", "heads.main.fc", "heads.rot"])
    optim = OptimCfg(REG.spec("optimizer", "sgd", "optim"), REG.spec("lr_schedule", "cosine", "s"))
    return REG.build(REG.spec("scheduler", {"name": "ssd", **kw}, "scheduler"), stages=[(rep, optim)])


def test_stage_plan():
    s = _scheduler(teacher_epochs=2, final_epochs=3)
    plans = []
    while (p := s.next_stage([{}] * len(plans))) is not None:
        plans.append(p)
    names = [p.name for p in plans]
    assert names == ["joint", "teacher", "student", "student_hard", "final"]
    joint, teacher, student, hard, final = (p.cfg for p in plans)
    assert teacher.train == ["heads.main.scale"] and teacher.epochs == 2
    assert teacher.sampler.name == "class_aware" and teacher.label_pool == "labeled"
    lab = teacher.label.params
    assert teacher.label.name == "threshold" and not lab.hard and lab.temperature == 2.0
    assert lab.threshold == 0.0 and lab.head == "main"
    assert student.reset == ["backbone", "heads"] and student.epochs == 4
    assert student.train == ["backbone", "heads.main.fc", "heads.soft.fc"]
    assert [(x.name, x.params.head) for x in student.loss] == [("ce", "main"), ("distill", "soft")]
    assert student.loss[1].params.temperature == 2.0 and student.eval_head == "soft"
    assert hard.epochs == 0 and hard.train == [] and hard.eval_head == "main" and hard.reset == []
    assert final.train == ["heads.soft.scale"] and final.eval_head == "soft" and final.epochs == 3
    assert _scheduler(final="none").next_stage([{}] * 4) is None
    assert _scheduler(teacher="crt").next_stage([{}]).cfg.reset == ["heads.main"]
    # stage II/IV settings of SSD_LT ssd_stage_ii.py (lr 0.2, 2 per class, batch 512)
    s = _scheduler(classifier_lr=0.2, classifier_per_class=2, classifier_batch_size=512)
    for plan in (s.next_stage([{}]), s.next_stage([{}] * 4)):
        assert plan.optim.optimizer.params.lr == 0.2 and plan.cfg.batch_size == 512
        assert plan.cfg.sampler.params.per_class == 2
    assert s.next_stage([{}] * 2).cfg.batch_size == 0  # the student keeps stage I's batch
    with pytest.raises(RecipeError, match="same head"):
        _scheduler(soft="main")


def test_soft_labels_are_tempered_softmax_and_distill_carries_t_squared():
    logits = torch.randn(5, 4)
    labeler = REG.build(REG.spec("pseudo_labeler", {"name": "threshold", "threshold": 0.0,
                                                    "hard": False, "temperature": 2.0}, "l"),
                        num_classes=4, class_counts=torch.ones(4))
    pool = PoolPredictions(index=torch.arange(5), probs=logits.softmax(1), num_classes=4,
                           class_counts=torch.ones(4), stage_index=1, stage_name="teacher",
                           logits=logits)
    sel = labeler.label_pool(pool)
    assert torch.allclose(sel.targets, F.softmax(logits / 2, 1), atol=1e-6)
    soft, z = sel.targets, torch.randn(5, 4, requires_grad=True)
    ctx = StepContext(step=0, epoch=0, num_classes=4, class_counts=torch.ones(4), targets=None,
                      features_by_part={"labeled": z}, logits_by_part={"labeled": {"soft": z}},
                      soft_targets=soft)
    for form in ("ce", "kl"):
        loss = REG.build(REG.spec("loss", {"name": "distill", "temperature": 2.0, "form": form},
                                  "l"), num_classes=4, class_counts=torch.ones(4))
        kl = F.kl_div(F.log_softmax(z / 2, 1), soft, reduction="batchmean") * 4
        ce = -(soft * F.log_softmax(z / 2, 1)).sum(1).mean() * 4
        assert torch.allclose(loss(ctx), kl if form == "kl" else ce, atol=1e-6)
    with pytest.raises(LtframeError, match="needs soft labels"):
        loss(StepContext(step=0, epoch=0, num_classes=4, class_counts=torch.ones(4), targets=None,
                         features_by_part={"labeled": z}, logits_by_part={"labeled": {"soft": z}}))


class _Capture:
    """Parameters at each stage's start (after the stage's resets)."""

    def __init__(self):
        self.at_start = {}

    @hookimpl
    def ltframe_stage_start(self, run, stage):
        self.at_start[stage.name] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def _recipe(tmp_path):
    stage = {"name": "joint", "epochs": 2, "steps_per_epoch": 2,
             "views": {"labeled": ["weak", "rotate"]},
             "loss": [{"name": "ce"}, {"name": "rotation", "part": "labeled:rotate"}],
             "train": ["backbone", "heads.main.fc", "heads.rot"]}
    return tiny_recipe(
        tmp_path, run={"log_every": 1},
        model={"heads": {"main": {"name": "lws"}, "soft": {"name": "lws"},
                         "rot": {"name": "linear", "out_features": 4}}},
        scheduler={"name": "ssd", "teacher_epochs": 1, "final_epochs": 1}, stage=[stage])


@pytest.mark.slow
def test_end_to_end_soft_labels_stored_new_network_and_resume(tmp_path):
    cap = _Capture()
    full = start_run(_recipe(tmp_path / "a"), plugins=[("cap", cap)])
    run = Path(full["run_dir"])
    assert [s["stage"] for s in full["stages"]] == ["joint", "teacher", "student", "student_hard",
                                                    "final"]
    # soft labels for every labeled sample, rows summing to 1, written once with the run
    soft = load_file(run / "pseudo_labels" / "stage1-teacher.safetensors")
    n_train = sum(full["stages"][1]["train_counts"])  # the labeled training set
    assert soft["index"].numel() == n_train
    assert torch.allclose(soft["soft"].sum(1), torch.ones(soft["index"].numel()), atol=1e-5)
    # stage III starts from scratch: no weight equals stage I's trained weights
    joint_end = cap.at_start["teacher"]  # the teacher stage starts from stage I's weights
    student = cap.at_start["student"]
    for k, v in student.items():
        if v.dtype.is_floating_point and v.numel() > 4 and "running" not in k:
            assert not torch.equal(v, joint_end[k]), k
    # resume mid-student: the stored soft labels are read back, not recomputed
    with pytest.raises(LtframeError, match="interrupted"):
        start_run(_recipe(tmp_path / "b"), plugins=[("stop", StopAt(1, stage_index=2))])
    resumed = resume_run(next((tmp_path / "b" / "runs").iterdir()))

    def lines(run_dir):
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows
                if r["event"] in ("train", "eval")]

    assert lines(full["run_dir"]) == lines(resumed["run_dir"])
    assert [s["top1"] for s in full["stages"]] == [s["top1"] for s in resumed["stages"]]
