"""Peer tests against USB's own code (semilearn 0.3.2 from PyPI; issue 20).

Where an ltframe component's USB parameters claim USB's behaviour, USB's code and the ltframe
component run on the same fixed inputs and must agree to float32 tolerance. On the USB side the
real classes run: the imbalanced algorithm class on top of FixMatch (as semilearn's
get_imb_algorithm combines them), its `train_step`, hooks and losses. Only `__init__` is skipped,
because it builds datasets, networks and optimisers. The model is a stand-in whose outputs are
fixed: an input row is [logits | features]. Where USB's code differs from the authors' (ZOO.md),
the test also checks that the ltframe default differs in the documented way.

Skipped unless `semilearn` can be imported. benchmarks/setup_usb.sh makes that environment:
    bash benchmarks/setup_usb.sh --target .usb-site
    PYTHONPATH=.usb-site:$PYTHONPATH python -m pytest -q tests/test_usb_peer.py
"""

import contextlib
import math
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltframe.engine.context import PoolPredictions, StepContext
from ltframe.plugins import make_plugin_manager
from ltframe_imbssl.abc import unlabeled_keep_prob
from ltframe_imbssl.saw import effective_weights

semilearn = pytest.importorskip("semilearn")

from semilearn.algorithms import name2alg  # noqa: E402
from semilearn.algorithms.hooks import FixedThresholdingHook, PseudoLabelingHook  # noqa: E402
from semilearn.core.criterions import CELoss, ConsistencyLoss  # noqa: E402
from semilearn.imb_algorithms import name2imbalg  # noqa: E402
from semilearn.imb_algorithms.adsh.utils import AdaptiveThresholdingHook  # noqa: E402
from semilearn.imb_algorithms.darp.utils import DARPPseudoLabelingHook  # noqa: E402
from semilearn.imb_algorithms.daso.utils import DASOFeatureQueue, DASOPseudoLabelingHook  # noqa: E402
from semilearn.imb_algorithms.debiaspl.utils import (  # noqa: E402
    DebiasPLConsistencyLoss,
    DebiasPLHook,
)
from semilearn.imb_algorithms.saw.utils import (  # noqa: E402
    SAWCELoss,
    SAWConsistencyLoss,
    SAWWeightsHook,
)
from semilearn.imb_algorithms.saw.utils import effective_weights as usb_effective_weights  # noqa: E402

C = 4  # classes
D = 5  # feature width
COUNTS = torch.tensor([40, 12, 5, 2])  # labeled counts, class 0 the head (USB's Adsh assumes it)
TOL = {"rtol": 1e-5, "atol": 1e-6}


# ---------------------------------------------------------------- USB side


class _Net:
    """USB's model interface on fixed outputs: an input row is [logits | features]."""

    def __init__(self, aux: nn.Linear | None = None) -> None:
        self.module = SimpleNamespace(aux_classifier=aux)  # ABC reads model.module.aux_classifier

    def __call__(self, x):
        return {"logits": x[:, :C], "feat": x[:, C:]}


def _usb(imb: str | None = None, hooks: dict | None = None, **attrs):
    """A USB algorithm object (imbalanced class over FixMatch, as get_imb_algorithm builds it)
    without its __init__: the attributes its train_step and hooks read, set by hand."""
    bases = (name2imbalg[imb], name2alg["fixmatch"]) if imb else (name2alg["fixmatch"],)
    cls = type("PeerAlgorithm", bases, {})
    alg = cls.__new__(cls)
    alg.__dict__.update(model=_Net(), use_cat=True, amp_cm=contextlib.nullcontext,
                        ce_loss=CELoss(), consistency_loss=ConsistencyLoss(), lambda_u=1.0,
                        T=0.5, p_cutoff=0.95, use_hard_label=True, it=0, epoch=0, gpu=None,
                        num_classes=C, print_fn=lambda *a, **k: None)
    alg.__dict__.update(attrs)
    alg.hooks_dict = OrderedDict(PseudoLabelingHook=PseudoLabelingHook(),
                                 MaskingHook=FixedThresholdingHook())
    alg.hooks_dict.update(hooks or {})
    alg.seen = {"mask": [], "label": []}  # what the masking / pseudo-label hooks returned
    for name, fn, key in (("MaskingHook", "masking", "mask"),
                          ("PseudoLabelingHook", "gen_ulb_targets", "label")):
        hook = alg.hooks_dict[name]
        orig = getattr(hook, fn)

        def record(algorithm, *a, _orig=orig, _key=key, **k):
            out = _orig(algorithm, *a, **k)
            algorithm.seen[_key].append(out.clone())
            return out

        setattr(hook, fn, record)
    return alg


