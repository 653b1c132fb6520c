r"""Adam, AMSGrad and AdamW with fused multi-tensor steps.

The update, per parameter :math:`\theta` with gradient :math:`g` at step :math:`t` (``step``
counted from 1), learning rate :math:`\gamma`, weight decay :math:`\lambda`:

.. math::

    g &\leftarrow g / s \quad\text{(GradScaler scale } s\text{, if any)} \\
    g &\leftarrow -g \quad\text{if maximize} \\
    \theta &\leftarrow \theta (1 - \gamma\lambda) \quad\text{(AdamW: decoupled decay)} \qquad
    g \leftarrow g + \lambda\theta \quad\text{(Adam: L2 decay)} \\
    m &\leftarrow m + (1-\beta_1)(g - m) \\
    v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
    \hat v &\leftarrow \max(\hat v, v) \quad\text{(AMSGrad; then } v := \hat v \text{ below)} \\
    \theta &\leftarrow \theta - \frac{\gamma}{1-\beta_1^t}\,
             \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

State per parameter, with torch.optim's keys: ``step`` (0-dim float tensor), ``exp_avg`` (m),
``exp_avg_sq`` (v), ``max_exp_avg_sq`` (:math:`\hat v`, only with ``amsgrad``). bf16/fp16
parameters are updated in fp32 math and rounded once.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch.optim.optimizer import _get_scalar_dtype

from .base import FusedOptimizer, GroupBucket, check_hyperparameter, check_value

Tensor = torch.Tensor


def _validate_adam(lr, betas, eps, weight_decay, on_step: bool = False) -> None:
    """torch.optim's checks (constructor, ``add_param_group``). ``on_step``: the step's check of
    values changed in ``param_groups`` since; it skips lr (torch does not check it there, and
    schedulers set it) and the value of any tensor (reading it would wait for the device)."""
    if not on_step:
        if isinstance(lr, Tensor):
            check_hyperparameter(lr.numel() == 1, "Tensor lr must be 1-element")
        check_hyperparameter(0.0 <= lr, "Invalid learning rate: {}", lr)
    check_hyperparameter(len(betas) == 2, "betas must be a pair, got {!r}", betas)
    in_unit = lambda v: 0.0 <= v < 1.0  # noqa: E731
    non_negative = lambda v: 0.0 <= v  # noqa: E731
    for value, ok, what in ((eps, non_negative, "epsilon value"),
                            (betas[0], in_unit, "beta parameter at index 0"),
                            (betas[1], in_unit, "beta parameter at index 1"),
                            (weight_decay, non_negative, "weight_decay value")):
        if on_step and isinstance(value, Tensor):  # (its value would be a read from the device)
            check_hyperparameter(value.numel() == 1, "Tensor {} must be 1-element", what)
        else:
            check_value(ok, value, what)
    both_tensors = isinstance(betas[0], Tensor) and isinstance(betas[1], Tensor)
    both_numbers = not isinstance(betas[0], Tensor) and not isinstance(betas[1], Tensor)
    check_hyperparameter(both_tensors or both_numbers, "betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            check_hyperparameter(beta.numel() == 1, "Tensor betas[{}] must be 1-element", index)


class Adam(FusedOptimizer):
    __doc__ = __doc__ + r"""

    Arguments are exactly :class:`torch.optim.Adam`'s, plus:

    backend (str): ``"auto"`` (default), ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``;
        see :func:`fusedopt.backends.select`. ``FUSEDOPT_BACKEND`` overrides it.
    max_grad_norm (float, optional): clip the gradients to this global 2-norm (over every param
        of the optimizer, all groups) inside the step: :math:`g \leftarrow g \min(1,
        \text{max\_grad\_norm} / (\|g\| + 10^{-6}))`, as ``torch.nn.utils.clip_grad_norm_``
        before the step would, with one read of the gradients for the norm and no extra pass
        nor host sync. The norm (of the unscaled gradients) is left in ``last_grad_norm``.
    skip_nonfinite (bool): make a step whose gradients hold a NaN/inf a no-op (params, state,
        step counters unchanged), decided on the device; ``skipped_steps`` counts them.

    ``foreach``, ``fused``, ``capturable`` are accepted for compatibility and stored in the
    groups (so checkpoints load into torch.optim unchanged); the step is always fused.
    """

    STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
    DISPLAY_NAME = "fusedopt.optim.Adam"
    _DEFAULT_DECOUPLED = False

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3,
                 betas: Tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 foreach=None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused=None, decoupled_weight_decay=None,
                 backend: str = "auto", max_grad_norm: Optional[float] = None,
                 skip_nonfinite: bool = False):
        _validate_adam(lr, betas, eps, weight_decay)
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._DEFAULT_DECOUPLED
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, backend=backend,
                        max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)
        super().__init__(params, defaults)

    def _fill_group_defaults(self, group: Dict[str, Any]) -> None:
        super()._fill_group_defaults(group)
        group.setdefault("amsgrad", False)
        group.setdefault("maximize", False)
        group.setdefault("decoupled_weight_decay", self._DEFAULT_DECOUPLED)

    def _validate_group(self, group: Dict[str, Any]) -> None:
        _validate_adam(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _init_state(self, group, p: Tensor, state: Dict[str, Any]) -> None:
        step_dtype = torch.float32 if p.device.type != "cpu" else _get_scalar_dtype()
        state["step"] = torch.zeros((), dtype=step_dtype, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _prepare_state(self, group, p: Tensor, state: Dict[str, Any]) -> None:
        step = state.get("step")
        if not torch.is_tensor(step):  # very old checkpoints stored a Python number
            state["step"] = step = torch.tensor(float(step), dtype=_get_scalar_dtype())
        if step.device != p.device:  # e.g. a CPU step from a torch.optim checkpoint, CUDA param
            state["step"] = step.to(device=p.device, dtype=torch.float32)
        # (assigned only when it changes: every assignment makes the caches rebuild)
        if group["amsgrad"] and state.get("max_exp_avg_sq") is None:
            # torch.optim creates it lazily too: a checkpoint saved without amsgrad may lack it
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                raise RuntimeError(f"{self.DISPLAY_NAME}: state of a parameter lacks {key!r}")

    def _watched_values(self, group: Dict[str, Any]) -> tuple:
        beta1, beta2 = group["betas"]  # (a list edited in place is seen: the values, not the list)
        return (beta1, beta2, group["eps"], group["weight_decay"], group.get("max_grad_norm"),
                group.get("skip_nonfinite", False), group.get("differentiable", False))

    def _validate_on_step(self, group: Dict[str, Any]) -> None:
        super()._validate_on_step(group)
        _validate_adam(None, group["betas"], group["eps"], group["weight_decay"], on_step=True)

    def _hyper(self, group, grad_scale, found_inf) -> Dict[str, Any]:
        beta1, beta2 = group["betas"]
        return dict(lr=group["lr"], beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                    weight_decay=float(group["weight_decay"]), amsgrad=group["amsgrad"],
                    maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"],
                    grad_scale=grad_scale, found_inf=found_inf)

    def _cache_flags(self, group) -> tuple:
        return (group["amsgrad"],)  # (turned on later: max_exp_avg_sq is created then)

    def _state_args(self, group, bucket: GroupBucket) -> List[List[Tensor]]:
        lists = bucket.state_lists
        return [lists["exp_avg"], lists["exp_avg_sq"],
                lists["max_exp_avg_sq"] if group["amsgrad"] else [], lists["step"]]

    def _apply(self, group, bucket: GroupBucket, grads: List[Tensor], grad_scale, found_inf,
               backend) -> None:
        backend.adam_(bucket.params, grads, *self._state_args(group, bucket),
                      **self._hyper(group, grad_scale, found_inf))

    def _apply_reading_grads(self, group, bucket: GroupBucket, grad_scale, found_inf,
                             backend) -> bool:
        step = getattr(backend, "adam_reading_grads", None)
        return step is not None and step(bucket.params, *self._state_args(group, bucket),
                                         **self._hyper(group, grad_scale, found_inf))


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay (default ``weight_decay=1e-2``).

    Same arguments as :class:`torch.optim.AdamW`, plus ``backend``. See :class:`Adam` for the
    update rule (the decoupled branch)."""

    DISPLAY_NAME = "fusedopt.optim.AdamW"
    _DEFAULT_DECOUPLED = True

    def __init__(self, params, lr: Union[float, Tensor] = 1e-3,
                 betas: Tuple[Union[float, Tensor], Union[float, Tensor]] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach=None, capturable: bool = False,
                 differentiable: bool = False, fused=None, backend: str = "auto",
                 max_grad_norm: Optional[float] = None, skip_nonfinite: bool = False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, backend=backend,
                         max_grad_norm=max_grad_norm, skip_nonfinite=skip_nonfinite)
