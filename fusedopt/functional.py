"""Functional API: one optimizer step over lists of tensors, through the one dispatch point.

These are what the optimizers do for one param group, without the ``torch.optim.Optimizer``
object: lists in, tensors updated in place. Use them to build your own optimizer loop. The lists
are split by (device, dtype); each part goes to the backend :func:`fusedopt.backends.select`
picks for ``backend`` (``"auto"`` by default). Complex tensors are updated through real views,
DTensors through their local shards (every list's entry ``i`` must then have the layout of
``params[i]``; gradients are redistributed to it).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _dtensor, backends
from ._views import as_real

Tensor = torch.Tensor


def _kernel_view(t: Tensor, param: Tensor, what: str, redistribute: bool) -> Tensor:
    """``t`` (an entry of a list, for ``param``) as the kernels see it: local shard, real view."""
    if _dtensor.is_dtensor(t) or _dtensor.is_dtensor(param):
        t = _dtensor.local_like(t, _dtensor.layout_of(param), what, redistribute)
    return as_real(t)


def _check_lists(name: str, reference: Sequence[Tensor], **others: Sequence[Tensor]) -> None:
    for other_name, other in others.items():
        if len(other) != len(reference):
            raise ValueError(f"{name}: {other_name} has {len(other)} tensors but params has "
                             f"{len(reference)}")


def _partition(params: Sequence[Tensor]) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    parts: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, p in enumerate(params):
        if p.is_sparse:
            raise RuntimeError("fusedopt does not support sparse tensors")
        parts.setdefault((p.device, as_real(p).dtype), []).append(i)
    return parts


_LIST_NAMES = ("a param", "a gradient", "a state tensor")


def _pick(lists: Sequence[Sequence[Optional[Tensor]]], idx: List[int]) -> List[List[Tensor]]:
    """Entries ``idx`` of each list (``lists[0]`` is the params, ``lists[1]`` the grads)."""
    params = lists[0]
    if not (_dtensor.any_dtensor(params) or _dtensor.any_dtensor(lists[1])):
        return [[as_real(lst[i]) for i in idx] if lst else [] for lst in lists]
    return [[_kernel_view(lst[i], params[i], _LIST_NAMES[min(k, 2)], k == 1) for i in idx]
            if lst else [] for k, lst in enumerate(lists)]


def adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
          exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor],
          state_steps: Sequence[Tensor], *, lr: Union[float, Tensor], beta1: float, beta2: float,
          eps: float, weight_decay: float, amsgrad: bool = False, maximize: bool = False,
          decoupled_weight_decay: bool = False, grad_scale: Optional[Tensor] = None,
          found_inf: Optional[Tensor] = None, backend: str = "auto") -> None:
    """One Adam (``decoupled_weight_decay=False``) or AdamW step, in place.

    ``state_steps`` are 0-dim float tensors, incremented by one; ``max_exp_avg_sqs`` may be
    empty when ``amsgrad`` is false. See :class:`fusedopt.optim.Adam` for the math.
    """
    backends.validate_choice(backend)
    _check_lists("adam_", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                 state_steps=state_steps, **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}))
    if any(g.is_sparse for g in grads):
        raise RuntimeError("fusedopt.functional.adam_ does not support sparse gradients")
    for (device, dtype), idx in _partition(params).items():
        p, g, m, v, vmax = _pick([params, grads, exp_avgs, exp_avg_sqs,
                                  max_exp_avg_sqs if amsgrad else []], idx)
        steps = [_dtensor.local(state_steps[i]) for i in idx]
        backends.select(backend, device, dtype).adam_(
            p, g, m, v, vmax, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, grad_scale=grad_scale,
            found_inf=found_inf)


def sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], *,
         lr: Union[float, Tensor], momentum: float = 0.0, dampening: float = 0.0,
         weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
         is_first_step: bool = False, grad_scale: Optional[Tensor] = None,
         found_inf: Optional[Tensor] = None, backend: str = "auto") -> None:
    """One SGD step, in place. ``momentum_buffers`` may be empty when ``momentum == 0``;
    with ``is_first_step`` the buffers are overwritten with the gradient (torch's first step).
    See :class:`fusedopt.optim.SGD` for the math."""
    backends.validate_choice(backend)
    _check_lists("sgd_", params, grads=grads,
                 **({"momentum_buffers": momentum_buffers} if momentum != 0 else {}))
    if any(g.is_sparse for g in grads):
        raise RuntimeError("fusedopt.functional.sgd_ does not support sparse gradients")
    for (device, dtype), idx in _partition(params).items():
        p, g, b = _pick([params, grads, momentum_buffers if momentum != 0 else []], idx)
        backends.select(backend, device, dtype).sgd_(
            p, g, b, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, is_first_step=is_first_step,
            grad_scale=grad_scale, found_inf=found_inf)


__all__ = ["adam_", "sgd_"]
