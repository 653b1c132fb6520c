"""Per-batch cyclical schedules: CyclicLR, OneCycleLR, and cosine annealing with warm restarts.

CyclicLR and OneCycleLR can also cycle the momentum (``momentum`` for SGD-like optimizers,
``betas[0]`` for Adam-like ones) inversely to the lr. A tensor momentum / beta1 is updated in place.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from ._base import (
    LRScheduler,
    check_choice,
    check_int,
    check_optimizer,
    check_real,
    per_group,
    require_group_keys,
    write_group_value,
    write_momentum,
)

FloatOrList = Union[float, Sequence[float]]


def _uses_beta1(optimizer: Any) -> bool:
    """True if the optimizer's momentum is ``betas[0]`` (Adam-like), False if it is ``momentum``."""
    defaults = getattr(optimizer, "defaults", None) or optimizer.param_groups[0]
    if "betas" in defaults:
        return True
    if "momentum" in defaults:
        return False
    raise ValueError(
        "cycle_momentum=True needs an optimizer with 'momentum' or 'betas' (pass cycle_momentum=False)"
    )


def _check_non_negative_each(name: str, values: Sequence[Any]) -> None:
    for value in values:
        check_real(name, value, low=0.0)


class _MomentumCycle:
    """Stores ``max_momentum`` / ``base_momentum`` in the groups and writes the momentum."""

    def _setup_momentum(self, optimizer: Any, cycle_momentum: bool, base_momentum: FloatOrList,
                        max_momentum: FloatOrList, last_epoch: int) -> Optional[tuple]:
        """(base momentums, max momentums) per group, written into the groups on a new
        schedule; None without ``cycle_momentum``."""
        self.cycle_momentum = bool(cycle_momentum)
        if not self.cycle_momentum:
            return None
        self.use_beta1 = _uses_beta1(optimizer)
        base_momentums = per_group("base_momentum", base_momentum, optimizer)
        max_momentums = per_group("max_momentum", max_momentum, optimizer)
        _check_non_negative_each("base_momentum", base_momentums)
        _check_non_negative_each("max_momentum", max_momentums)
        if last_epoch == -1:
            for group, low, high in zip(optimizer.param_groups, base_momentums, max_momentums):
                write_momentum(group, high, self.use_beta1)
                group["max_momentum"] = high
                group["base_momentum"] = low
        return base_momentums, max_momentums

    def _write_momentums(self, momentums: Sequence[Any]) -> None:
        for group, momentum in zip(self.optimizer.param_groups, momentums):
            write_momentum(group, momentum, self.use_beta1)


# --------------------------------------------------------------------------------------------
# CyclicLR
# --------------------------------------------------------------------------------------------

def _triangular(cycle: float) -> float:
    return 1.0


def _triangular2(cycle: float) -> float:
    return 1 / (2.0 ** (cycle - 1))


