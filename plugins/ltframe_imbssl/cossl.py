"""Pseudo-labeler `cossl`: CoSSL (Fan, Dai, Kukleva & Schiele, CVPR 2022, "CoSSL: Co-Learning of
Representation and Classifier for Imbalanced Semi-Supervised Learning"), following the authors'
YUE-FAN/CoSSL train_cifar_fix_cossl.py (main, train, validate_teacher) and utils/tfe_init.py
(classifier_warmup, TFE, weight_imprint, classifier_train).

CoSSL is the second phase of a FixMatch run (recipes/cifar10_lt/cossl.toml: a `fixmatch` stage,
then a stage with this labeler). The labeler owns a linear *teacher* classifier on the features
of the stage's teacher (the EMA model), its optimizer and its EMA copy:

- TFE warm-up (once, when the stage starts; not again on resume): with the teacher encoder in
  eval mode, (1) a weight-imprinted classifier W_c = m_c / |m_c| (m_c the mean feature of the
  labeled images of class c, `weak_view`); (2) features of the labeled set (`weak_view`) and of
  the unlabeled set (`view`, the strong one) with class probabilities softmax(W f) (unlabeled:
  from the weak view of the same images); (3) for every class c with n_c < n_max, n_max - n_c
  synthetic features lam f_a + (1 - lam) f_b with target c, lam ~ Beta(0.75, 0.75), f_a a random
  labeled feature of class c (with replacement), f_b the other-class labeled and unlabeled
  features ranked by their probability of c, the top ones in order; (4) a fresh linear head
  trained on labeled + synthetic features (soft CE, Adam `warm_lr`, L2 `weight_decay` on the
  weight, `warm_epochs` x `warm_iters` batches of `warm_batch`, a fresh shuffle per epoch) with
  an EMA copy (`ema`). Its head and EMA head become the teacher and the EMA teacher.
- Every step, first the pseudo-labels: teacher(EMA encoder(weak unlabeled view)), argmax and
  mask [max p >= threshold] for the recipe's `fixmatch` loss (the teacher as it was before
  this step's update). Then the teacher update: a class-balanced labeled batch (the
  `class_balanced` sampler: class uniform, then image uniform; `view`) and a partner batch
  (uniform over labeled + unlabeled images, `view`), both encoded by the teacher encoder; each
  labeled feature f_x is replaced, with probability (n_max - n_y) / n_max, by
  lam f_x + (1 - lam) f_u with lam ~ U(max_lam, 1), keeping its label; one soft-CE step of the
  teacher with its own optimizer (Adam `lr`, L2 `weight_decay` on the weight), then the EMA
  teacher (`ema`).
- After each step the teacher and the EMA teacher are copied into model head `head` and into
  the EMA model's head `head`, so the stage evaluates the EMA teacher on EMA features with
  `eval_head = head` (the authors' validate_teacher), and checkpoints and exports carry it.
  The stage must not train that head (`train = ["backbone", "heads.main"]`).

USB's behaviour (semilearn/imb_algorithms/cossl), as parameters:
- `labels = "usb"`: the pseudo-labels come from the student's own head `student_head` (USB's
  FixMatch labels; its teacher never supplies them);
- `mix = "usb"`: every sample mixes with the probability of class 0 (USB indexes the mixing
  probability by `label.argmax()` of a scalar label: class 0, the head class, probability 0,
  so its online TFE never mixes);
- `partner = "unlabeled"`: partners from the unlabeled images only;
- `optimizer = "sgd"`, `lr = 0.02`: USB's tfe_optimizer (SGD Nesterov, momentum 0.9);
  `warm_lr = 0.001`, `warm_iters = 1024`: its warm-up (Adam 1e-3 hard-coded, 10 x 1024).
  Not reproduced: USB also steps the teacher head with the main SGD (its parameters are part
  of the model), and starts CoSSL inside one cosine schedule (epoch 200 of 256).

Differences from the authors' code: index draws, augmentation and mixing come from the
component's own generators (checkpointed), so the numbers differ from the reference run while
the rule is the same; the partner batch is drawn by an endless shuffled stream; a class without
labeled images gets no synthetic features (the reference code fails there) and the ranked
partners wrap around when fewer than n_max - n_c exist; ties in the ranking keep the reference
order (stable sort). Under torchrun every rank draws the same teacher batch and the teacher's
gradient is averaged over ranks, so every rank holds the same teacher.

State (checkpointed): both heads, the teacher optimizer, the generators' states, the two index
streams' positions and whether the warm-up ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltframe import hookimpl
from ltframe.config import param
from ltframe.data.samplers import BatchStream
from ltframe.engine import dist
from ltframe.engine.context import PseudoLabels, StepContext
from ltframe.engine.forward import forward_no_grad
from ltframe.errors import LtframeError, RecipeError
from ltframe.recipe import channels_last_on
from ltframe.registry import Registry
from ltframe_imbssl.prior import require_unlabeled

KEY = "cossl"  # ctx.extras: {"teacher_loss": the step's teacher loss (detached)}
SMOKE_POOL = 256  # `ltframe run --smoke`: images per warm-up feature pass
SMOKE_BATCH = 16


@dataclass
class CosslParams:
    # model head that receives the teacher (model) and the EMA teacher (EMA model): evaluate it
    # with stage.eval_head; the stage must not train it
    head: str = "tfe"
    threshold: float = param(0.95, ge=0, le=1)  # mask: max teacher probability >= threshold
    labels: Literal["teacher", "usb"] = "teacher"  # authors: teacher(EMA feats); usb: student head
    student_head: str = param("main", ref="head")  # labels = "usb": the student's head
    mix: Literal["authors", "usb"] = "authors"  # usb: every sample with class 0's probability
    # online TFE: lam ~ U(max_lam, 1); 0.6 as the authors' run scripts (their argparse: 0.8)
    max_lam: float = param(0.6, ge=0, le=1)
    partner: Literal["all", "unlabeled"] = "all"  # authors: labeled + unlabeled; USB: unlabeled
    view: str = "strong"  # the stage view (by name) of the teacher batches and TFE's features
    weak_view: str = "weak"  # the stage view of TFE's labeled features and probabilities
    batch_size: int = param(0, ge=0, le=2**20)  # teacher batch; 0 = the stage's labeled batch
    optimizer: Literal["adam", "sgd"] = "adam"  # authors: Adam; USB: SGD (Nesterov)
    lr: float = param(0.002, gt=0)  # authors: the phase's lr 0.002; USB: 0.02
    momentum: float = param(0.9, ge=0, lt=1)  # sgd only
    weight_decay: float = param(5e-4, ge=0)  # L2 on the teacher's weight (not its bias)
    ema: float = param(0.999, ge=0, lt=1)  # EMA teacher decay (warm-up and training)
    warm_epochs: int = param(10, ge=0, le=100_000)  # TFE warm-up epochs (0: no warm-up)
    warm_iters: int = param(500, ge=1, le=10**8)  # batches per warm-up epoch (USB: 1024)
    warm_lr: float = param(0.002, gt=0)  # warm-up Adam lr (USB: 0.001)
    warm_batch: int = param(64, ge=1, le=2**20)
    beta: float = param(0.75, gt=0, le=1e6)  # TFE warm-up: lam ~ Beta(beta, beta)
    seed: int = param(0, ge=0, le=2**31)


# --- the rules, as pure functions (tests/test_imbssl_cossl.py) --------------------------------
def mix_probability(counts: Tensor) -> Tensor:
    """(n_max - n_c) / n_max per class (train_cifar_fix_cossl.py `tfe_prob`)."""
    n = counts.float()
    return (n.max() - n) / n.max().clamp_min(1.0)


def mix_features(fx: Tensor, fu: Tensor, prob: Tensor, u_mix: Tensor, u_lam: Tensor,
                 max_lam: float) -> Tensor:
    """Online TFE: row i becomes lam_i fx_i + (1 - lam_i) fu_i with lam_i = max_lam +
    (1 - max_lam) u_lam_i when u_mix_i < prob_i, else fx_i (uniforms given)."""
    lam = (max_lam + (1.0 - max_lam) * u_lam)[:, None]
    return torch.where((u_mix < prob)[:, None], lam * fx + (1.0 - lam) * fu, fx)


def imprint_weights(feats: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Weight imprinting: row c = normalised mean feature of class c (zero for a class
    without samples)."""
    sums = torch.zeros(num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels, feats)
    n = torch.bincount(labels, minlength=num_classes).clamp_min(1).to(feats.dtype)
    means = sums / n[:, None]
    return means / means.norm(dim=1, keepdim=True).clamp_min(1e-12)