def _usb_step(alg, batch, **extra):
    """One USB training iteration as AlgorithmBase.train runs it (hooks around train_step)."""
    alg.call_hook("before_train_step")
    out, log = alg.train_step(x_lb=batch["labeled"], y_lb=batch["y"],
                              x_ulb_w=batch["unlabeled:weak"], x_ulb_s=batch["unlabeled:strong"],
                              **extra)
    alg.call_hook("after_train_step")
    alg.it += 1
    return out, log


@pytest.fixture
def no_cuda(monkeypatch):
    """USB moves some state with .cuda() (DARP's refined rows, SAW's weights); on a machine
    without CUDA those moves stay on the CPU."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


# ---------------------------------------------------------------- ltframe side

REG = make_plugin_manager()[1]
POOL = 16  # unlabeled samples (DARP's P rows, SAW / Adsh pool passes)


def _lt(kind: str, name: str, **params):
    spec = REG.spec(kind, {"name": name, **params}, kind)
    return REG.build(spec, num_classes=C, class_counts=COUNTS, labeled_counts=COUNTS, seed=3,
                     num_samples=POOL, unlabeled_index=torch.arange(POOL))


def _batch(seed: int, n_lb: int = 6, n_ulb: int = 8, scale: float = 4.0) -> dict:
    """Fixed inputs: rows [logits | features] per part, labels and unlabeled indices."""
    g = torch.Generator().manual_seed(seed)
    rows = {part: torch.cat([scale * torch.randn(n, C, generator=g), torch.randn(n, D, generator=g)], 1)
            for part, n in (("labeled", n_lb), ("unlabeled:weak", n_ulb), ("unlabeled:strong", n_ulb))}
    rows["y"] = torch.randint(0, C, (n_lb,), generator=g)
    rows["idx"] = torch.randperm(POOL, generator=g)[:n_ulb]
    return rows


def _ctx(batch: dict, step: int = 0, epoch: int = 0, aux: nn.Linear | None = None) -> StepContext:
    parts = ["labeled", "unlabeled:weak", "unlabeled:strong"]
    feats = {p: batch[p][:, C:] for p in parts}
    logits = {p: {"main": batch[p][:, :C]} for p in parts}
    if aux is not None:
        with torch.no_grad():
            for p in parts:
                logits[p]["aux"] = aux(feats[p])
    feats["unlabeled"], logits["unlabeled"] = feats["unlabeled:weak"], logits["unlabeled:weak"]
    lab_feats = feats["labeled"]
    return StepContext(step=step, epoch=epoch, num_classes=C, class_counts=COUNTS,
                       targets=batch["y"], features_by_part=feats, logits_by_part=logits,
                       inputs_by_part={p: batch[p] for p in parts},
                       indices_by_part={"unlabeled": batch["idx"], "unlabeled:weak": batch["idx"]},
                       _teacher=lambda part: (lab_feats, {"main": torch.zeros(len(lab_feats), C)}))


def _lt_step(ctx: StepContext, labeler, *losses) -> tuple[torch.Tensor, torch.Tensor]:
    """ltframe's step: the pseudo-labeler, then the sum of the losses; (total, mask)."""
    ctx.pseudo = labeler(ctx)
    return sum(loss(ctx) for loss in losses), ctx.pseudo.mask


def _pool(seed: int, scale: float = 4.0) -> torch.Tensor:
    return scale * torch.randn(POOL, C, generator=torch.Generator().manual_seed(seed))


def _pool_predictions(logits: torch.Tensor) -> PoolPredictions:
    return PoolPredictions(index=torch.arange(POOL), probs=torch.softmax(logits, 1), num_classes=C,
                           class_counts=COUNTS, stage_index=0, stage_name="s", logits=logits)


# ---------------------------------------------------------------- FixMatch


