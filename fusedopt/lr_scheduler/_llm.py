"""Schedules used to train large language models: warmup + cosine, warmup-stable-decay, inverse sqrt.

All three are closed-form functions of the step ``t`` and the group's peak lr ``base_lr`` (its
``initial_lr``); every step recomputes the lr from them, so ``step()`` and ``step(epoch)`` agree
exactly and resuming from a checkpoint at any step gives the same values.

Warmup (all three): for ``t < warmup_steps``,
``lr_t = base_lr * (s + (1 - s) * t / warmup_steps)`` with ``s = warmup_start_factor``
(default 0: the lr starts at 0 and reaches ``base_lr`` at ``t = warmup_steps``).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

from ._base import LRScheduler, check_choice, check_int, check_real, per_group

FloatOrList = Union[float, Sequence[float]]


class _WarmupSchedule(LRScheduler):
    """Shared parts: the linear warmup, the lr floor, and the closed-form stepping."""

    def _setup_warmup(self, warmup_steps: int, warmup_start_factor: float) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.warmup_start_factor = check_real("warmup_start_factor", warmup_start_factor, low=0.0, high=1.0)

    def _setup_floor(self, optimizer: Any, min_lr: Optional[FloatOrList], min_lr_ratio: Optional[float]) -> None:
        """The lr at the end of the decay: ``min_lr`` (absolute, per group) or ``min_lr_ratio * base_lr``."""
        if min_lr is not None and min_lr_ratio is not None:
            raise ValueError("give min_lr or min_lr_ratio, not both")
        if min_lr is not None:
            self.min_lrs = per_group("min_lr", min_lr, optimizer)
            for value in self.min_lrs:
                check_real("min_lr", value, low=0.0)
            self.min_lr_ratio = None
        else:
            self.min_lrs = None
            self.min_lr_ratio = check_real("min_lr_ratio", 0.0 if min_lr_ratio is None else min_lr_ratio,
                                           low=0.0, high=1.0)

    def _floor(self, index: int, base_lr: Any) -> Any:
        if self.min_lrs is not None:
            return self.min_lrs[index]
        return base_lr * self.min_lr_ratio

    def _warmup_lr(self, base_lr: Any, step: int) -> Any:
        start = self.warmup_start_factor
        return base_lr * (start + (1.0 - start) * step / self.warmup_steps)

    def _lr_at(self, step: int, base_lr: Any, floor: Any) -> Any:
        """The lr at ``step`` for a group with peak ``base_lr`` and floor ``floor``."""
        raise NotImplementedError

    def get_lr(self) -> List[Any]:
        step = self.last_epoch
        return [self._lr_at(step, base_lr, self._floor(i, base_lr)) for i, base_lr in enumerate(self.base_lrs)]

    def _closed_form_lr(self) -> List[Any]:
        return self.get_lr()


class WarmupCosineLR(_WarmupSchedule):
    r"""Linear warmup, then cosine decay to a floor (the GPT-3 / LLaMA / Chinchilla schedule).

    .. math::
        lr_t = \begin{cases}
          base\,(s + (1 - s)\,t / W) & t < W \\
          floor + (base - floor)\,\tfrac12\,(1 + \cos(\pi\,\frac{t - W}{T - W})) & W \le t < T \\
          floor & t \ge T
        \end{cases}

    with ``W = warmup_steps``, ``T = total_steps``, ``s = warmup_start_factor`` and
    ``floor = min_lr`` or ``min_lr_ratio * base`` (default 0).

    Args:
        optimizer: wrapped optimizer; each group's lr is its peak.
        warmup_steps: steps of linear warmup (>= 0, < total_steps).
        total_steps: step at which the floor is reached.
        min_lr: absolute floor, float or one per group (exclusive with ``min_lr_ratio``).
        min_lr_ratio: floor as a fraction of each group's peak, in [0, 1]. Default: 0.
        warmup_start_factor: lr at step 0 as a fraction of the peak. Default: 0.
        last_epoch: index of the last step; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, warmup_steps: int, total_steps: int, min_lr: Optional[FloatOrList] = None,
                 min_lr_ratio: Optional[float] = None, warmup_start_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        self._setup_warmup(warmup_steps, warmup_start_factor)
        self.total_steps = check_int("total_steps", total_steps, minimum=1)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be < total_steps ({total_steps})")
        self._setup_floor(optimizer, min_lr, min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, step: int, base_lr: Any, floor: Any) -> Any:
        if step < self.warmup_steps:
            return self._warmup_lr(base_lr, step)
        if step >= self.total_steps:
            return floor
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _decay_linear(progress: float) -> float:
    return 1.0 - progress


