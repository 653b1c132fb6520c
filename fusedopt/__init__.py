"""fusedopt: fused multi-tensor optimizer steps for PyTorch.

Swap ``torch.optim.AdamW(...)`` for ``fusedopt.optim.AdamW(...)``: same arguments, same numbers,
same checkpoints, a faster step. Backends: ``cuda``, ``triton``, ``cpu`` and ``reference``; see
:mod:`fusedopt.backends`.
"""
from . import backends, clip, functional, lr_scheduler, optim
from .clip import (PercentileClipper, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_,
                   get_total_norm)
from .optim import SGD, Adam, AdamW

__version__ = "0.1.0"

__all__ = ["optim", "lr_scheduler", "functional", "backends", "clip", "SGD", "Adam", "AdamW",
           "clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm",
           "PercentileClipper", "__version__"]
