"""The classic epoch schedules: step, multi-step, exponential, linear, constant, polynomial, cosine,
and the lambda-driven ones.

Most are *chainable*: each step multiplies the group's current ``lr`` by a ratio (or, for cosine
annealing, applies an affine map), so the schedule composes with other schedulers acting on the
same optimizer. The step-by-step values follow the same floating-point recursion as
``torch.optim.lr_scheduler``, which is why they match it to the last bit; the closed forms (used by
the deprecated ``step(epoch)``) are written from ``base_lrs`` as in torch.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Union

from ._base import LRScheduler, check_int, check_real

LrLambda = Callable[[int], float]


def _lambdas_per_group(lr_lambda: Union[LrLambda, Sequence[LrLambda]], optimizer: Any) -> List[LrLambda]:
    n_groups = len(optimizer.param_groups)
    if isinstance(lr_lambda, (list, tuple)):
        if len(lr_lambda) != n_groups:
            raise ValueError(f"lr_lambda: expected {n_groups} functions (one per param group), got {len(lr_lambda)}")
        lambdas = list(lr_lambda)
    else:
        lambdas = [lr_lambda] * n_groups
    for fn in lambdas:
        if not callable(fn):
            raise ValueError(f"lr_lambda must be callable, got {type(fn).__name__}")
    return lambdas


class _RatioChain(LRScheduler):
    """A chainable schedule of the form ``lr_t = lr_{t-1} * ratio_t``.

    Subclasses give :meth:`_ratio` for the epoch ``self.last_epoch``; ``None`` keeps the lr.
    """

    def _ratio(self) -> Optional[float]:
        raise NotImplementedError

    def get_lr(self) -> List[Any]:
        ratio = self._ratio()
        if ratio is None:
            return self._current_lrs()
        return [group["lr"] * ratio for group in self.optimizer.param_groups]


class LambdaLR(LRScheduler):
    r"""``lr_t = base_lr * lr_lambda(t)`` (one function, or one per param group).

    Args:
        optimizer: wrapped optimizer.
        lr_lambda: function of the epoch returning a factor, or a list with one per group.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    _callable_attributes = ("lr_lambdas",)

    def __init__(self, optimizer: Any, lr_lambda: Union[LrLambda, Sequence[LrLambda]], last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        self.lr_lambdas = _lambdas_per_group(lr_lambda, optimizer)
        super().__init__(optimizer, last_epoch, verbose)

    def get_lr(self) -> List[Any]:
        return [base_lr * fn(self.last_epoch) for fn, base_lr in zip(self.lr_lambdas, self.base_lrs)]


class MultiplicativeLR(LRScheduler):
    r"""``lr_t = lr_{t-1} * lr_lambda(t)`` for ``t >= 1`` (chainable).

    Args:
        optimizer: wrapped optimizer.
        lr_lambda: function of the epoch returning a factor, or a list with one per group.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    _callable_attributes = ("lr_lambdas",)

    def __init__(self, optimizer: Any, lr_lambda: Union[LrLambda, Sequence[LrLambda]], last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        self.lr_lambdas = _lambdas_per_group(lr_lambda, optimizer)
        super().__init__(optimizer, last_epoch, verbose)

    def get_lr(self) -> List[Any]:
        if self._is_initial:
            return self._current_lrs()
        return [group["lr"] * fn(self.last_epoch)
                for fn, group in zip(self.lr_lambdas, self.optimizer.param_groups)]


class StepLR(_RatioChain):
    r"""Decay by ``gamma`` every ``step_size`` epochs: ``lr_t = base_lr * gamma ** (t // step_size)``.

    Args:
        optimizer: wrapped optimizer.
        step_size: period of the decay, in epochs (>= 1).
        gamma: multiplicative factor of each decay. Default: 0.1.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, step_size: int, gamma: float = 0.1, last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        self.step_size = check_int("step_size", step_size, minimum=1)
        self.gamma = check_real("gamma", gamma, low=0.0)
        super().__init__(optimizer, last_epoch, verbose)

    def _ratio(self) -> Optional[float]:
        epoch = self.last_epoch
        if epoch == 0 or epoch % self.step_size != 0:
            return None
        return self.gamma

    def _closed_form_lr(self) -> List[Any]:
        return [base_lr * self.gamma ** (self.last_epoch // self.step_size) for base_lr in self.base_lrs]


class MultiStepLR(_RatioChain):
    r"""Decay by ``gamma`` at each milestone: ``lr_t = base_lr * gamma ** #{m in milestones : m <= t}``.

    A milestone listed ``n`` times decays by ``gamma ** n``.

    Args:
        optimizer: wrapped optimizer.
        milestones: epoch indices (non-negative integers).
        gamma: multiplicative factor of each decay. Default: 0.1.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, milestones: Iterable[int], gamma: float = 0.1, last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        try:  # a mapping (a Counter, e.g. another MultiStepLR's milestones) gives the counts
            milestone_list = (list(Counter(milestones).elements()) if isinstance(milestones, Mapping)
                              else list(milestones))
        except TypeError:
            raise ValueError(f"milestones must be an iterable of integers, got {milestones!r}") from None
        self.milestones = Counter(check_int("milestones", m, minimum=0) for m in milestone_list)
        self.gamma = check_real("gamma", gamma, low=0.0)
        super().__init__(optimizer, last_epoch, verbose)

    def _ratio(self) -> Optional[float]:
        count = self.milestones.get(self.last_epoch, 0)
        if count == 0:
            return None
        return self.gamma ** count

    def _closed_form_lr(self) -> List[Any]:
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base_lr * self.gamma ** passed for base_lr in self.base_lrs]


class ConstantLR(_RatioChain):
    r"""Scale the lr by ``factor`` for the first ``total_iters`` epochs, then restore it:
    ``lr_t = base_lr * (factor if t < total_iters else 1)``.

    Args:
        optimizer: wrapped optimizer.
        factor: scale applied until ``total_iters``, in (0, 1]. Default: 1/3.
        total_iters: number of scaled epochs (>= 1). Default: 5.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, factor: float = 1.0 / 3, total_iters: int = 5, last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        self.factor = check_real("factor", factor, low=0.0, high=1.0, low_inclusive=False)
        self.total_iters = check_int("total_iters", total_iters, minimum=1)
        super().__init__(optimizer, last_epoch, verbose)

    def _ratio(self) -> Optional[float]:
        if self.last_epoch == 0:
            return self.factor
        if self.last_epoch == self.total_iters:
            return 1.0 / self.factor
        return None

    def _closed_form_lr(self) -> List[Any]:
        restored = self.last_epoch >= self.total_iters
        return [base_lr * (self.factor + restored * (1 - self.factor)) for base_lr in self.base_lrs]


class LinearLR(_RatioChain):
    r"""Scale the lr by a factor moving linearly from ``start_factor`` to ``end_factor``:
    ``lr_t = base_lr * (start + (end - start) * min(t, total_iters) / total_iters)``.

    Step by step the lr is multiplied by
    ``1 + (end - start) / (total_iters * start + (t - 1) * (end - start))``, the ratio of two
    consecutive factors (the chainable form).

    Args:
        optimizer: wrapped optimizer.
        start_factor: factor at epoch 0, in (0, 1]. Default: 1/3.
        end_factor: factor from epoch ``total_iters`` on, in [0, 1]. Default: 1.0.
        total_iters: epochs to go from start to end factor (>= 0). Default: 5. With 0 (as in
            torch) the factor stays ``start_factor``: use it for "no warmup" with start = end.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1, verbose: Any = "deprecated") -> None:
        self.start_factor = check_real("start_factor", start_factor, low=0.0, high=1.0, low_inclusive=False)
        self.end_factor = check_real("end_factor", end_factor, low=0.0, high=1.0)
        self.total_iters = check_int("total_iters", total_iters, minimum=0)
        super().__init__(optimizer, last_epoch, verbose)

    def _ratio(self) -> Optional[float]:
        epoch = self.last_epoch
        if epoch == 0:
            return self.start_factor
        if self._is_initial or epoch > self.total_iters:
            return None
        slope = self.end_factor - self.start_factor
        previous_factor_times_total = self.total_iters * self.start_factor + (epoch - 1) * slope
        return 1.0 + slope / previous_factor_times_total

    def _closed_form_lr(self) -> List[Any]:
        if self.total_iters == 0:  # what the step-by-step form gives (torch divides by zero here)
            return [base_lr * self.start_factor for base_lr in self.base_lrs]
        progress = min(self.total_iters, self.last_epoch)
        slope = self.end_factor - self.start_factor
        return [base_lr * (self.start_factor + slope * progress / self.total_iters) for base_lr in self.base_lrs]


class ExponentialLR(_RatioChain):
    r"""Decay by ``gamma`` every epoch: ``lr_t = base_lr * gamma ** t``.

    Args:
        optimizer: wrapped optimizer.
        gamma: multiplicative factor per epoch.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, gamma: float, last_epoch: int = -1, verbose: Any = "deprecated") -> None:
        self.gamma = check_real("gamma", gamma, low=0.0)
        super().__init__(optimizer, last_epoch, verbose)

    def _ratio(self) -> Optional[float]:
        return None if self._is_initial else self.gamma

    def _closed_form_lr(self) -> List[Any]:
        return [base_lr * self.gamma ** self.last_epoch for base_lr in self.base_lrs]


class PolynomialLR(_RatioChain):
    r"""Polynomial decay to zero: ``lr_t = base_lr * (1 - min(t, total_iters) / total_iters) ** power``.

    Step by step the lr is multiplied by ``((1 - t/T) / (1 - (t-1)/T)) ** power``.

    Args:
        optimizer: wrapped optimizer.
        total_iters: epochs until the lr reaches 0 (>= 1). Default: 5.
        power: exponent of the polynomial (>= 0). Default: 1.0.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, total_iters: int = 5, power: float = 1.0, last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        self.total_iters = check_int("total_iters", total_iters, minimum=1)
        self.power = check_real("power", power, low=0.0)
        super().__init__(optimizer, last_epoch, verbose)

    def _ratio(self) -> Optional[float]:
        epoch = self.last_epoch
        if self._is_initial or epoch > self.total_iters:
            return None
        remaining_now = 1.0 - epoch / self.total_iters
        remaining_before = 1.0 - (epoch - 1) / self.total_iters
        return (remaining_now / remaining_before) ** self.power

    def _closed_form_lr(self) -> List[Any]:
        remaining = 1.0 - min(self.total_iters, self.last_epoch) / self.total_iters
        return [base_lr * remaining ** self.power for base_lr in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing from ``base_lr`` to ``eta_min`` over ``T_max`` epochs (SGDR without restarts):

    .. math::
        \eta_t = \eta_{min} + \tfrac12(\eta_{base} - \eta_{min})(1 + \cos(\pi t / T_{max}))

    Past ``T_max`` the cosine continues (the lr rises again, period ``2 T_max``).
    Step by step (chainable form) the lr follows
    ``eta_t = eta_min + (eta_{t-1} - eta_min) * (1 + cos(pi t/T)) / (1 + cos(pi (t-1)/T))``,
    except at the bottom of each period (``t - 1 = T_max mod 2 T_max``), where that ratio is
    0/0 and the lr instead grows by ``(base_lr - eta_min) * (1 - cos(pi / T)) / 2``.

    Args:
        optimizer: wrapped optimizer.
        T_max: half period, in epochs (> 0).
        eta_min: lowest lr. Default: 0.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, T_max: int, eta_min: float = 0.0, last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        self.T_max = check_real("T_max", T_max, low=0.0, low_inclusive=False)
        self.eta_min = check_real("eta_min", eta_min, low=0.0)
        super().__init__(optimizer, last_epoch, verbose)

    def get_lr(self) -> List[Any]:
        if self._is_initial:
            return self._current_lrs()
        epoch, period, eta_min = self.last_epoch, self.T_max, self.eta_min
        groups = self.optimizer.param_groups
        if (epoch - 1 - period) % (2 * period) == 0:
            # bottom of the cosine: the ratio below would be 0/0, step up by the first increment
            rise = 1 - math.cos(math.pi / period)
            return [group["lr"] + (base_lr - eta_min) * rise / 2 for base_lr, group in zip(self.base_lrs, groups)]
        ratio = (1 + math.cos(math.pi * epoch / period)) / (1 + math.cos(math.pi * (epoch - 1) / period))
        return [ratio * (group["lr"] - eta_min) + eta_min for group in groups]

    def _closed_form_lr(self) -> List[Any]:
        cosine = 1 + math.cos(math.pi * self.last_epoch / self.T_max)
        return [self.eta_min + (base_lr - self.eta_min) * cosine / 2 for base_lr in self.base_lrs]
