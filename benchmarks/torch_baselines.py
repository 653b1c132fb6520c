"""torch's clipping functions on every torch fusedopt supports (>= 2.5): the baselines of
``bench_clip.py`` and the oracles of the tests.

torch 2.6 split ``torch.nn.utils.clip_grad_norm_`` into ``get_total_norm`` and
``clip_grads_with_norm_``. On torch 2.6 and later these names are torch's own functions. On
torch 2.5 they are the two halves of that release's ``clip_grad_norm_``, written out here with
the same private helpers and the same operations in the same order (per (device, dtype) group:
``torch._foreach_norm`` or ``torch.linalg.vector_norm`` per tensor, the norm of the stacked
norms, then ``torch._foreach_mul_`` by ``clamp(max_norm / (norm + 1e-6), max=1)``), so a
baseline measures what a torch 2.5 user runs and an oracle gives torch 2.5's numbers.

One difference is deliberate: ``linalg.vector_norm`` cannot take a sparse tensor before some
release after 2.10 (2.14 can), so there the fallback serves every call with a sparse tensor
and takes a sparse gradient's norm over its coalesced values, which is the norm of the dense
tensor. ``clip_grad_norm_`` (torch's own where it serves, the two halves elsewhere) thus takes
sparse gradients on every torch.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Union

import torch

__all__ = ["get_total_norm", "clip_grads_with_norm_", "clip_grad_norm_", "TORCH_HAS_SPLIT_CLIPPING",
           "TORCH_NORMS_SPARSE"]

#: True where torch itself has ``get_total_norm`` and ``clip_grads_with_norm_`` (torch >= 2.6).
TORCH_HAS_SPLIT_CLIPPING = hasattr(torch.nn.utils, "get_total_norm") and hasattr(
    torch.nn.utils, "clip_grads_with_norm_")

_Tensors = Union[torch.Tensor, Iterable[torch.Tensor]]


def _use_foreach(foreach: Optional[bool], tensors: List[torch.Tensor], device: torch.device) -> bool:
    from torch.utils._foreach_utils import _device_has_foreach_support, _has_foreach_support

    if foreach is None:
        return _has_foreach_support(tensors, device) and not any(t.is_sparse for t in tensors)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on "
                           f"{device.type} tensors")
    return bool(foreach)


def _vector_norm(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    if t.is_sparse:
        return torch.linalg.vector_norm(t.coalesce()._values(), norm_type)
    return torch.linalg.vector_norm(t, norm_type)


def _fallback_get_total_norm(tensors: _Tensors, norm_type: float = 2.0,
                             error_if_nonfinite: bool = False,
                             foreach: Optional[bool] = None) -> torch.Tensor:
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    first_device = tensors[0].device
    norms: List[torch.Tensor] = []
    for (device, _), ([group], _) in _group_tensors_by_device_and_dtype([tensors]).items():
        if _use_foreach(foreach, group, device):
            norms.extend(torch._foreach_norm(group, norm_type))
        else:
            norms.extend(_vector_norm(t, norm_type) for t in group)
    total = torch.linalg.vector_norm(torch.stack([n.to(first_device) for n in norms]), norm_type)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients from `parameters` "
                           "is non-finite, so it cannot be clipped.")
    return total


def _fallback_clip_grads_with_norm_(parameters: _Tensors, max_norm: float,
                                    total_norm: torch.Tensor,
                                    foreach: Optional[bool] = None) -> None:
    from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm = float(max_norm)
    if len(grads) == 0:
        return
    clip_coef = max_norm / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    for (device, _), ([group], _) in _group_tensors_by_device_and_dtype([grads]).items():
        if _use_foreach(foreach, group, device):
            torch._foreach_mul_(group, clip_coef_clamped.to(device))
        else:
            for g in group:
                g.mul_(clip_coef_clamped.to(device))


def _fallback_clip_grad_norm_(parameters: _Tensors, max_norm: float, norm_type: float = 2.0,
                              error_if_nonfinite: bool = False,
                              foreach: Optional[bool] = None) -> torch.Tensor:
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    total = _fallback_get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
    _fallback_clip_grads_with_norm_(parameters, max_norm, total, foreach)
    return total


def _norms_sparse_tensors() -> bool:
    try:
        torch.linalg.vector_norm(torch.sparse_coo_tensor([[0]], [1.0], (2,), check_invariants=True))
    except (NotImplementedError, RuntimeError):
        return False
    return True


#: True where torch's norms take sparse tensors (2.14 does; 2.5, 2.6, 2.7, 2.8 and 2.10 do not).
#: Elsewhere the functions below take the fallback for any call with a sparse tensor.
TORCH_NORMS_SPARSE = _norms_sparse_tensors()


def _torchs(tensors: List[torch.Tensor]) -> bool:
    """Whether torch's own function serves a call on ``tensors``."""
    return TORCH_HAS_SPLIT_CLIPPING and (TORCH_NORMS_SPARSE or not any(t.is_sparse for t in tensors))


def _listed(tensors: _Tensors) -> List[torch.Tensor]:
    return [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)


def get_total_norm(tensors: _Tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: Optional[bool] = None) -> torch.Tensor:
    tensors = _listed(tensors)
    fn = torch.nn.utils.get_total_norm if _torchs(tensors) else _fallback_get_total_norm
    return fn(tensors, norm_type, error_if_nonfinite, foreach)


def clip_grads_with_norm_(parameters: _Tensors, max_norm: float, total_norm: torch.Tensor,
                          foreach: Optional[bool] = None) -> None:
    parameters = _listed(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    fn = torch.nn.utils.clip_grads_with_norm_ if _torchs(grads) else _fallback_clip_grads_with_norm_
    return fn(parameters, max_norm, total_norm, foreach)


def clip_grad_norm_(parameters: _Tensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None) -> torch.Tensor:
    parameters = _listed(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    fn = torch.nn.utils.clip_grad_norm_ if _torchs(grads) else _fallback_clip_grad_norm_
    return fn(parameters, max_norm, norm_type, error_if_nonfinite, foreach)