def test_fixmatch_step_equals_usb():
    """USB's FixMatch train_step (fixed-threshold mask, hard argmax labels, consistency loss)
    = ltframe's `ce` + `fixmatch` losses with the `threshold` labeler (0.95)."""
    alg = _usb()
    labeler = _lt("pseudo_labeler", "threshold", threshold=0.95)
    ce, fixmatch = _lt("loss", "ce"), _lt("loss", "fixmatch")
    masks = []
    for seed in range(3):
        batch = _batch(seed)
        out, log = _usb_step(alg, batch)
        ctx = _ctx(batch)
        total, mask = _lt_step(ctx, labeler, ce, fixmatch)
        assert torch.equal(ctx.pseudo.targets, alg.seen["label"][-1])
        assert torch.equal(mask, alg.seen["mask"][-1])
        assert torch.allclose(total, out["loss"], **TOL)
        assert math.isclose(float(fixmatch(ctx)), log["train/unsup_loss"], rel_tol=1e-5)
        masks.append(mask)
    kept = torch.cat(masks)
    assert 0 < kept.sum() < kept.numel()  # the inputs exercise both sides of the threshold


# ---------------------------------------------------------------- SAW


def test_saw_effective_weights_equal_usb():
    """beta = 0 is USB's effective_weights (beta = (N - 1) / N from the mean count)."""
    for counts in ([40, 12, 5, 2], [100, 10, 1, 1], [7, 7, 7, 7], [3000, 1500, 90, 15]):
        t = torch.tensor(counts)
        assert torch.allclose(effective_weights(t, 0.0), usb_effective_weights(t).float(), **TOL)
    assert not torch.allclose(effective_weights(COUNTS, 0.99), usb_effective_weights(COUNTS).float(),
                              rtol=1e-3)  # the default (beta 0.99, train_example.sh) is not USB's


def test_saw_usb_training_equals_usb(no_cuda):
    """SAW with beta = 0, counts = "pool": USB's SAW over FixMatch for two epochs (labeled
    weights from the labeled counts, unlabeled weights uniform, then from the EMA pool pass)."""
    pool_logits = _pool(11)
    alg = _usb("saw", {"SAWWeightsHook": SAWWeightsHook(y_lb_cnt=COUNTS, num_ulb=POOL)},
               ce_loss=SAWCELoss(), consistency_loss=SAWConsistencyLoss(),
               evaluate=lambda dest, return_logits=False: {f"{dest}/logits": pool_logits.numpy()})
    labeler = _lt("pseudo_labeler", "threshold", threshold=0.95)
    lab = _lt("loss", "saw", on="labeled", beta=0.0)
    unl = _lt("loss", "saw", on="unlabeled", beta=0.0, counts="pool")
    alg.call_hook("before_run")
    for epoch in range(2):
        alg.epoch = epoch
        alg.call_hook("before_train_epoch")
        for seed in range(2):
            batch = _batch(10 * epoch + seed)
            out, log = _usb_step(alg, batch)
            total, mask = _lt_step(_ctx(batch, epoch=epoch), labeler, lab, unl)
            assert torch.allclose(total, out["loss"].float(), **TOL)
        alg.call_hook("after_train_epoch")
        unl.epoch_pool(_pool_predictions(pool_logits), epoch)
        assert torch.allclose(unl.weights, alg.x_ulb_weights.float(), **TOL)
    assert torch.allclose(lab.weights, alg.x_lb_weights.float(), **TOL)
    assert not torch.allclose(unl.weights, torch.ones(C))  # the pool pass changed them


# ---------------------------------------------------------------- Adsh


def test_adsh_usb_equals_usb():
    """mode = "usb": USB's AdaptiveThresholdingHook. First thresholds exp(-0.95) = 0.39, then
    after each epoch the EMA pool pass. The second pool has one head confidence >= tau_1, so
    rho = 0 and index -1 (the smallest) is taken."""
    hook = AdaptiveThresholdingHook(C, 0.95)
    pools = [_pool(21), _pool(22)]
    pools[1][:, 0] = -9.0
    pools[1][0] = torch.tensor([9.0, 0.0, 0.0, 0.0])  # one head prediction, conf 0.9996
    pools[1][1] = torch.tensor([2.0, 0.5, 0.0, 0.0])  # one below tau_1
    alg = _usb("adsh", {"MaskingHook": hook}, tau_1=0.95)
    alg.evaluate = lambda dest, return_logits=False: {f"{dest}/logits": pools[alg.epoch].numpy()}
    labeler = _lt("pseudo_labeler", "adsh", mode="usb")
    fixmatch, ce = _lt("loss", "fixmatch"), _lt("loss", "ce")
    assert torch.allclose(labeler.scores, torch.full((C,), math.exp(-0.95)))
    for epoch in range(3):
        alg.epoch = epoch
        for seed in range(2):
            batch = _batch(30 + 10 * epoch + seed, scale=2.0)
            out, _ = _usb_step(alg, batch)
            total, mask = _lt_step(_ctx(batch, epoch=epoch), labeler, ce, fixmatch)
            assert torch.equal(mask, alg.seen["mask"][-1])
            assert torch.allclose(total, out["loss"], **TOL)
        if epoch < 2:
            hook.after_train_epoch(alg)
            labeler.epoch_pool(_pool_predictions(pools[epoch]), epoch)
            assert torch.allclose(labeler.scores, torch.exp(-hook.adsh_s), **TOL)
    # rho = 0: every class's threshold is its smallest pool confidence
    conf, pred = torch.softmax(pools[1], 1).max(1)
    smallest = torch.stack([conf[pred == c].min() for c in range(C)])
    assert torch.allclose(labeler.scores, smallest, **TOL)
    # the authors' rule (default mode) starts at tau_1 and keeps the head's score at tau_1
    authors = _lt("pseudo_labeler", "adsh")
    assert torch.allclose(authors.scores, torch.full((C,), 0.95))
    authors.epoch_pool(_pool_predictions(pools[1]), 1)
    assert float(authors.scores[0]) == pytest.approx(0.95)


