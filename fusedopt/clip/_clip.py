r"""Gradient clipping by global norm and by value, as in :mod:`torch.nn.utils`, without host syncs.

Clipping by norm scales every gradient by

.. math::

    c = \min\Big(1, \frac{\text{max\_norm}}{\|g\|_p + 10^{-6}}\Big)

computed on the device from the norm tensor (no ``if norm > max_norm`` on the host). It costs one
read of the gradients for the norm and, when ``c < 1``, one read-modify-write to scale them.
The native scale op skips its pass when ``c == 1`` exactly (multiplying by one changes no bit):
on CPU tensors the host reads ``c`` (no sync there); the CUDA kernel reads it on the device and
its threads return at once, so nothing waits for the GPU (``torch._foreach_mul_``, the fallback
without native kernels, always multiplies). To pay for one read only, clip inside the step
instead: ``fusedopt.optim.AdamW(..., max_grad_norm=1.0)``.

DTensor gradients (FSDP2, tensor parallel) are clipped through their local shards, with the norm
reduced over the mesh (:func:`fusedopt.clip._norm.sharded_norm`); the norm returned is then a
replicated DTensor, as torch returns it.
"""
from __future__ import annotations

import types
import warnings
from typing import List, Optional, Sequence, Union

import torch

from .. import _dtensor, _norm_ops, backends
from .._lists import any_none, grads_of
from ._norm import (Summary, TensorOrTensors, as_list, by_device, check_backend, check_finite,
                    get_total_norm, result_dtype, to_device, total_norm)

Tensor = torch.Tensor

#: Added to the norm before dividing, as torch does.
EPS = 1e-6


def clip_coefficient(max_norm: Union[float, Tensor], norm: Tensor) -> Tensor:
    """``min(1, max_norm / (norm + 1e-6))`` as a 0-dim tensor on the norm's device and dtype."""
    return torch.clamp(max_norm / (norm + EPS), max=1.0)


def _grads(parameters: TensorOrTensors) -> List[Tensor]:
    grads = grads_of(as_list(parameters))  # one C-level pass (p.grad: ~0.1 us each)
    if any_none(grads):
        grads = [g for g in grads if g is not None]
    return grads


def scale_(tensors: Sequence[Tensor], scale: Tensor, backend: str = "auto",
           summary: Optional[Summary] = None) -> None:
    """``t *= scale`` for every tensor (``scale``: a 0-dim tensor), one multi-tensor pass per device.
    ``summary``: the :class:`Summary` of ``tensors`` when the caller has it already."""
    summary = Summary.of(tensors, summary)
    if summary.any_dtensor:  # elementwise: the local shards
        tensors = [_dtensor.local(t) for t in tensors]
        summary = Summary(tensors)
    scale = _dtensor.plain(scale)
    groups = by_device(tensors, summary)
    for device, group in groups.items():
        factor = to_device(scale, device)
        if _native(device, group, "scale_", backend, summary if len(groups) == 1 else None):
            _norm_ops.scale_(group, factor)
        else:
            torch._foreach_mul_(group, factor)


def _native(device: torch.device, group: Sequence[Tensor], op: str, backend: str = "auto",
            summary: Optional[Summary] = None) -> bool:
    """Whether the native op ``op`` runs ``group`` (``backend="reference"`` means torch ops)."""
    if backends.requested(backend) == "reference":
        return False
    if not _norm_ops.has_kernel(op, device.type):
        return False
    summary = Summary.of(group, summary)
    return not (summary.any_complex or summary.any_sparse)  # (torch ops scale sparse grads)


