"""Process-group setup (gloo on CPU, nccl on CUDA) and the few collectives the loop needs.

Works unchanged for a plain ``python -m fusedopt.train`` (world size 1, no
process group) and under ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT).
"""

from __future__ import annotations

import os
from datetime import timedelta
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "gloo", "nccl" or "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment variables, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size == 1:
        return DistContext(0, 1, 0, device, "none")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store = _restart_safe_agent_store(world_size)
        if store is not None:
            kwargs["store"] = store
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistContext(rank, world_size, local_rank, device, backend)


def _restart_safe_agent_store(world_size: int):
    """Under torchrun, a client of the agent's TCPStore with a per-restart key prefix.

    torchrun lets workers share its rendezvous store (TORCHELASTIC_USE_AGENT_STORE)
    and keeps that store across ``--max-restarts`` restarts; a restarted gloo/nccl
    group initialised through ``env://`` can then read the previous attempt's
    peer addresses and fail to connect (pytorch/pytorch#135712).  Namespacing
    the keys by TORCHELASTIC_RESTART_COUNT gives every attempt fresh keys.
    Returns None outside torchrun (``env://`` is fine there).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                         is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"fusedopt.train/{run_id}/attempt_{restart}/", base)


def cleanup(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` is left untouched)."""
    out = t.detach().clone()
    if ctx.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    out = t.detach().clone()
    if ctx.distributed:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def gather_objects(obj: Any, ctx: DistContext) -> List[Any]:
    """Every rank's ``obj`` (picklable), ordered by rank, available on every rank."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
