"""Loads the native extension and makes its ops traceable.

Importing this module imports ``fusedopt._C``, whose static initialisers register the ops
``torch.ops.fusedopt.adam_`` and ``torch.ops.fusedopt.sgd_`` (schemas in ``csrc/ops.cpp``) and
their CPU (and, when built, CUDA) kernels. If the extension is missing or fails to load, the
error is kept in :data:`LOAD_ERROR` instead of raised, so that pure-Python backends still work.

It also registers fake ("meta") implementations so that ``torch.compile`` can trace calls to
the ops: both ops only mutate their inputs in place and return nothing, so the fake
implementations have nothing to compute. They check what metadata allows (list lengths,
devices, one-element scalars), and refuse a real call in which some tensors are on the meta
device and others not: the dispatcher sends such a call to them as a whole, where it would
silently do nothing. And it warns about a ``FUSEDOPT_CPU_ISA`` / ``FUSEDOPT_CPU_STREAMS`` value
the extension ignores (:func:`warn_invalid_cpu_env`).
"""
from __future__ import annotations

import itertools
import os
import warnings
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


def _is_fake(t) -> bool:
    """Whether ``t`` is a fake tensor (FakeTensorMode, torch.compile's tracing), whose
    ``.device`` is the device it stands for."""
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def check_fake_call(op: str, named) -> None:
    """The fake implementations run for two kinds of call: fake tensors (torch.compile,
    FakeTensorMode), where nothing runs and that is right, and real calls in which a tensor is on
    the meta device, which the dispatcher sends to the Meta kernel as a whole. A meta tensor among
    CPU/CUDA ones would then make the call silently do nothing (or return an uninitialised norm):
    such a call is refused, naming the mismatch. ``named``: (name, tensor or None) pairs."""
    meta = other = None
    for name, t in named:
        if t is None or _is_fake(t):
            continue
        if t.device.type == "meta":
            meta = meta or name
        elif other is None:
            other = (name, t.device)
        if meta is not None and other is not None:
            raise RuntimeError(
                f"fusedopt::{op}: {meta} is on meta but {other[0]} is on {other[1]}; the tensors "
                "of a call must be on one device (a meta tensor among others would make the "
                "call do nothing)")


def _named(list_name: str, tensors):
    return ((f"{list_name}[{i}]", t) for i, t in enumerate(tensors))


def check_scalar(op: str, name: str, t, device, others: str = "params are") -> None:
    """A one-element tensor argument (``lr_tensor``, ``grad_scale``, ``found_inf``, ``scale``,
    ``prescale``) of a call on ``device``: one element, and on ``device`` or on the CPU (the
    kernels read a CPU scalar on the host; the cpu kernels read any device's), never meta with
    non-meta tensors or the reverse."""
    if t is None:
        return
    if t.numel() != 1:
        raise RuntimeError(f"fusedopt::{op}: {name} must be a tensor with one element, got shape "
                           f"{list(t.shape)}")
    if device is None or t.device == device:
        return
    if (t.device.type == "meta" or device.type == "meta" or
            not (t.device.type == "cpu" or device.type == "cpu")):
        raise RuntimeError(f"fusedopt::{op}: {name} is on {t.device} but {others} on {device}")


def _check_lists(op: str, params, lists, scalars=None) -> None:
    """The checks a fake implementation can do: list lengths, one device per item, and the
    scalar tensor arguments' element count and device (:func:`check_scalar`).

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
    scalars = scalars or {}
    device = params[0].device if len(params) else None
    for name, t in scalars.items():
        check_scalar(op, name, t, device)
    check_fake_call(op, itertools.chain(
        _named("params", params), *(_named(n, ts) for n, ts in lists.items()), scalars.items()))


def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr,
               beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
               lr_tensor=None, grad_scale=None, found_inf=None) -> None:
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
             "state_steps": state_steps}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    _check_lists("adam_", params, lists, {"lr_tensor": lr_tensor, "grad_scale": grad_scale,
                                          "found_inf": found_inf})
    return None


def _sgd_fake(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
              nesterov, maximize, is_first_step, lr_tensor=None, grad_scale=None,
              found_inf=None) -> None:
    lists = {"grads": grads}
    if momentum != 0:
        lists["momentum_buffers"] = momentum_buffers
    _check_lists("sgd_", params, lists, {"lr_tensor": lr_tensor, "grad_scale": grad_scale,
                                         "found_inf": found_inf})
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


#: Values ``csrc/cpu/isa.cpp`` accepts for the CPU kernels' environment variables (exactly these
#: spellings: anything else is ignored there and the default choice stays).
CPU_ENV_VALUES = {"FUSEDOPT_CPU_ISA": ("avx512bf16", "avx512", "avx2", "scalar"),
                  "FUSEDOPT_CPU_STREAMS": ("1", "2")}


def warn_invalid_cpu_env(environ=None) -> None:
    """Warn once per bad variable, when the extension loads, about a ``FUSEDOPT_CPU_ISA`` /
    ``FUSEDOPT_CPU_STREAMS`` value the C++ side (which cannot raise at load time) silently
    ignores, e.g. ``AVX2`` or ``4``. Empty values mean unset."""
    environ = os.environ if environ is None else environ
    for name, valid in CPU_ENV_VALUES.items():
        value = environ.get(name)
        if value and value not in valid:
            warnings.warn(f"{name}={value!r} is not one of {'|'.join(valid)} (exact spelling) "
                          "and is ignored: the CPU kernels keep their default choice",
                          RuntimeWarning, stacklevel=2)


if _C is not None:
    _register_fakes()
    warn_invalid_cpu_env()
