"""DARP, distribution aligning refinery of pseudo-labels (Kim et al., NeurIPS 2020,
"Distribution Aligning Refinery of Pseudo-label for Imbalanced Semi-supervised Learning";
bbuing9/DARP common.py estimate_pseudo / opt_solver and training_functions.py train_fix).

Pseudo-labeler `darp` for FixMatch (the `fixmatch` loss). State: P, the latest weak-view
softmax of every sample of the stage's unlabeled pool (written at its row each step; uniform at
first), and Q, the last refined matrix (uniform at first). After `warmup` epochs (0-based epoch
> warmup, the authors' `epoch > args.warm`), every `every` batches (the batch index within the
epoch, `batch_idx % num_iter == 0`) the whole pool is refined:

1. target column sums c: the labeled class proportions x N_u (`target = "labeled"`), a given
   distribution x N_u (`target = "given"`, `target_dist`: the authors' `--est` loads a BBSE
   estimate saved by train_base_estim.py; the same numbers go here), or a BBSE estimate made
   during the run (`target = "bbse"`, below);
2. prune: per class j, the floor(alpha * c_j) rows with the largest P_ij keep P_ij scaled by
   (c_j + 1e-6) / (their sum + 1e-6), the rest 0; + 1e-6, rows renormalised;
3. solve min sum_i w_i KL(q_i || p~_i) with rows summing to 1 and columns to c, w_i =
   1 / H(p~_i): q_ij = (p~_ij / e) x_i exp(-nu_j / w_i); T = `iters` alternations of the row
   normalisation x_i and, per class, scipy's secant method for nu_j (optimize.newton without a
   derivative: at most `newton_steps` steps, absolute tolerance `tol`, started from the last nu;
   a class that does not converge keeps its last iterate where scipy would raise);
4. Q = the solution; the batch uses its rows, and the rows of the last Q until the next
   refinement. Labels argmax Q_i, mask [max Q_i >= threshold] (`mask = "refined"`).

Before the warm-up ends it is FixMatch (labels and mask from the softmax). The CIFAR-100 / STL
scripts use every = 100, iters = 20 and tol 0.3.

`target = "bbse"`: black-box shift estimation as train_base_estim.py (`estimate_q_y`,
`confusion`) computes it. At the end of every 0-based epoch e with bbse_from <= e <= warmup the
engine's `epoch_pool` pass gives the training model's (eval mode) softmax on the held-out labeled
`val` split (data.val_per_class; the authors' num_val 10) and on the unlabeled split. The soft
confusion matrix M[k, i] = mean over val samples of class i of p_k (columns normalised), q~ = the
sum of the unlabeled softmax, and the estimate is M^-1 q~; it is accepted when no entry is < 0 and
cond(M) (2-norm) < `bbse_cond` (th_cond 100), and c = N_u x (mean of the accepted estimates) /
its sum. Until one is accepted c stays the labeled proportions. The authors estimate offline
with a separate supervised model (labeled data only, 200 epochs, every epoch's accepted estimate
averaged) and train DARP with the saved numbers; here the estimate comes from the DARP stage's
own model during its warm-up (no second training run). For their numbers: `target = "given"`.
State: the sum and count of accepted estimates, the last estimate and its condition number.

USB (semilearn/imb_algorithms/darp/darp.py): `mask = "usb"` thresholds the unrefined softmax
(FixMatch's masking runs before DARP's label hook); `schedule = "global"` refines at the global
step (it % 10) rather than the batch index in the epoch; USB never estimates c and uses tol 0.1
everywhere. Under torchrun every rank writes the whole global batch into P, so P and Q agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PoolPredictions, PseudoLabels, StepContext
from ltframe.engine.dist import gather_batch
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_imbssl.prior import load_like, require_unlabeled
from ltframe_ssl.common import state_device


@dataclass
class DarpParams:
    threshold: float = param(0.95, ge=0, le=1)  # FixMatch's tau
    warmup: int = param(200, ge=0, le=10**6)  # refine when the 0-based epoch > warmup (run.sh: 200)
    every: int = param(10, ge=1, le=10**6)  # refine every this many batches (num_iter)
    alpha: float = param(2.0, ge=0, le=1000)  # prune: keep floor(alpha * c_j) rows per class
    iters: int = param(10, ge=1, le=1000)  # T, alternations of the solver (iter_T)
    newton_steps: int = param(30, ge=1, le=1000)  # secant steps per class and alternation
    tol: float = param(0.1, gt=0, le=100)  # secant tolerance on nu (CIFAR-100 / STL: 0.3)
    # column sums: labeled proportions, target_dist, or a BBSE estimate made in the warm-up
    target: Literal["labeled", "given", "bbse"] = "labeled"
    # target = "given": one weight per class, in class-index order (normalised, x N_u)
    target_dist: list[float] = param(factory=list, ge=0)
    bbse_from: int = param(0, ge=0, le=10**6)  # bbse: estimates after 0-based epochs from..warmup
    bbse_cond: float = param(100.0, gt=1, le=1e12)  # bbse: accept when cond(M) < this (th_cond)
    mask: Literal["refined", "usb"] = "refined"  # the mask from the refined rows, or USB's unrefined
    schedule: Literal["epoch", "global"] = "epoch"  # batch index in the epoch (authors) or global step (USB)
    part: str = param("unlabeled", ref="part")  # the weak view
    head: str = "main"


def prune(probs: Tensor, target: Tensor, alpha: float) -> Tensor:
    """estimate_pseudo + the rescaling of train_fix: rows [N, C] -> p~ [N, C] (no host sync)."""
    n = probs.shape[0]
    k = torch.floor(alpha * target)  # int(alpha * q_y[i])
    values, order = probs.sort(dim=0, descending=True)
    keep = (torch.arange(n, device=probs.device, dtype=target.dtype)[:, None] < k[None, :])
    keep = keep.to(probs.dtype)
    chosen = torch.zeros_like(probs).scatter_(0, order, keep)
    kprob = (values * keep).sum(0)
    scale = (target.to(probs.dtype) + 1e-6) / (kprob + 1e-6)
    out = probs * chosen * scale + 1e-6
    return out / out.sum(1, keepdim=True)


def _secant(func, x0: Tensor, tol: float, maxiter: int) -> Tensor:
    """scipy.optimize.newton without fprime (the secant method), elementwise on x0 [K] with a
    fixed number of steps and per-element convergence (no host sync)."""
    eps = 1e-4
    p0 = x0
    p1 = x0 * (1 + eps)
    p1 = p1 + torch.where(p1 >= 0, eps, -eps)
    q0, q1 = func(p0), func(p1)
    swap = q1.abs() < q0.abs()
    p0, p1 = torch.where(swap, p1, p0), torch.where(swap, p0, p1)
    q0, q1 = torch.where(swap, q1, q0), torch.where(swap, q0, q1)
    done = torch.zeros_like(x0, dtype=torch.bool)
    result = p1
    for _ in range(maxiter):
        same = q1 == q0
        a = (-q0 / q1 * p1 + p0) / (1 - q0 / q1)
        b = (-q1 / q0 * p0 + p1) / (1 - q1 / q0)
        p = torch.where(q1.abs() > q0.abs(), a, b)
        p = torch.where(same, (p1 + p0) / 2, p)
        conv = same | ((p - p1).abs() <= tol)
        result = torch.where(done, result, p)
        done = done | conv
        p0, q0 = torch.where(done, p0, p1), torch.where(done, q0, q1)
        p1 = torch.where(done, p1, p)
        q1 = torch.where(done, q1, func(p1))
    return result


def solve(probs: Tensor, target: Tensor, iters: int = 10, tol: float = 0.1,
          newton_steps: int = 30) -> Tensor:
    """opt_solver: the refined [N, C] (float64) with rows summing to 1 and columns ~ target."""
    a = probs.double()
    c = target.double()
    w = 1.0 / (-(a * torch.log(a + 1e-6)).sum(1))  # 1 / entropy
    a_e = a / math.e
    y = torch.exp(-1.0 / w)[:, None].expand_as(a)  # nu = 1 at the start
    nu = torch.zeros_like(c)
    for _ in range(iters):
        x = 1.0 / (a_e * y).sum(1)

        def column_sums(v: Tensor, x: Tensor = x) -> Tensor:
            return (a_e * x[:, None] * torch.exp(-v[None, :] / w[:, None])).sum(0) - c

        nu = _secant(column_sums, nu, tol, newton_steps)
        y = torch.exp(-nu[None, :] / w[:, None])
    x = 1.0 / (a_e * y).sum(1)
    return a_e * x[:, None] * y


def refine(probs: Tensor, target: Tensor, alpha: float = 2.0, iters: int = 10, tol: float = 0.1,
           newton_steps: int = 30) -> Tensor:
    """One DARP refinement of the pool's softmax [N, C] toward column sums `target` [C]."""
    return solve(prune(probs, target, alpha), target, iters, tol, newton_steps).float()


