r"""SGD with momentum, dampening, Nesterov, weight decay and maximize, in fused multi-tensor steps.

The update, per parameter :math:`\theta` with gradient :math:`g`, learning rate :math:`\gamma`,
weight decay :math:`\lambda`, momentum :math:`\mu`, dampening :math:`\tau`:

.. math::

    g &\leftarrow g / s \quad\text{(GradScaler scale } s\text{, if any)} \\
    g &\leftarrow -g \quad\text{if maximize} \\
    g &\leftarrow g + \lambda\theta \\
    b &\leftarrow g \ \text{(first step)} \quad\text{or}\quad b \leftarrow \mu b + (1-\tau) g \\
    g &\leftarrow g + \mu b \ \text{(Nesterov)} \quad\text{or}\quad g \leftarrow b \\
    \theta &\leftarrow \theta - \gamma g

(the momentum lines only when :math:`\mu \ne 0`). State per parameter, with torch.optim's key:
``momentum_buffer`` (b), present only when momentum is nonzero.

Sparse gradients (``nn.Embedding(sparse=True)``) are taken, as torch.optim.SGD takes them: those
params are stepped apart with torch's own ops (its single-tensor formula, so a sparse grad gives
a sparse momentum buffer, as in torch), the others by the kernels. With GradScaler,
``found_inf`` is then read on the host once per step, as torch's non-fused SGD does.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch

from .._lists import any_none as _any_none
from .._lists import sparse_positions as _sparse_positions
from .._views import kernel_view
from ..backends.reference import GradDivisor
from .base import FusedOptimizer, GroupBucket, check_hyperparameter, check_value

Tensor = torch.Tensor


def _validate_sgd(lr, momentum, dampening, weight_decay, nesterov, on_step: bool = False) -> None:
    """torch.optim.SGD's checks; ``on_step`` as for Adam's (no lr, no tensor values), and not
    the Nesterov rule: torch steps such a group as written."""
    if not on_step:
        if isinstance(lr, Tensor):
            check_hyperparameter(lr.numel() == 1, "Tensor lr must be 1-element")
        check_hyperparameter(not lr < 0.0, "Invalid learning rate: {}", lr)
    for value, what in ((momentum, "momentum value"), (weight_decay, "weight_decay value")):
        if on_step and isinstance(value, Tensor):  # (its value would be a read from the device)
            check_hyperparameter(value.numel() == 1, "Tensor {} must be 1-element", what)
        else:
            check_value(lambda v: not v < 0.0, value, what)
    if not on_step:  # (torch steps such a group as written, e.g. momentum warmed up from 0)
        check_hyperparameter(not (nesterov and (momentum <= 0 or dampening != 0)),
                             "Nesterov momentum requires a momentum and zero dampening")


def _skipped_on_host(found_inf: Optional[Tensor]) -> bool:
    """Whether GradScaler's ``found_inf`` says to skip this step, read on the host (a sync)."""
    return found_inf is not None and bool(found_inf.ne(0).any())


