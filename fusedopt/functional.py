"""Functional API: one optimizer step over lists of tensors, through the one dispatch point.

These are what the optimizers do for one param group, without the ``torch.optim.Optimizer``
object: lists in, tensors updated in place. Use them to build your own optimizer loop. The lists
are split by (device, dtype); each part goes to the backend :func:`fusedopt.backends.select`
picks for ``backend`` (``"auto"`` by default). Complex tensors are updated through real views,
DTensors through their local shards (every list's entry ``i`` must then have the layout of
``params[i]``; gradients are redistributed to it).

The number hyperparameters are checked as torch.optim's constructors check them, with their
words (``0 <= beta < 1``, ``eps``, ``lr``, ``weight_decay``, ``momentum`` not negative, the
Nesterov rule); a tensor ``lr`` by its shape only (its value is never read: no host sync). A
``None`` entry in a list is an error naming the list and index; the backends check the rest
(shapes, dtypes, devices, one-element scalars) before writing anything.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _dtensor, backends
from ._lists import SHARED_MEMORY_MESSAGE, any_none, memory_shared
from ._views import as_real
from .optim.base import check_hyperparameter

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


def _check_no_none(name: str, **lists: Sequence[Optional[Tensor]]) -> None:
    """A ``None`` entry (e.g. a param without a gradient) is an error naming the list and index,
    not an AttributeError deep inside: one C-level pass per list."""
    for list_name, tensors in lists.items():
        if any_none(tensors):
            i = next(i for i, t in enumerate(tensors) if t is None)
            hint = "; leave out the params that have no gradient" if list_name == "grads" else ""
            raise ValueError(f"fusedopt.functional.{name}: {list_name}[{i}] is None (every entry "
                             f"must be a tensor{hint})")


def _check_memory(name: str, written: List[Sequence[Tensor]], grads: Sequence[Tensor]) -> None:
    """What the step writes must not share memory with anything else of the call (one region
    or launch would rewrite shared elements from several threads at once); grads may share
    theirs with other grads. ~30 ns a tensor in C++, at every call (the optimizers check once
    per cache instead). A step counter shared by two params counts too: the CPU backend would
    advance it once per param, the GPU kernels once per launch."""
    lists = written + [grads]
    if any(_dtensor.any_dtensor(tensors) for tensors in lists):  # (their local shards hold the data)
        lists = [[_dtensor.local(t) if _dtensor.is_dtensor(t) else t for t in tensors]
                 for tensors in lists]
    if memory_shared(lists[:-1], lists[-1:]):
        raise ValueError(f"fusedopt.functional.{name}: {SHARED_MEMORY_MESSAGE}")


def _is_number(value) -> bool:
    """A Python number, checked by value here. A tensor hyperparameter is not read (that would
    wait for the device); the backends check its shape."""
    return isinstance(value, (int, float))


def _check_lr(lr, non_negative) -> None:
    if isinstance(lr, Tensor):
        check_hyperparameter(lr.numel() == 1, "Tensor lr must be 1-element")
    elif _is_number(lr):
        check_hyperparameter(non_negative(lr), "Invalid learning rate: {}", lr)


def _check_adam_hyperparameters(lr, beta1, beta2, eps, weight_decay) -> None:
    """torch.optim.Adam's range checks, with its wording, on the number arguments (as
    :class:`fusedopt.optim.Adam`'s constructor: NaN is refused too)."""
    at_least_0 = lambda v: 0.0 <= v  # noqa: E731
    _check_lr(lr, at_least_0)
    for value, ok, what in ((eps, at_least_0, "epsilon value"),
                            (beta1, lambda v: 0.0 <= v < 1.0, "beta parameter at index 0"),
                            (beta2, lambda v: 0.0 <= v < 1.0, "beta parameter at index 1"),
                            (weight_decay, at_least_0, "weight_decay value")):
        if _is_number(value):
            check_hyperparameter(ok(value), "Invalid {}: {}", what, value)


def _check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's checks, with its wording, on the number arguments, as
    :class:`fusedopt.optim.SGD`'s constructor makes them (torch's ``value < 0`` tests; torch
    checks no range of ``dampening``: only the Nesterov rule involves it)."""
    not_negative = lambda v: not v < 0.0  # noqa: E731
    _check_lr(lr, not_negative)
    for value, what in ((momentum, "momentum value"), (weight_decay, "weight_decay value")):
        if _is_number(value):
            check_hyperparameter(not_negative(value), "Invalid {}: {}", what, value)
    if nesterov and _is_number(momentum) and _is_number(dampening):
        check_hyperparameter(momentum > 0 and dampening == 0,
                 "Nesterov momentum requires a momentum and zero dampening")


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
    _check_adam_hyperparameters(lr, beta1, beta2, eps, weight_decay)
    used = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, state_steps=state_steps,
                **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {}))
    _check_lists("adam_", params, **used)
    _check_no_none("adam_", params=params, **used)
    _check_memory("adam_", [params, exp_avgs, exp_avg_sqs, state_steps]
                  + ([max_exp_avg_sqs] if amsgrad else []), grads)
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
    _check_sgd_hyperparameters(lr, momentum, dampening, weight_decay, nesterov)
    used = dict(grads=grads, **({"momentum_buffers": momentum_buffers} if momentum != 0 else {}))
    _check_lists("sgd_", params, **used)
    _check_no_none("sgd_", params=params, **used)
    _check_memory("sgd_", [params] + ([momentum_buffers] if momentum != 0 else []), grads)
    if any(g.is_sparse for g in grads):
        raise RuntimeError("fusedopt.functional.sgd_ does not support sparse gradients")
    for (device, dtype), idx in _partition(params).items():
        p, g, b = _pick([params, grads, momentum_buffers if momentum != 0 else []], idx)
        backends.select(backend, device, dtype).sgd_(
            p, g, b, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, is_first_step=is_first_step,
            grad_scale=grad_scale, found_inf=found_inf)


__all__ = ["adam_", "sgd_"]
