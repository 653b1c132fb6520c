"""The ``cuda`` backend: thin wrappers over the native CUDA kernels ``torch.ops.fusedopt.*``.

One call updates every tensor of one storage dtype with ONE kernel launch, whatever the number
of tensors (``csrc/cuda``; design in ``docs/cuda.md``). The step counters, lr tensor, grad
scale and found-inf flag are read and written on the device: a step never waits for the GPU.
Float32/float64 params compute in their own precision, bfloat16/float16 ones in float32.

Eager calls skip the dispatcher's boxing through ``fusedopt._C._adam_cuda`` / ``_sgd_cuda``
(see :mod:`._native`, shared with the ``cpu`` backend).

Available when ``fusedopt._C`` was built with CUDA (``setup.py``: nvcc + a CUDA build of torch)
and a CUDA device is present.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .. import _ops
from ._native import NativeBackend

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def kernels_registered() -> bool:
    """True when ``fusedopt._C`` registered CUDA kernels for every fusedopt op."""
    if not _ops.available():
        return False
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    return all(has_kernel(f"fusedopt::{name}", "CUDA") for name in _ops.OP_NAMES)


def built_with_cuda() -> bool:
    """True when ``fusedopt._C`` says it was built with its CUDA kernels."""
    return bool(_ops.build_info().get("with_cuda", False))


def table_stats() -> Dict[str, int]:
    """Counters of the device work-table cache (see ``docs/cuda.md``).

    ``full_uploads``: tables built and uploaded whole; ``grad_uploads``: only the gradient
    pointers re-uploaded; ``hits``: tables reused unchanged; ``entries``: tables cached now.
    """
    full, grads, hits, entries = torch.ops.fusedopt._cuda_table_stats()
    return {"full_uploads": full, "grad_uploads": grads, "hits": hits, "entries": entries}


def clear_table_cache() -> None:
    """Forget every cached work table (their memory returns to torch's caching allocator)."""
    torch.ops.fusedopt._cuda_clear_table_cache()


class CudaBackend(NativeBackend):
    name = "cuda"
    # direct entry points of CUDA builds (older builds lack them: the dispatcher is used)
    DIRECT_ADAM = "_adam_cuda"
    DIRECT_SGD = "_sgd_cuda"

    def unavailable_reason(self) -> Optional[str]:
        if not _ops.available():
            return f"fusedopt._C not built or not loadable: {_ops.LOAD_ERROR}"
        if not built_with_cuda():
            why = _ops.build_info().get("cuda_reason") or "no reason recorded"
            return f"fusedopt._C was built without CUDA ({why})"
        if not kernels_registered():
            return "fusedopt._C was built with CUDA but its CUDA kernels are not registered"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cuda":
            return f"cuda backend needs CUDA tensors, got {device}"
        if dtype not in _SUPPORTED_DTYPES:
            return f"dtype {dtype} not supported (float32, float64, bfloat16, float16 are)"
        return None


BACKEND = CudaBackend()
