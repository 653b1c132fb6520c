"""Backend registry and the one dispatch point of fusedopt.

A backend is a module ``fusedopt.backends.<name>`` that defines ``BACKEND``, an object with:

``name``
    the backend's name (``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``).
``unavailable_reason() -> str | None``
    ``None`` when the backend can run in this process, else a sentence saying why not
    (extension not built, no GPU, triton missing, ...).
``supports(device, dtype) -> str | None``
    ``None`` when it can update parameters of that device and dtype, else why not.
``adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale=None, found_inf=None)``
    one Adam/AdamW step over the lists, in place; increments every ``state_steps[i]`` by one.
``sgd_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
maximize, is_first_step, grad_scale=None, found_inf=None)``
    one SGD step over the lists, in place.
``adam_reading_grads(params, exp_avgs, ...)`` / ``sgd_reading_grads(params, momentum_buffers, ...)`` (optional)
    the same steps reading every param's own ``.grad`` (no grads list): return True when done,
    False having changed nothing when the general call must be made instead. The optimizers use
    them when every param of a bucket has a grad and no clipping is folded into the step.
``rejects_sparse_grads`` (optional, default False)
    True when the backend's own argument checks reject sparse gradients before anything is
    written; the optimizers then skip their per-step Python check of every gradient's layout.

Contract shared by all backends: every list holds real floating tensors (complex parameters
arrive as real views), all on one device; dtypes may differ between tensors; ``lr`` is a Python
float or a 0-dim tensor; ``grad_scale`` divides the gradients on the fly (gradients are never
written; a float64 ``grad_scale`` beyond float32's range, which clipping under GradScaler's
ceiling scale produces, divides float32 math as ``(g / (scale 2^-64)) 2^-64``, not by inf); a nonzero ``found_inf`` makes the call change nothing at all.

Adding a backend means adding one module here and its name to :data:`BACKEND_NAMES`.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

#: Every backend fusedopt knows, in no particular order.
BACKEND_NAMES: Tuple[str, ...] = ("reference", "cpu", "triton", "cuda")

#: Names accepted by ``backend=`` on optimizers and functional calls.
VALID_CHOICES: Tuple[str, ...] = ("auto",) + BACKEND_NAMES

#: Environment variable that overrides the ``backend=`` of every optimizer when set.
ENV_VAR = "FUSEDOPT_BACKEND"

# Preference order of the ``auto`` rule per device type.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the requested update."""


_loaded: Dict[str, Any] = {}
_load_errors: Dict[str, str] = {}
_select_cache: Dict[Tuple[str, str, torch.dtype], Any] = {}
_warned_fallback: set = set()


def _import(name: str):
    """``fusedopt.backends.<name>``, by import statements: torch.compile traces these (it cannot
    trace ``importlib.import_module``), so that a compiled step or clipping call may load the
    backend it picks."""
    if name == "reference":
        from . import reference as module
    elif name == "cpu":
        from . import cpu as module
    elif name == "triton":
        from . import triton as module
    elif name == "cuda":
        from . import cuda as module
    else:
        raise ValueError(f"unknown fusedopt backend {name!r}")
    return module


def _load(name: str):
    """Import ``fusedopt.backends.<name>`` once; return its BACKEND or None (reason recorded)."""
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    try:
        backend = _import(name).BACKEND
    except Exception as exc:  # any import problem is a reason, not a crash
        _load_errors[name] = f"cannot import fusedopt.backends.{name}: {type(exc).__name__}: {exc}"
        return None
    _loaded[name] = backend
    return backend


def get(name: str):
    """The backend object called ``name``; raises :class:`BackendUnavailableError` if unusable."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown fusedopt backend {name!r}; choose one of {VALID_CHOICES}")
    backend = _load(name)
    if backend is None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {_load_errors[name]}")
    reason = backend.unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return backend


def available() -> Dict[str, Optional[str]]:
    """Map every backend name to ``None`` (usable here) or the reason it is not."""
    result: Dict[str, Optional[str]] = {}
    for name in BACKEND_NAMES:
        backend = _load(name)
        if backend is None:
            result[name] = _load_errors[name]
        else:
            result[name] = backend.unavailable_reason()
    return result


def validate_choice(name: str) -> str:
    """Check a ``backend=`` argument early, at optimizer construction."""
    if not isinstance(name, str) or name not in VALID_CHOICES:
        raise ValueError(f"Invalid backend: {name!r}; choose one of {VALID_CHOICES}")
    return name


def requested(name: str) -> str:
    """The backend actually requested: ``FUSEDOPT_BACKEND`` overrides ``name`` when set."""
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in VALID_CHOICES:
            raise ValueError(f"{ENV_VAR}={env!r} is not a backend; choose one of {VALID_CHOICES}")
        return env
    return name


def select(name: str, device: torch.device, dtype: torch.dtype):
    """Return the backend that updates tensors of ``device``/``dtype`` for the request ``name``.

    ``auto``: CUDA tensors use ``cuda`` if built, else ``triton``; CPU tensors use ``cpu`` if built;
    otherwise ``reference`` (same numbers, slower) with a one-time warning. An explicit name that
    cannot serve the request raises :class:`BackendUnavailableError` saying why.
    """
    name = requested(name)
    device = torch.device(device)
    key = (name, str(device), dtype)
    cached = _select_cache.get(key)
    if cached is not None:
        return cached
    if name == "auto":
        backend = _select_auto(device, dtype)
    else:
        backend = get(name) if name in BACKEND_NAMES else None
        if backend is None:
            raise ValueError(f"unknown fusedopt backend {name!r}; choose one of {VALID_CHOICES}")
        reason = backend.supports(device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot update {dtype} tensors on {device}: {reason}")
    _select_cache[key] = backend
    return backend


def _select_auto(device: torch.device, dtype: torch.dtype):
    reasons = []
    for candidate in _AUTO_ORDER.get(device.type, ()):
        backend = _load(candidate)
        reason = _load_errors.get(candidate) if backend is None else (
            backend.unavailable_reason() or backend.supports(device, dtype))
        if reason is None:
            return backend
        reasons.append(f"{candidate}: {reason}")
    backend = get("reference")
    reason = backend.supports(device, dtype)
    if reason is not None:
        raise BackendUnavailableError(f"no fusedopt backend can update {dtype} tensors on {device}: {reason}")
    if reasons and (device.type, dtype) not in _warned_fallback:
        _warned_fallback.add((device.type, dtype))
        warnings.warn(
            f"fusedopt: no fused backend for {dtype} on {device} ({'; '.join(reasons)}); "
            "using the reference backend (same numbers, slower)", RuntimeWarning, stacklevel=3)
    return backend


#: Bumped by :func:`clear_cache`; callers that remember a selection (the optimizers' buckets)
#: compare it to know their choice is stale.
generation = 0


def clear_cache() -> None:
    """Forget cached selections (tests that change the environment use this)."""
    global generation
    _select_cache.clear()
    generation += 1


__all__ = [
    "BACKEND_NAMES", "VALID_CHOICES", "ENV_VAR", "BackendUnavailableError",
    "available", "get", "select", "requested", "validate_choice", "clear_cache",
]
