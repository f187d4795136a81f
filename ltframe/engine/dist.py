"""Multi-process training on torch.distributed (DDP), started by torchrun.

`torchrun --nproc_per_node=N -m ltframe run RECIPE` sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; `init()` joins the process group (NCCL on CUDA, gloo on CPU).
Everything here is a no-op in a single process.

Conventions:
- `data.batch_size` (and `stage.batch_size`) is the global batch: each rank takes
  batch_size / world_size samples per step. Samplers shard a shared per-epoch permutation
  interleaved (rank r takes positions r, r + W, ...), so the ranks' batches of one step are
  exactly the single-process batch, and `gather_batch` restores its order.
- Every rank keeps identical model weights (DDP averages gradients), identical stateful
  components (they update from `gather_batch`ed tensors) and identical target tables
  (evaluation and pool labelling shard the samples and gather the predictions).
- Only rank 0 writes files (run directory, metrics, checkpoints, pseudo-labels, summary).
- Augmentation draws come from a per-rank generator (seed + rank), as in any DDP trainer;
  they are saved per rank in checkpoints, so a resumed DDP run continues every rank's stream.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ltframe.errors import LtframeError, PeerDiedError

#: torchrun's agent (the workers' parent), recorded at `init`; None outside torchrun
_AGENT_PID: int | None = None
#: what gloo / NCCL / the TCP store say when another rank has gone away
_PEER_SIGNS = ("connection reset by peer", "connection closed by peer", "broken pipe",
               "connection refused", "socket timeout", "timed out", "nccl", "gloo",
               "processgroup", "process group", "watchdog")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank and world size from torchrun's environment (1 process when unset)."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise LtframeError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({exc}); start "
                           "multi-process runs with torchrun") from None


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def world_size() -> int:
    return info().world_size


def is_main() -> bool:
    return info().main


def init(device: torch.device) -> DistInfo:
    """Join the process group when torchrun started several processes."""
    global _AGENT_PID
    env = env_info()
    if "TORCHELASTIC_RUN_ID" in os.environ and _AGENT_PID is None:  # started by torchrun
        _AGENT_PID = os.getppid()
    if env.world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        return info()
    if not dist.is_available():
        raise LtframeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise LtframeError(f"WORLD_SIZE = {env.world_size} but {key} is not set; start "
                               "multi-process runs with torchrun --nproc_per_node=N -m ltframe ...")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return info()


def local_device(device: torch.device) -> torch.device:
    """`cuda` becomes this process's GPU (cuda:LOCAL_RANK) under torchrun."""
    env = env_info()
    if device.type == "cuda" and env.world_size > 1 and device.index is None:
        return torch.device("cuda", env.local_rank)
    return device


def _comm_device(x: Tensor) -> Tensor:
    """NCCL moves CUDA tensors only."""
    if dist.get_backend() == "nccl" and x.device.type != "cuda":
        return x.to(torch.device("cuda", torch.cuda.current_device()))
    return x


def gather_batch(x: Tensor) -> Tensor:
    """The global batch from each rank's equal-size share, in single-process order (rank r
    holds global positions r, r + W, ...); x itself in a single process. No gradient."""
    w = world_size()
    if w == 1:
        return x
    src = _comm_device(x.detach().contiguous())
    parts = [torch.empty_like(src) for _ in range(w)]
    dist.all_gather(parts, src)
    out = torch.stack(parts, 1)  # [n, W, ...]: position j of rank r is global j * W + r
    return out.reshape(-1, *x.shape[1:]).to(x.device)


def shard(index: Tensor) -> tuple[Tensor, int]:
    """This rank's interleaved share of `index` (padded by repeating the last element so
    every rank has the same count) and the original length, for `unshard`."""
    w, n = world_size(), index.numel()
    if w == 1 or n == 0:
        return index, n
    pad = (-n) % w
    if pad:
        index = torch.cat([index, index[-1:].expand(pad)])
    return index[info().rank::w], n


def unshard(local: Tensor, n: int) -> Tensor:
    """Inverse of `shard`: the rows for the whole index, in its order, on every rank."""
    if world_size() == 1:
        return local
    return gather_batch(local)[:n]


def sharded(fn: Callable[[Tensor], Tensor], index: Tensor) -> Tensor:
    """`fn(index)` with each rank computing its share of `index`; the rows for the whole
    index, in its order, on every rank (evaluation, pool labelling, head fitting)."""
    local, n = shard(index)
    return unshard(fn(local), n)


def all_sum(x: Tensor) -> Tensor:
    """Sum over ranks (a new tensor; x itself in a single process)."""
    if world_size() == 1:
        return x
    y = _comm_device(x.detach().clone())
    dist.all_reduce(y)
    return y.to(x.device)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agent_alive() -> bool:
    """False once torchrun's agent has died (this worker was handed to another parent)."""
    return _AGENT_PID is None or os.getppid() == _AGENT_PID


def resume_hint(run_dir: Any) -> str:
    """How to continue `run_dir` with the same number of processes."""
    w = env_info().world_size
    launch = f"torchrun --nproc_per_node={w} -m ltframe" if w > 1 else "ltframe"
    return f"`{launch} resume {run_dir}`"


def peer_failure(exc: BaseException, run_dir: Any) -> PeerDiedError | None:
    """A PeerDiedError for the error a collective raises when another rank died (gloo's
    "Connection reset by peer", NCCL / store errors), else None. Multi-process runs only."""
    if env_info().world_size <= 1 or not isinstance(exc, RuntimeError):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(exc).split()))  # no source path
    dist_error = getattr(dist, "DistError", None)
    if not (dist_error and isinstance(exc, dist_error)) and \
            not any(s in text.lower() for s in _PEER_SIGNS):
        return None
    return PeerDiedError(
        f"a peer process died, so rank {env_info().rank} stops too ({text[:100]}); the newest "
        f"checkpoint on disk is kept: find why the other rank stopped (its error line or "
        f"error.rank*.log), then continue with {resume_hint(run_dir)}")