def tfe_synthesize(feats_l: Tensor, labels_l: Tensor, probs_l: Tensor, feats_u: Tensor,
                   probs_u: Tensor, counts: list[int], rng: np.random.Generator,
                   beta: float = 0.75) -> tuple[Tensor, Tensor]:
    """TFE (tfe_init.py `TFE`): labeled features + for each class c with n_c < n_max,
    n_max - n_c synthetic features lam f_a + (1 - lam) f_b (target c); returns (features,
    int64 targets). `rng` draws, class by class, the anchors a (uniform over class c's labeled
    features, with replacement) and then lam ~ Beta(beta, beta)."""
    n_max = max(counts)
    labels_cpu = labels_l.cpu()
    per_class = [torch.nonzero(labels_cpu == c).flatten() for c in range(len(counts))]
    feats, targets = [feats_l], [labels_l.to(torch.long)]
    for c, n_c in enumerate(counts):
        own = per_class[c]
        if n_c >= n_max or own.numel() == 0:
            continue
        m = n_max - n_c
        others = torch.cat([per_class[k] for k in range(len(counts)) if k != c]).to(feats_l.device)
        pool = torch.cat([feats_l[others], feats_u])
        score = torch.cat([probs_l[others, c], probs_u[:, c]])
        order = torch.sort(score, descending=True, stable=True).indices
        a = torch.as_tensor(rng.integers(0, own.numel(), size=m)).to(feats_l.device)
        lam = torch.as_tensor(rng.beta(beta, beta, size=m), dtype=feats_l.dtype).to(feats_l.device)
        b = order[torch.arange(m, device=order.device) % order.numel()]
        anchors = feats_l[own.to(feats_l.device)[a]]
        feats.append(lam[:, None] * anchors + (1 - lam[:, None]) * pool[b])
        targets.append(torch.full((m,), c, dtype=torch.long, device=feats_l.device))
    return torch.cat(feats), torch.cat(targets)


