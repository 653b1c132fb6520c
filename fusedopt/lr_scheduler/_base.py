"""The scheduler base class and the helpers that read and write a param group's hyper-parameters.

Everything here is plain Python: a scheduler only reads and writes ``param_groups`` entries, so it
works with any optimizer that has ``param_groups`` (``torch.optim`` optimizers, ``fusedopt.optim``
optimizers, or a duck-typed object).

Tensor hyper-parameters: when a group's ``lr`` (or ``momentum``, or ``betas[0]``) is a
:class:`torch.Tensor`, a scheduler writes the new value *into* that tensor (``fill_``) instead of
replacing it, so a captured CUDA graph or a ``torch.compile``-d step that holds the tensor sees the
new value without re-capturing or re-compiling.
"""
from __future__ import annotations

import contextlib
import functools
import math
import numbers
import types
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

Tensor = torch.Tensor

# torch's wording first (filters such as message="The epoch parameter" catch both), then ours.
_EPOCH_ARGUMENT_WARNING = (
    "The epoch parameter in `scheduler.step()` was not necessary and is being deprecated where "
    "possible. Please use `scheduler.step()` to step the scheduler. With an epoch, the scheduler "
    "jumps to it using the closed-form schedule where one exists."
)
_GET_LR_WARNING = "To get the last learning rate computed by the scheduler, please use `get_last_lr()`."


def _warning_get_lr(get_lr: Callable) -> Callable:
    """``get_lr`` warning as torch's does when called from outside ``step()`` (the values it
    computes are those of an epoch step() is moving to, not the lr in use)."""
    @functools.wraps(get_lr)
    def get_lr_checked(self, *args: Any, **kwargs: Any) -> List[Any]:
        if getattr(self, "_get_lr_called_within_step", True):
            return get_lr(self, *args, **kwargs)
        warnings.warn(_GET_LR_WARNING, UserWarning, stacklevel=2)
        with self._within_step():  # (once, however deep the super() calls go)
            return get_lr(self, *args, **kwargs)

    get_lr_checked._warns_outside_step = True
    return get_lr_checked


# --------------------------------------------------------------------------------------------
# Reading and writing param-group values
# --------------------------------------------------------------------------------------------

def copy_value(value: Any) -> Any:
    """A copy of a hyper-parameter that never aliases it (tensors are cloned, numbers returned)."""
    return value.clone() if isinstance(value, Tensor) else value


def group_values(optimizer: Any, key: str) -> List[Any]:
    """``[group[key] for group in optimizer.param_groups]``, with tensors cloned."""
    return [copy_value(group[key]) for group in optimizer.param_groups]


def _fill_tensor(target: Tensor, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"cannot write a {tuple(value.shape)} tensor into a scalar hyper-parameter")
        value = value.reshape(())
    target.fill_(value)


def write_group_value(group: Dict[str, Any], key: str, value: Any) -> None:
    """Set ``group[key]`` to ``value``; a tensor already stored there is updated in place."""
    current = group.get(key)
    if isinstance(current, Tensor):
        _fill_tensor(current, value)
    else:
        group[key] = value


def write_momentum(group: Dict[str, Any], value: Any, use_beta1: bool) -> None:
    """Set the group's momentum: ``betas[0]`` for Adam-like optimizers, else ``momentum``.

    A tensor ``betas[0]`` (or ``momentum``) is filled in place; a float ``betas`` tuple is
    rebuilt with the new first entry.
    """
    if not use_beta1:
        write_group_value(group, "momentum", value)
        return
    betas = group["betas"]
    if isinstance(betas[0], Tensor):
        _fill_tensor(betas[0], value)
    else:
        group["betas"] = (value, *betas[1:])


def per_group(name: str, value: Any, optimizer: Any) -> List[Any]:
    """Expand a scalar argument to one entry per param group, or check a list's length."""
    n_groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n_groups:
            raise ValueError(
                f"{name} must have one entry per param group: the optimizer has {n_groups} "
                f"param groups, {name} has {len(value)} entries"
            )
        return [copy_value(v) for v in value]
    return [copy_value(value) for _ in range(n_groups)]


# --------------------------------------------------------------------------------------------
# Argument checks (every failure is a ValueError naming the argument)
# --------------------------------------------------------------------------------------------