class CyclicLR(_MomentumCycle, LRScheduler):
    r"""Cyclical learning rate (Smith, 2017): the lr moves between ``base_lr`` and ``max_lr``.

    With ``c = floor(1 + t / (up + down))`` the cycle number and ``x = 1 + t/(up+down) - c`` the
    position in the cycle,

    .. math::
        h = \begin{cases} x / r & x \le r \\ (x - 1) / (r - 1) & x > r \end{cases},\quad
        r = \frac{up}{up + down}, \qquad
        lr_t = base + (max - base)\, h\, s

    where the amplitude scale ``s`` is ``1`` (``"triangular"``), ``1 / 2^{c-1}``
    (``"triangular2"``), ``gamma^t`` (``"exp_range"``), or ``scale_fn(c)`` / ``scale_fn(t)``
    (custom, per ``scale_mode``). With ``cycle_momentum`` the momentum follows
    ``max_m - (max_m - base_m) h s`` (inversely to the lr).

    Args:
        optimizer: wrapped optimizer.
        base_lr: lower lr bound, float or one per group (written into the groups at start).
        max_lr: upper lr bound, float or one per group.
        step_size_up: batches in the rising half of a cycle (> 0). Default: 2000.
        step_size_down: batches in the falling half (>= 0); None means ``step_size_up``.
        mode: ``"triangular"``, ``"triangular2"`` or ``"exp_range"``; ignored with ``scale_fn``.
        gamma: base of the ``exp_range`` scale (> 0). Default: 1.0.
        scale_fn: custom amplitude scale, ``0 <= scale_fn(x) <= 1``.
        scale_mode: ``"cycle"`` or ``"iterations"``: argument of ``scale_fn``.
        cycle_momentum: cycle the momentum inversely. Default: True.
        base_momentum / max_momentum: momentum bounds. Defaults: 0.8 / 0.9.
        last_epoch: index of the last batch; -1 starts a new schedule.
    """

    _callable_attributes = ("_scale_fn_custom",)

    def __init__(self, optimizer: Any, base_lr: FloatOrList, max_lr: FloatOrList, step_size_up: int = 2000,
                 step_size_down: Optional[int] = None, mode: str = "triangular", gamma: float = 1.0,
                 scale_fn: Optional[Callable[[float], float]] = None, scale_mode: str = "cycle",
                 cycle_momentum: bool = True, base_momentum: FloatOrList = 0.8, max_momentum: FloatOrList = 0.9,
                 last_epoch: int = -1, verbose: Any = "deprecated") -> None:
        check_optimizer(optimizer)
        base_lrs = per_group("base_lr", base_lr, optimizer)
        self.max_lrs = per_group("max_lr", max_lr, optimizer)
        _check_non_negative_each("base_lr", base_lrs)
        _check_non_negative_each("max_lr", self.max_lrs)
        check_real("step_size_up", step_size_up, low=0.0, low_inclusive=False)
        if step_size_down is not None:
            check_real("step_size_down", step_size_down, low=0.0)
        up = float(step_size_up)
        down = float(step_size_down) if step_size_down is not None else up
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        if scale_fn is None:
            check_choice("mode", mode, ["triangular", "triangular2", "exp_range"])
        elif not callable(scale_fn):
            raise ValueError(f"scale_fn must be callable, got {type(scale_fn).__name__}")
        self.mode = mode
        self.gamma = check_real("gamma", gamma, low=0.0, low_inclusive=False)
        self._scale_fn_custom = scale_fn
        if scale_fn is None:  # the built-in modes fix what the scale depends on (torch ignores
            self.scale_mode = "iterations" if mode == "exp_range" else "cycle"  # the argument)
        else:
            self.scale_mode = check_choice("scale_mode", scale_mode, ["cycle", "iterations"])
        last_epoch = check_int("last_epoch", last_epoch, minimum=-1)
        if last_epoch == -1:
            for group, lr in zip(optimizer.param_groups, base_lrs):
                write_group_value(group, "lr", lr)
        momentums = self._setup_momentum(optimizer, cycle_momentum, base_momentum, max_momentum,
                                         last_epoch)
        if momentums is not None:  # (attributes, as torch keeps them)
            self.base_momentums, self.max_momentums = momentums
        self._base_lrs_given = base_lrs  # read once by _initial_base_lrs (not state: torch's has none)
        super().__init__(optimizer, last_epoch, verbose)

    def _initial_base_lrs(self) -> List[Any]:
        base_lrs = self._base_lrs_given
        del self._base_lrs_given
        return list(base_lrs)

    def scale_fn(self, x: float) -> float:
        """The amplitude scale at ``x`` (cycle number or iteration, per ``scale_mode``)."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular2":
            return _triangular2(x)
        if self.mode == "exp_range":
            return self.gamma ** x
        return _triangular(x)

    def _height(self) -> tuple:
        """(fraction of the amplitude reached in this cycle, amplitude scale)."""
        position = self.last_epoch / self.total_size
        cycle = math.floor(1 + position)
        x = 1.0 + position - cycle
        if x <= self.step_ratio:
            fraction = x / self.step_ratio
        else:
            fraction = (x - 1) / (self.step_ratio - 1)
        scale = self.scale_fn(cycle if self.scale_mode == "cycle" else self.last_epoch)
        return fraction, scale

    def get_lr(self) -> List[Any]:
        fraction, scale = self._height()
        if self.cycle_momentum:
            self._write_momentums([high - (high - low) * fraction * scale
                                   for low, high in zip(self.base_momentums, self.max_momentums)])
        return [low + (high - low) * fraction * scale for low, high in zip(self.base_lrs, self.max_lrs)]


# --------------------------------------------------------------------------------------------
# OneCycleLR
# --------------------------------------------------------------------------------------------

def _phase(end_step: float, start_lr: str, end_lr: str, start_momentum: str,
           end_momentum: str) -> Dict[str, Any]:
    """One phase of the 1cycle policy: anneal from ``group[start_lr]`` to ``group[end_lr]`` (and
    the momentum likewise) until ``end_step``. A plain dict with torch's keys, so the state dict
    is torch's and loads with ``torch.load(weights_only=True)``."""
    return {"end_step": end_step, "start_lr": start_lr, "end_lr": end_lr,
            "start_momentum": start_momentum, "end_momentum": end_momentum}


