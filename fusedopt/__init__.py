"""fusedopt: fused multi-tensor optimizer steps for PyTorch.

Swap ``torch.optim.AdamW(...)`` for ``fusedopt.optim.AdamW(...)``: same arguments, same numbers,
same checkpoints, a faster step. Backends: ``cuda``, ``triton``, ``cpu`` and ``reference``; see
:mod:`fusedopt.backends`.
"""
from . import backends, functional, optim
from .optim import SGD, Adam, AdamW

__version__ = "0.1.0"

__all__ = ["optim", "functional", "backends", "SGD", "Adam", "AdamW", "__version__"]
