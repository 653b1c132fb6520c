"""The ``reference`` backend: plain PyTorch, one tensor at a time. It is the oracle.

It reproduces ``torch.optim``'s single-tensor (``foreach=False``) code path operation by operation,
so for fp32/fp64 parameters it gives torch's numbers. bf16/fp16 parameters are computed the way the
fused backends do it: every tensor is upcast to fp32, updated, and rounded back once (torch's
for-loop instead rounds after every operation, which is less accurate).

It runs on any device and may synchronise with the host (``found_inf.item()``, tensor ``lr``);
speed is not its job.
"""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

from .._compiling import is_compiling as _is_compiling

Tensor = torch.Tensor
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _as_float(value: Union[float, Tensor]) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _scalars(lr, grad_scale, found_inf):
    return (("lr_tensor", lr if isinstance(lr, Tensor) else None), ("grad_scale", grad_scale),
            ("found_inf", found_inf))


def _step_skipped(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


# ---- argument checks ----------------------------------------------------------------------------
# The cpu backend's rules and wording (csrc/cpu/op_common.cpp check_*, adam.cpp / sgd.cpp
# validate()), once per call and before anything is written, from tensor metadata only: no
# device value is read. Without them this backend broadcast a one-element gradient over a param,
# divided element-wise by a many-element grad_scale, mixed dtypes and ran a meta gradient as a
# no-op: silently wrong numbers where every other backend raises.
_SUPPORTED_NAMES = "float32, float64, bfloat16, float16"
_STEP_DTYPES = (torch.float32, torch.float64)


def _fail(op: str, message: str):
    raise RuntimeError(f"fusedopt::{op}: {message}")


def _check_length(op: str, tensors, n: int, list_name: str) -> None:
    if len(tensors) != n:
        _fail(op, f"{list_name} has {len(tensors)} tensors but params has {n}")


def _check_dense(op: str, t, list_name: str, i: int) -> None:
    if t is None:
        _fail(op, f"{list_name}[{i}] is undefined (None)")
    if t.layout != torch.strided:
        _fail(op, f"{list_name}[{i}] is {t.layout}; sparse tensors are not supported")


def _check_writable(op: str, t: Tensor, list_name: str, i: int) -> None:
    # (contiguous excludes internal overlap; the overlap query is not traced by torch.compile,
    # where the in-place torch ops raise their own error instead)
    if not t.is_contiguous() and not _is_compiling() and torch._debug_has_internal_overlap(t) == 1:
        _fail(op, f"{list_name}[{i}] has elements that share memory (e.g. an expanded tensor) "
                  "and cannot be updated in place")


def _check_param(op: str, p, i: int, device) -> None:
    _check_dense(op, p, "params", i)
    if p.dtype not in _SUPPORTED:
        _fail(op, f"params[{i}] has dtype {p.dtype}, which is not supported (supported: "
                  f"{_SUPPORTED_NAMES})")
    if p.device != device:
        _fail(op, f"params[{i}] is on {p.device} but params[0] is on {device}; one call takes "
                  "one device")
    _check_writable(op, p, "params", i)


def _check_like_param(op: str, t, p: Tensor, list_name: str, i: int, written: bool) -> None:
    _check_dense(op, t, list_name, i)
    if t.device != p.device:
        _fail(op, f"{list_name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
    if t.dtype != p.dtype:
        _fail(op, f"{list_name}[{i}] has dtype {t.dtype} but params[{i}] has dtype {p.dtype}")
    if t.shape != p.shape:
        _fail(op, f"{list_name}[{i}] has shape {list(t.shape)} but params[{i}] has shape "
                  f"{list(p.shape)}")
    if written:
        _check_writable(op, t, list_name, i)


def _check_step(op: str, step, p: Tensor, i: int) -> None:
    if step is None:
        _fail(op, f"state_steps[{i}] is undefined (None)")
    if step.device != p.device:
        _fail(op, f"state_steps[{i}] is on {step.device} but params[{i}] is on {p.device}")
    if step.numel() != 1:
        _fail(op, f"state_steps[{i}] must have one element, got shape {list(step.shape)}")
    if step.dtype not in _STEP_DTYPES:
        _fail(op, f"state_steps[{i}] has dtype {step.dtype}; expected float32 or float64")


def _check_scalar(op: str, name: str, t, device) -> None:
    """``lr_tensor`` / ``grad_scale`` / ``found_inf``: one real element. Read on the host (lr,
    found_inf) or moved to each tensor's device (grad_scale), so any device will do, but a meta
    tensor (which holds no value) only with meta params."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        _fail(op, f"{name} must be a tensor with one element, got {type(t).__name__}")
    if t.numel() != 1:
        _fail(op, f"{name} must be a tensor with one element, got shape {list(t.shape)}")
    if t.is_complex():
        _fail(op, f"{name} must be real, got dtype {t.dtype}")
    if device is not None and (t.device.type == "meta") != (device.type == "meta"):
        _fail(op, f"{name} is on {t.device} but params are on {device}")


def _validate(op: str, params, like, state_steps, scalars) -> None:
    """``like``: (list name, tensors, written by the op) of the lists that must match the
    params, the name with the condition that makes the list needed, e.g. ``"momentum_buffers
    (momentum != 0)"``, for the length error; ``state_steps`` None for SGD."""
    n = len(params)
    for length_name, tensors, _ in like:
        _check_length(op, tensors, n, length_name)
    like = [(name.split(" ")[0], tensors, written) for name, tensors, written in like]
    if state_steps is not None:
        _check_length(op, state_steps, n, "state_steps")
    device = params[0].device if n and params[0] is not None else None
    for i in range(n):
        p = params[i]
        _check_param(op, p, i, device)
        for list_name, tensors, written in like:
            _check_like_param(op, tensors[i], p, list_name, i, written)
        if state_steps is not None:
            _check_step(op, state_steps[i], p, i)
    for name, t in scalars:
        _check_scalar(op, name, t, device)


class _Working:
    """fp32 working copies of low-precision tensors, written back once by :meth:`commit`."""

    def __init__(self, originals: List[Optional[Tensor]]):
        self.originals = originals
        self.low = originals[0].dtype in _LOW_PRECISION
        self.tensors = [None if t is None else (t.float() if self.low else t) for t in originals]

    def commit(self, indices) -> None:
        if self.low:
            for i in indices:
                self.originals[i].copy_(self.tensors[i])


class ReferenceBackend:
    name = "reference"

    def unavailable_reason(self) -> Optional[str]:
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in _SUPPORTED:
            return f"dtype {dtype} is not supported (fp32, fp64, fp16, bf16 are)"
        return None

    @torch.no_grad()
    def adam_(self, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr,
              beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
              grad_scale=None, found_inf=None) -> None:
        like = [("grads", grads, False), ("exp_avgs", exp_avgs, True),
                ("exp_avg_sqs", exp_avg_sqs, True)]
        if amsgrad:
            like.append(("max_exp_avg_sqs (amsgrad=True)", max_exp_avg_sqs, True))
        _validate("adam_", params, like, state_steps, _scalars(lr, grad_scale, found_inf))
        if _step_skipped(found_inf):
            return
        lr = _as_float(lr)
        unscale = GradDivisor(grad_scale) if grad_scale is not None else None
        for i, param in enumerate(params):
            work = _Working([param, grads[i], exp_avgs[i], exp_avg_sqs[i],
                             max_exp_avg_sqs[i] if amsgrad else None])
            p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq = work.tensors
            if unscale is not None:
                grad = unscale.divide(grad)
            step_t = state_steps[i]
            step_t += 1
            step = _as_float(step_t)

            if maximize:
                grad = -grad
            if weight_decay != 0:
                if decoupled_weight_decay:
                    p.mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(p, alpha=weight_decay)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = math.sqrt(bias_correction2)
            if amsgrad:
                torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
            work.commit([0, 2, 3, 4] if amsgrad else [0, 2, 3])

    @torch.no_grad()
    def sgd_(self, params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay,
             nesterov, maximize, is_first_step, grad_scale=None, found_inf=None) -> None:
        like = [("grads", grads, False)]
        if momentum != 0:
            like.append(("momentum_buffers (momentum != 0)", momentum_buffers, True))
        _validate("sgd_", params, like, None, _scalars(lr, grad_scale, found_inf))
        if _step_skipped(found_inf):
            return
        lr = _as_float(lr)
        unscale = GradDivisor(grad_scale) if grad_scale is not None else None
        for i, param in enumerate(params):
            work = _Working([param, grads[i], momentum_buffers[i] if momentum != 0 else None])
            p, grad, buf = work.tensors
            if unscale is not None:
                grad = unscale.divide(grad)
            if maximize:
                grad = -grad
            if weight_decay != 0:
                grad = grad.add(p, alpha=weight_decay)
            if momentum != 0:
                if is_first_step:
                    buf.copy_(grad)
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                grad = grad.add(buf, alpha=momentum) if nesterov else buf
            p.add_(grad, alpha=-lr)
            work.commit([0, 2] if momentum != 0 else [0])


_FLOAT_MAX = torch.finfo(torch.float32).max


class GradDivisor:
    """A grad scale as the kernels apply it (rules.h, ``grad_divisor``), made once per call. A
    float64 scale beyond float32's range (GradScaler's scale near its ceiling divided by a clip
    coefficient) would round to inf in float32 math and zero the gradient: float32 gradients are
    divided by ``scale * 2^-64`` and then multiplied by ``2^-64`` instead, the same quotient."""

    def __init__(self, grad_scale: torch.Tensor):
        self.scale = grad_scale
        self.split = None  # (divisor, post) in float32, for a float64 scale
        if grad_scale.dtype == torch.float64:
            huge = grad_scale.abs() > _FLOAT_MAX
            self.split = (torch.where(huge, grad_scale * 2.0 ** -64, grad_scale).to(torch.float32),
                          torch.where(huge, 2.0 ** -64, 1.0).to(torch.float32))

    def _factors(self, grad: torch.Tensor):
        """(divisor, post or None) for ``grad``'s math, on its device."""
        if self.split is None or grad.dtype == torch.float64:
            return self.scale.to(grad.device), None
        divisor, post = self.split
        return divisor.to(grad.device), post.to(grad.device)

    def divide(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad / scale`` in ``grad``'s dtype (the optimizer kernels' unscaling)."""
        divisor, post = self._factors(grad)
        grad = grad / divisor
        return grad if post is None else grad * post

    def multiply_by_reciprocal(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad * (1 / scale)``, as GradScaler's ``unscale_`` computes it (for float32 math a
        float64 scale is rounded to float32 first, then split as above when beyond range)."""
        divisor, post = self._factors(grad)
        grad = grad * divisor.reciprocal()
        return grad if post is None else grad * post


BACKEND = ReferenceBackend()
