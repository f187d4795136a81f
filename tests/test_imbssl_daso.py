"""DASO (ytaek-oh/daso): the balanced queue against FeatureQueue's rule, the blended pseudo-labels
and the loss on fixed inputs against daso_model.py's expressions, the pi refresh, USB's blend,
the state round trip, bounds and the errors before a run."""

import pytest
import torch
import torch.nn.functional as F

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.plugins import make_plugin_manager
from ltframe.testing import tiny_recipe
from ltframe_imbssl.daso import ClassQueue

C, D = 3, 4


def _reg():
    return make_plugin_manager()[1]


def _labeler(**kw):
    reg = _reg()
    return reg.build(reg.spec("pseudo_labeler", {"name": "daso", **kw}, "pseudo_labeler"),
                     num_classes=C, class_counts=torch.tensor([5, 3, 1]))


def _loss(**kw):
    reg = _reg()
    return reg.build(reg.spec("loss", {"name": "daso", **kw}, "loss"), num_classes=C,
                     class_counts=torch.tensor([5, 3, 1]))


def _ctx(step=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {"labeled": torch.randn(6, D, generator=g), "unlabeled:weak": torch.randn(8, D, generator=g),
             "unlabeled:strong": torch.randn(8, D, generator=g).requires_grad_()}
    logits = {k: {"main": 3 * torch.randn(f.shape[0], C, generator=g)} for k, f in feats.items()}
    t_feats = torch.randn(6, D, generator=g)  # the EMA model's labeled features
    ctx = StepContext(step=step, epoch=0, num_classes=C, class_counts=torch.tensor([5, 3, 1]),
                      targets=torch.randint(0, C, (6,), generator=g), features_by_part=feats,
                      logits_by_part=logits, inputs_by_part={k: torch.zeros(1) for k in feats},
                      _teacher=lambda part: (t_feats, {"main": torch.zeros(6, C)}))
    ctx.t_feats = t_feats
    return ctx


class _RefQueue:
    """feature_queue.py's FeatureQueue(bal_queue=True), as written there."""

    def __init__(self, size):
        self.size = size
        self.bank = {c: torch.empty(0, D) for c in range(C)}
        self.prototypes = torch.zeros(C, D)

    def enqueue(self, features, labels):
        for idx in range(C):
            cls_inds = torch.where(labels == idx)[0]
            if len(cls_inds):
                self.bank[idx] = torch.cat([self.bank[idx], features[cls_inds]], 0)
                n = len(self.bank[idx])
                if n > self.size:
                    self.bank[idx] = self.bank[idx][n - self.size:]
                self.prototypes[idx, :] = self.bank[idx].mean(0)


def test_queue_keeps_each_class_last_items_as_the_code():
    g = torch.Generator().manual_seed(0)
    q, ref = ClassQueue(C, 5, D, torch.device("cpu")), _RefQueue(5)
    for n in (3, 9, 1, 12, 4, 7):
        f = torch.randn(n, D, generator=g)
        y = torch.randint(0, C - 1, (n,), generator=g)  # class 2 stays empty
        q.enqueue(f, y)
        ref.enqueue(f, y)
        assert torch.allclose(q.prototypes(), ref.prototypes, atol=1e-6)
        for c in range(C):
            kept = q.bank[c, :q.size][:int(q.filled[c])]
            got = sorted(map(tuple, kept.tolist()))
            assert got == sorted(map(tuple, ref.bank[c].tolist()))


def _reference_labels(ctx, protos, pl_dist, t_dist=1.5, t_proto=0.05, thr=0.95):
    """daso_model.py forward_train's pseudo-label after pre-training."""
    sim = torch.nn.CosineSimilarity(dim=2)
    fw = ctx.features_by_part["unlabeled:weak"]
    soft_target = (sim(fw.unsqueeze(1), protos.unsqueeze(0)) / t_proto).softmax(dim=1)
    p = ctx.logits_by_part["unlabeled:weak"]["main"].softmax(dim=1)
    _, pred_class = torch.max(p, dim=1)
    d = pl_dist / pl_dist.sum()
    d = d ** (1.0 / t_dist)
    d = d / d.sum()
    d = d / d.max()
    w = d[pred_class].view(-1, 1)
    p = (1.0 - w) * p + w * soft_target
    conf, label = torch.max(p, dim=1)
    return label, conf.ge(thr).float(), soft_target


def test_blended_labels_and_loss_against_the_code():
    lab = _labeler(warmup=1, period=1000, threshold=0.6)
    first = _ctx(step=0, seed=1)
    lab(first)  # pre-training: fills the queue with the first EMA features
    lab.pl_dist = torch.tensor([50.0, 30.0, 20.0])
    ctx = _ctx(step=1, seed=2)
    ref = _RefQueue(256)
    ref.enqueue(first.t_feats, first.targets)
    ref.enqueue(ctx.t_feats, ctx.targets)
    got = ctx.pseudo = lab(ctx)
    label, mask, q = _reference_labels(ctx, ref.prototypes, lab.pl_dist, thr=0.6)
    assert torch.equal(got.targets, label) and torch.equal(got.mask, mask)
    assert torch.allclose(ctx.extras["daso"]["q"], q, atol=1e-6)
    # the loss: masked CE of the strong view + the semantic alignment loss (weight 1)
    sim = torch.nn.CosineSimilarity(dim=2)
    fs = ctx.features_by_part["unlabeled:strong"]
    sim_strong = sim(fs.unsqueeze(1), ref.prototypes.unsqueeze(0)) / 0.05
    psa = -1 * torch.sum(q * F.log_softmax(sim_strong, dim=1), dim=1).sum() / 8
    ce = (F.cross_entropy(ctx.logits_by_part["unlabeled:strong"]["main"], label,
                          reduction="none") * mask).sum() / 8
    assert torch.allclose(_loss()(ctx), ce + psa, atol=1e-5)
    # before `warmup`: the linear labels and no alignment term
    early = _ctx(step=0, seed=3)
    pl = _labeler(warmup=10, threshold=0.6)(early)
    p = early.logits_by_part["unlabeled:weak"]["main"].softmax(1)
    assert torch.equal(pl.targets, p.argmax(1)) and torch.equal(pl.mask, (p.max(1).values >= 0.6).float())
    early.pseudo = pl
    ce = (F.cross_entropy(early.logits_by_part["unlabeled:strong"]["main"], pl.targets,
                          reduction="none") * pl.mask).mean()
    assert torch.allclose(_loss()(early), ce)


def test_pl_distribution_refreshes_every_period():
    lab = _labeler(warmup=100, period=3)
    labels = []
    for step in range(7):
        ctx = _ctx(step=step, seed=step)
        labels.append(lab(ctx).targets)
        if step == 2:
            assert torch.equal(lab.pl_dist, torch.bincount(torch.cat(labels), minlength=C).float())
    assert torch.equal(lab.pl_dist, torch.bincount(torch.cat(labels[3:6]), minlength=C).float())
    assert torch.equal(lab.window, torch.bincount(labels[6], minlength=C).float())


def test_usb_blend_uses_the_previous_batch_and_the_unblended_mask():
    lab = _labeler(warmup=0, blend="usb", threshold=0.6)
    lab.pl_dist = torch.tensor([50.0, 30.0, 20.0])
    a = _ctx(step=0, seed=4)
    lab(a)
    q_prev = a.extras["daso"]["q"]
    b = _ctx(step=1, seed=5)
    got = lab(b)
    p = b.logits_by_part["unlabeled:weak"]["main"].softmax(1)
    d = lab.pl_dist.pow(1 / 1.5)
    d = d / d.sum()
    w = (d / d.max())[p.argmax(1)][:, None]
    assert torch.equal(got.targets, ((1 - w) * p + w * q_prev).argmax(1))
    assert torch.equal(got.mask, (p.max(1).values >= 0.6).float())


def test_state_round_trip_is_bit_exact():
    a = _labeler(warmup=2, period=2, queue_size=4, blend="usb")
    for step in range(5):
        a(_ctx(step=step, seed=step))
    b = _labeler(warmup=2, period=2, queue_size=4, blend="usb")
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for step in range(5, 9):
        pa, pb = a(_ctx(step=step, seed=step)), b(_ctx(step=step, seed=step))
        assert torch.equal(pa.targets, pb.targets) and torch.equal(pa.mask, pb.mask)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(LtframeError, match="keep queue_size"):
        _labeler(queue_size=8).load_state_dict(a.state_dict())


def test_bad_parameters_are_refused():
    reg = _reg()
    for kind, bad in (("pseudo_labeler", {"t_proto": 0.0}), ("pseudo_labeler", {"period": 0}),
                      ("pseudo_labeler", {"queue_size": 0}), ("pseudo_labeler", {"warmup": -1}),
                      ("pseudo_labeler", {"blend": "previous"}), ("loss", {"psa_weight": -1.0})):
        with pytest.raises(LtframeError):
            reg.spec(kind, {"name": "daso", **bad}, "stage[0]")


STAGE = {"name": "daso", "epochs": 1, "steps_per_epoch": 2, "data": "labeled+unlabeled",
         "ema": 0.9, "teacher_bn": "batch", "views": {"unlabeled": ["weak", "strong"]},
         "pseudo_labeler": "daso", "loss": ["ce", "daso"]}


@pytest.mark.slow
def test_errors_before_the_run(tmp_path):
    ssl = {"split": {"name": "fraction", "labeled_fraction": 0.3}}
    with pytest.raises(LtframeError, match="stage.ema > 0"):
        start_run(tiny_recipe(tmp_path / "a", data=ssl, stage=[{**STAGE, "ema": 0.0}]))
    with pytest.raises(LtframeError, match="pseudo_labeler = \"daso\""):
        start_run(tiny_recipe(tmp_path / "b", data=ssl,
                              stage=[{**STAGE, "pseudo_labeler": "threshold"}]))
    no_unl = {k: v for k, v in STAGE.items() if k != "pseudo_labeler"}
    with pytest.raises(LtframeError, match=r"loss\[1\]: loss 'daso' needs unlabeled batches"):
        start_run(tiny_recipe(tmp_path / "c", data=ssl, stage=[{**no_unl, "data": "labeled"}]))
