"""The native clipping ops and their fake kernels (``csrc/cpu/norm.cpp``; ``csrc/cuda/norm.cu``,
``norm_ops.cpp``).

``fusedopt._C`` registers, next to the optimizer ops:

* ``fusedopt::total_norm(Tensor[] tensors, float norm_type) -> Tensor`` -- the norm of all
  tensors as one vector, a 0-dim float32 tensor (float64 if any input is float64), every element
  read once;
* ``fusedopt::scale_(Tensor(a!)[] tensors, Tensor scale) -> ()`` -- ``t *= scale`` for all
  tensors, nothing when ``scale == 1``;
* ``fusedopt::clamp_(Tensor(a!)[] tensors, float min, float max) -> ()``.

This module says which devices have kernels for them, calls them (eager calls on CPU tensors
skip the dispatcher's boxing through ``fusedopt._C._total_norm_cpu`` / ``_scale_cpu``, ~0.14 ms
per call with 1000 tensors) and registers the fake implementations that ``torch.compile`` needs
to trace the calls.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from . import _ops
from ._compiling import is_compiling as _is_compiling

OP_NAMES = ("total_norm", "scale_", "clamp_")


def _probe_kernel(op: str, dispatch_key: str) -> bool:
    if not _ops.available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedopt::{op}", dispatch_key)
    except RuntimeError:  # the op does not exist (an extension built before the clip ops)
        return False


# Probed once, at import: the registrations are fixed once the extension is loaded, and a plain
# dict is what torch.compile can trace (it cannot call the dispatcher query).
_KERNELS = {(op, device_type): _probe_kernel(op, key)
            for op in OP_NAMES for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


def has_kernel(op: str, device_type: str) -> bool:
    """True when ``torch.ops.fusedopt.<op>`` has a kernel for ``device_type`` ('cpu', 'cuda')."""
    return _KERNELS.get((op, device_type), False)


def total_norm(tensors, norm_type: float, prescale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.ops.fusedopt.total_norm(tensors, norm_type, prescale)`` (the norm of
    ``prescale * tensors``), directly when the tensors allow."""
    direct = getattr(_ops._C, "_total_norm_cpu", None)
    if direct is not None and not _is_compiling():
        out = direct(tensors, float(norm_type), False, prescale)
        if out is not None:
            return out
    return torch.ops.fusedopt.total_norm(list(tensors), norm_type, prescale)


def scale_(tensors, scale: torch.Tensor) -> None:
    """``torch.ops.fusedopt.scale_(tensors, scale)``, directly when the tensors allow."""
    direct = getattr(_ops._C, "_scale_cpu", None)
    if direct is not None and not _is_compiling() and direct(tensors, scale):
        return
    torch.ops.fusedopt.scale_(list(tensors), scale)


def _check_fake_call(op: str, tensors, scalar_name: Optional[str] = None,
                     scalar: Optional[torch.Tensor] = None) -> Optional[torch.device]:
    """What a fake implementation can check (``_ops.check_fake_call``: a meta tensor among real
    ones is refused, not run as a no-op): one device for the list; the scalar argument's element
    count and device. Returns the list's device (None for an empty list)."""
    device = tensors[0].device if len(tensors) else None
    for i, t in enumerate(tensors):
        if t.device != device:
            raise RuntimeError(f"fusedopt::{op}: tensors[{i}] is on {t.device} but tensors[0] is "
                               f"on {device}; one call takes tensors of one device")
    if scalar_name is not None:
        _ops.check_scalar(op, scalar_name, scalar, device, "the tensors are")
    _ops.check_fake_call(op, itertools.chain(
        ((f"tensors[{i}]", t) for i, t in enumerate(tensors)), ((scalar_name, scalar),)))
    return device


def _total_norm_fake(tensors, norm_type, prescale=None):
    device = _check_fake_call("total_norm", tensors, "prescale", prescale)
    if device is None:
        device = prescale.device if prescale is not None else torch.device("cpu")
    any_double = any(t.dtype == torch.float64 for t in tensors)
    return torch.empty((), dtype=torch.float64 if any_double else torch.float32, device=device)


def _scale_fake(tensors, scale) -> None:
    _check_fake_call("scale_", tensors, "scale", scale)
    return None


def _clamp_fake(tensors, min, max) -> None:  # noqa: A002 (the schema's names)
    _check_fake_call("clamp_", tensors)
    return None


def _register_fakes() -> None:
    register = getattr(torch.library, "register_fake", None) or getattr(torch.library, "impl_abstract")
    for name, fn in (("total_norm", _total_norm_fake), ("scale_", _scale_fake),
                     ("clamp_", _clamp_fake)):
        if not has_kernel(name, "cpu") and not has_kernel(name, "cuda"):
            continue
        try:
            register(f"fusedopt::{name}")(fn)
        except RuntimeError as exc:  # already registered (module reloaded)
            if "already" not in str(exc):
                raise


_register_fakes()