def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: Optional[int] = None) -> int:
    """``value`` must be an integer (not a bool; an integral float such as ``30.0``, as configs
    and ``epochs * 0.5`` give, counts, as torch takes it) and at least ``minimum``."""
    integral_float = (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
                      and math.isfinite(value) and float(value).is_integer())
    if not (isinstance(value, numbers.Integral) or integral_float) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None,
               low_inclusive: bool = True, high_inclusive: bool = True) -> float:
    """``value`` must be a finite real number inside the given interval."""
    if isinstance(value, Tensor) and value.numel() == 1:
        number = float(value)
    elif _is_real(value):
        number = float(value)
    else:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    too_low = low is not None and (number < low if low_inclusive else number <= low)
    too_high = high is not None and (number > high if high_inclusive else number >= high)
    if too_low or too_high:
        left = "[" if low_inclusive else "("
        right = "]" if high_inclusive else ")"
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_optimizer(optimizer: Any) -> None:
    """The only thing a scheduler needs: ``param_groups``, a non-empty list of dicts with ``lr``."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not groups or not all(isinstance(g, dict) for g in groups):
        raise ValueError(
            f"optimizer must have a non-empty list of dicts as param_groups, got {type(optimizer).__name__}"
        )
    for i, group in enumerate(groups):
        if "lr" not in group:
            raise ValueError(f"optimizer.param_groups[{i}] has no 'lr'")


def check_last_epoch(last_epoch: Any) -> int:
    return check_int("last_epoch", last_epoch, minimum=-1)


def require_group_keys(optimizer: Any, keys: Iterable[str]) -> None:
    """Resuming (``last_epoch >= 0``) needs the keys a fresh scheduler stored in each group."""
    for i, group in enumerate(optimizer.param_groups):
        for key in keys:
            if key not in group:
                raise MissingGroupKeyError(
                    f"last_epoch >= 0 resumes a schedule, which needs param_groups[{i}][{key!r}]; "
                    f"it is missing. Load the optimizer's state_dict (saved together with the "
                    f"scheduler's) before creating the scheduler, or use last_epoch=-1 for a new run."
                )


class MissingGroupKeyError(KeyError, ValueError):
    """A resumed scheduler (``last_epoch >= 0``) found no ``initial_lr`` (or similar) in a group.

    It is a ``KeyError`` as in ``torch.optim.lr_scheduler`` and a ``ValueError`` like every other
    bad-argument error of this package.
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def check_verbose(verbose: Any) -> None:
    """Older torch constructors took a deprecated ``verbose``; accept it, warn, ignore it."""
    if verbose != "deprecated":
        warnings.warn(
            "the verbose argument of LR schedulers is deprecated and ignored; use get_last_lr() "
            "to read the learning rates",
            UserWarning,
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# Saving callables (lr_lambda, scale_fn) the way torch does
# --------------------------------------------------------------------------------------------

def callable_state(fn: Optional[Callable]) -> Optional[Dict[str, Any]]:
    """Plain functions and lambdas are not saved (None); a callable object saves its ``__dict__``;
    one without a ``__dict__`` (a bound built-in such as ``factors.__getitem__``, a class with
    ``__slots__``) has no state to save: None too (torch's ``state_dict`` raises there)."""
    if fn is None or isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__"):
        return None
    return dict(fn.__dict__)


def restore_callable_state(fn: Optional[Callable], state: Optional[Dict[str, Any]]) -> None:
    if fn is None or not state:
        return
    if not hasattr(fn, "__dict__"):
        raise ValueError(f"the state dict holds attributes {sorted(state)} for a callable "
                         f"({type(fn).__name__}) that has no __dict__ to restore them into")
    fn.__dict__.update(state)


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------

class LRScheduler:
    """Base class: a schedule that sets each param group's ``lr`` once per :meth:`step`.

    Subclasses implement :meth:`get_lr`, the learning rates for epoch ``self.last_epoch`` (after
    ``step`` advanced it). Chainable schedules compute them from the current ``group["lr"]``
    (so several schedulers can act on one optimizer); a subclass may also implement
    :meth:`_closed_form_lr`, the same schedule computed from ``base_lrs`` alone, used when
    ``step(epoch)`` jumps to an epoch.

    Creating a scheduler with ``last_epoch=-1`` stores each group's ``lr`` as
    ``group["initial_lr"]`` (unless present) and performs the first step (epoch 0).
    With ``last_epoch=k >= 0`` it resumes: ``initial_lr`` must already be in the groups (load the
    optimizer's state first) and the first step moves to epoch ``k + 1``.

    Attributes:
        optimizer: the wrapped optimizer (anything with ``param_groups``).
        base_lrs: ``initial_lr`` of each group.
        last_epoch: index of the current epoch (or batch, for per-batch schedules).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # This package's schedules warn as torch's built-in ones do; a user's subclass is left
        # as written (torch does not wrap it either: its get_lr may take arguments, its own
        # step() may call it).
        super().__init_subclass__(**kwargs)
        get_lr = cls.__dict__.get("get_lr")
        if (cls.__module__.startswith("fusedopt.") and callable(get_lr)
                and not getattr(get_lr, "_warns_outside_step", False)):
            cls.get_lr = _warning_get_lr(get_lr)

    def __init__(self, optimizer: Any, last_epoch: int = -1, verbose: Any = "deprecated") -> None:
        check_optimizer(optimizer)
        last_epoch = check_last_epoch(last_epoch)
        check_verbose(verbose)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                if "initial_lr" not in group:
                    group["initial_lr"] = copy_value(group["lr"])
        else:
            require_group_keys(optimizer, ["initial_lr"])
        self.base_lrs: List[Any] = self._initial_base_lrs()
        self.last_epoch = last_epoch
        self._get_lr_called_within_step = False  # True while step() computes (torch's flag)
        self._initial_step()

    # -- hooks for subclasses ------------------------------------------------------------------

    def _initial_base_lrs(self) -> List[Any]:
        """The learning rates the schedule is relative to; by default each group's ``initial_lr``."""
        return group_values(self.optimizer, "initial_lr")

    def get_lr(self) -> List[Any]:
        """The learning rate of each group at epoch ``self.last_epoch`` (subclasses implement it)."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_lr()")

    def _closed_form_lr(self) -> Optional[List[Any]]:
        """The schedule at ``self.last_epoch`` computed from ``base_lrs`` only, or None if the
        schedule has no closed form (then :meth:`get_lr` is used).

        A subclass written for torch may define ``_get_closed_form_lr`` instead; it is used.
        """
        torch_style = getattr(self, "_get_closed_form_lr", None)
        return torch_style() if callable(torch_style) else None

    # -- stepping ------------------------------------------------------------------------------

    def _initial_step(self) -> None:
        """The step a new scheduler takes: from ``last_epoch`` to ``last_epoch + 1``.

        While it runs, ``self._is_initial`` is True: chainable schedules then leave the lr as it
        is (the optimizer already holds the lr of that epoch) except where torch's schedules
        apply a change at that epoch too.
        """
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def step(self, epoch: Optional[int] = None) -> None:
        """Advance to the next epoch and write the new learning rates into the optimizer.

        Call it after ``optimizer.step()``. ``epoch`` (deprecated, as in torch) jumps to that
        epoch with the closed-form schedule.
        """
        self._step_count += 1
        with self._within_step():
            if epoch is None:
                self.last_epoch += 1
                self._set_lrs(self.get_lr())
            else:
                warnings.warn(_EPOCH_ARGUMENT_WARNING, UserWarning, stacklevel=2)
                self._jump_to(epoch)

    @contextlib.contextmanager
    def _within_step(self) -> Iterator[None]:
        """Marks ``get_lr`` calls as step()'s own (no "use get_last_lr()" warning)."""
        outer = getattr(self, "_get_lr_called_within_step", False)
        self._get_lr_called_within_step = True
        try:
            yield
        finally:
            self._get_lr_called_within_step = outer

    def _jump_to(self, epoch: int) -> None:
        """Set ``last_epoch`` to ``epoch`` and apply the schedule's value there (also called by
        SequentialLR at a milestone, outside this scheduler's step())."""
        with self._within_step():
            self.last_epoch = epoch
            lrs = self._closed_form_lr()
            self._set_lrs(lrs if lrs is not None else self.get_lr())

    def _set_lrs(self, lrs: Sequence[Any]) -> None:
        groups = self.optimizer.param_groups
        if len(lrs) != len(groups):
            raise RuntimeError(
                f"{type(self).__name__} computed {len(lrs)} learning rates for {len(groups)} param groups"
            )
        for group, lr in zip(groups, lrs):
            write_group_value(group, "lr", lr)
        self._last_lr = group_values(self.optimizer, "lr")

    def _current_lrs(self) -> List[Any]:
        return group_values(self.optimizer, "lr")

    # -- inspection and checkpoints ------------------------------------------------------------

    def get_last_lr(self) -> List[Any]:
        """The learning rates set by the last step, one per group (tensors are copies)."""
        return self._last_lr

    _callable_attributes: Sequence[str] = ()

    def state_dict(self) -> Dict[str, Any]:
        """Everything but the optimizer. Functions and lambdas are not saved (callable objects
        save their ``__dict__``), as in torch; the keys match torch's so checkpoints move both ways."""
        state = {k: v for k, v in self.__dict__.items() if k != "optimizer" and k not in self._callable_attributes}
        for name in self._callable_attributes:
            value = self.__dict__.get(name)
            if isinstance(value, list):
                state[name] = [callable_state(fn) for fn in value]
            else:
                state[name] = callable_state(value)
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (ours or torch's scheduler of the same kind)."""
        plain = {k: v for k, v in state_dict.items() if k not in self._callable_attributes}
        self.__dict__.update(plain)
        for name in self._callable_attributes:
            if name not in state_dict:
                continue
            saved, current = state_dict[name], self.__dict__.get(name)
            if isinstance(current, list):
                for fn, fn_state in zip(current, saved or []):
                    restore_callable_state(fn, fn_state)
            else:
                restore_callable_state(current, saved)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={getattr(self, 'last_epoch', None)})"
