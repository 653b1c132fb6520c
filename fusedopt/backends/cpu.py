"""The ``cpu`` backend: thin wrappers over the native CPU kernels ``torch.ops.fusedopt.*``.

The kernels (``csrc/cpu``) update every tensor of a call in one parallel region, vectorised
with the widest instruction set of the machine (chosen at run time). Float32/float64 params
compute in their own precision, bfloat16/float16 ones in float32.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch

from .. import _ops

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _split_lr(lr: Union[float, torch.Tensor]):
    """(float lr, lr_tensor): a tensor lr travels as lr_tensor, read by the kernel itself."""
    if isinstance(lr, torch.Tensor):
        return 0.0, lr
    return float(lr), None


class CpuBackend:
    name = "cpu"

    def unavailable_reason(self) -> Optional[str]:
        if not _ops.available():
            return f"fusedopt._C not built or not loadable: {_ops.LOAD_ERROR}"
        return None

    def supports(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        device = torch.device(device)
        if device.type != "cpu":
            return f"cpu backend needs CPU tensors, got {device}"
        if dtype not in _SUPPORTED_DTYPES:
            return f"dtype {dtype} not supported (float32, float64, bfloat16, float16 are)"
        return None

    def adam_(self, params: List[torch.Tensor], grads: List[torch.Tensor],
              exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor],
              max_exp_avg_sqs: List[torch.Tensor], state_steps: List[torch.Tensor], *,
              lr, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
              maximize: bool, decoupled_weight_decay: bool,
              grad_scale: Optional[torch.Tensor] = None,
              found_inf: Optional[torch.Tensor] = None) -> None:
        if not params:
            return  # the dispatcher needs at least one tensor to pick a kernel
        lr_float, lr_tensor = _split_lr(lr)
        torch.ops.fusedopt.adam_(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            lr=lr_float, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
            weight_decay=float(weight_decay), amsgrad=bool(amsgrad), maximize=bool(maximize),
            decoupled_weight_decay=bool(decoupled_weight_decay), lr_tensor=lr_tensor,
            grad_scale=grad_scale, found_inf=found_inf)

    def sgd_(self, params: List[torch.Tensor], grads: List[torch.Tensor],
             momentum_buffers: List[torch.Tensor], *, lr, momentum: float, dampening: float,
             weight_decay: float, nesterov: bool, maximize: bool, is_first_step: bool,
             grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None) -> None:
        if not params:
            return
        lr_float, lr_tensor = _split_lr(lr)
        torch.ops.fusedopt.sgd_(
            params, grads, momentum_buffers, lr=lr_float, momentum=float(momentum),
            dampening=float(dampening), weight_decay=float(weight_decay),
            nesterov=bool(nesterov), maximize=bool(maximize), is_first_step=bool(is_first_step),
            lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf)


BACKEND = CpuBackend()
