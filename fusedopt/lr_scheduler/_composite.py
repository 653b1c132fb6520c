"""Schedulers made of schedulers: SequentialLR (one after another) and ChainedScheduler (all at once)."""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Dict, List, Sequence

import torch

from ._base import LRScheduler, check_int, check_last_epoch, check_verbose, group_values, write_group_value
from ._plateau import ReduceLROnPlateau


def _check_members(owner: str, schedulers: Sequence[Any], optimizer: Any) -> None:
    if len(schedulers) < 1:
        raise ValueError(f"{owner}: schedulers must contain at least one scheduler")
    for index, scheduler in enumerate(schedulers):
        if not hasattr(scheduler, "optimizer") or not hasattr(scheduler, "step"):
            raise ValueError(f"{owner}: schedulers[{index}] is not a scheduler (no optimizer / step)")
        if isinstance(scheduler, (ReduceLROnPlateau, torch.optim.lr_scheduler.ReduceLROnPlateau)):
            raise ValueError(
                f"{owner}: schedulers[{index}] is a ReduceLROnPlateau, which needs a metric in step() "
                f"and cannot be combined"
            )
        if scheduler.optimizer is not optimizer:
            raise ValueError(f"{owner}: schedulers[{index}] drives a different optimizer than the others")


class _CompositeState:
    """state_dict / load_state_dict that save the member schedulers' states under ``_schedulers``."""

    _schedulers: List[Any]

    def state_dict(self) -> Dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_schedulers")}
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k != "_schedulers"})
        for scheduler, member_state in zip(self._schedulers, state_dict["_schedulers"]):
            scheduler.load_state_dict(member_state)


class ChainedScheduler(_CompositeState, LRScheduler):
    """Step several chainable schedulers together: each ``step()`` calls every member's ``step()``
    in order, so their effects compose (e.g. ``ConstantLR`` warmup on top of ``ExponentialLR``).

    Args:
        schedulers: the schedulers, all on the same optimizer.
        optimizer: the optimizer (default: the first scheduler's).
    """

    def __init__(self, schedulers: Sequence[Any], optimizer: Any = None) -> None:  # noqa: D107
        schedulers = list(schedulers)
        if optimizer is None and schedulers:
            # a non-scheduler here is reported by _check_members (ValueError), not as AttributeError
            optimizer = getattr(schedulers[0], "optimizer", None)
        _check_members("ChainedScheduler", schedulers, optimizer)
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._last_lr = group_values(optimizer, "lr")

    def step(self) -> None:  # type: ignore[override]
        for scheduler in self._schedulers:
            scheduler.step()
        self._last_lr = group_values(self.optimizer, "lr")


class SequentialLR(_CompositeState, LRScheduler):
    """Run schedulers one after another, switching at the milestones.

    Scheduler ``i`` drives epochs ``[milestones[i-1], milestones[i])``. On switching, the new
    scheduler restarts from its own epoch 0 (its closed form at 0, which is ``base_lr`` times its
    starting factor), as in torch.

    Args:
        optimizer: the optimizer all schedulers drive.
        schedulers: the schedulers (of this package, not composites), in order.
        milestones: ``len(schedulers) - 1`` non-decreasing epochs where the next one takes over.
        last_epoch: index of the last epoch. Default: -1.
    """

    def __init__(self, optimizer: Any, schedulers: Sequence[LRScheduler], milestones: Sequence[int],
                 last_epoch: int = -1, verbose: Any = "deprecated") -> None:  # noqa: D107
        schedulers = list(schedulers)
        _check_members("SequentialLR", schedulers, optimizer)
        for index, scheduler in enumerate(schedulers):
            if not isinstance(scheduler, LRScheduler) or isinstance(scheduler, _CompositeState):
                raise ValueError(
                    f"SequentialLR: schedulers[{index}] must be a (non-composite) fusedopt.lr_scheduler scheduler, "
                    f"got {type(scheduler).__name__}"
                )
        milestones = list(milestones)
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                f"SequentialLR: milestones must have len(schedulers) - 1 = {len(schedulers) - 1} entries, "
                f"got {len(milestones)}"
            )
        milestones = [check_int("milestones", m, minimum=0) for m in milestones]
        if milestones != sorted(milestones):
            raise ValueError(f"SequentialLR: milestones must be non-decreasing, got {milestones}")
        last_epoch = check_last_epoch(last_epoch)
        check_verbose(verbose)
        self._schedulers = schedulers
        self._milestones = milestones
        self.optimizer = optimizer
        self.last_epoch = last_epoch + 1

        # Each member's constructor already took its first step; start over from the initial lrs
        # and let only the scheduler that owns epoch 0 take it.
        for group in optimizer.param_groups:
            write_group_value(group, "lr", group["initial_lr"])
        for scheduler in schedulers:
            scheduler.last_epoch -= 1
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def step(self) -> None:  # type: ignore[override]
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._jump_to(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()
