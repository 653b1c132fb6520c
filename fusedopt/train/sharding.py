"""``--parallel fsdp2``: the model sharded with FSDP2 (``fully_shard``); model and optimizer
state in and out of checkpoints, in either ``--checkpoint-format``.

Every transformer block is one FSDP2 unit and the root holds the rest (embeddings, final norm,
head), so params, gradients and optimizer state are DTensors sharded over the ranks; the
optimizers (fusedopt's or torch's) step the local shards.

Checkpoints of a sharded run hold full tensors in exactly the layout of an unsharded one: the
model's ``state_dict()`` (FSDP2 keeps the parameter names) and ``optimizer.state_dict()``
(torch.optim's layout, state keyed by the parameter's position in the groups). A run can
therefore resume with the other ``--parallel`` mode or another world size. Gathering and
scattering go through ``torch.distributed.checkpoint.state_dict``, whose full optimizer state is
keyed by parameter name: :func:`_by_position` and :func:`_by_name` translate.

Sharded checkpoints (:func:`save_sharded`, :func:`load_sharded`) are
``torch.distributed.checkpoint`` (DCP) files: every rank writes the shards it holds (a
replicated tensor once), nothing is gathered, and loading reads each rank's part of every
tensor, whatever the world size or ``--parallel`` mode that wrote it. Their keys are
``model.<name>`` and ``optimizer.state.<name>.<key>``, as in torchtitan's checkpoints, and
:func:`consolidate` turns one into a full checkpoint's model and optimizer state.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn

from .._compiling import TORCH_VERSION


def fully_shard_fn():
    """FSDP2's ``fully_shard`` (public in torch.distributed.fsdp since torch 2.6)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


#: The first torch whose FSDP2 trains correctly on CPU (gloo). Measured on 2 gloo ranks against
#: DDP (a small model on torch 2.5 to 2.10 and 2.14; the FSDP2 tests of tests/test_train.py fail
#: on 2.8 and pass on 2.9 and 2.14): torch 2.5 raises "FSDP
#: requires CUDA for streams"; 2.6 fails on its CPU streams, which lack ``record_event`` (added
#: in 2.7, pytorch/pytorch#145935); 2.7 and 2.8 run but sum the gradients over the ranks instead
#: of averaging them (gloo's reduce-scatter did not apply ``ReduceOp.AVG``, pytorch/pytorch#162338):
#: a silently different training run. 2.9 and later equal DDP.
FSDP2_CPU_MIN_TORCH = (2, 9)


def check_supported(parallel: str, world_size: int, device: torch.device) -> None:
    """Raise ConfigError when ``--parallel fsdp2`` cannot train correctly here: sharding (more
    than one rank) on CPU needs torch >= 2.9 (:data:`FSDP2_CPU_MIN_TORCH`). One process trains
    the plain model, so it is never refused."""
    if parallel != "fsdp2" or world_size < 2 or device.type != "cpu":
        return
    if TORCH_VERSION >= FSDP2_CPU_MIN_TORCH:
        return
    from .config import ConfigError

    need = ".".join(map(str, FSDP2_CPU_MIN_TORCH))
    raise ConfigError(
        f"--parallel fsdp2 on CPU needs torch >= {need} (this is torch {torch.__version__}): "
        "FSDP2 cannot run on CPU before torch 2.7, and in torch 2.7 and 2.8 it sums the gradients "
        "over the gloo ranks instead of averaging them (pytorch/pytorch#162338). Use --parallel "
        f"ddp, a CUDA device, or torch >= {need}."
    )


def shard(model: nn.Module) -> nn.Module:
    """Apply ``fully_shard`` to every block of ``model``, then to ``model`` itself (in place)."""
    fully_shard = fully_shard_fn()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """Names of the optimizer's params, in the order of its state dict."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _by_position(named: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """A name-keyed optimizer state dict in torch.optim's layout (keyed by position)."""
    position = {name: i for i, name in enumerate(names)}
    return {
        "state": {position[name]: value for name, value in named["state"].items()},
        "param_groups": [dict(group, params=[position[name] for name in group["params"]])
                         for group in named["param_groups"]],
    }


def _by_name(positional: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """torch.optim's state dict layout keyed by parameter name instead of position."""
    return {
        "state": {names[index]: value for index, value in positional["state"].items()},
        "param_groups": [dict(group, params=[names[index] for index in group["params"]])
                         for group in positional["param_groups"]],
    }


def full_model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full model state dict on rank 0, on the CPU (empty elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """``optimizer.state_dict()`` as an unsharded run has it, on rank 0 (empty elsewhere).
    Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    named = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not named:  # not rank 0
        return {}
    return _by_position(named, _param_names(model, optimizer))


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Load a full model state dict (every rank passes it) into the sharded model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: Dict[str, Any]) -> None:
    """Load an unsharded run's ``optimizer.state_dict()`` (every rank passes it) into the
    optimizer of the sharded model: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, _by_name(state, _param_names(model, optimizer)),
                             options=_options())


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Model and optimizer state as DCP saves and loads it: each rank's DTensor shards (plain
    tensors when the model is not sharded), keyed by parameter name. An optimizer without state
    gets it first (torch's ``get_state_dict`` takes one step with lr 0 and zero gradients)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


@contextlib.contextmanager
def _dcp_call():
    """Around DCP calls: its failures (``CheckpointException``, a BaseException, raised on every
    rank) become RuntimeErrors callers can catch, and its warning that it "assumes" one process
    without a process group is dropped (that is what it is for in a one-process run; torch < 2.7
    has no ``no_dist`` argument to say so)."""
    from torch.distributed.checkpoint.api import CheckpointException

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        try:
            yield
        except CheckpointException as exc:
            failures = getattr(exc, "failures", None) or {}
            causes = "; ".join(f"rank {rank}: {type(failure[0]).__name__}: {failure[0]}".rstrip(": ")
                               for rank, failure in sorted(failures.items())) or str(exc)
            raise RuntimeError(f"torch.distributed.checkpoint failed ({causes})") from exc


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write the model and optimizer into ``directory`` as DCP files. Collective: every rank
    calls it with the same (shared) directory and writes its own shards."""
    import torch.distributed.checkpoint as dcp

    with _dcp_call():
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(directory))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load DCP files written by :func:`save_sharded` under any world size and mode. Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, optimizer)
    with _dcp_call():
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def consolidate(directory: Path) -> Dict[str, Any]:
    """``{"model": ..., "optimizer": ...}`` of a sharded checkpoint as a full checkpoint holds
    them: full plain tensors, and the optimizer in torch.optim's positional layout. One process,
    no process group; it holds every tensor in memory."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix=".consolidate-",
                                     dir=os.path.dirname(os.path.abspath(directory))) as tmp:
        path = os.path.join(tmp, "full.pt")
        with _dcp_call():
            dcp_to_torch_save(str(directory), path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    named = state["optimizer"]
    names = [name for group in named["param_groups"] for name in group["params"]]
    return {"model": state["model"], "optimizer": _by_position(named, names)}


__all__ = ["fully_shard_fn", "shard", "full_model_state", "full_optimizer_state", "load_model_state",
           "load_optimizer_state", "save_sharded", "load_sharded", "consolidate"]