def soft_confusion(probs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """M[k, i] = mean of p_k over the samples of class i (train_base_estim.py `confusion` with
    its columns normalised), float64 [C, C]; a class without samples has a NaN column."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=probs.device)
    conf.index_add_(1, labels, probs.double().t())
    return conf / conf.sum(0, keepdim=True)


def bbse_estimate(conf: Tensor, unlabeled_probs: Tensor) -> tuple[Tensor, float]:
    """(M^-1 q~ with q~ the summed unlabeled softmax, float64 [C]; cond(M), 2-norm); a matrix
    that is not finite (a class without val samples) gives zeros and cond inf, a singular one
    zeros (rejected by any bbse_cond)."""
    none = torch.zeros(conf.shape[0], dtype=torch.float64, device=conf.device), math.inf
    if not bool(torch.isfinite(conf).all()):
        return none
    cond = float(torch.linalg.cond(conf))
    if not math.isfinite(cond):
        return none
    try:
        return torch.linalg.solve(conf, unlabeled_probs.double().sum(0)), cond
    except torch.linalg.LinAlgError:  # numerically singular
        return none[0], cond


class Darp:
    """DARP-refined FixMatch pseudo-labels over the stage's unlabeled pool."""

    def __init__(self, params: DarpParams, num_classes: int,
                 unlabeled_index: Tensor | None = None, num_samples: int = 0,
                 labeled_counts: Tensor | None = None, class_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        counts = labeled_counts if labeled_counts is not None else class_counts
        dev = state_device(device, counts)
        # the engine passes the stage's unlabeled pool; without it every sample has a row
        pool = (unlabeled_index if unlabeled_index is not None
                else torch.arange(num_samples)).to(dev)
        self.n = pool.numel()
        # dataset index -> row of P / Q (-1: not in the pool)
        size = max(num_samples, int(pool.max()) + 1 if self.n else 0)
        self.row = torch.full((size,), -1, dtype=torch.long, device=dev)
        self.row[pool] = torch.arange(self.n, device=dev)
        self.target = self._target(counts, dev)
        self.labeled_target = self.target.clone()
        uniform = torch.full((self.n, num_classes), 1.0 / num_classes, device=dev)
        self.P, self.Q = uniform, uniform.clone()
        self.epoch = -1
        self.epoch_step = 0  # the stage step at which the current epoch began
        # BBSE (target = "bbse"): the engine's epoch_pool pass on the val and unlabeled splits
        self.pool_splits = ("val", "unlabeled") if params.target == "bbse" else ("unlabeled",)
        self.pool_head = params.head
        self.bbse_sum = torch.zeros(num_classes, dtype=torch.float64)  # accepted estimates
        self.bbse_n = 0
        self.bbse_last = torch.zeros(num_classes, dtype=torch.float64)  # 0: none (yet)
        self.bbse_last_cond = math.inf
        self._val_conf: tuple[int, Tensor] | None = None  # (epoch, M) between the two calls

    @property
    def pool_model(self) -> str | None:
        """"model" while BBSE estimates are made (the end of epochs bbse_from..warmup), else None:
        no pool pass."""
        p = self.p
        return "model" if p.target == "bbse" and p.bbse_from <= self.epoch <= p.warmup else None

    def epoch_pool(self, pool: PoolPredictions, epoch: int) -> None:
        """BBSE at the end of `epoch`: the val split's soft confusion matrix, then the estimate
        from the unlabeled split's predictions (the calls come in that order)."""
        p = self.p
        if p.target != "bbse" or not p.bbse_from <= epoch <= p.warmup:
            return
        if pool.split == "val":
            if pool.labels is None:
                raise LtframeError("pseudo_labeler 'darp': the val predictions came without labels")
            self._val_conf = (epoch, soft_confusion(pool.probs, pool.labels, self.num_classes))
            return
        if self._val_conf is None or self._val_conf[0] != epoch:
            return
        est, cond = bbse_estimate(self._val_conf[1], pool.probs)
        self._val_conf = None
        self.bbse_last, self.bbse_last_cond = est, cond
        if cond < p.bbse_cond and bool((est >= 0).all()):
            self.bbse_sum = self.bbse_sum + est
            self.bbse_n += 1
            self._set_bbse_target()

    def _set_bbse_target(self) -> None:
        """c = N_u x normalised mean of the accepted estimates (the labeled proportions before)."""
        if self.bbse_n == 0 or float(self.bbse_sum.sum()) <= 0:
            self.target = self.labeled_target.clone()
            return
        mean = self.bbse_sum / self.bbse_n
        self.target = (mean / mean.sum() * self.n).float().to(self.target.device)

    def _target(self, counts: Tensor | None, dev: torch.device) -> Tensor:
        if self.p.target == "given":
            dist = self.p.target_dist
            if len(dist) != self.num_classes or sum(dist) <= 0:
                raise LtframeError(f"pseudo_labeler 'darp': target = \"given\" needs target_dist "
                                   f"with {self.num_classes} non-negative numbers (not all 0), "
                                   f"got {len(dist)}; e.g. the authors' estimation/*.npy values")
            prop = torch.tensor(dist, dtype=torch.float64)
        else:
            if counts is None:
                raise LtframeError("pseudo_labeler 'darp' needs the labeled class counts")
            prop = counts.detach().double().cpu()
        return (prop / prop.sum() * self.n).float().to(dev)  # c = proportions x N_u

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "pseudo_labeler 'darp'")
        if self.n == 0:
            raise LtframeError("pseudo_labeler 'darp' refines the pseudo-labels of the unlabeled "
                               "pool but the stage's pool is empty; give data.split unlabeled "
                               "samples (e.g. name = \"counts\" with unlabeled_head > 0)")
        if self.n < self.num_classes:
            raise LtframeError(f"pseudo_labeler 'darp': the unlabeled pool has {self.n} samples, "
                               f"fewer than the {self.num_classes} classes it must spread them "
                               "over; use a larger unlabeled split")

    def _to(self, device: torch.device) -> None:
        if self.P.device != device:
            for name in ("P", "Q", "row", "target", "labeled_target"):
                setattr(self, name, getattr(self, name).to(device))

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        logits = ctx.logits(self.p.part, self.p.head).detach().float()
        self._to(logits.device)
        probs = torch.softmax(logits, dim=1)
        if ctx.epoch != self.epoch:
            self.epoch, self.epoch_step = ctx.epoch, ctx.step
        rows = self.row[ctx.indices(self.p.part)]
        self.P[gather_batch(rows)] = gather_batch(probs)
        if ctx.epoch <= self.p.warmup:
            conf, pred = probs.max(1)
            return PseudoLabels(pred, (conf >= self.p.threshold).float())
        batch = ctx.step - self.epoch_step if self.p.schedule == "epoch" else ctx.step
        if batch % self.p.every == 0:
            self.Q = refine(self.P, self.target, self.p.alpha, self.p.iters, self.p.tol,
                            self.p.newton_steps)
        refined = self.Q[rows]
        conf, pred = refined.max(1)
        if self.p.mask == "usb":
            conf = probs.max(1).values
        return PseudoLabels(pred, (conf >= self.p.threshold).float())

    def state_dict(self) -> dict[str, Tensor]:
        state = {"P": self.P.clone(), "Q": self.Q.clone(),
                 "epoch": torch.tensor(self.epoch, dtype=torch.long),
                 "epoch_step": torch.tensor(self.epoch_step, dtype=torch.long)}
        if self.p.target == "bbse":
            state.update({"bbse_sum": self.bbse_sum.clone(),
                          "bbse_n": torch.tensor(self.bbse_n, dtype=torch.long),
                          "bbse_last": self.bbse_last.clone(),
                          "bbse_last_cond": torch.tensor(self.bbse_last_cond, dtype=torch.float64)})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        who = "pseudo_labeler 'darp'"
        self.P = load_like(state, "P", self.P, who)
        self.Q = load_like(state, "Q", self.Q, who)
        self.epoch = int(state["epoch"])
        self.epoch_step = int(state["epoch_step"])
        if self.p.target == "bbse":
            if "bbse_sum" not in state:
                raise LtframeError(f"{who}: the checkpoint has no BBSE estimate (it was saved with "
                                   "another target); resume with the recipe the run started")
            self.bbse_sum = load_like(state, "bbse_sum", self.bbse_sum, who)
            self.bbse_n = int(state["bbse_n"])
            self.bbse_last = load_like(state, "bbse_last", self.bbse_last, who)
            self.bbse_last_cond = float(state["bbse_last_cond"])
            self._set_bbse_target()


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "darp", Darp, DarpParams)
