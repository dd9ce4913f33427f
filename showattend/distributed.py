"""Multi-process training on PyTorch's own engine (torchrun + DistributedDataParallel).

    torchrun --nproc_per_node 2 -m showattend train --config ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; ``setup`` reads them and
opens the process group (gloo on CPU, nccl on CUDA). Without them everything here is a no-op for
a single process, so the training loop has one code path.

Division of labour (why each piece is here):
* every global batch of ``train.batch_size`` captions is split across ranks (``shard``), so a run
  with N processes takes the same optimiser steps over the same captions as one process;
* each rank's loss is re-weighted by its share of the global token count before DDP averages the
  gradients (``token_weight``), so the gradient is the global per-token mean, not a mean of means;
* the REINFORCE baseline is updated from the global mean reward (``all_sum``) and stays identical
  on every rank;
* validation decodes a slice of the images on every rank; the results are gathered and scored once;
* only rank 0 writes files (logs, checkpoints, plots); a stop signal on any rank stops all ranks at
  the same step (``any_flag``), so nobody waits forever in a collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0


SINGLE = Dist()


def from_env() -> Dist:
    """The launch layout torchrun put in the environment (single process if none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun; returns the layout.

    gloo serves CPU tensors, nccl CUDA ones. On CUDA each process takes the GPU of its local rank.
    """
    dist = from_env()
    if not dist.enabled or td.is_initialized():
        return dist
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(dist.local_rank)
    td.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world)
    return dist


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """CUDA processes use the GPU of their local rank; CPU stays CPU."""
    if dist.enabled and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def teardown(dist: Dist) -> None:
    if dist.enabled and td.is_initialized():
        td.destroy_process_group()


def shard(batch: list[int], dist: Dist) -> list[int]:
    """This rank's part of one global batch (strided, so sizes differ by at most one)."""
    return batch[dist.rank:: dist.world] if dist.enabled else batch


def _tensor_device(dist: Dist) -> torch.device:
    # nccl reduces CUDA tensors only; gloo CPU tensors
    if dist.enabled and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: list[float], dist: Dist) -> list[float]:
    """Element-wise sum over ranks (float64, so counts and sums stay exact)."""
    if not dist.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_tensor_device(dist))
    td.all_reduce(t, op=td.ReduceOp.SUM)
    return t.tolist()


def any_flag(flag: bool, dist: Dist) -> bool:
    """True on every rank if it is true on any rank."""
    if not dist.enabled:
        return flag
    return all_sum([1.0 if flag else 0.0], dist)[0] > 0


def token_weight(local_tokens: int, dist: Dist) -> tuple[float, int]:
    """(factor for the local per-token loss, global token count).

    DDP averages gradients over ranks; scaling rank r's mean loss by n_r · world / N makes that
    average the gradient of the global per-token mean, whatever the ranks' token counts.
    """
    if not dist.enabled:
        return 1.0, local_tokens
    total = int(all_sum([float(local_tokens)], dist)[0])
    return local_tokens * dist.world / max(total, 1), total


def gather(items: list[Any], dist: Dist) -> list[Any]:
    """Concatenate every rank's list, in rank order (rank 0's first)."""
    if not dist.enabled:
        return items
    parts: list[list[Any] | None] = [None] * dist.world
    td.all_gather_object(parts, items)
    return [x for part in parts for x in (part or [])]


def broadcast(obj: Any, dist: Dist) -> Any:
    """Rank 0's object on every rank."""
    if not dist.enabled:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def barrier(dist: Dist) -> None:
    if dist.enabled:
        td.barrier()


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device,
         find_unused: bool) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` (or the model itself for one process).

    ``find_unused``: hard attention without the expected-context mix leaves the attention
    parameters without gradient on some steps (they learn through the score-function term only
    when λ_r > 0), which DDP must be told about.
    """
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The captioner inside a DDP wrapper (attributes, state dicts, decoding)."""
    return getattr(model, "module", model)
