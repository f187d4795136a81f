"""Self-supervised pre-training: rotation pretext and MoCo v2 (paper 001 / SSD stage I)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.testing import tiny_recipe
from ltframe_rethink.rotation import rotate_by_position


def test_rotation_by_batch_position_is_balanced_and_exact():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(8, 3, 1, 1)
    out = rotate_by_position(x)
    for i in range(8):
        assert torch.equal(out[i], torch.rot90(x[i], i % 4, dims=(1, 2)))


def test_rotate_view_and_rotation_loss(registry):
    view = registry.build("rotate", kind="view", mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8)
    out = view(x, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 8, 8)
    plain = registry.build(registry.spec("view", {"name": "rotate", "flip": False, "pad": 0}, "v"),
                           mean=(0, 0, 0), std=(1, 1, 1))(x, torch.Generator())
    for i in range(8):  # without flip/crop: exactly the (i mod 4) * 90 degree rotation
        assert torch.allclose(plain[i], torch.rot90(x[i].float() / 255, i % 4, dims=(1, 2)), atol=1e-6)
    loss = registry.build(registry.spec("loss", "rotation", "l"), num_classes=3,
                          class_counts=torch.ones(3))
    perfect = torch.full((8, 4), -10.0)
    perfect[torch.arange(8), torch.arange(8) % 4] = 10.0
    ctx = StepContext(step=0, epoch=0, num_classes=3, class_counts=torch.ones(3), targets=None,
                      features_by_part={"labeled": torch.zeros(8, 2)},
                      logits_by_part={"labeled": {"rot": perfect}})
    assert loss(ctx).item() < 1e-6


def _moco_ctx(model, x, targets):
    feats, logits = model(x)
    parts = {"labeled:moco": feats, "labeled:moco#1": feats}
    return StepContext(step=0, epoch=0, num_classes=3, class_counts=torch.ones(3),
                       targets=targets, features_by_part=parts,
                       logits_by_part={p: logits for p in parts}, model=model,
                       inputs_by_part={"labeled:moco": x, "labeled:moco#1": x})


def test_moco_queue_masking_and_state(registry):
    from ltframe.models import LTModel

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    model = LTModel(backbone, {"proj": torch.nn.Linear(6, 4)})
    spec = registry.spec("loss", {"name": "moco", "queue_size": 8, "temperature": 0.2,
                                  "mask_same_label": True}, "l")
    loss = registry.build(spec, num_classes=3, class_counts=torch.ones(3))
    x = torch.randn(4, 3, 2, 2)
    y = torch.tensor([0, 1, 2, 0])
    loss(_moco_ctx(model, x, y))
    assert loss.ptr == 4 and loss.queue_labels[:4].tolist() == [0, 1, 2, 0]
    # with identical key and query encoders, each query's own key is in the queue now: masking
    # same-label negatives removes it, so the loss is lower than without masking
    masked = loss(_moco_ctx(model, x, y)).item()
    loss.p.mask_same_label = False
    loss.ptr = 4
    unmasked = loss(_moco_ctx(model, x, y)).item()
    assert masked < unmasked
    state = loss.state_dict()
    fresh = registry.build(spec, num_classes=3, class_counts=torch.ones(3))
    fresh.load_state_dict(state)
    fresh(_moco_ctx(model, x, y))  # pending state applied at first use
    assert fresh.ptr == (state["ptr"] + 4) % 8


@pytest.mark.slow
@pytest.mark.parametrize("pretext", ["rotation", "moco"])
def test_ssp_stage_then_downstream_from_the_pretrained_backbone(tmp_path, pretext):
    if pretext == "rotation":
        heads = {"main": {"name": "linear"}, "rot": {"name": "linear", "out_features": 4}}
        ssp = {"name": "ssp", "steps": 3, "views": {"labeled": ["rotate"]},
               "loss": [{"name": "rotation"}], "train": ["backbone", "heads.rot"]}
    else:
        heads = {"main": {"name": "linear"}, "proj": {"name": "mlp", "out_features": 16}}
        ssp = {"name": "ssp", "steps": 3, "views": {"labeled": ["moco", "moco"]},
               "loss": [{"name": "moco", "queue_size": 32}], "train": ["backbone", "heads.proj"]}
    over = {"model": {"heads": heads},
            "stage": [ssp, {"name": "train", "steps": 3, "train": ["backbone", "heads.main"]}]}
    summary = start_run(tiny_recipe(tmp_path, **over))
    run_dir = Path(summary["run_dir"])
    pre = load_file(str(run_dir / "checkpoints/stage0-ssp.safetensors"))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    ssp_losses = [r["loss"] for r in rows if r["event"] == "train" and r["stage"] == "ssp"]
    assert pretext in ssp_losses[0]
    post = load_file(str(run_dir / "checkpoints/stage1-train.safetensors"))
    pretext_head = "rot" if pretext == "rotation" else "proj"
    for k in pre:  # the pretext head is dropped: untouched by the downstream stage
        if k.startswith(f"model.heads.{pretext_head}."):
            assert torch.equal(pre[k], post[k])


def test_rotate_view_rotates_when_its_draws_are_applied_apart(registry):
    """Under `run.compile` the trainer draws eagerly and applies inside the compiled step
    (`draw` / `apply`): the rotation is part of `apply`, so both paths give the same batch."""
    from ltframe.data.views import deferrable

    view = registry.build("rotate", kind="view", mean=(0, 0, 0), std=(1, 1, 1))
    assert deferrable(view)
    x = torch.randint(0, 255, (8, 3, 8, 8), dtype=torch.uint8)
    whole = view(x, torch.Generator().manual_seed(3))
    apart = view.apply(x, view.draw(8, torch.Generator().manual_seed(3), x.device))
    assert torch.equal(whole, apart)
    plain = registry.build(registry.spec("view", {"name": "rotate", "flip": False, "pad": 0}, "v"),
                           mean=(0, 0, 0), std=(1, 1, 1))
    out = plain.apply(x, plain.draw(8, torch.Generator(), x.device))
    assert torch.allclose(out[1], torch.rot90(x[1].float() / 255, 1, dims=(1, 2)), atol=1e-6)


def test_a_view_that_overrides_call_is_never_deferred():
    from ltframe.data.views import WeakParams, WeakView, deferrable

    class Wrapped(WeakView):
        def __call__(self, x, gen=None):
            return super().__call__(x, gen).flip(2)

    assert deferrable(WeakView(WeakParams(), (0,) * 3, (1,) * 3))
    assert not deferrable(Wrapped(WeakParams(), (0,) * 3, (1,) * 3))
    assert not deferrable(object())


def test_rotate_view_pads_with_zeros_like_the_ssp_reference(registry):
    # imbalanced-semi-self pretrain_rot.py: RandomCrop(32, padding=4) pads with 0 (black) before
    # ToTensor/Normalize. A constant-255 image shifted by the crop shows 0 on the padded border.
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    view = registry.build("rotate", kind="view", mean=mean, std=std)
    assert view.p.padding_mode == "zeros" and view.p.pad == 4
    x = torch.full((64, 3, 8, 8), 255, dtype=torch.uint8)
    out = view(x, torch.Generator().manual_seed(0))
    r = torch.arange(8)
    shifted = 0
    for i in range(64):
        raw = torch.rot90(out[i], -(i % 4), dims=(1, 2)) * 0.25 + 0.5  # undo rotation and norm.
        matches = []
        for oy in range(9):  # every crop offset into the 16x16 zero-padded image
            for ox in range(9):
                inside = ((r + oy - 4 >= 0) & (r + oy - 4 < 8))[:, None] & \
                         ((r + ox - 4 >= 0) & (r + ox - 4 < 8))[None, :]
                if torch.allclose(raw, inside.float().expand(3, 8, 8), atol=1e-6):  # float rounding
                    matches.append((oy, ox))
        assert len(matches) == 1, f"sample {i} is not a zero-padded crop"
        shifted += matches[0] != (4, 4)
    assert shifted > 32  # most crops show some zero border
    assert ((out - (0 - 0.5) / 0.25).abs() < 1e-6).any()  # border pixels are 0 before normalisation
    reflect = registry.build(registry.spec("view", {"name": "rotate", "padding_mode": "reflect"},
                                           "v"), mean=mean, std=std)
    assert torch.allclose(reflect(x, torch.Generator().manual_seed(0)), torch.full_like(out, 2.0), atol=1e-6)
