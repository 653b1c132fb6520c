"""ReduceLROnPlateau: cut the lr when a monitored metric stops improving."""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, SupportsFloat, Union

from ._base import (
    _EPOCH_ARGUMENT_WARNING,
    LRScheduler,
    check_choice,
    check_int,
    check_optimizer,
    check_real,
    check_verbose,
    group_values,
    write_group_value,
)


class ReduceLROnPlateau(LRScheduler):
    r"""Multiply the lr by ``factor`` after ``patience`` epochs without improvement of a metric.

    A value ``a`` improves on the best value ``best`` when

    * ``mode="min"``, ``threshold_mode="rel"``: ``a < best * (1 - threshold)``
    * ``mode="min"``, ``threshold_mode="abs"``: ``a < best - threshold``
    * ``mode="max"``, ``threshold_mode="rel"``: ``a > best * (1 + threshold)``
    * ``mode="max"``, ``threshold_mode="abs"``: ``a > best + threshold``

    When more than ``patience`` consecutive epochs bring no improvement, each group's lr becomes
    ``max(lr * factor, min_lr)`` (skipped if that changes it by less than ``eps``), and the next
    ``cooldown`` epochs are not counted. Call ``step(metric)`` once per epoch.

    Args:
        optimizer: wrapped optimizer.
        mode: ``"min"`` or ``"max"``. Default: ``"min"``.
        factor: lr multiplier on a plateau, in [0, 1). Default: 0.1.
        patience: epochs without improvement tolerated (>= 0). Default: 10.
        threshold: minimal significant change (>= 0). Default: 1e-4.
        threshold_mode: ``"rel"`` or ``"abs"``. Default: ``"rel"``.
        cooldown: epochs to wait after a reduction (>= 0). Default: 0.
        min_lr: lower bound, float or one per group. Default: 0.
        eps: smallest lr change applied (>= 0). Default: 1e-8.
    """

    def __init__(self, optimizer: Any, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: Union[float, Sequence[float]] = 0, eps: float = 1e-8, verbose: Any = "deprecated") -> None:
        check_optimizer(optimizer)
        check_verbose(verbose)
        self.factor = check_real("factor", factor, low=0.0, high=1.0, high_inclusive=False)
        self.optimizer = optimizer
        n_groups = len(optimizer.param_groups)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != n_groups:
                raise ValueError(f"min_lr must have one entry per param group: expected {n_groups}, got {len(min_lr)}")
            self.default_min_lr = None
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = min_lr
            self.min_lrs = [min_lr] * n_groups
        for value in self.min_lrs:
            check_real("min_lr", value, low=0.0)
        self.patience = check_int("patience", patience, minimum=0)
        self.cooldown = check_int("cooldown", cooldown, minimum=0)
        self.eps = check_real("eps", eps, low=0.0)
        self.mode = check_choice("mode", mode, ["min", "max"])
        self.threshold = check_real("threshold", threshold, low=0.0)
        self.threshold_mode = check_choice("threshold_mode", threshold_mode, ["rel", "abs"])
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.last_epoch = 0
        self._last_lr = group_values(optimizer, "lr")
        self._reset()

    def _reset(self) -> None:
        """Forget the best value and the bad-epoch and cooldown counters."""
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def is_better(self, value: float, best: float) -> bool:
        """Whether ``value`` is a significant improvement on ``best`` (see the class docstring)."""
        if self.mode == "min":
            if self.threshold_mode == "rel":
                return value < best * (1.0 - self.threshold)
            return value < best - self.threshold
        if self.threshold_mode == "rel":
            return value > best * (self.threshold + 1.0)
        return value > best + self.threshold

    def step(self, metrics: SupportsFloat, epoch: Optional[int] = None) -> None:  # type: ignore[override]
        """Record one epoch's metric (a number or a one-element tensor) and reduce the lr if due."""
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(_EPOCH_ARGUMENT_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = epoch

        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce_lrs()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = group_values(self.optimizer, "lr")

    def _reduce_lrs(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"the optimizer now has {len(groups)} param groups but min_lr was given for "
                    f"{len(self.min_lrs)}; set scheduler.min_lrs to one value per group"
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                write_group_value(group, "lr", new_lr)

    def get_lr(self) -> List[Any]:
        """The current learning rates (this schedule is driven by ``step(metrics)``)."""
        return group_values(self.optimizer, "lr")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.mode_worse = math.inf if self.mode == "min" else -math.inf
