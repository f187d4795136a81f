"""`run.compile` compiles the whole step (views, forward, pseudo-labels, losses) and
`run.cuda_graph` selects CUDA graphs on CUDA (issue 19). The compile runs on the CPU here."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltframe import start_run
from ltframe.engine.report import Reporter
from ltframe.engine.trainer import compile_mode
from ltframe.recipe import RunCfg

ROOT = Path(__file__).parent.parent
TINY_VIT = ['model.backbone="vit_tiny_patch16_224"',
            'model.backbone_args={img_size = 16, patch_size = 8, depth = 1, embed_dim = 16, '
            'num_heads = 1}']


class _Messages(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def _run(tmp_path: Path, extra: list[str], rep: Reporter | None = None) -> dict:
    over = [*TINY_VIT, f"run.out_dir={tmp_path}", "run.checkpoint_minutes=0", "run.log_every=2",
            "stage.0.epochs=1", "stage.0.steps_per_epoch=4", "data.batch_size=8",
            "stage.0.pseudo_labeler.threshold=0.2", *extra]
    res = start_run(ROOT / "recipes/cpu/fixmatch.toml", over, reporter=rep)
    return load_file(str(Path(res["run_dir"]) / "checkpoints" / "stage0-fixmatch.safetensors"))


def test_compile_mode_picks_cuda_graphs_only_on_cuda():
    assert compile_mode(RunCfg(), cuda=True) is None
    assert compile_mode(RunCfg(compile="max-autotune"), cuda=False) == "max-autotune"
    assert compile_mode(RunCfg(cuda_graph=True), cuda=True) == "reduce-overhead"
    assert compile_mode(RunCfg(cuda_graph=True, compile="max-autotune"), cuda=True) == "reduce-overhead"
    assert compile_mode(RunCfg(cuda_graph=True), cuda=False) == "default"


@pytest.mark.slow
def test_the_whole_compiled_step_equals_eager(tmp_path):
    from torch._dynamo.utils import counters

    eager = _run(tmp_path / "eager", [])
    torch._dynamo.reset()
    counters.clear()
    rep = _Messages()
    compiled = _run(tmp_path / "compiled", ['run.compile="default"', "run.cuda_graph=true"], rep)
    assert any("CUDA graphs need a CUDA device" in m for m in rep.lines)
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from ltframe.engine.trainer import Trainer

    # the step core was compiled (not only the forward inside it) ...
    assert _debug_get_cache_entry_list(Trainer._core.__code__)
    assert not counters["graph_break"]  # ... as one graph: views, forward, labeler, losses
    # step and epoch become dynamic after their first change: at most 3 compilations
    assert counters["stats"]["unique_graphs"] <= 3
    keys = [k for k in eager if k.startswith(("model.", "ema."))]
    assert keys and eager.keys() == compiled.keys()
    for k in keys:
        assert torch.allclose(eager[k].float(), compiled[k].float(), atol=2e-4, rtol=1e-3), k
