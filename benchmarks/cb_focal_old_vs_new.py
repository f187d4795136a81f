"""CB-focal loss value: the old ltframe formula against the LDAM-DRW reference form.

old: l_i = w_y (1 - p_i)^gamma CE_i with p_i = exp(-CE_i), summed and divided by sum_i w_{y_i}
     (the weight outside the focal factor and PyTorch's weighted mean; ltframe before the fix).
new: ce_w = w_y CE_i, p_i = exp(-ce_w), loss = mean_i (1 - p_i)^gamma ce_w
     (kaidic/LDAM-DRW losses.py FocalLoss / focal_loss; the `focal` loss with reweight = "cb").

Class counts: CIFAR-10-LT, exp profile, ratio 100 (ltframe.data.longtail.profile_counts);
w = CB weights, beta 0.9999, summing to C; gamma = 1; batches of 128 drawn instance-wise.
Cases: random Gaussian logits, and a small MLP briefly trained with plain CE on synthetic
Gaussian-cluster features with the same class counts (CPU, a few seconds). Prints numbers only.

    .venv/bin/python benchmarks/cb_focal_old_vs_new.py
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.data.longtail import ProfileCfg, profile_counts
from ltframe.engine.context import StepContext
from ltframe.plugins import make_plugin_manager
from ltframe_classics.losses import cb_weights


def old_cb_focal(logits: Tensor, y: Tensor, w: Tensor, gamma: float) -> Tensor:
    ce = F.cross_entropy(logits, y, reduction="none")
    loss = (1 - torch.exp(-ce)) ** gamma * ce * w[y]
    return loss.sum() / w[y].sum()


def new_cb_focal_by_formula(logits: Tensor, y: Tensor, w: Tensor, gamma: float) -> Tensor:
    ce_w = w[y] * F.cross_entropy(logits, y, reduction="none")
    return ((1 - torch.exp(-ce_w)) ** gamma * ce_w).mean()


def make_plugin_loss(counts: Tensor, gamma: float):
    registry = make_plugin_manager()[1]
    spec = registry.spec("loss", {"name": "focal", "gamma": gamma, "reweight": "cb"}, "loss")
    loss = registry.build(spec, num_classes=counts.numel(), class_counts=counts)

    def call(logits: Tensor, y: Tensor) -> Tensor:
        ctx = StepContext(step=0, epoch=0, num_classes=logits.shape[1], class_counts=counts,
                          targets=y, features_by_part={"labeled": logits},
                          logits_by_part={"labeled": {"main": logits}})
        return loss(ctx)

    return call


def batches(labels: Tensor, batch: int, n: int, gen: torch.Generator) -> list[Tensor]:
    return [torch.randint(0, labels.numel(), (batch,), generator=gen) for _ in range(n)]


def report(name: str, rows: list[tuple[float, float, float]]) -> None:
    t = torch.tensor(rows, dtype=torch.float64)
    old, new, plugin = t.mean(0).tolist()
    ratios = t[:, 0] / t[:, 1]
    print(f"{name:<34}{old:>10.4f}{new:>10.4f}{plugin:>10.4f}{old / new:>9.2f}"
          f"{ratios.min().item():>8.2f}{ratios.max().item():>8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--train-epochs", type=int, nargs="*", default=[1, 3, 10])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    counts_list = profile_counts(ProfileCfg(name="exp", ratio=100), 10, 5000)
    counts = torch.tensor(counts_list)
    w = cb_weights(counts, 0.9999)
    labels = torch.repeat_interleave(torch.arange(10), counts)
    plugin = make_plugin_loss(counts, args.gamma)
    print(f"class counts {counts_list} (N = {labels.numel()})")
    print("CB weights (beta 0.9999, sum C): " + " ".join(f"{v:.3f}" for v in w.tolist()))
    print(f"gamma {args.gamma}, {args.batches} instance-sampled batches of 128; mean over batches\n")
    print(f"{'case':<34}{'old':>10}{'new':>10}{'plugin':>10}{'old/new':>9}{'min':>8}{'max':>8}")

    def evaluate(name: str, logits_of) -> None:
        rows = []
        for idx in batches(labels, 128, args.batches, gen):
            z, y = logits_of(idx), labels[idx]
            rows.append((old_cb_focal(z, y, w, args.gamma).item(),
                         new_cb_focal_by_formula(z, y, w, args.gamma).item(),
                         plugin(z, y).item()))
        report(name, rows)

    for sigma in (1.0, 3.0):
        evaluate(f"random logits N(0, {sigma:g}^2)",
                 lambda idx, s=sigma: s * torch.randn(idx.numel(), 10, generator=gen))

    # briefly trained model: 2-layer MLP on 32-d Gaussian clusters (overlapping), plain CE
    centres = 0.3 * torch.randn(10, 32, generator=gen)
    feats = centres[labels] + torch.randn(labels.numel(), 32, generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    done, t0 = 0, time.perf_counter()
    for target in sorted(args.train_epochs):
        while done < target:
            for idx in torch.randperm(labels.numel(), generator=gen).split(128):
                loss = F.cross_entropy(model(feats[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            done += 1
        with torch.no_grad():
            acc = (model(feats).argmax(1) == labels).double()
            per_class = torch.stack([acc[labels == c].mean() for c in range(10)])
            evaluate(f"MLP, CE {done:>2} ep (bal. acc {100 * per_class.mean().item():4.1f}%)",
                     lambda idx: model(feats[idx]))
    print(f"\ntraining time {time.perf_counter() - t0:.1f}s; old/new = ratio of the batch means, "
          "min/max over batches; 'plugin' is ltframe's focal loss with reweight = \"cb\"")


if __name__ == "__main__":
    main()