# ---------------------------------------------------------------- DARP


def test_darp_usb_equals_usb(no_cuda):
    """mask = "usb", schedule = "global": USB's DARPPseudoLabelingHook over FixMatch. The rows
    of P are written per sample, refined every 3 global steps (epoch > warm-up), labels from the
    refined rows and the mask from the unrefined softmax. Also checks Q."""
    target = COUNTS.double().numpy() / COUNTS.sum().item() * POOL  # DARP.set_hooks's target_disb
    hook = DARPPseudoLabelingHook(warmup_epochs=0, alpha=2.0, iter_T=10, num_refine_iter=3,
                                  dataset_len=POOL, num_classes=C, target_disb=target)
    start = 5  # the epoch starts at global step 5: the batch index and the global step disagree
    alg = _usb("darp", {"PseudoLabelingHook": hook}, epoch=1, it=start)
    labeler = _lt("pseudo_labeler", "darp", warmup=0, every=3, mask="usb", schedule="global")
    fixmatch, ce = _lt("loss", "fixmatch"), _lt("loss", "ce")
    refined_differs = False
    for step in range(start, start + 7):
        batch = _batch(40 + step, scale=1.5)
        out, _ = _usb_step(alg, batch, idx_ulb=batch["idx"])
        ctx = _ctx(batch, step=step, epoch=1)
        total, mask = _lt_step(ctx, labeler, ce, fixmatch)
        assert torch.equal(ctx.pseudo.targets, alg.seen["label"][-1])
        assert torch.equal(mask, alg.seen["mask"][-1])
        assert torch.allclose(total, out["loss"], rtol=1e-5, atol=1e-5)
        assert torch.allclose(labeler.Q, hook.pseudo_refine.float(), rtol=1e-4, atol=1e-5)
        plain = torch.softmax(batch["unlabeled:weak"][:, :C], 1).argmax(1)
        refined_differs |= not torch.equal(ctx.pseudo.targets, plain)
    assert refined_differs  # refinement changed some labels (the test is not plain FixMatch)
    # the default (the authors') masks with the refined rows: another mask on the same inputs
    authors = _lt("pseudo_labeler", "darp", warmup=0, every=3, schedule="global")
    usb = _lt("pseudo_labeler", "darp", warmup=0, every=3, mask="usb", schedule="global")
    differs = False
    for step in range(start, start + 7):
        ctx = _ctx(_batch(40 + step, scale=1.5), step=step, epoch=1)
        a, u = authors(ctx), usb(ctx)
        assert torch.equal(a.targets, u.targets)
        differs |= not torch.equal(a.mask, u.mask)
    assert differs


# ---------------------------------------------------------------- ABC


