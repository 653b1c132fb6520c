"""torch's own functions as oracles, on every torch fusedopt supports (>= 2.5).

Tests compare fusedopt with what the installed torch does. A few of the torch functions they use
as oracles are newer than torch 2.5; this module gives each one under one name:

- ``get_total_norm`` / ``clip_grads_with_norm_``: torch's (2.6+), else the two halves of torch
  2.5's ``clip_grad_norm_`` (``benchmarks/torch_baselines.py``, shared with ``bench_clip.py``);
  ``clip_grad_norm_``: torch's (2.6+), else those two halves, which take sparse gradients
  (torch 2.5's own cannot).
- ``torch_adam(params, decoupled_weight_decay=..., **kw)``: ``torch.optim.Adam`` with that
  argument where it has it (2.7+), else ``AdamW`` for decoupled decay and ``Adam`` otherwise
  (the same update: torch's Adam with decoupled decay is AdamW).
"""
from __future__ import annotations

import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from torch_baselines import (TORCH_HAS_SPLIT_CLIPPING, clip_grad_norm_, clip_grads_with_norm_,  # noqa: E402
                             get_total_norm)

__all__ = ["get_total_norm", "clip_grads_with_norm_", "clip_grad_norm_", "torch_adam", "TORCH_HAS_SPLIT_CLIPPING",
           "ADAM_HAS_DECOUPLED_WEIGHT_DECAY", "TORCH_VERSION"]

from fusedopt._compiling import TORCH_VERSION  # noqa: E402  (the installed release, (major, minor))

#: True where ``torch.optim.Adam`` takes ``decoupled_weight_decay`` (torch >= 2.7).
ADAM_HAS_DECOUPLED_WEIGHT_DECAY = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam).parameters


def torch_adam(params, *, decoupled_weight_decay: bool = False, **kwargs) -> torch.optim.Optimizer:
    """``torch.optim.Adam(params, decoupled_weight_decay=..., **kwargs)`` on any torch >= 2.5."""
    if ADAM_HAS_DECOUPLED_WEIGHT_DECAY:
        return torch.optim.Adam(params, decoupled_weight_decay=decoupled_weight_decay, **kwargs)
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    return cls(params, **kwargs)
