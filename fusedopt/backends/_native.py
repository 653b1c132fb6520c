"""What the ``cpu`` and ``cuda`` backends share: calls into the native ops of ``fusedopt._C``.

Eager calls go through the extension's direct entry points (``_adam_cpu`` / ``_sgd_cpu``, and
``_adam_cuda`` / ``_sgd_cuda`` in CUDA builds), which borrow the tensors straight from the
Python lists and call the function the dispatcher would: calling ``torch.ops.fusedopt.*``
boxes every tensor and costs ~0.6 us per tensor, more than the update of a small tensor on a
CPU, and more host time than a GPU needs for the whole step of 1000 small tensors. The entry
points decline (return False, having done nothing) for anything that needs the dispatcher
(tensor subclasses, dispatch modes); the wrappers then call ``torch.ops.fusedopt.*``, as they
do under ``torch.compile`` (which traces it).

The ``*_reading_grads`` methods are the optimizers' fast path: the entry point reads every
param's own ``.grad`` (no grads list built in Python). True when done; False, having changed
nothing, when the general path must run (a param without a plain dense grad, a subclass, a
dispatch mode, compiling, an extension without the entry point).
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from .. import _ops
from .._compiling import is_compiling

Tensor = torch.Tensor


def split_lr(lr: Union[float, Tensor]) -> Tuple[float, Optional[Tensor]]:
    """(float lr, lr_tensor): a tensor lr travels as lr_tensor, read by the kernel itself."""
    if isinstance(lr, Tensor):
        return 0.0, lr
    return float(lr), None


class NativeBackend:
    """Base of the backends whose kernels are the ``torch.ops.fusedopt`` ops of one device."""

    #: names of the extension's direct entry points for Adam and SGD on this device
    DIRECT_ADAM = ""
    DIRECT_SGD = ""

    def _direct(self, name: str):
        return None if is_compiling() or not _ops.available() else getattr(_ops._C, name, None)

    # Each algorithm's arguments are converted once, in schema order.
    @staticmethod
    def _adam_hyper(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                    decoupled_weight_decay):
        lr_float, lr_tensor = split_lr(lr)
        return (lr_float, float(beta1), float(beta2), float(eps), float(weight_decay),
                bool(amsgrad), bool(maximize), bool(decoupled_weight_decay)), lr_tensor

    @staticmethod
    def _sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step):
        lr_float, lr_tensor = split_lr(lr)
        return (lr_float, float(momentum), float(dampening), float(weight_decay),
                bool(nesterov), bool(maximize), bool(is_first_step)), lr_tensor

    def adam_(self, params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
              exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor],
              *, lr, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
              maximize: bool, decoupled_weight_decay: bool, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None) -> None:
        if not params:
            return  # the dispatcher needs at least one tensor to pick a kernel
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        hyper, lr_tensor = self._adam_hyper(lr, beta1, beta2, eps, weight_decay, amsgrad,
                                            maximize, decoupled_weight_decay)
        direct = self._direct(self.DIRECT_ADAM)
        if direct is not None and direct(*lists, *hyper, lr_tensor, grad_scale, found_inf):
            return
        torch.ops.fusedopt.adam_(
            *lists, lr=hyper[0], beta1=hyper[1], beta2=hyper[2], eps=hyper[3],
            weight_decay=hyper[4], amsgrad=hyper[5], maximize=hyper[6],
            decoupled_weight_decay=hyper[7], lr_tensor=lr_tensor, grad_scale=grad_scale,
            found_inf=found_inf)

    def adam_reading_grads(self, params: List[Tensor], exp_avgs: List[Tensor],
                           exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor],
                           state_steps: List[Tensor], *, lr, beta1: float, beta2: float,
                           eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                           decoupled_weight_decay: bool, grad_scale: Optional[Tensor] = None,
                           found_inf: Optional[Tensor] = None) -> bool:
        direct = self._direct(self.DIRECT_ADAM)
        if not params or direct is None:
            return False
        hyper, lr_tensor = self._adam_hyper(lr, beta1, beta2, eps, weight_decay, amsgrad,
                                            maximize, decoupled_weight_decay)
        return bool(direct(params, None, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                           *hyper, lr_tensor, grad_scale, found_inf))

    def sgd_(self, params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *,
             lr, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
             maximize: bool, is_first_step: bool, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None) -> None:
        if not params:
            return
        hyper, lr_tensor = self._sgd_hyper(lr, momentum, dampening, weight_decay, nesterov,
                                           maximize, is_first_step)
        direct = self._direct(self.DIRECT_SGD)
        if direct is not None and direct(params, grads, momentum_buffers, *hyper, lr_tensor,
                                         grad_scale, found_inf):
            return
        torch.ops.fusedopt.sgd_(
            params, grads, momentum_buffers, lr=hyper[0], momentum=hyper[1],
            dampening=hyper[2], weight_decay=hyper[3], nesterov=hyper[4], maximize=hyper[5],
            is_first_step=hyper[6], lr_tensor=lr_tensor, grad_scale=grad_scale,
            found_inf=found_inf)

    def sgd_reading_grads(self, params: List[Tensor], momentum_buffers: List[Tensor], *, lr,
                          momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                          maximize: bool, is_first_step: bool, grad_scale: Optional[Tensor] = None,
                          found_inf: Optional[Tensor] = None) -> bool:
        direct = self._direct(self.DIRECT_SGD)
        if not params or direct is None:
            return False
        hyper, lr_tensor = self._sgd_hyper(lr, momentum, dampening, weight_decay, nesterov,
                                           maximize, is_first_step)
        return bool(direct(params, None, momentum_buffers, *hyper, lr_tensor, grad_scale,
                           found_inf))


__all__ = ["NativeBackend", "split_lr"]