def test_abc_usb_equals_usb():
    """targets = "hard", horizon = USB's epochs (256), one strong view: USB's compute_abc_loss
    (inside ABC's train_step). USB draws the Bernoulli masks from the global RNG; the test
    records USB's Bernoulli probabilities, checks them against ltframe's, and gives USB
    ltframe's draws."""
    g = torch.Generator().manual_seed(5)
    aux = nn.Linear(D, C)
    with torch.no_grad():
        aux.weight.copy_(3 * torch.randn(C, D, generator=g))
        aux.bias.copy_(torch.randn(C, generator=g))
    ratio = torch.from_numpy(COUNTS.min().numpy() / COUNTS.numpy())  # ABC.__init__'s lb_class_dist
    alg = _usb("abc", model=_Net(aux), lb_class_dist=ratio, abc_p_cutoff=0.95, abc_loss_ratio=1.0,
               epochs=256)
    loss = _lt("loss", "abc", targets="hard", horizon=256)
    for step, epoch in ((0, 0), (1, 100), (2, 255)):
        batch = _batch(50 + step, n_lb=12, n_ulb=16)
        ctx = _ctx(batch, step=step, epoch=epoch, aux=aux)
        with torch.no_grad():
            q = torch.softmax(aux(batch["unlabeled:weak"][:, C:]), 1)
        m_lab, m_unl = loss.masks(ctx.targets, q.argmax(1), epoch, step)
        draws, probs = [m_lab, m_unl], []

        def bernoulli(p, draws=draws, probs=probs):
            probs.append(p.clone())
            return draws[len(probs) - 1]

        alg.bernouli_mask = bernoulli
        alg.epoch = epoch
        _, log = _usb_step(alg, batch)
        keep = unlabeled_keep_prob(loss.ratio, epoch, loss.p.horizon)  # what ltframe draws from
        assert torch.allclose(probs[0].float(), loss.ratio[ctx.targets], **TOL)
        assert torch.allclose(probs[1].float(), keep[q.argmax(1)], **TOL)
        assert math.isclose(float(loss(ctx)), log["train/abc_loss"], rel_tol=1e-5, abs_tol=1e-6)
    # the authors' soft targets give another loss on the same inputs and masks
    soft = _lt("loss", "abc", horizon=256)
    assert not math.isclose(float(soft(ctx)), float(loss(ctx)), rel_tol=1e-4)


# ---------------------------------------------------------------- DASO


class _NoEma:
    def apply_shadow(self):
        pass

    def restore(self):
        pass


def test_daso_usb_equals_usb():
    """blend = "usb", warmup = USB's num_pretrain_iter: USB's DASO train_step over FixMatch for
    8 steps (queue of 3 per class, pi refreshed every 2 steps, warm-up 3). Checks prototypes,
    labels, masks (unblended), the blend with the previous batch's semantic labels, and the
    loss. USB adds the semantic alignment loss from step warmup - 1 on (`it + 1 <
    num_pretrain_iter` returns early), one step before it blends; ltframe starts both at
    `warmup`, so the one step in between differs by USB's assign loss."""
    warm = 3
    alg = _usb("daso", {"PseudoLabelingHook": DASOPseudoLabelingHook(C, 1.5, True, 0.5)},
               queue=DASOFeatureQueue(num_classes=C, feat_dim=D, queue_length=3),
               similarity_fn=nn.CosineSimilarity(dim=2), T_proto=0.05, T_dist=1.5,
               with_dist_aware=True, interp_alpha=0.5, lambda_f=1.0, num_pl_dist_iter=2,
               num_pretrain_iter=warm, ema=_NoEma())
    labeler = _lt("pseudo_labeler", "daso", blend="usb", warmup=warm, period=2, queue_size=3)
    ce, daso = _lt("loss", "ce"), _lt("loss", "daso")
    current = _lt("pseudo_labeler", "daso", warmup=warm, period=2, queue_size=3)
    blend_differs = False
    for step in range(8):
        batch = _batch(60 + step, scale=2.0)
        out, log = _usb_step(alg, batch)
        ctx = _ctx(batch, step=step)
        total, mask = _lt_step(ctx, labeler, ce, daso)
        assert torch.allclose(labeler.queue.prototypes(), alg.queue.prototypes, **TOL)
        assert torch.equal(ctx.pseudo.targets, alg.seen["label"][-1])
        assert torch.equal(mask, alg.seen["mask"][-1])
        if step == warm - 1:
            assert log["train/assign_loss"] > 0.01
            assert torch.allclose(total + log["train/assign_loss"], out["loss"], **TOL)
        else:
            assert torch.allclose(total, out["loss"], **TOL)
        other = current(_ctx(batch, step=step))
        blend_differs |= not torch.equal(other.targets, ctx.pseudo.targets)
    assert torch.allclose(labeler.pl_dist, alg.hooks_dict["PseudoLabelingHook"].get_pl_dist(False))
    assert blend_differs  # the default blends this batch's semantic labels: other labels


# ---------------------------------------------------------------- DebiasPL


def _usb_debiaspl(momentum: float):
    return _usb("debiaspl", {"DebiasPLHook": DebiasPLHook()}, tau=0.4, ema_p=momentum,
                ema_m=momentum, p_hat=torch.full((C,), 1.0 / C),
                consistency_loss=DebiasPLConsistencyLoss(tau=0.4))


