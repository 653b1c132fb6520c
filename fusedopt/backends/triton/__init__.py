"""The ``triton`` backend: one Triton kernel launch per param group step (per dtype present).

Layout of this package:

* :mod:`.rules` -- the SGD and Adam math as ``@triton.jit`` helpers (fp32, written once);
* :mod:`.program` -- what every program does besides the math (tables, scalars, step counter);
* :mod:`.adam_kernel`, :mod:`.sgd_kernel` -- the kernels;
* :mod:`.tables` -- device tables (addresses, sizes, chunk map) and their cache;
* :mod:`.config` -- block size / tiles / warps: candidates and the default row per dtype;
* :mod:`.tuning` -- times the candidates on the device and keeps the fastest (autotuning), with
  its file cache in :mod:`.tuning_cache` and its command line in ``__main__``;
* :mod:`.launch` -- the launchers (imported at the first step: it defines the kernels);
* :mod:`.compile_ops` -- custom ops so ``torch.compile`` keeps the step in its graph;
* :mod:`.compat` -- triton / numpy versions, and what an old triton's interpreter cannot do.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``),
which is how CI tests it. See ``docs/triton.md``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..._compiling import is_compiling
from . import compat
from .tables import SUPPORTED_DTYPES
from .tuning import tune

_triton_error: Optional[str] = None
try:
    import triton  # noqa: F401
except Exception as exc:  # missing or broken install: a reason, not a crash
    _triton_error = f"triton cannot be imported ({type(exc).__name__}: {exc})"


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class TritonBackend:
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        if _triton_error is not None:
            return _triton_error
        if interpreting():  # an old triton's interpreter with a numpy it cannot use (.compat)
            problem = compat.interpreter_problem()
            if problem is not None:
                return problem
        if not (torch.cuda.is_available() or interpreting()):
            return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason is not None:
            return reason
        if dtype not in SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported (float32, bfloat16, float16 are)"
        device = torch.device(device)
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "no CUDA device"
        if device.type == "cpu":
            return None if interpreting() else (
                "CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1)")
        return f"device type {device.type!r} is not supported"

    def adam_(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr,
              beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
              grad_scale=None, found_inf=None) -> None:
        kwargs = dict(lr=lr, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                      weight_decay=float(weight_decay), amsgrad=bool(amsgrad),
                      maximize=bool(maximize), decoupled_weight_decay=bool(decoupled_weight_decay),
                      grad_scale=grad_scale, found_inf=found_inf)
        if is_compiling():
            from . import compile_ops
            compile_ops.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)
            return
        from . import launch
        with torch.no_grad():
            launch.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs)

    def sgd_(self, params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
             nesterov, maximize, is_first_step, grad_scale=None, found_inf=None) -> None:
        kwargs = dict(lr=lr, momentum=float(momentum), dampening=float(dampening),
                      weight_decay=float(weight_decay), nesterov=bool(nesterov),
                      maximize=bool(maximize), is_first_step=bool(is_first_step),
                      grad_scale=grad_scale, found_inf=found_inf)
        if is_compiling():
            from . import compile_ops
            compile_ops.sgd_(params, grads, momentum_buffers, **kwargs)
            return
        from . import launch
        with torch.no_grad():
            launch.sgd_(params, grads, momentum_buffers, **kwargs)


BACKEND = TritonBackend()

# Register the custom ops now, outside any torch.compile trace (registration inside one fails).
try:
    from . import compile_ops as _compile_ops  # noqa: F401
except Exception:  # pragma: no cover - older torch: compiled steps fall back to a graph break
    pass

__all__ = ["BACKEND", "TritonBackend", "interpreting", "tune"]