def clip_grads_with_norm_(parameters: TensorOrTensors, max_norm: float, total_norm: Tensor,
                          foreach: Optional[bool] = None, *, backend: str = "auto") -> None:
    """Drop-in for :func:`torch.nn.utils.clip_grads_with_norm_`: scale the gradients by
    ``min(1, max_norm / (total_norm + 1e-6))`` (computed in ``total_norm``'s dtype, on its device).
    ``foreach`` is accepted for compatibility. ``backend``: ``"reference"`` scales with torch's
    foreach ops, any other usable backend with the native scale op (see :func:`clip_grad_norm_`)."""
    with torch.no_grad():
        grads = _grads(parameters)
        summary = Summary(grads)
        check_backend(backend, summary.devices)
        if grads:
            scale_(grads, clip_coefficient(float(max_norm), _dtensor.plain(total_norm)), backend,
                   summary)


def clip_grad_norm_(parameters: TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                    backend: str = "auto") -> Tensor:
    """Drop-in for :func:`torch.nn.utils.clip_grad_norm_`: clip the gradients of ``parameters``
    to a global ``norm_type``-norm of at most ``max_norm``, in place; return the norm before
    clipping (the dtype torch returns, see :func:`fusedopt.get_total_norm`).

    The coefficient is computed from the norm accumulated in float32 (float64 for float64
    gradients), not from the rounded value returned, so float16 gradients with a norm above the
    float16 range are still clipped correctly. No host sync unless ``error_if_nonfinite``.
    """
    with torch.no_grad():
        if isinstance(parameters, types.GeneratorType):
            parameters = list(parameters)
            if not parameters:
                warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                              stacklevel=2)
        grads = _grads(parameters)
        if not grads:
            check_backend(backend)
            norm = total_norm(grads, norm_type, backend)
            if error_if_nonfinite:
                check_finite(norm, norm_type)
            return norm
        summary = Summary(grads)
        check_backend(backend, summary.devices)
        norm = total_norm(grads, norm_type, backend, summary)
        if error_if_nonfinite:
            check_finite(norm, norm_type)
        scale_(grads, clip_coefficient(float(max_norm), norm), backend, summary)
        norm = norm.to(summary.result_dtype())
        return _dtensor.replicated_like(norm, grads) if summary.any_dtensor else norm


def clip_grad_value_(parameters: TensorOrTensors, clip_value: float,
                     foreach: Optional[bool] = None, *, backend: str = "auto") -> None:
    """Drop-in for :func:`torch.nn.utils.clip_grad_value_`: clamp every gradient element to
    ``[-clip_value, clip_value]`` in place (NaN stays NaN), in one pass: the native clamp op (CPU:
    one parallel region; CUDA: one launch per dtype), where torch's foreach path makes two
    (clamp_min then clamp_max). Without native kernels, or with ``backend="reference"``: torch's
    ops."""
    with torch.no_grad():
        clip_value = float(clip_value)
        grads = _grads(parameters)
        summary = Summary(grads)
        check_backend(backend, summary.devices)
        if summary.any_dtensor:  # elementwise: the local shards
            grads = [_dtensor.local(g) for g in grads]
            summary = Summary(grads)
        if summary.any_sparse:
            raise RuntimeError("clip_grad_value_ does not support sparse gradients (neither does "
                               "torch's: there is no sparse clamp); clip their values instead")
        groups = by_device(grads, summary)
        for device, group in groups.items():
            # An empty range or a NaN bound: torch's ops decide (everything but NaN becomes
            # clip_value; a NaN bound makes every element NaN), not the kernels' min/max order.
            if not clip_value >= 0:
                for g in group:
                    g.clamp_(min=-clip_value, max=clip_value)
            elif _native(device, group, "clamp_", backend,
                         summary if len(groups) == 1 else None):
                torch.ops.fusedopt.clamp_(group, -clip_value, clip_value)
            elif device.type == "cuda":  # two multi-tensor launches rather than one per tensor
                torch._foreach_clamp_min_(group, -clip_value)
                torch._foreach_clamp_max_(group, clip_value)
            else:
                for g in group:
                    g.clamp_(min=-clip_value, max=clip_value)


__all__ = ["clip_grad_norm_", "clip_grads_with_norm_", "clip_grad_value_", "get_total_norm",
           "clip_coefficient", "scale_", "EPS"]
