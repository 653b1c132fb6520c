"""The ``cpu`` backend: thin wrappers over the native CPU kernels (``csrc/cpu``).

The kernels update every tensor of a call in one parallel region, vectorised with the widest
instruction set of the machine (chosen at run time). Float32/float64 params compute in their
own precision, bfloat16/float16 ones in float32.

Eager calls go through ``fusedopt._C._adam_cpu`` / ``_sgd_cpu``, which borrow the tensors
straight from the Python lists: calling ``torch.ops.fusedopt.*`` boxes every tensor and costs
~0.6 us per tensor, more than the update of a small tensor. Those entry points decline (return
False) for anything that needs the dispatcher (tensor subclasses, dispatch modes), and under
``torch.compile`` the wrappers call ``torch.ops.fusedopt.*``, which is traceable.
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch

from .. import _ops
from .._compiling import is_compiling as _is_compiling

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _split_lr(lr: Union[float, torch.Tensor]):
    """(float lr, lr_tensor): a tensor lr travels as lr_tensor, read by the kernel itself."""
    if isinstance(lr, torch.Tensor):
        return 0.0, lr
    return float(lr), None


class CpuBackend:
    name = "cpu"
    #: the kernels' own validation rejects sparse (non-strided) grads before writing anything
    rejects_sparse_grads = True

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

    # Each algorithm's arguments are converted once (_adam_hyper / _sgd_hyper) for the native
    # direct entry point (grads=None: it reads every param's own .grad); adam_/sgd_ add the
    # dispatcher fallback, while the *_reading_grads methods report a refusal
    # (*_reading_grads, the optimizers' fast path: True when done, False having changed nothing
    # when the general path must run: a param without a plain dense grad, a tensor subclass, a
    # dispatch mode, compiling).

    @staticmethod
    def _adam_hyper(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                    decoupled_weight_decay):
        lr_float, lr_tensor = _split_lr(lr)
        return (lr_float, float(beta1), float(beta2), float(eps), float(weight_decay),
                bool(amsgrad), bool(maximize), bool(decoupled_weight_decay)), lr_tensor

    @staticmethod
    def _sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step):
        lr_float, lr_tensor = _split_lr(lr)
        return (lr_float, float(momentum), float(dampening), float(weight_decay),
                bool(nesterov), bool(maximize), bool(is_first_step)), lr_tensor

    def adam_(self, params: List[torch.Tensor], grads: List[torch.Tensor],
              exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor],
              max_exp_avg_sqs: List[torch.Tensor], state_steps: List[torch.Tensor], *,
              lr, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
              maximize: bool, decoupled_weight_decay: bool,
              grad_scale: Optional[torch.Tensor] = None,
              found_inf: Optional[torch.Tensor] = None) -> None:
        if not params:
            return  # the dispatcher needs at least one tensor to pick a kernel
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        hyper, lr_tensor = self._adam_hyper(lr, beta1, beta2, eps, weight_decay, amsgrad,
                                            maximize, decoupled_weight_decay)
        if not _is_compiling() and _ops._C._adam_cpu(*lists, *hyper, lr_tensor, grad_scale,
                                                      found_inf):
            return
        torch.ops.fusedopt.adam_(
            *lists, lr=hyper[0], beta1=hyper[1], beta2=hyper[2], eps=hyper[3],
            weight_decay=hyper[4], amsgrad=hyper[5], maximize=hyper[6],
            decoupled_weight_decay=hyper[7], lr_tensor=lr_tensor, grad_scale=grad_scale,
            found_inf=found_inf)

    def adam_reading_grads(self, params: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                           exp_avg_sqs: List[torch.Tensor], max_exp_avg_sqs: List[torch.Tensor],
                           state_steps: List[torch.Tensor], *, lr, beta1: float, beta2: float,
                           eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                           decoupled_weight_decay: bool, grad_scale: Optional[torch.Tensor] = None,
                           found_inf: Optional[torch.Tensor] = None) -> bool:
        if not params or _is_compiling():
            return False
        hyper, lr_tensor = self._adam_hyper(lr, beta1, beta2, eps, weight_decay, amsgrad,
                                            maximize, decoupled_weight_decay)
        return bool(_ops._C._adam_cpu(params, None, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                      state_steps, *hyper, lr_tensor, grad_scale, found_inf))

    def sgd_(self, params: List[torch.Tensor], grads: List[torch.Tensor],
             momentum_buffers: List[torch.Tensor], *, lr, momentum: float, dampening: float,
             weight_decay: float, nesterov: bool, maximize: bool, is_first_step: bool,
             grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None) -> None:
        if not params:
            return
        hyper, lr_tensor = self._sgd_hyper(lr, momentum, dampening, weight_decay, nesterov,
                                           maximize, is_first_step)
        if not _is_compiling() and _ops._C._sgd_cpu(params, grads, momentum_buffers, *hyper,
                                                     lr_tensor, grad_scale, found_inf):
            return
        torch.ops.fusedopt.sgd_(
            params, grads, momentum_buffers, lr=hyper[0], momentum=hyper[1],
            dampening=hyper[2], weight_decay=hyper[3], nesterov=hyper[4], maximize=hyper[5],
            is_first_step=hyper[6], lr_tensor=lr_tensor, grad_scale=grad_scale,
            found_inf=found_inf)

    def sgd_reading_grads(self, params: List[torch.Tensor], momentum_buffers: List[torch.Tensor],
                          *, lr, momentum: float, dampening: float, weight_decay: float,
                          nesterov: bool, maximize: bool, is_first_step: bool,
                          grad_scale: Optional[torch.Tensor] = None,
                          found_inf: Optional[torch.Tensor] = None) -> bool:
        if not params or _is_compiling():
            return False
        hyper, lr_tensor = self._sgd_hyper(lr, momentum, dampening, weight_decay, nesterov,
                                           maximize, is_first_step)
        return bool(_ops._C._sgd_cpu(params, None, momentum_buffers, *hyper, lr_tensor,
                                     grad_scale, found_inf))

    def norm_of_grads(self, params: List[torch.Tensor], norm_type: float = 2.0
                      ) -> Optional[torch.Tensor]:
        """The norm of the params' ``.grad`` (``torch.ops.fusedopt.total_norm`` of them), read in
        C++; ``None`` (nothing done) when a param has no plain grad or the call needs the
        dispatcher. For steps with ``max_grad_norm``, like ``adam_reading_grads``."""
        direct = getattr(_ops._C, "_total_norm_cpu", None)
        if not params or direct is None or _is_compiling():
            return None
        return direct(params, float(norm_type), True)


BACKEND = CpuBackend()