Head = list[Tensor]  # a linear classifier [weight [C, D], bias [C]] (plain leaf tensors)


def init_head(in_features: int, num_classes: int, gen: torch.Generator, device: Any) -> Head:
    """A linear classifier with nn.Linear's default initial values (U(+-1/sqrt(in)) for the
    weight and the bias) drawn from `gen` (CPU); made on `device`, gradients on."""
    bound = 1.0 / math.sqrt(in_features)
    head = []
    for shape in ((num_classes, in_features), (num_classes,)):
        t = torch.empty(shape, device=device)
        with torch.no_grad():
            t.copy_(torch.rand(shape, generator=gen) * 2 * bound - bound)
        head.append(t.requires_grad_())
    return head


def _copy(head: Head) -> Head:
    return [t.detach().clone() for t in head]


def _optimizer(head: Head, kind: str, lr: float, weight_decay: float,
               momentum: float) -> torch.optim.Optimizer:
    groups = [{"params": [head[0]], "weight_decay": weight_decay},
              {"params": [head[1]], "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.Adam(groups, lr=lr)


@torch.no_grad()
def _ema_step(ema: Head, head: Head, decay: float) -> None:
    """The authors' WeightEMA (wd=False): ema = decay ema + (1 - decay) head."""
    torch._foreach_lerp_(ema, [t.detach() for t in head], 1.0 - decay)


def train_head(feats: Tensor, targets: Tensor, num_classes: int, epochs: int, iters: int,
               batch: int, lr: float, weight_decay: float, decay: float,
               gen: torch.Generator) -> tuple[Head, Head]:
    """The warm-up (tfe_init.py `classifier_warmup` / `classifier_train`): a fresh linear
    head and its EMA copy trained on (feats, targets) with Adam; each epoch is `iters`
    batches from fresh shuffles (the last, smaller batch of a pass dropped). `gen` (CPU)
    draws the initial values and the shuffles."""
    head = init_head(feats.shape[1], num_classes, gen, feats.device)
    ema = _copy(head)
    opt = _optimizer(head, "adam", lr, weight_decay, 0.0)
    n = feats.shape[0]
    batch = min(batch, n)
    per_pass = n // batch
    for _ in range(epochs):
        done = 0
        while done < iters:
            perm = torch.randperm(n, generator=gen)[: per_pass * batch].to(feats.device)
            for k in range(min(per_pass, iters - done)):
                idx = perm[k * batch:(k + 1) * batch]
                loss = F.cross_entropy(F.linear(feats[idx], *head), targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                _ema_step(ema, head, decay)
            done += per_pass
    return head, ema


def _optim_state(opt: torch.optim.Optimizer) -> dict:
    state = opt.state_dict()
    return {"state": {str(k): v for k, v in state["state"].items()},
            "param_groups": state["param_groups"]}


def _load_optim(opt: torch.optim.Optimizer, state: dict) -> None:
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})}
              for g in state["param_groups"]]
    opt.load_state_dict({"state": {int(k): v for k, v in state["state"].items()},
                         "param_groups": groups})