class SGD(FusedOptimizer):
    __doc__ = __doc__ + r"""

    Arguments are exactly :class:`torch.optim.SGD`'s, plus ``backend`` (``"auto"``,
    ``"reference"``, ``"cpu"``, ``"triton"``, ``"cuda"``; ``FUSEDOPT_BACKEND`` overrides it),
    ``max_grad_norm`` and ``skip_nonfinite`` (clipping and non-finite skipping inside the step;
    see :class:`fusedopt.optim.Adam`).
    """

    STATE_KEYS = ("momentum_buffer",)
    DISPLAY_NAME = "fusedopt.optim.SGD"

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: Union[float, Tensor] = 0,
                 nesterov: bool = False, *, maximize: bool = False, foreach=None,
                 differentiable: bool = False, fused=None, backend: str = "auto",
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False):
        _validate_sgd(lr, momentum, dampening, weight_decay, nesterov)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                        foreach=foreach, differentiable=differentiable, fused=fused,
                        backend=backend, max_grad_norm=max_grad_norm,
                        skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    COMPAT_DEFAULTS = {"foreach": None, "fused": None, "differentiable": False}

    def _fill_group_defaults(self, group: Dict[str, Any]) -> None:
        super()._fill_group_defaults(group)
        group.setdefault("nesterov", False)
        group.setdefault("maximize", False)

    def _validate_group(self, group: Dict[str, Any]) -> None:
        _validate_sgd(group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                      group["nesterov"])

    def _sparse_grad_positions(self, grads: List[Optional[Tensor]]) -> List[int]:
        return _sparse_positions(grads)

    def _step_sparse(self, group, pairs, grad_scale: Optional[Tensor],
                     found_inf: Optional[Tensor]) -> None:
        """torch.optim.SGD's single-tensor step, with its ops, for params with sparse grads."""
        if _skipped_on_host(found_inf):  # (the one host read)
            return
        lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
        weight_decay, nesterov, maximize = group["weight_decay"], group["nesterov"], group["maximize"]
        # The clip-folded scale s / c arrives in float64 (fusedopt/clip/_step.py): GradDivisor
        # rounds it to float32 for float32 grads, as it was computed before, and splits it beyond
        # float32's range (GradScaler's ceiling scale), where 1 / inf would zero the grads.
        unscale = GradDivisor(grad_scale) if grad_scale is not None else None
        before = self._state_version()
        for p, grad in pairs:
            if unscale is not None:
                grad = unscale.multiply_by_reciprocal(grad)
            if maximize:
                grad = -grad
            if weight_decay != 0:
                grad = grad.add(p, alpha=weight_decay)
            if momentum != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                grad = grad.add(buf, alpha=momentum) if nesterov else buf
            p.add_(grad, alpha=-lr)
        self._rebase_caches(before)  # (new buffers of params the kernels' caches do not hold)

    def _init_state(self, group, p: Tensor, state: Dict[str, Any]) -> None:
        """Nothing up front: like torch.optim, the buffer appears at the first step."""

    def _watched_values(self, group: Dict[str, Any]) -> tuple:
        return (group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"],
                group.get("max_grad_norm"), group.get("skip_nonfinite", False),
                group.get("differentiable", False))

    def _validate_on_step(self, group: Dict[str, Any]) -> None:
        super()._validate_on_step(group)
        _validate_sgd(None, group["momentum"], group["dampening"], group["weight_decay"],
                      group["nesterov"], on_step=True)

    @staticmethod
    def _hyper(group, grad_scale, found_inf) -> Dict[str, Any]:
        return dict(lr=group["lr"], momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]),
                    weight_decay=float(group["weight_decay"]), nesterov=group["nesterov"],
                    maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf)

    def _apply_reading_grads(self, group, bucket: GroupBucket, grad_scale, found_inf,
                             backend) -> bool:
        step = getattr(backend, "sgd_reading_grads", None)
        if step is None:
            return False
        hyper = self._hyper(group, grad_scale, found_inf)
        if hyper["momentum"] == 0:
            return step(bucket.params, [], is_first_step=False, **hyper)
        buffers = bucket.state_lists["momentum_buffer"]
        if _any_none(buffers):  # first step of some params: the general path creates buffers
            return False
        return step(bucket.params, buffers, is_first_step=False, **hyper)

    def _apply(self, group, bucket: GroupBucket, grads: List[Tensor], grad_scale, found_inf,
               backend) -> None:
        hyper = self._hyper(group, grad_scale, found_inf)
        momentum = hyper["momentum"]
        if momentum == 0:
            backend.sgd_(bucket.params, grads, [], is_first_step=False, **hyper)
            return
        buffers = bucket.state_lists["momentum_buffer"]
        if not _any_none(buffers):
            backend.sgd_(bucket.params, grads, buffers, is_first_step=False, **hyper)
            return
        if hyper["dampening"] != 0 and _skipped_on_host(found_inf):
            # A first step that GradScaler skips: torch.optim creates no buffer then, and the
            # next step starts it from g, which a zero buffer would not give when dampening != 0
            # (b = mu * 0 + (1 - tau) g). One host read, on first steps with dampening only; it
            # says the whole step is skipped, so nothing is launched either.
            return
        fresh = [i for i, b in enumerate(buffers) if b is None]
        old = [i for i, b in enumerate(buffers) if b is not None]
        self._create_buffers(bucket, fresh)
        for indices, first in ((old, False), (fresh, True)):
            if indices:
                backend.sgd_([bucket.params[i] for i in indices], [grads[i] for i in indices],
                             [buffers[i] for i in indices], is_first_step=first, **hyper)

    def _create_buffers(self, bucket: GroupBucket, fresh: List[int]) -> None:
        """Create the momentum buffers of params stepping for the first time.

        They start at zero and the kernel writes ``b = g`` into them (``is_first_step``). If
        GradScaler skips that very step (``found_inf``), they stay zero and the next step treats
        them as existing, as ``torch.optim.SGD(fused=True)`` does: the same as torch's default
        path (no buffer until a step is taken) when dampening is 0; with dampening the caller
        reads ``found_inf`` first and creates no buffer on a skipped step.
        """
        before = self._state_version()
        for i in fresh:
            owner = bucket.owners[i]  # the buffer is like it (complex, DTensor), the kernel's view real
            buf = torch.zeros_like(owner, memory_format=torch.preserve_format)
            self.state[owner]["momentum_buffer"] = buf
            bucket.state_lists["momentum_buffer"][i] = kernel_view(buf)
        self._rebase_caches(before)  # (this bucket's cache included: it holds the new buffers)
