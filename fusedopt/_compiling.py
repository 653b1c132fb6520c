"""``is_compiling()``: whether torch.compile is tracing the current call.

The eager fast paths (C++ entry points that borrow tensors from Python lists) step aside then,
so that dynamo traces ``torch.ops.fusedopt.*`` (which have fake kernels) instead.
"""
from __future__ import annotations

try:
    from torch.compiler import is_compiling
except ImportError:  # torch < 2.3 spelled it here
    from torch._dynamo import is_compiling

__all__ = ["is_compiling"]
