"""What the kernels see of a tensor: the local shard of a DTensor, as real numbers if complex.

The optimizers (``optim/base.py``) and the functional API share these, so both hand the kernels
the same views.
"""
from __future__ import annotations

import torch

from . import _dtensor

Tensor = torch.Tensor


def as_real(t: Tensor) -> Tensor:
    """A complex tensor as a real view (a trailing dimension of 2), any other tensor as it is."""
    return torch.view_as_real(t) if t.is_complex() else t


def kernel_view(t: Tensor) -> Tensor:
    """What a kernel updates for ``t``: the local shard if a DTensor, as real numbers if complex."""
    return as_real(_dtensor.local(t))


__all__ = ["as_real", "kernel_view"]