def _usb_qhat_is_scalar() -> bool:
    """USB@1ef4cbe (GitHub) updates q^ with probs.mean() (a scalar: q^ stays uniform); the PyPI
    0.3.2 wheel has probs.mean(dim=0) (a per-class update). Which one is installed?"""
    alg = _usb_debiaspl(0.5)
    alg.compute_prob(torch.tensor([[5.0, 0.0, 0.0, 0.0]]))
    return bool(torch.allclose(alg.p_hat, torch.full((C,), 1.0 / C)))


def test_debiaspl_usb_qhat_equals_usb():
    """USB's DebiasPL over FixMatch, momentum 0.5 so q^ moves visibly.

    - USB@1ef4cbe (GitHub): q^ stays uniform. ltframe's qhat = "usb" then gives USB's labels,
      masks and loss (USB's DebiasPL is FixMatch).
    - semilearn 0.3.2 (PyPI): q^ is updated per class, so its trajectory is ltframe's
      "batch_mean" one. USB labels with the q^ just updated and adds the margin of the q^
      before the update; the authors (ltframe's default) do the opposite. No ltframe mode
      reproduces that order. The test checks USB's step against ltframe's q^ trajectory with
      USB's order.
    """
    scalar = _usb_qhat_is_scalar()
    alg = _usb_debiaspl(0.5)
    mode = "usb" if scalar else "batch_mean"
    labeler = _lt("pseudo_labeler", "debiaspl", qhat=mode, threshold=0.95, tau=0.4, momentum=0.5)
    loss, ce = _lt("loss", "debiaspl"), _lt("loss", "ce")
    fixmatch = _lt("pseudo_labeler", "threshold", threshold=0.95)
    for step in range(4):
        batch = _batch(70 + step, scale=1.5)
        before = labeler.qhat.clone()
        out, log = _usb_step(alg, batch)
        ctx = _ctx(batch, step=step)
        total, mask = _lt_step(ctx, labeler, ce, loss)
        assert torch.allclose(labeler.qhat, alg.p_hat.float(), **TOL)  # the same q^ trajectory
        weak = batch["unlabeled:weak"][:, :C]
        if scalar:
            assert torch.equal(ctx.pseudo.targets, alg.seen["label"][-1])
            assert torch.equal(mask, alg.seen["mask"][-1])
            assert torch.allclose(total, out["loss"], **TOL)
            plain = fixmatch(_ctx(batch))
            assert torch.equal(plain.targets, ctx.pseudo.targets) and torch.equal(plain.mask, mask)
        else:
            # USB: labels and mask from softmax(z - tau log q^_new), margin tau log q^_old
            debiased = torch.softmax(weak - 0.4 * labeler.qhat.log(), 1)
            conf, label = debiased.max(1)
            assert torch.equal(label, alg.seen["label"][-1])
            assert torch.equal((conf >= 0.95).float(), alg.seen["mask"][-1])
            strong = batch["unlabeled:strong"][:, :C] + 0.4 * before.log()
            unsup = (F.cross_entropy(strong, label, reduction="none") * (conf >= 0.95).float()).mean()
            assert math.isclose(float(unsup), log["train/unsup_loss"], rel_tol=1e-5, abs_tol=1e-6)
    assert not torch.allclose(labeler.qhat, torch.full((C,), 1.0 / C)) or scalar


def test_debiaspl_usb_mode_keeps_qhat_uniform():
    """ltframe's qhat = "usb" follows USB@1ef4cbe (probs.mean(), ZOO.md): q^ stays uniform
    whatever the installed semilearn does, and the default moves it."""
    usb = _lt("pseudo_labeler", "debiaspl", qhat="usb", momentum=0.5)
    authors = _lt("pseudo_labeler", "debiaspl", momentum=0.5)
    for step in range(3):
        ctx = _ctx(_batch(80 + step), step=step)
        usb(ctx)
        authors(ctx)
    assert torch.allclose(usb.qhat, torch.full((C,), 1.0 / C))
    assert not torch.allclose(authors.qhat, torch.full((C,), 1.0 / C), atol=1e-3)


def test_usb_environment_is_the_expected_release():
    """The peer tests read USB's classes as 0.3.x has them; a different release fails here
    first rather than in a confusing comparison."""
    from importlib.metadata import version

    assert version("semilearn").startswith("0.3.")