def _decay_cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _decay_sqrt(progress: float) -> float:
    return 1.0 - math.sqrt(progress)


_DECAY_SHAPES = {"linear": _decay_linear, "cosine": _decay_cosine, "sqrt": _decay_sqrt, "1-sqrt": _decay_sqrt}


class WarmupStableDecayLR(_WarmupSchedule):
    r"""Warmup-stable-decay ("WSD", trapezoidal): warm up, hold the peak, then cool down at the end.

    .. math::
        lr_t = \begin{cases}
          base\,(s + (1 - s)\,t / W) & t < W \\
          base & W \le t < T - D \\
          floor + (base - floor)\, f\!\left(\frac{t - (T - D)}{D}\right) & T - D \le t < T \\
          floor & t \ge T
        \end{cases}

    with ``W = warmup_steps``, ``D = decay_steps``, ``T = total_steps`` and the cooldown shape
    ``f(p) = 1 - p`` (``"linear"``), ``(1 + cos(pi p)) / 2`` (``"cosine"``) or ``1 - sqrt(p)``
    (``"sqrt"``, also spelled ``"1-sqrt"``; Hägele et al., 2024).

    Args:
        optimizer: wrapped optimizer; each group's lr is its peak.
        warmup_steps: steps of linear warmup (>= 0).
        total_steps: step at which the floor is reached.
        decay_steps: length of the final decay (>= 1, ``warmup_steps + decay_steps <= total_steps``).
        decay_type: ``"linear"``, ``"cosine"`` or ``"sqrt"``. Default: ``"linear"``.
        min_lr / min_lr_ratio / warmup_start_factor / last_epoch: as in :class:`WarmupCosineLR`.
    """

    def __init__(self, optimizer: Any, warmup_steps: int, total_steps: int, decay_steps: int,
                 decay_type: str = "linear", min_lr: Optional[FloatOrList] = None,
                 min_lr_ratio: Optional[float] = None, warmup_start_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        self._setup_warmup(warmup_steps, warmup_start_factor)
        self.total_steps = check_int("total_steps", total_steps, minimum=1)
        self.decay_steps = check_int("decay_steps", decay_steps, minimum=1)
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) must be <= total_steps ({total_steps})"
            )
        self.decay_type = check_choice("decay_type", decay_type, list(_DECAY_SHAPES))
        self._setup_floor(optimizer, min_lr, min_lr_ratio)
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, step: int, base_lr: Any, floor: Any) -> Any:
        decay_start = self.total_steps - self.decay_steps
        if step < self.warmup_steps:
            return self._warmup_lr(base_lr, step)
        if step < decay_start:
            return base_lr
        if step >= self.total_steps:
            return floor
        progress = (step - decay_start) / self.decay_steps
        return floor + (base_lr - floor) * _DECAY_SHAPES[self.decay_type](progress)


class InverseSqrtLR(_WarmupSchedule):
    r"""Linear warmup, then decay with the inverse square root of the step (Transformer / T5 /
    fairseq ``inverse_sqrt``):

    .. math::
        lr_t = \begin{cases}
          base\,(s + (1 - s)\,t / W) & t < W \\
          base\,\sqrt{W / t} & t \ge W
        \end{cases}

    The lr is continuous at ``t = W`` (both pieces give ``base``).

    Args:
        optimizer: wrapped optimizer; each group's lr is its peak.
        warmup_steps: steps of linear warmup (>= 1).
        warmup_start_factor: lr at step 0 as a fraction of the peak. Default: 0.
        last_epoch: index of the last step; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, warmup_steps: int, warmup_start_factor: float = 0.0,
                 last_epoch: int = -1) -> None:
        self._setup_warmup(warmup_steps, warmup_start_factor)
        check_int("warmup_steps", warmup_steps, minimum=1)
        self.min_lrs, self.min_lr_ratio = None, 0.0
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, step: int, base_lr: Any, floor: Any) -> Any:
        if step < self.warmup_steps:
            return self._warmup_lr(base_lr, step)
        return base_lr * math.sqrt(self.warmup_steps / step)


WSD = WarmupStableDecayLR