def _anneal_cos(start: Any, end: Any, pct: float) -> Any:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1)."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _anneal_linear(start: Any, end: Any, pct: float) -> Any:
    """Straight line from ``start`` (pct 0) to ``end`` (pct 1)."""
    return (end - start) * pct + start


class OneCycleLR(_MomentumCycle, LRScheduler):
    r"""The 1cycle policy (Smith & Topin, 2017), per batch.

    With ``initial = max_lr / div_factor`` and ``min = initial / final_div_factor``, the lr goes
    ``initial -> max_lr`` over the first ``pct_start * total_steps`` steps, then
    ``max_lr -> min`` until ``total_steps - 1`` (two phases, as fastai); with ``three_phase`` it
    goes ``initial -> max_lr -> initial`` symmetrically and then ``initial -> min``. Inside a phase
    going from ``a`` to ``b`` with progress ``p`` in [0, 1]:

    * ``"cos"``: ``b + (a - b) / 2 * (1 + cos(pi p))``
    * ``"linear"``: ``a + (b - a) p``

    The momentum (or beta1) follows ``max_momentum -> base_momentum -> max_momentum``.
    Stepping more than ``total_steps`` times raises ``ValueError``.

    Args:
        optimizer: wrapped optimizer.
        max_lr: peak lr, float or one per group.
        total_steps: number of steps in the cycle; or give ``epochs`` and ``steps_per_epoch``.
        pct_start: fraction of the cycle spent increasing the lr, in [0, 1]. Default: 0.3.
        anneal_strategy: ``"cos"`` or ``"linear"``. Default: ``"cos"``.
        cycle_momentum: cycle the momentum inversely. Default: True.
        base_momentum / max_momentum: momentum bounds. Defaults: 0.85 / 0.95.
        div_factor: ``initial_lr = max_lr / div_factor`` (> 0). Default: 25.
        final_div_factor: ``min_lr = initial_lr / final_div_factor`` (> 0). Default: 1e4.
        three_phase: use the three-phase variant. Default: False.
        last_epoch: index of the last batch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, max_lr: FloatOrList, total_steps: Optional[int] = None,
                 epochs: Optional[int] = None, steps_per_epoch: Optional[int] = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: FloatOrList = 0.85, max_momentum: FloatOrList = 0.95, div_factor: float = 25.0,
                 final_div_factor: float = 1e4, three_phase: bool = False, last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        check_optimizer(optimizer)
        if total_steps is not None:
            self.total_steps = check_int("total_steps", total_steps, minimum=1)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = (check_int("epochs", epochs, minimum=1)
                                * check_int("steps_per_epoch", steps_per_epoch, minimum=1))
        else:
            raise ValueError("OneCycleLR needs total_steps, or both epochs and steps_per_epoch")
        check_real("pct_start", pct_start, low=0.0, high=1.0)
        self._anneal_func_type = check_choice("anneal_strategy", anneal_strategy, ["cos", "linear"])
        check_real("div_factor", div_factor, low=0.0, low_inclusive=False)
        check_real("final_div_factor", final_div_factor, low=0.0, low_inclusive=False)
        last_epoch = check_int("last_epoch", last_epoch, minimum=-1)
        self._schedule_phases = self._make_phases(float(pct_start), bool(three_phase))

        max_lrs = per_group("max_lr", max_lr, optimizer)
        _check_non_negative_each("max_lr", max_lrs)
        if last_epoch == -1:
            for group, peak in zip(optimizer.param_groups, max_lrs):
                group["initial_lr"] = peak / div_factor
                group["max_lr"] = peak
                group["min_lr"] = group["initial_lr"] / final_div_factor
        else:
            require_group_keys(optimizer, ["initial_lr", "max_lr", "min_lr"])
        self._setup_momentum(optimizer, cycle_momentum, base_momentum, max_momentum, last_epoch)
        if self.cycle_momentum and last_epoch != -1:
            require_group_keys(optimizer, ["max_momentum", "base_momentum"])
        super().__init__(optimizer, last_epoch, verbose)

    def _make_phases(self, pct_start: float, three_phase: bool) -> List[Dict[str, Any]]:
        peak_step = float(pct_start * self.total_steps) - 1
        last_step = self.total_steps - 1
        if three_phase:
            return [
                _phase(peak_step, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                _phase(float(2 * pct_start * self.total_steps) - 2, "max_lr", "initial_lr",
                       "base_momentum", "max_momentum"),
                _phase(last_step, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
            ]
        return [
            _phase(peak_step, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
            _phase(last_step, "max_lr", "min_lr", "base_momentum", "max_momentum"),
        ]

    def _locate(self, step: int) -> tuple:
        """(phase, progress within it) for ``step``; the last phase extends past its end."""
        start = 0.0
        for index, phase in enumerate(self._schedule_phases):
            if step <= phase["end_step"] or index == len(self._schedule_phases) - 1:
                length = phase["end_step"] - start
                return phase, ((step - start) / length if length != 0 else 1.0)
            start = phase["end_step"]
        raise AssertionError("unreachable: the last phase always matches")

    def get_lr(self) -> List[Any]:
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(
                f"Tried to step {step} times. The specified number of total steps is {self.total_steps}: "
                f"OneCycleLR cannot go past total_steps (create it with a larger total_steps or "
                f"epochs * steps_per_epoch)"
            )
        anneal = _anneal_cos if self._anneal_func_type == "cos" else _anneal_linear
        phase, pct = self._locate(step)
        groups = self.optimizer.param_groups
        if self.cycle_momentum:
            self._write_momentums([anneal(g[phase["start_momentum"]], g[phase["end_momentum"]], pct)
                                   for g in groups])
        return [anneal(g[phase["start_lr"]], g[phase["end_lr"]], pct) for g in groups]


# --------------------------------------------------------------------------------------------
# CosineAnnealingWarmRestarts
# --------------------------------------------------------------------------------------------

class CosineAnnealingWarmRestarts(LRScheduler):
    r"""Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter, 2016).

    .. math::
        \eta_t = \eta_{min} + \tfrac12(\eta_{base} - \eta_{min})(1 + \cos(\pi T_{cur} / T_i))

    ``T_cur`` counts epochs since the last restart; a restart happens when it reaches ``T_i``, and
    then ``T_i`` is multiplied by ``T_mult`` (``T_0, T_0 T_mult, T_0 T_mult^2, ...``).
    ``step(epoch)`` accepts fractional epochs (e.g. ``epoch + i / iters`` per batch).

    Args:
        optimizer: wrapped optimizer.
        T_0: epochs until the first restart (integer >= 1).
        T_mult: growth factor of the period after each restart (integer >= 1). Default: 1.
        eta_min: lowest lr. Default: 0.
        last_epoch: index of the last epoch; -1 starts a new schedule.
    """

    def __init__(self, optimizer: Any, T_0: int, T_mult: int = 1, eta_min: float = 0.0, last_epoch: int = -1,
                 verbose: Any = "deprecated") -> None:
        self.T_0 = check_int("T_0", T_0, minimum=1)
        self.T_mult = check_int("T_mult", T_mult, minimum=1)
        self.eta_min = check_real("eta_min", eta_min, low=0.0)
        self.T_i = self.T_0
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch, verbose)

    def get_lr(self) -> List[Any]:
        cosine = 1 + math.cos(math.pi * self.T_cur / self.T_i)
        return [self.eta_min + (base_lr - self.eta_min) * cosine / 2 for base_lr in self.base_lrs]

    def step(self, epoch: Optional[float] = None) -> None:
        """Advance one epoch, or jump to ``epoch`` (may be fractional; not deprecated here)."""
        self._step_count += 1
        with self._within_step():
            self._advance(epoch)

    def _advance(self, epoch: Optional[float]) -> None:
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
            self.last_epoch += 1
            self._set_lrs(self.get_lr())
        else:
            self._jump_to(epoch)

    def _jump_to(self, epoch: float) -> None:
        check_real("epoch", epoch, low=0.0)
        with self._within_step():
            self.T_cur, self.T_i = self._position(epoch)
            self.last_epoch = math.floor(epoch)
            self._set_lrs(self.get_lr())

    def _position(self, epoch: float) -> tuple:
        """(T_cur, T_i) at ``epoch``: walk the restart points ``T_0 (T_mult^n - 1) / (T_mult - 1)``."""
        if epoch < self.T_0:
            return epoch, self.T_0
        if self.T_mult == 1:
            return epoch % self.T_0, self.T_0
        restarts = 0  # largest n with restart_point(n) <= epoch, in exact integer arithmetic
        while self.T_0 * (self.T_mult ** (restarts + 1) - 1) // (self.T_mult - 1) <= epoch:
            restarts += 1
        restart_point = self.T_0 * (self.T_mult ** restarts - 1) / (self.T_mult - 1)
        return epoch - restart_point, self.T_0 * self.T_mult ** restarts
