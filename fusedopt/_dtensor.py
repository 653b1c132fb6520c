"""DTensor parameters and gradients (``torch.distributed.tensor``: FSDP2's ``fully_shard``, tensor
parallelism): what the optimizers and the clipping code need to know about them.

The update rules are elementwise, so a step on DTensors is the same step on their local shards,
provided that a param, its gradient and its state share one *layout* (device mesh and
placements): then element ``i`` of every local shard is the same element of the global tensor.
The kernels therefore get the local tensors; state stays a DTensor (torch.optim's state, so
checkpoints interchange). A gradient with another layout than its param is redistributed to the
param's first (what torch's own DTensor step does); state with another layout is an error.

Norms are not elementwise: :func:`reduce_over_shards` combines the local contributions over the
mesh dimensions where a layout shards the tensors (a collective, on the device: no host sync);
along replicated dimensions every rank already holds the same values.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ._compiling import is_compiling

Tensor = torch.Tensor
#: (device mesh, placements) of a DTensor; None for a plain tensor.
Layout = Tuple[Any, Tuple[Any, ...]]

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # torch built without distributed support: there are no DTensors
    DTensor = Partial = Replicate = None


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors: Sequence[Any]) -> bool:
    return DTensor is not None and any(map(isinstance, tensors, itertools.repeat(DTensor)))


def layout_of(t: Tensor) -> Optional[Layout]:
    """The (mesh, placements) of a DTensor, None for a plain tensor."""
    return (t.device_mesh, tuple(t.placements)) if is_dtensor(t) else None


def describe(layout: Optional[Layout]) -> str:
    if layout is None:
        return "a plain tensor"
    mesh, placements = layout
    return f"a DTensor with placements {placements} on mesh {mesh}"


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself, not a copy; writes reach the DTensor), or
    ``t`` if it is a plain tensor. (``DTensor.to_local()`` returns this tensor too under no_grad,
    or a fresh view of it for a Parameter.)"""
    return t._local_tensor if is_dtensor(t) else t


def local_like(t: Tensor, layout: Optional[Layout], what: str, redistribute: bool = False) -> Tensor:
    """The local tensor of ``t``, which belongs to a param of ``layout``: checked to have that
    layout, or (``redistribute``: gradients) brought to it. ``what`` names ``t`` in errors."""
    own = layout_of(t)
    if own == layout:
        return local(t)
    if redistribute and own is not None and layout is not None:
        mesh, placements = layout
        return local(t.redistribute(mesh, placements))
    raise ValueError(f"{what} is {describe(own)}, but its parameter is {describe(layout)}; "
                     "fusedopt updates them elementwise and needs one layout for both")


_local_tensor = operator.attrgetter("_local_tensor")
_mesh = operator.attrgetter("device_mesh")
_placements = operator.attrgetter("placements")


def locals_like(tensors: Sequence[Tensor], layout: Layout, what: str,
                redistribute: bool = False) -> List[Tensor]:
    """:func:`local_like` of every tensor, for params that all have ``layout``: C-level passes when
    every tensor has it (a step's gradients, ~0.2 us a tensor), else one by one. (dynamo cannot
    call attrgetter objects: under torch.compile, one by one, which the graph does not pay for.)"""
    mesh, placements = layout
    if is_compiling():
        return [local_like(t, layout, what, redistribute) for t in tensors]
    try:
        if (all(map(operator.is_, map(_mesh, tensors), itertools.repeat(mesh)))
                and all(map(operator.eq, map(_placements, tensors), itertools.repeat(placements)))):
            return list(map(_local_tensor, tensors))
    except AttributeError:  # a plain tensor among them: local_like says what is wrong
        pass
    return [local_like(t, layout, what, redistribute) for t in tensors]


def shards_of(dtensors: Sequence[Tensor]) -> List[Tensor]:
    """The local tensors of DTensors, in one C-level pass (a comprehension under torch.compile)."""
    if is_compiling():
        return [t._local_tensor for t in dtensors]
    return list(map(_local_tensor, dtensors))


def sharded_dims(layout: Layout) -> List[int]:
    """The mesh dimensions over which ``layout`` splits its tensors: not ``Replicate``, and of
    more than one rank (a dimension of one rank has nothing to combine)."""
    mesh, placements = layout
    if any(isinstance(p, Partial) for p in placements):
        raise ValueError(f"cannot take the norm of a DTensor with placements {placements}: its "
                         "local values are partial sums (redistribute it first)")
    return [dim for dim, p in enumerate(placements)
            if not isinstance(p, Replicate) and mesh.size(dim) > 1]


def reduce_over_shards(value: Tensor, mesh: Any, dims: Sequence[int], op: str) -> Tensor:
    """``value`` (one per rank, any shape) reduced elementwise with ``op`` ("sum", "max" or
    "min") over the mesh dimensions ``dims`` (:func:`sharded_dims`), in one collective; a plain
    tensor, the same on every rank. (Not a DTensor op: from_local + full_tensor, which
    torch.compile traces.)"""
    if not dims:
        return value
    reduced = [Partial(op) if dim in dims else Replicate() for dim in range(mesh.ndim)]
    return DTensor.from_local(value, mesh, reduced, run_check=False).full_tensor()


def replicated_like(value: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """``value`` as torch's clipping functions return it for ``tensors``: a replicated DTensor on
    their mesh when they are all DTensors of one mesh, else ``value`` itself."""
    if not tensors or not all(map(is_dtensor, tensors)):
        return value
    meshes = {t.device_mesh for t in tensors}
    if len(meshes) != 1:
        return value
    mesh = meshes.pop()
    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, run_check=False)


def plain(value: Tensor) -> Tensor:
    """A 0-dim tensor given by the user (a norm, a scale) as a plain tensor with its full value."""
    return value.full_tensor() if is_dtensor(value) else value


__all__ = ["is_dtensor", "any_dtensor", "layout_of", "local", "local_like", "locals_like",
           "shards_of", "sharded_dims", "reduce_over_shards", "replicated_like", "plain", "Layout"]
