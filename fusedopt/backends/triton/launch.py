"""Launchers: from the backend's lists to one kernel launch per dtype present.

Per call: look the plan up (:mod:`.tables`; a list comparison when nothing moved), point the
gradient tables at this step's gradients, turn the hyperparameters into kernel arguments, launch
once per bucket, and hand the entries the kernels cannot address to the reference backend.
Nothing here reads a device value on the host: ``lr``, ``grad_scale`` and ``found_inf`` tensors
go to the kernel as pointers.

Importing this module defines the kernels (``@triton.jit`` runs at import), so
``TRITON_INTERPRET`` must be set before the first import; :mod:`fusedopt.backends.triton` imports it
lazily, at the first step.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import Counter
from typing import List, Optional, Sequence, Union

import torch
import triton.language as tl

from .. import reference
from .adam_kernel import adam_kernel
from .sgd_kernel import sgd_kernel
from .tables import PLANS, Bucket, Plan

Tensor = torch.Tensor

#: Kernel launches so far, by kernel name (tests count launches per step with it); the tuner's
#: timing launches count under "<name> (tuning)".
LAUNCHES: Counter = Counter()

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
              torch.float64: tl.float64}
#: Names of the address tables of each list, in the kernels' order (the first n for n lists).
ADAM_ROWS = ("param_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs", "max_exp_avg_sq_ptrs")
SGD_ROWS = ("param_ptrs", "buffer_ptrs")
_warned_fallback = False


def adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor],
          state_steps: Sequence[Tensor], *, lr: Union[float, Tensor], beta1: float, beta2: float,
          eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
          decoupled_weight_decay: bool, grad_scale: Optional[Tensor] = None,
          found_inf: Optional[Tensor] = None, plan: Optional[Plan] = None) -> None:
    """One Adam/AMSGrad/AdamW step over the lists (see the backend protocol). ``plan``: tables
    built for these lists by the caller (the tuner's), instead of the cache's."""
    if len(params) == 0:
        return
    _check_lengths(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                   *((max_exp_avg_sqs,) if amsgrad else ()))
    # the scalars first: a bad one is refused before any table is built or bound
    device = params[0].device
    lr_value, lr_ptr = _scalar_argument(lr, device, "adam_")
    grad_scale = _on(device, grad_scale, "adam_", "grad_scale")
    found_inf = _on(device, found_inf, "adam_", "found_inf")
    lists = [params, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    counted = plan is None  # the tuner's launches are counted apart
    if plan is None:
        plan = PLANS.get("adam", ADAM_ROWS[:len(lists)], lists, state_steps)
    plan.bind_gradients(grads, params)
    with _current_device(device):
        for bucket in plan.buckets:
            rows, cfg, unused = bucket.rows, bucket.config, bucket.rows["numels"]
            adam_kernel[(bucket.n_chunks,)](
                rows["param_ptrs"], bucket.grad_ptrs, rows["exp_avg_ptrs"], rows["exp_avg_sq_ptrs"],
                rows.get("max_exp_avg_sq_ptrs", unused), rows["step_ptrs"], rows["numels"],
                bucket.vector_ok, rows["chunk_counts"], rows["chunk_tensor"], rows["chunk_start"],
                bucket.arrivals,
                lr_value, _or(lr_ptr, unused), 1.0 - beta1, beta2, 1.0 - beta2, _log(beta1),
                _log(beta2), eps, weight_decay, _or(grad_scale, unused), _or(found_inf, unused),
                DTYPE=_TL_DTYPES[bucket.dtype], STEP_DTYPE=_TL_DTYPES[bucket.step_dtype],
                BLOCK=cfg.block, TILES=cfg.tiles, AMSGRAD=amsgrad, MAXIMIZE=maximize, HAS_WEIGHT_DECAY=weight_decay != 0,
                DECOUPLED=decoupled_weight_decay, LR_ON_DEVICE=lr_ptr is not None,
                HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
                num_warps=cfg.num_warps)
            LAUNCHES["adam_kernel" if counted else "adam_kernel (tuning)"] += 1
    _bump_param_versions(params)
    if plan.fallback:
        _warn_fallback(plan)
        pick = _picker(plan.fallback)
        reference.BACKEND.adam_(
            pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs),
            pick(max_exp_avg_sqs) if amsgrad else [], pick(state_steps), lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
            found_inf=found_inf)


def sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
         lr: Union[float, Tensor], momentum: float, dampening: float, weight_decay: float,
         nesterov: bool, maximize: bool, is_first_step: bool, grad_scale: Optional[Tensor] = None,
         found_inf: Optional[Tensor] = None, plan: Optional[Plan] = None) -> None:
    """One SGD step over the lists (see the backend protocol); ``plan`` as for :func:`adam_`."""
    if len(params) == 0:
        return
    has_momentum = momentum != 0
    _check_lengths(params, grads, *((momentum_buffers,) if has_momentum else ()))
    # the scalars first: a bad one is refused before any table is built or bound
    device = params[0].device
    lr_value, lr_ptr = _scalar_argument(lr, device, "sgd_")
    grad_scale = _on(device, grad_scale, "sgd_", "grad_scale")
    found_inf = _on(device, found_inf, "sgd_", "found_inf")
    lists = [params, momentum_buffers] if has_momentum else [params]
    counted = plan is None
    if plan is None:
        plan = PLANS.get("sgd", SGD_ROWS[:len(lists)], lists, [])
    plan.bind_gradients(grads, params)
    with _current_device(device):
        for bucket in plan.buckets:
            rows, cfg, unused = bucket.rows, bucket.config, bucket.rows["numels"]
            sgd_kernel[(bucket.n_chunks,)](
                rows["param_ptrs"], bucket.grad_ptrs, rows.get("buffer_ptrs", unused),
                rows["numels"], bucket.vector_ok, rows["chunk_tensor"], rows["chunk_start"],
                lr_value, _or(lr_ptr, unused), momentum, 1.0 - dampening, weight_decay,
                _or(grad_scale, unused), _or(found_inf, unused),
                DTYPE=_TL_DTYPES[bucket.dtype], BLOCK=cfg.block, TILES=cfg.tiles,
                HAS_WEIGHT_DECAY=weight_decay != 0, HAS_MOMENTUM=has_momentum,
                NESTEROV=nesterov, MAXIMIZE=maximize, FIRST_STEP=is_first_step,
                LR_ON_DEVICE=lr_ptr is not None, HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, num_warps=cfg.num_warps)
            LAUNCHES["sgd_kernel" if counted else "sgd_kernel (tuning)"] += 1
    _bump_param_versions(params)
    if plan.fallback:
        _warn_fallback(plan)
        pick = _picker(plan.fallback)
        reference.BACKEND.sgd_(
            pick(params), pick(grads), pick(momentum_buffers) if has_momentum else [], lr=lr,
            momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, is_first_step=is_first_step, grad_scale=grad_scale,
            found_inf=found_inf)


# ---- helpers ---------------------------------------------------------------------------------
def _bump_param_versions(params: Sequence[Tensor]) -> None:
    """Bump the autograd version counters of the params, as in-place torch ops (and torch's fused
    optimizers) do: the kernels write memory behind autograd's back, and a param saved for a
    backward that runs after the step must raise autograd's "modified by an inplace operation"
    error, not give wrong gradients. Only the params: the state tensors are the optimizer's own,
    and bumping every list would cost ~70 ns per tensor per list of host time (1000 tensors:
    ~0.07 ms for the params). A skipped step (found_inf, decided on the device) bumps too, which
    autograd allows."""
    try:
        torch._C._increment_version(list(params))
    except TypeError:  # torch versions whose binding takes one tensor
        for p in params:
            torch._C._increment_version(p)


def _check_lengths(first: Sequence[Tensor], *others: Sequence[Tensor]) -> None:
    for other in others:
        if len(other) != len(first):
            raise ValueError(f"fusedopt triton: lists of different lengths ({len(first)} params, "
                             f"{len(other)} in another list)")


def _log(beta: float) -> float:
    """ln(beta) in double precision for the in-kernel bias correction; -inf for beta == 0."""
    return math.log(beta) if beta > 0 else -math.inf


#: dtypes of an lr / grad_scale / found_inf tensor the kernels load as they are (and convert);
#: other real dtypes (float8, wide unsigned) travel as a float32 copy of the value.
_SCALAR_DTYPES = frozenset((torch.float32, torch.float64, torch.float16, torch.bfloat16,
                            torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                            torch.bool))


def _scalar_argument(value: Union[float, Tensor], device: torch.device, op: str):
    """(float for the kernel, device tensor or None): a tensor is read in the kernel, not here."""
    if isinstance(value, Tensor):
        return 0.0, _on(device, value, op, "lr_tensor")
    return float(value), None


def _on(device: torch.device, value: Optional[Tensor], op: str, name: str) -> Optional[Tensor]:
    """``value`` (the argument ``name`` of ``op``) on ``device`` (a non-blocking copy when it
    lives elsewhere, e.g. a CPU lr), after the cpu backend's checks: one element (the kernel
    reads element 0 only, so a [0., 1.] found_inf would be taken for "no overflow"), a real
    dtype, not a meta tensor (which holds no value). Metadata only: nothing is read."""
    if value is None:
        return None
    if value.numel() != 1:
        raise RuntimeError(f"fusedopt::{op} (triton): {name} must be a tensor with one element, "
                           f"got shape {list(value.shape)}")
    if value.dtype not in _SCALAR_DTYPES:
        if value.is_complex() or not (value.is_floating_point() or value.dtype in _WIDE_UNSIGNED):
            raise RuntimeError(f"fusedopt::{op} (triton): {name} has dtype {value.dtype}; it must "
                               "be a real floating point, integer or bool tensor")
        value = value.to(torch.float32)
    if value.device.type == "meta" and device.type != "meta":
        raise RuntimeError(f"fusedopt::{op} (triton): {name} is on meta but params are on "
                           f"{device}")
    if value.device == device:
        return value
    return value.to(device, non_blocking=True)


_WIDE_UNSIGNED = frozenset(getattr(torch, name) for name in ("uint16", "uint32", "uint64")
                           if hasattr(torch, name))


def _or(value: Optional[Tensor], unused: Tensor) -> Tensor:
    """A pointer argument the kernel will not read (its flag is off) still needs a tensor."""
    return unused if value is None else value


def _current_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _picker(indices: List[int]):
    return lambda lst: [lst[i] for i in indices]


def _warn_fallback(plan: Plan) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"fusedopt triton: {len(plan.fallback)} tensor(s) are not dense or their "
                      "state has another layout; they are updated by the reference backend "
                      "(correct, slower, may synchronise with the host)", RuntimeWarning, stacklevel=4)


__all__ = ["adam_", "sgd_", "LAUNCHES", "ADAM_ROWS", "SGD_ROWS", "Bucket"]
