"""The ``cpu`` backend: thin wrappers over the native CPU kernels (``csrc/cpu``).

The kernels update every tensor of a call in one parallel region, vectorised with the widest
instruction set of the machine (chosen at run time). Float32/float64 params compute in their
own precision, bfloat16/float16 ones in float32.

Eager calls go through ``fusedopt._C._adam_cpu`` / ``_sgd_cpu``, which borrow the tensors
straight from the Python lists (see :mod:`._native`, shared with the ``cuda`` backend).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .. import _ops
from .._compiling import is_compiling as _is_compiling
from ._native import NativeBackend

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class CpuBackend(NativeBackend):
    name = "cpu"
    #: the kernels' own validation rejects sparse (non-strided) grads before writing anything
    rejects_sparse_grads = True
    DIRECT_ADAM = "_adam_cpu"
    DIRECT_SGD = "_sgd_cpu"

    def unavailable_reason(self) -> Optional[str]:
        if not _ops.available():
            return f"fusedopt._C not built or not loadable: {_ops.LOAD_ERROR}"
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cpu":
            return f"cpu backend needs CPU tensors, got {device}"
        if dtype not in _SUPPORTED_DTYPES:
            return f"dtype {dtype} not supported (float32, float64, bfloat16, float16 are)"
        return None

    def norm_of_grads(self, params: List[torch.Tensor], norm_type: float = 2.0,
                      prescale: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The norm of the params' ``.grad`` (``torch.ops.fusedopt.total_norm`` of them, of
        ``prescale * grad`` when given), read in C++; ``None`` (nothing done) when a param has
        no plain grad or the call needs the dispatcher. For steps with ``max_grad_norm``, like
        ``adam_reading_grads``."""
        direct = getattr(_ops._C, "_total_norm_cpu", None)
        if not params or direct is None or _is_compiling():
            return None
        return direct(params, float(norm_type), True, prescale)


BACKEND = CpuBackend()
