r"""The global norm of a list of tensors, in one read of every element, with no host sync.

.. math::

    \|x\|_p = \Big(\sum_i |x_i|^p\Big)^{1/p}, \qquad
    \|x\|_\infty = \max_i |x_i|, \qquad \|x\|_{-\infty} = \min_i |x_i|

over all elements of all tensors as one vector (for ``p = 0`` torch counts the tensors that have
a nonzero element, and so does fusedopt). Elements are accumulated in float32 (float64 when
a tensor is float64), whatever their storage dtype: float16 gradients with values whose squares
overflow float16 still give the right norm.

Implementations, per device (``backend="auto"`` picks the first that applies):

``cpu``        ``torch.ops.fusedopt.total_norm``: one parallel region over all tensors.
``cuda``       the same op's CUDA kernel, when the extension was built with it.
``triton``     :mod:`fusedopt.backends.triton.norm`: one launch per dtype plus one to finish.
``reference``  ``torch._foreach_norm`` per dtype, then the norm of the per-tensor norms (torch's
               own method, accumulating in float32).
"""
from __future__ import annotations

import functools
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from .. import _norm_ops, backends

Tensor = torch.Tensor
TensorOrTensors = Union[Tensor, Iterable[Tensor]]

_COMPLEX_TO_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64,
                    torch.complex32: torch.float16}
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_NORMS = (2.0, 1.0, float("inf"))


def as_list(tensors: TensorOrTensors) -> List[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return _COMPLEX_TO_REAL.get(dtype, dtype)


def result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype torch's ``get_total_norm`` returns: the promotion of the (real) grad dtypes."""
    return functools.reduce(torch.promote_types, (real_dtype(t.dtype) for t in tensors))


def accumulate_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 if any tensor is (complex) float64, else float32."""
    return torch.float64 if any(real_dtype(t.dtype) == torch.float64 for t in tensors) else torch.float32


def to_device(t: Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t`` on ``device``: asynchronous towards a GPU; blocking towards the CPU, where the value
    is read right away (an asynchronous device-to-host copy could still be in flight)."""
    device = torch.device(device)
    return t.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def by_device(tensors: Sequence[Tensor]) -> Dict[torch.device, List[Tensor]]:
    groups: Dict[torch.device, List[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def choose(backend: str, device: torch.device, tensors: Sequence[Tensor], norm_type: float) -> str:
    """Which implementation computes the norm of ``tensors`` (all on ``device``)."""
    backend = backends.requested(backend)
    if backend in ("cpu", "cuda"):
        return "native" if _native_ok(device, tensors) else "reference"
    if backend == "triton":
        return "triton" if _triton_ok(device, tensors, norm_type) else "reference"
    if backend == "reference":
        return "reference"
    if _native_ok(device, tensors):
        return "native"
    if device.type == "cuda" and _triton_ok(device, tensors, norm_type):
        return "triton"
    return "reference"


def _native_ok(device: torch.device, tensors: Sequence[Tensor]) -> bool:
    return (_norm_ops.has_kernel("total_norm", device.type)
            and not any(t.is_complex() or t.is_sparse for t in tensors))


def _triton_ok(device: torch.device, tensors: Sequence[Tensor], norm_type: float) -> bool:
    if norm_type not in _TRITON_NORMS or any(t.dtype not in _TRITON_DTYPES for t in tensors):
        return False
    try:
        triton_backend = backends.get("triton")
    except backends.BackendUnavailableError:
        return False
    return triton_backend.supports(device, tensors[0].dtype) is None


def device_norm(tensors: Sequence[Tensor], norm_type: float, backend: str = "auto") -> Tensor:
    """Norm of tensors that share one device, as a 0-dim tensor of :func:`accumulate_dtype`."""
    how = choose(backend, tensors[0].device, tensors, norm_type)
    if how == "native":
        return torch.ops.fusedopt.total_norm(list(tensors), norm_type)
    if how == "triton":
        from ..backends.triton import norm as triton_norm
        return triton_norm.total_norm(tensors, norm_type)
    return reference_norm(tensors, norm_type)


def reference_norm(tensors: Sequence[Tensor], norm_type: float) -> Tensor:
    """torch's method (norm of the per-tensor norms), accumulating in :func:`accumulate_dtype`."""
    acc = accumulate_dtype(tensors)
    groups: Dict[torch.dtype, List[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t.abs() if t.is_complex() else t)
    norms: List[Tensor] = []
    for group in groups.values():
        if norm_type in (float("inf"), float("-inf")):
            group = [t for t in group if t.numel() > 0]  # no identity for max/min of nothing
        if group:
            norms.extend(torch._foreach_norm(group, norm_type, dtype=acc))
    if not norms:
        return torch.zeros((), dtype=acc, device=tensors[0].device)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def total_norm(tensors: Sequence[Tensor], norm_type: float = 2.0, backend: str = "auto") -> Tensor:
    """Norm of tensors on any devices, in :func:`accumulate_dtype`, on the first tensor's device.

    Per-device norms are combined as torch does (the norm of the per-device norms; for ``p = 0``
    their sum, as each is a count). Nothing here reads a value on the host.
    """
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    groups = by_device(tensors)
    first = tensors[0].device
    norms = [device_norm(group, norm_type, backend) for group in groups.values()]
    if len(norms) == 1:
        return norms[0]
    acc = accumulate_dtype(tensors)
    stacked = torch.stack([to_device(n, first, acc) for n in norms])
    return stacked.sum() if norm_type == 0.0 else torch.linalg.vector_norm(stacked, norm_type)


def check_finite(norm: Tensor, norm_type: float) -> None:
    """torch's ``error_if_nonfinite`` check (the one place that reads the norm on the host)."""
    if not bool(torch.isfinite(norm)):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")


def get_total_norm(tensors: TensorOrTensors, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                   backend: str = "auto") -> Tensor:
    """Drop-in for :func:`torch.nn.utils.get_total_norm`: the norm of all ``tensors`` as one vector.

    Returns a 0-dim tensor on the first tensor's device, of the dtype torch returns (the promotion
    of the tensors' dtypes; float32 ``0.`` for no tensors). The value is accumulated in float32
    (float64 for float64 tensors) and rounded once, so float16/bfloat16 results are torch's up
    to that rounding. ``error_if_nonfinite`` checks the accumulated value (a float16 norm above
    65504 is not an error: the gradients are finite) and is the only option that synchronises
    with the host. ``foreach`` is accepted for compatibility: every path is multi-tensor.
    ``backend`` picks the implementation (see the module docstring).
    """
    with torch.no_grad():
        tensors = as_list(tensors)
        norm = total_norm(tensors, norm_type, backend)
        if error_if_nonfinite:
            check_finite(norm, norm_type)
        if not tensors:
            return norm
        return norm.to(result_dtype(tensors))
