"""Step the scheduler only when the optimizer really stepped (mixed precision with GradScaler).

With ``torch.amp.GradScaler``, ``scaler.step(optimizer)`` skips the update when the gradients
contain inf/NaN (typically for the first few iterations, while the loss scale calibrates). A
scheduler stepped unconditionally then runs ahead of the optimizer: the schedule is shifted and, for
``OneCycleLR``, can even run past ``total_steps``. The right pattern is::

    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if optimizer_stepped:          # <- only then
        scheduler.step()

:class:`SkipAwareScheduler` works out ``optimizer_stepped``:

* it registers a step post-hook on the optimizer (``register_step_post_hook``; an optimizer
  without it gets its ``step`` method wrapped) and counts the optimizer's steps, which catches
  GradScaler's usual skip (it does not call ``optimizer.step``);
* given the ``scaler``, it also compares the loss scale before and after ``scaler.update()``:
  the scale shrinks exactly when inf/NaN were found. This catches optimizers that take the
  GradScaler's ``found_inf`` and skip inside their own ``step`` (fused optimizers with
  ``_step_supports_amp_scaling``), for which ``optimizer.step`` is called even on a skipped
  update.
"""
from __future__ import annotations

import functools
from typing import Any, Optional


class SkipAwareScheduler:
    """Wrap a scheduler so that :meth:`step` advances it only if the optimizer stepped since the
    previous call. Everything else (``get_last_lr``, ``state_dict``, ``last_epoch``...) is passed
    through to the wrapped scheduler.

    Example::

        scheduler = SkipAwareScheduler(CosineAnnealingLR(optimizer, T_max=10_000), scaler=scaler)
        for batch in loader:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(batch)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            scheduler.step()          # a no-op for the iterations GradScaler skipped

    Args:
        scheduler: any scheduler with ``optimizer`` and ``step`` (ours or torch's).
        scaler: optional ``torch.amp.GradScaler`` whose loss scale is checked as described in the
            module docstring. Without it, only calls to ``optimizer.step`` are counted.
        optimizer: the optimizer to watch (default: ``scheduler.optimizer``).

    Attributes:
        skipped_steps: how many calls of :meth:`step` did not advance the scheduler.
    """

    def __init__(self, scheduler: Any, scaler: Any = None, optimizer: Any = None) -> None:
        optimizer = optimizer if optimizer is not None else getattr(scheduler, "optimizer", None)
        if optimizer is None:
            raise ValueError("scheduler has no optimizer; pass optimizer=")
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.scaler = scaler
        self.skipped_steps = 0
        self._optimizer_steps = 0
        self._steps_at_last_call = 0
        self._scale_at_last_call = self._loss_scale()
        self._remove_hook = self._watch(optimizer)

    # -- watching the optimizer ----------------------------------------------------------------

    def _count_step(self, *_: Any) -> None:
        self._optimizer_steps += 1

    def _watch(self, optimizer: Any):
        register = getattr(optimizer, "register_step_post_hook", None)
        if callable(register):
            handle = register(self._count_step)
            return handle.remove
        original_step = optimizer.step

        @functools.wraps(original_step)
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            result = original_step(*args, **kwargs)
            self._count_step()
            return result

        optimizer.step = counted_step

        def unwrap() -> None:
            if optimizer.__dict__.get("step") is counted_step:
                del optimizer.step

        return unwrap

    def _loss_scale(self) -> Optional[float]:
        if self.scaler is None or not getattr(self.scaler, "is_enabled", lambda: True)():
            return None
        return float(self.scaler.get_scale())

    # -- the guarded step ----------------------------------------------------------------------

    def optimizer_stepped(self) -> bool:
        """Whether the optimizer took a real step since the last :meth:`step` of this wrapper.

        Call it after ``scaler.update()``; it does not reset anything.
        """
        called = self._optimizer_steps > self._steps_at_last_call
        scale = self._loss_scale()
        found_inf = scale is not None and self._scale_at_last_call is not None and scale < self._scale_at_last_call
        return called and not found_inf

    def step(self, *args: Any, **kwargs: Any) -> bool:
        """Step the wrapped scheduler if the optimizer stepped; return whether it did.

        Arguments are passed on (``ReduceLROnPlateau`` needs the metric).
        """
        stepped = self.optimizer_stepped()
        self._steps_at_last_call = self._optimizer_steps
        self._scale_at_last_call = self._loss_scale()
        if stepped:
            self.scheduler.step(*args, **kwargs)
        else:
            self.skipped_steps += 1
        return stepped

    def remove(self) -> None:
        """Stop watching the optimizer (remove the hook)."""
        self._remove_hook()

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the wrapper itself
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

