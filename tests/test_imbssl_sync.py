"""No host<->device sync in a training step of the imbalanced SSL recipes of issue 20 (debiaspl,
saw, adsh, darp, abc, acr, daso, simpro, tras, cossl), with the probe of tests/test_sync_probe.py on
tiny sizes,
every method's term active from the first step, each crossing an epoch boundary
(steps_per_epoch 2) so the per-epoch updates run too."""

from pathlib import Path

import pytest
import torch

from ltframe.probes import probe_steps

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data.source.train_per_class=100", "data.source.test_per_class=4", "data.batch_size=8",
        "data.longtail.ratio=10", "run.log_every=1000"]
#: name -> (recipe, overrides, steps[, stages]); steps_per_epoch 2 so that an epoch boundary is
#: crossed; `stages` > 1 probes the first `steps` steps of each of the first `stages` stages
RECIPES = {
    "debiaspl": ("recipes/cpu/debiaspl.toml", ["stage.0.steps_per_epoch=2"], 3),
    "adsh": ("recipes/cpu/adsh.toml", ["stage.0.steps_per_epoch=2",
                                       "stage.0.pseudo_labeler.start_epoch=0"], 5),
    "saw": ("recipes/cpu/saw.toml", ["stage.0.steps_per_epoch=2"], 5),
    "darp": ("recipes/cpu/darp.toml", ["stage.0.steps_per_epoch=2", "stage.0.pseudo_labeler.warmup=0",
                                       "stage.0.pseudo_labeler.every=1"], 4),
    "darp_bbse": ("recipes/cpu/darp.toml", ["stage.0.steps_per_epoch=2", "stage.0.pseudo_labeler.warmup=0",
                                            "stage.0.pseudo_labeler.every=1", "data.val_per_class=2",
                                            "stage.0.pseudo_labeler.target=bbse",
                                            "stage.0.pseudo_labeler.bbse_cond=1e12"], 4),
    "saw_usb": ("recipes/cpu/saw.toml", ["stage.0.steps_per_epoch=2", "stage.0.loss.1.counts=pool",
                                         "stage.0.loss.1.beta=0"], 5),
    "abc": ("recipes/cpu/abc.toml", ["stage.0.steps_per_epoch=2"], 3),
    "acr": ("recipes/cpu/acr.toml", ["stage.0.steps_per_epoch=2", "stage.0.loss.1.est_epoch=0"], 5),
    "simpro": ("recipes/cpu/simpro.toml", ["stage.0.steps_per_epoch=2"], 5),
    "daso": ("recipes/cpu/daso.toml", ["stage.0.steps_per_epoch=2", "stage.0.pseudo_labeler.warmup=1",
                                       "stage.0.pseudo_labeler.period=2"], 4),
    "daso_usb": ("recipes/cpu/daso.toml", ["stage.0.steps_per_epoch=2", "stage.0.pseudo_labeler.warmup=1",
                                           "stage.0.pseudo_labeler.blend=usb"], 3),
    "tras": ("recipes/cpu/tras.toml", ["stage.0.steps_per_epoch=2", "stage.0.loss.3.start_epoch=1"], 3),
    # CoSSL's teacher runs in the second stage (after a FixMatch stage of two epochs)
    "cossl": ("recipes/cpu/cossl.toml", ["stage.0.epochs=2", "stage.0.steps_per_epoch=2",
                                         "stage.1.steps_per_epoch=2", "stage.1.pseudo_labeler.threshold=0.3",
                                         "stage.1.pseudo_labeler.warm_iters=4"], 3, 2),
    "cossl_usb": ("recipes/cpu/cossl.toml", ["stage.0.epochs=2", "stage.0.steps_per_epoch=2",
                                             "stage.1.steps_per_epoch=2", "stage.1.pseudo_labeler.labels=usb",
                                             "stage.1.pseudo_labeler.mix=usb",
                                             "stage.1.pseudo_labeler.partner=unlabeled",
                                             "stage.1.pseudo_labeler.optimizer=sgd",
                                             "stage.1.pseudo_labeler.warm_iters=4"], 3, 2),
}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_no_host_device_sync_in_a_training_step(name, tmp_path):
    recipe, over, steps, *more = RECIPES[name]
    stages = more[0] if more else 1
    res = probe_steps(ROOT / recipe, [*TINY, *over], out_dir=tmp_path / "runs", steps=steps,
                      stages=stages)
    assert res.steps == steps * stages
    syncs = res.syncs()
    rows = "\n".join(f"{n:3d} {k} {op} {w}" for (k, op, w), n in res.by_location().items())
    assert not syncs, f"{name}: {len(syncs)} host<->device syncs:\n{rows}"