def _find_view(cfg: Any, name: str) -> Any:
    for spec in [*cfg.views.labeled, *cfg.views.unlabeled]:
        if spec.name == name:
            return spec
    return None


class CosslLabeler:
    """CoSSL's teacher: pseudo-labels, TFE warm-up and per-step update; see the module
    docstring."""

    def __init__(self, params: CosslParams, num_classes: int, class_counts: Tensor,
                 labeled_counts: Tensor | None = None, seed: int = 0,
                 device: torch.device | str | None = None,
                 unlabeled_index: Tensor | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        counts = labeled_counts if labeled_counts is not None else class_counts
        self.counts = [int(c) for c in counts.cpu().tolist()]
        self.device = torch.device(device) if device is not None else counts.device
        self.prob = mix_probability(counts.cpu()).to(self.device)
        self.seed = seed * 1_000_003 + params.seed
        self.unlabeled_index = unlabeled_index
        self.head: Head | None = None  # the teacher
        self.ema_head: Head | None = None  # the EMA teacher
        self.opt: torch.optim.Optimizer | None = None
        self.gen: torch.Generator | None = None  # per-step draws (augmentation, mixing)
        self.streams: dict[str, BatchStream] = {}
        self.warmed = False
        self._stash: dict[str, Any] = {}  # checkpointed parts that need the stage set up
        self._run: Any = None

    # --- set-up ---------------------------------------------------------------------------
    def preflight(self, info: Any) -> None:
        p, cfg = self.p, info.plan.cfg
        require_unlabeled(info, "pseudo_labeler 'cossl'")
        head = dict(info.model.heads.items()).get(p.head)
        if not isinstance(head, nn.Linear) or head.bias is None or head.out_features != info.num_classes:
            raise RecipeError(f"pseudo_labeler 'cossl': model.heads.{p.head} must be a linear head "
                              f"with a bias and one output per class; add {p.head} = "
                              "{ name = \"linear\" } under [model.heads]")
        path = f"heads.{p.head}"
        for t in cfg.train:
            if path == t or path.startswith(t + ".") or t.startswith(path + "."):
                raise RecipeError(f"pseudo_labeler 'cossl' trains {path} itself; leave it out of "
                                  f"the stage's train (e.g. train = [\"backbone\", \"heads.main\"])")
        if cfg.ema <= 0 and cfg.teacher != "start":
            raise RecipeError("pseudo_labeler 'cossl' works on the EMA model's features; set the "
                              "stage's ema (the authors: 0.999)")
        for field in ("view", "weak_view"):
            if _find_view(cfg, getattr(p, field)) is None:
                names = [s.name for s in [*cfg.views.labeled, *cfg.views.unlabeled]]
                raise RecipeError(f"pseudo_labeler 'cossl'.{field} = \"{getattr(p, field)}\" is not "
                                  f"one of the stage's views ({', '.join(names)}); name one of them")

    @hookimpl
    def ltframe_stage_start(self, run: Any, stage: Any) -> None:
        """Data, views, index streams and generator of the teacher batches; the TFE warm-up
        (a fresh stage only: a resumed one has its teacher from the checkpoint)."""
        p, cfg, d = self.p, stage.cfg, run.data
        self._run, self.device = run, run.device
        self.prob = self.prob.to(self.device)
        self.store, self.mean, self.std = d.train, d.source.mean, d.source.std
        self.lab_idx, self.lab_y = d.splits.labeled.cpu(), d.labeled_labels.cpu()
        if self.lab_idx.numel() == 0:
            raise RecipeError("pseudo_labeler 'cossl' needs labeled images for its teacher")
        unl = (self.unlabeled_index if self.unlabeled_index is not None else d.splits.unlabeled)
        self.unl_idx = unl.cpu()
        self.label_of = torch.full((len(d.train),), -1, dtype=torch.long)
        self.label_of[self.lab_idx] = self.lab_y
        self.views = {}
        for field in ("view", "weak_view"):
            spec = _find_view(cfg, getattr(p, field))
            view = run.registry.build(spec, mean=self.mean, std=self.std)
            if callable(getattr(view, "to", None)):
                view.to(self.device)
            self.views[field] = view
        cuda = self.device.type == "cuda"
        self.autocast = cuda and run.recipe.run.precision == "bf16"
        self.channels_last = channels_last_on(self.device, run.recipe.run)
        batch = p.batch_size or cfg.batch_size or run.recipe.data.batch_size
        self.batch = min(batch, SMOKE_BATCH) if run.smoke else batch
        reg, c = run.registry, self.num_classes
        sx = reg.build("class_balanced", kind="sampler", labels=self.lab_y, num_classes=c,
                       seed=self.seed + 1, rank=0, world_size=1)
        pool = torch.cat([self.lab_idx, self.unl_idx]) if p.partner == "all" else self.unl_idx
        su = reg.build("random", kind="sampler", labels=torch.full((pool.numel(),), -1),
                       num_classes=c, seed=self.seed + 2, rank=0, world_size=1)
        self.streams = {"x": BatchStream(sx, self.lab_idx, self.batch),
                        "u": BatchStream(su, pool, self.batch)}
        for k, s in self._stash.pop("streams", {}).items():
            self.streams[k].load_state_dict(s)
        self.gen = torch.Generator(device=self.device).manual_seed(self.seed + 3)
        if "gen" in self._stash:
            self.gen.set_state(self._stash.pop("gen").cpu())
        if self.head is not None:
            self._to(self.device)
        if not self.warmed:
            self._warm_up(run)
            self.warmed = True
        self._publish(run.model, None)

    def _to(self, device: torch.device) -> None:
        for t in [*self.head, *self.ema_head]:
            t.data = t.data.to(device)
        for state in self.opt.state.values():
            for k, v in state.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    state[k] = v.to(device)

    def _make_heads(self, in_features: int, device: Any) -> None:
        gen = torch.Generator().manual_seed(self.seed + 4)
        self.head = init_head(in_features, self.num_classes, gen, device)
        self.ema_head = _copy(self.head)
        self.opt = _optimizer(self.head, self.p.optimizer, self.p.lr, self.p.weight_decay,
                              self.p.momentum)

    def _images(self, idx: Tensor, view: Any) -> Tensor:
        x = view(self.store.get(idx), self.gen)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _features(self, model: nn.Module, idx: Tensor, view: Any, batch: int) -> Tensor:
        out = [forward_no_grad(model, self._images(idx[i:i + batch], view), False, self.autocast)[0]
               for i in range(0, idx.numel(), batch)]
        return torch.cat(out)

    def _warm_up(self, run: Any) -> None:
        """TFE warm-up with the model as the stage starts (= its EMA model then), eval mode."""
        p, model = self.p, run.model
        self._make_heads(model.num_features, self.device)
        if p.warm_epochs == 0:
            return
        lab, unl = self.lab_idx, self.unl_idx
        if run.smoke:
            lab, unl = lab[:SMOKE_POOL], unl[:SMOKE_POOL]
        y = self.label_of[lab].to(self.device)
        bs = run.recipe.eval.batch_size
        weak, strong = self.views["weak_view"], self.views["view"]
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            w = imprint_weights(self._features(model, lab, weak, bs), y, self.num_classes)
            f_l = self._features(model, lab, weak, bs)
            f_u = (self._features(model, unl, strong, bs) if unl.numel()
                   else f_l.new_zeros(0, f_l.shape[1]))
            p_u = ((self._features(model, unl, weak, bs) @ w.T).softmax(1) if unl.numel()
                   else f_l.new_zeros(0, self.num_classes))
        finally:
            for m, mode in modes:
                m.training = mode
        counts = [int(n) for n in torch.bincount(y.cpu(), minlength=self.num_classes)]
        rng = np.random.default_rng(self.seed + 5)
        feats, targets = tfe_synthesize(f_l, y, (f_l @ w.T).softmax(1), f_u, p_u, counts, rng,
                                        p.beta)
        iters = min(p.warm_iters, 2) if run.smoke else p.warm_iters
        gen = torch.Generator().manual_seed(self.seed + 6)
        head, ema = train_head(feats, targets, self.num_classes, p.warm_epochs, iters,
                               p.warm_batch, p.warm_lr, p.weight_decay, p.ema, gen)
        with torch.no_grad():
            torch._foreach_copy_([*self.head, *self.ema_head], [*head, *ema])
            if dist.world_size() > 1:  # ranks' BatchNorm statistics differ: one mean teacher
                for t in [*self.head, *self.ema_head]:
                    t.copy_(dist.all_sum(t) / dist.world_size())

    # --- every step -----------------------------------------------------------------------
    def __call__(self, ctx: StepContext) -> PseudoLabels:
        p = self.p
        if p.labels == "usb":
            logits = ctx.logits("unlabeled", p.student_head).detach().float()
        else:
            feats = ctx.teacher_features("unlabeled")
            if self.head is None:  # a hand-made context (no stage): an untrained teacher
                if ctx.steps_per_epoch > 0:
                    raise LtframeError("pseudo_labeler 'cossl' was not set up: its stage never "
                                       "started (ltframe_stage_start)")
                self._make_heads(feats.shape[1], feats.device)
            with torch.no_grad():
                logits = F.linear(feats, *self.head)
        conf, label = logits.softmax(1).max(1)
        out = PseudoLabels(label, (conf >= p.threshold).float())
        if self._run is not None:
            ctx.extras[KEY] = {"teacher_loss": self._update(ctx)}
        return out

    @torch.compiler.disable
    def _update(self, ctx: StepContext) -> Tensor:
        """One teacher step (train_cifar_fix_cossl.py `train`, after the pseudo-labels)."""
        p, dev = self.p, self.device
        ix, iu = self.streams["x"].next(), self.streams["u"].next()
        y = self.label_of[ix]
        y = (y.pin_memory() if dev.type == "cuda" else y).to(dev, non_blocking=True)
        feats = ctx.teacher_forward(self._images(torch.cat([ix, iu]), self.views["view"]))[0]
        fx, fu = feats[: ix.numel()], feats[ix.numel():]
        u = torch.rand(2, ix.numel(), generator=self.gen, device=dev)
        prob = self.prob[y] if p.mix == "authors" else self.prob[0].expand(ix.numel())
        f = mix_features(fx, fu, prob, u[0], u[1], p.max_lam)
        with torch.enable_grad():
            loss = F.cross_entropy(F.linear(f, *self.head), y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        if dist.world_size() > 1:  # the same teacher on every rank
            for t in self.head:
                t.grad = dist.all_sum(t.grad) / dist.world_size()
        self.opt.step()
        _ema_step(self.ema_head, self.head, p.ema)
        return loss.detach()

    @hookimpl
    def ltframe_step_end(self, run: Any, stage: Any, step: int, ctx: Any) -> None:
        if self.head is not None and ctx is not None:
            self._publish(ctx.model, ctx.teacher_model)

    @torch.no_grad()
    def _publish(self, model: Any, teacher: Any) -> None:
        """The teacher into the model's head, the EMA teacher into the EMA model's head."""
        for module, src in ((model, self.head), (teacher, self.ema_head)):
            if module is None or self.p.head not in getattr(module, "heads", {}):
                continue
            dst = module.heads[self.p.head]
            torch._foreach_copy_([dst.weight, dst.bias], [t.detach() for t in src])

    # --- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state: dict[str, Any] = {"warmed": self.warmed}
        if self.head is not None:
            state["head"] = {"weight": self.head[0].detach().clone(),
                             "bias": self.head[1].detach().clone()}
            state["ema_head"] = {"weight": self.ema_head[0].clone(),
                                 "bias": self.ema_head[1].clone()}
            state["optim"] = _optim_state(self.opt)
        if self.gen is not None:
            state["gen"] = self.gen.get_state()
        elif "gen" in self._stash:
            state["gen"] = self._stash["gen"]
        if self.streams:
            state["streams"] = {k: s.state_dict() for k, s in self.streams.items()}
        elif "streams" in self._stash:
            state["streams"] = self._stash["streams"]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.warmed = bool(state.get("warmed", False))
        if "head" in state:
            w = state["head"]["weight"]
            if tuple(w.shape)[0] != self.num_classes:
                raise LtframeError(f"pseudo_labeler 'cossl': the saved teacher has {w.shape[0]} "
                                   f"classes, this run {self.num_classes}; resume with the recipe "
                                   "the run started")
            self._make_heads(w.shape[1], self.device)
            with torch.no_grad():
                for dst, src in ((self.head, state["head"]), (self.ema_head, state["ema_head"])):
                    dst[0].copy_(src["weight"])
                    dst[1].copy_(src["bias"])
            _load_optim(self.opt, state["optim"])
        if "gen" in state:
            if self.gen is not None:
                self.gen.set_state(state["gen"].cpu())
            else:
                self._stash["gen"] = state["gen"].clone()
        if "streams" in state:
            if self.streams:
                for k, s in state["streams"].items():
                    self.streams[k].load_state_dict(s)
            else:
                self._stash["streams"] = state["streams"]


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "cossl", CosslLabeler, CosslParams)
