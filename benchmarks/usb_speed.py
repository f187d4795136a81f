"""USB (PyPI `semilearn` 0.3.2) on the workloads of benchmarks/speed.py, for the side-by-side
table. Runs in the separate environment that benchmarks/setup_usb.sh makes:

    bash benchmarks/setup_usb.sh
    .venv-usb/bin/python benchmarks/usb_speed.py --steps 20 --warmup 3 --json usb.json
    .venv/bin/python benchmarks/speed.py --usb usb.json      # the table with ltframe/USB ratios

USB is used as shipped (config/classic_cv/fixmatch/fixmatch_cifar10_*.yaml: WRN-28-2, 64
labeled + 7 x 64 unlabeled, SGD 0.03, EMA 0.999, use_cat, fp32, its torchvision/PIL transforms
with RandAugment(3, 5), DataLoader workers 1 labeled / 2 unlabeled) on the same CIFAR-10-LT
split sizes (labeled 1500 ... 15, unlabeled 3000 ... 30, ratio 100): `fixmatch` and its
`fullysupervised` step (WRN-28-2, batch 128; USB has no ResNet-32). USB has no BMB and its
CReST labelling pass is not a separate step, so (c) and (d) have no USB column.

Two shims, both outside the timed work: the dataset is handed over in memory (USB's own
get_dataset downloads CIFAR), and on a machine without CUDA the batch stays on the CPU
(USB's process_batch calls .cuda()) and the CUDA-event timer hook is left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]


def lt_counts(head: int, ratio: float, classes: int = 10) -> list[int]:
    return [int(head * ratio ** (-i / (classes - 1))) for i in range(classes)]


def images(counts: list[int], root: str | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HWC images per class: the real CIFAR-10 JPEG export under `root`, or random."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    if root:
        from PIL import Image

        classes = sorted(p.name for p in (Path(root) / "train").iterdir())
        for c, n in enumerate(counts):
            files = sorted((Path(root) / "train" / classes[c]).iterdir())[:n]
            xs += [np.asarray(Image.open(f).convert("RGB")) for f in files]
            ys += [c] * len(files)
        return np.stack(xs), np.array(ys)
    for c, n in enumerate(counts):
        xs.append(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        ys += [c] * n
    return np.concatenate(xs), np.array(ys)


def datasets(alg: str, root: str | None) -> dict[str, Any]:
    from semilearn import BasicDataset
    from semilearn.datasets.augmentation import RandAugment
    from torchvision import transforms

    weak = transforms.Compose([transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])
    strong = transforms.Compose([transforms.RandomCrop(32, padding=4, padding_mode="reflect"),
                                 transforms.RandomHorizontalFlip(), RandAugment(3, 5),
                                 transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    val = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    xl, yl = images(lt_counts(1500, 100), root, 0)
    xu, yu = images(lt_counts(3000, 100), root, 1)
    xt, yt = images([20] * 10, None, 2)
    return {"train_lb": BasicDataset(alg, xl, yl, 10, weak, False, strong, False),
            "train_ulb": BasicDataset(alg, xu, yu, 10, weak, True, strong, False),
            "eval": BasicDataset(alg, xt, yt, 10, val, False, None, False), "test": None}


def config(workload: str, total: int, workers: int, tmp: str, cuda: bool) -> Any:
    from semilearn import get_config

    semi = workload == "fixmatch"
    return get_config({
        "algorithm": "fixmatch" if semi else "fullysupervised", "net": "wrn_28_2",
        "net_from_name": False, "use_pretrain": False, "pretrain_path": "",
        "epoch": 1, "num_train_iter": total + 1,  # never reached (Done)
        "num_eval_iter": 10 ** 9,
        "num_log_iter": 10 ** 9, "num_labels": sum(lt_counts(1500, 100)),
        "batch_size": 64 if semi else 128, "eval_batch_size": 256, "uratio": 7,
        "hard_label": True, "T": 0.5, "p_cutoff": 0.95, "ulb_loss_ratio": 1.0, "ema_m": 0.999,
        "crop_ratio": 0.875, "img_size": 32, "optim": "SGD", "lr": 0.03, "momentum": 0.9,
        "weight_decay": 5e-4, "layer_decay": 1.0, "amp": False, "clip": 0.0, "use_cat": True,
        "dataset": "cifar10", "num_classes": 10, "data_dir": tmp, "train_sampler": "RandomSampler",
        "num_workers": workers, "seed": 0, "world_size": 1, "rank": 0, "distributed": False,
        "multiprocessing_distributed": False, "gpu": 0 if cuda else None,
        "save_dir": tmp, "save_name": "usb_bench", "overwrite": True, "resume": False,
        "use_tensorboard": False, "use_wandb": False, "use_aim": False,
    })


def run(workload: str, steps: int, warmup: int, workers: int, root: str | None) -> dict:
    from semilearn.algorithms import name2alg
    from semilearn.core.hooks import Hook, TimerHook
    from semilearn.core.utils import get_net_builder

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    marks: dict[str, float] = {}
    total = warmup + steps
    per_step = 64 + 2 * 448 if workload == "fixmatch" else 128

    class Done(Exception):
        pass

    class Clock(Hook):
        def before_run(self, algorithm: Any) -> None:
            marks["start"] = time.perf_counter()

        def after_train_step(self, algorithm: Any) -> None:
            done = algorithm.it + 1
            if done in (warmup, total):
                if cuda:
                    torch.cuda.synchronize()
                marks["warm" if done == warmup else "end"] = time.perf_counter()
            if done == total:
                raise Done  # stop before USB's end-of-training evaluation and checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        args = config(workload, total, workers, tmp, cuda)
        base = name2alg[args.algorithm]

        class Bench(base):  # type: ignore[misc, valid-type]
            def set_dataset(self) -> dict:
                d = datasets(self.algorithm, root)
                self.args.ulb_dest_len, self.args.lb_dest_len = len(d["train_ulb"]), len(d["train_lb"])
                return d

            def process_batch(self, input_args: Any = None, **kwargs: Any) -> dict:
                if cuda:
                    return super().process_batch(input_args, **kwargs)
                from inspect import signature

                names = list(signature(self.train_step).parameters)
                return {k: v for k, v in kwargs.items() if k in names and v is not None}

            def set_hooks(self) -> None:
                super().set_hooks()
                if not cuda:  # CUDA events
                    self._hooks = [h for h in self._hooks if not isinstance(h, TimerHook)]
                    self.hooks_dict.pop("TimerHook", None)
                self.register_hook(Clock(), "BenchClock", "LOWEST")

        t0 = time.perf_counter()
        alg = Bench(args=args, net_builder=get_net_builder("wrn_28_2", False), tb_log=None,
                    logger=None)
        alg.model, alg.ema_model = alg.model.to(device), alg.ema_model.to(device)
        with contextlib.suppress(Done):
            alg.train()
        steady = marks["end"] - marks["warm"]
        return {"workload": workload, "framework": "usb", "steps": steps,
                "steps_per_s": steps / steady, "images_per_s": steps * per_step / steady,
                "warmup_s": marks["warm"] - marks["start"], "setup_s": marks["start"] - t0,
                "device": str(device), "torch": torch.__version__, "workers": workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=0, help="0: 20 CPU, 300 GPU")
    ap.add_argument("--warmup", type=int, default=0, help="0: 3 CPU, 50 GPU")
    ap.add_argument("--workers", type=int, default=1, help="USB's shipped num_workers: 1")
    ap.add_argument("--only", default="fixmatch,supervised_wrn")
    ap.add_argument("--root", default=None, help="the CIFAR-10 JPEG export (else random images)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    steps, warmup = args.steps or (300 if gpu else 20), args.warmup or (50 if gpu else 3)
    rows = []
    for w in args.only.split(","):
        rows.append(run(w, steps, warmup, args.workers, args.root))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
