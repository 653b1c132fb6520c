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

Tensor = torch.Tensor
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _as_float(value: Union[float, Tensor]) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _step_skipped(found_inf: Optional[Tensor]) -> bool:
    return found_inf is not None and bool(found_inf.item() != 0)


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
