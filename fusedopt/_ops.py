"""Loads the native extension and makes its ops traceable.

Importing this module imports ``fusedopt._C``, whose static initialisers register the ops
``torch.ops.fusedopt.adam_`` and ``torch.ops.fusedopt.sgd_`` (schemas in ``csrc/ops.cpp``) and
their CPU (and, when built, CUDA) kernels. If the extension is missing or fails to load, the
error is kept in :data:`LOAD_ERROR` instead of raised, so that pure-Python backends still work.

It also registers fake ("meta") implementations so that ``torch.compile`` can trace calls to
the ops: both ops only mutate their inputs in place and return nothing, so the fake
implementations have nothing to compute.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

LOAD_ERROR: Optional[str] = None
"""Why ``fusedopt._C`` could not be imported (``None`` when it was)."""

try:
    from . import _C  # noqa: F401  (registers torch.ops.fusedopt.*)
except Exception as exc:  # ImportError when not built, OSError/ImportError on ABI mismatch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"

#: The ops defined by ``csrc/ops.cpp``.
OP_NAMES = ("adam_", "sgd_")


def available() -> bool:
    """True when the native extension is loaded and ``torch.ops.fusedopt.*`` exist."""
    return _C is not None


def build_info() -> Dict[str, Any]:
    """How the extension was built (compiler, flags, CUDA, CPU ISA variants); {} if not loaded."""
    return dict(_C.build_info()) if _C is not None else {}


def cpu_isa() -> Optional[str]:
    """CPU kernel variant picked at run time ('avx512bf16', 'avx512', 'avx2', 'scalar'); None if
    not loaded."""
    return _C.cpu_isa() if _C is not None else None


def _check_lists(op: str, params, lists) -> None:
    """The checks a fake implementation can do: list lengths and one device per item.

    (Fake/meta tensors also reach these functions outside torch.compile, e.g. a meta tensor
    mixed into CPU lists; without them such a call would silently do nothing.)
    """
    for list_name, tensors in lists.items():
        if len(tensors) != len(params):
            raise RuntimeError(f"fusedopt::{op}: {list_name} has {len(tensors)} tensors but "
                               f"params has {len(params)}")
        for i, (t, p) in enumerate(zip(tensors, params)):
            if t.device != p.device:
                raise RuntimeError(f"fusedopt::{op}: {list_name}[{i}] is on {t.device} but "
                                   f"params[{i}] is on {p.device}")


def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
               lr_tensor=None, grad_scale=None, found_inf=None) -> None:
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    _check_lists("adam_", params, lists)
    if len(state_steps) != len(params):
        raise RuntimeError(f"fusedopt::adam_: state_steps has {len(state_steps)} tensors but "
                           f"params has {len(params)}")
    return None


def _sgd_fake(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
              nesterov, maximize, is_first_step, lr_tensor=None, grad_scale=None,
              found_inf=None) -> None:
    lists = {"grads": grads}
    if momentum != 0:
        lists["momentum_buffers"] = momentum_buffers
    _check_lists("sgd_", params, lists)
    return None


def _register_fakes() -> None:
    # torch >= 2.4 has register_fake; older releases called it impl_abstract.
    register = getattr(torch.library, "register_fake", None) or getattr(
        torch.library, "impl_abstract")
    for name, fn in (("adam_", _adam_fake), ("sgd_", _sgd_fake)):
        try:
            register(f"fusedopt::{name}")(fn)
        except RuntimeError as exc:  # already registered (e.g. module reloaded)
            if "already" not in str(exc):
                raise


if _C is not None:
    _register_fakes()
