"""The practitioner's path end to end: their own long-tailed ImageFolder and a flat + nested
folder of unlabeled images without labels; supervised training (counts equal the folder's)
from a safetensors file, FixMatch and CReST+ from that run, export, reload with timm alone."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from ltframe import start_run
from ltframe.data.sources import decode_image
from ltframe.export import export_run, load_model
from ltframe.predict import predict_files
from ltframe.testing import OWN_COUNTS, write_own_data

ROOT = Path(__file__).parent.parent
CLASSES = sorted(OWN_COUNTS)


@pytest.mark.slow
def test_own_folder_unlabeled_folder_weights_in_model_out(tmp_path):
    own = write_own_data(tmp_path / "own", size=16)
    data = [f'data.source={{name="imagefolder", root="{own}", image_size=16}}',
            'data.longtail={name="none"}', 'data.split={name="supervised"}', "data.val_per_class=0",
            "run.device=\"cpu\""]
    unl = [f'data.unlabeled={{name="folder", root="{own / "unl"}"}}']

    # weights from another tool: a "module."-prefixed state dict with a 10-class classifier
    torch.manual_seed(1)
    other = timm.create_model("resnet32_cifar", num_classes=10)
    save_file({f"module.{k}": v.contiguous() for k, v in other.state_dict().items()},
              tmp_path / "start.safetensors")
    sup = start_run(ROOT / "recipes/quickstart.toml",
                    data + [f'model.weights="{tmp_path / "start.safetensors"}"'],
                    out_dir=tmp_path / "runs", smoke=True)
    sup_dir = Path(sup["run_dir"])
    counts = json.loads((sup_dir / "splits/counts.json").read_text())
    assert counts["classes"] == CLASSES
    assert counts["labeled"] == [OWN_COUNTS[c] for c in CLASSES]  # the folder as it is
    weights = json.loads((sup_dir / "run.json").read_text())["weights"]
    assert weights["loaded"] > 0 and weights["skipped"] and len(weights["sha256"]) == 64

    for recipe, extra in (("fixmatch", []), ("crest_plus", ["scheduler.generations=2"])):
        s = start_run(ROOT / f"recipes/cpu/{recipe}.toml",
                      data + unl + extra + [f'model.weights="{sup_dir}"'],
                      out_dir=tmp_path / "runs", smoke=True)
        run = Path(s["run_dir"])
        c = json.loads((run / "splits/counts.json").read_text())
        assert c["labeled"] == counts["labeled"] and c["unlabeled_without_labels"] == 9
        assert json.loads((run / "run.json").read_text())["weights"]["path"] == str(sup_dir)
    assert any((run / "pseudo_labels").glob("*.csv"))  # CReST+ labelled the folder

    meta = export_run(run, tmp_path / "model")
    assert meta["format"] == "timm"
    kw = dict(json.loads((tmp_path / "model.json").read_text())["timm"])
    net = timm.create_model(kw.pop("model_name"), **kw).eval()
    rows = predict_files(run, [own / "test"], top_k=len(CLASSES))
    x = torch.stack([decode_image(r["file"], 16) for r in rows])
    want = torch.zeros(len(rows), len(CLASSES))
    for i, r in enumerate(rows):
        for t in r["top"]:
            want[i, t["index"]] = t["prob"]
    clf = load_model(run)
    with torch.no_grad():
        torch.testing.assert_close(net(clf.preprocess(x)).softmax(1), want)
