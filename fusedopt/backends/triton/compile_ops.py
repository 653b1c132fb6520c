"""Custom ops that let ``torch.compile`` keep a Triton optimizer step (and the Triton global norm
of the clipping code) inside its graph.

``torch.library.triton_op`` would show the kernel itself to Inductor, but our launch reads tensor
addresses (``data_ptr()``) to build its tables, which fake tensors do not have during tracing. So
the step is an opaque custom op (``torch.library.custom_op``, torch >= 2.4) that mutates its
inputs and returns nothing; its fake implementation does nothing. The real implementation runs
the normal launcher when the compiled graph executes.

Eager calls do not come through here: the custom-op dispatcher costs Python work per tensor.
On a torch without ``custom_op``, :data:`AVAILABLE` is False and compiled code calls the launcher
directly (Dynamo then breaks the graph at the optimizer step, which stays correct).
"""
from typing import List, Optional

import torch

Tensor = torch.Tensor
AVAILABLE = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")
NAMESPACE = "fusedopt_triton"   # apart from the C++ extension's ``fusedopt`` library


def _split_lr(lr):
    """(float, tensor or None): the schema has no "float or tensor" type."""
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


if AVAILABLE:
    @torch.library.custom_op(f"{NAMESPACE}::adam_", mutates_args=(
        "params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))
    def _adam_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                 exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor],
                 state_steps: List[Tensor], lr: float, lr_tensor: Optional[Tensor], beta1: float,
                 beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                 decoupled_weight_decay: bool, grad_scale: Optional[Tensor],
                 found_inf: Optional[Tensor]) -> None:
        from . import launch
        launch.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                     lr=lr if lr_tensor is None else lr_tensor, beta1=beta1, beta2=beta2, eps=eps,
                     weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                     decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
                     found_inf=found_inf)

    @_adam_op.register_fake
    def _adam_fake(*args, **kwargs) -> None:
        return None

    @torch.library.custom_op(f"{NAMESPACE}::sgd_", mutates_args=("params", "momentum_buffers"))
    def _sgd_op(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
                lr: float, lr_tensor: Optional[Tensor], momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool, is_first_step: bool,
                grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        from . import launch
        launch.sgd_(params, grads, momentum_buffers, lr=lr if lr_tensor is None else lr_tensor,
                    momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                    nesterov=nesterov, maximize=maximize, is_first_step=is_first_step,
                    grad_scale=grad_scale, found_inf=found_inf)

    @_sgd_op.register_fake
    def _sgd_fake(*args, **kwargs) -> None:
        return None

    @torch.library.custom_op(f"{NAMESPACE}::total_norm", mutates_args=())
    def _total_norm_op(tensors: List[Tensor], norm_type: float,
                       prescale: Optional[Tensor] = None) -> Tensor:
        from . import norm
        return norm.launch_total_norm(tensors, norm_type, prescale)

    @_total_norm_op.register_fake
    def _total_norm_fake(tensors: List[Tensor], norm_type: float,
                         prescale: Optional[Tensor] = None) -> Tensor:
        return tensors[0].new_empty((), dtype=torch.float32)


def total_norm(tensors, norm_type: float, prescale: Optional[Tensor] = None) -> Tensor:
    """The Triton global norm through the custom op (the launcher when custom ops are
    unavailable)."""
    from . import norm
    if not AVAILABLE or not tensors:
        return norm.launch_total_norm(tensors, norm_type, prescale)
    return torch.ops.fusedopt_triton.total_norm(list(tensors), float(norm_type), prescale)


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1,
          beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_scale=None,
          found_inf=None) -> None:
    """Adam step through the custom op (the launcher itself when custom ops are unavailable)."""
    if not AVAILABLE:
        from . import launch
        return launch.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                            amsgrad=amsgrad, maximize=maximize,
                            decoupled_weight_decay=decoupled_weight_decay,
                            grad_scale=grad_scale, found_inf=found_inf)
    lr_value, lr_tensor = _split_lr(lr)
    torch.ops.fusedopt_triton.adam_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        list(state_steps), lr_value, lr_tensor, beta1, beta2, eps, weight_decay, amsgrad,
        maximize, decoupled_weight_decay, grad_scale, found_inf)


def sgd_(params, grads, momentum_buffers, *, lr, momentum, dampening, weight_decay, nesterov,
         maximize, is_first_step, grad_scale=None, found_inf=None) -> None:
    """SGD step through the custom op (the launcher itself when custom ops are unavailable)."""
    if not AVAILABLE:
        from . import launch
        return launch.sgd_(params, grads, momentum_buffers, lr=lr, momentum=momentum,
                           dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                           maximize=maximize, is_first_step=is_first_step,
                           grad_scale=grad_scale, found_inf=found_inf)
    lr_value, lr_tensor = _split_lr(lr)
    torch.ops.fusedopt_triton.sgd_(
        list(params), list(grads), list(momentum_buffers), lr_value, lr_tensor, momentum,
        dampening, weight_decay, nesterov, maximize, is_first_step, grad_scale, found_inf)
