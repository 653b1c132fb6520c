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

:class:`SkipAwareScheduler` works out ``optimizer_stepped`` by counting the optimizer's real
steps, one by one, with a step pre-hook and post-hook (``register_step_pre_hook`` /
``register_step_post_hook``; an optimizer without them gets its ``step`` method wrapped):

* GradScaler's usual skip does not call ``optimizer.step`` at all, so it is never counted;
* optimizers that skip *inside* their ``step`` (fused ones, with ``_step_supports_amp_scaling``)
  are called with the ``found_inf`` tensor GradScaler hands them as ``optimizer.found_inf``: a
  step with ``found_inf != 0`` is not counted;
* fusedopt's ``skip_nonfinite=True`` skips on the device and counts in
  ``optimizer.skipped_steps``: a step that raised that counter is not counted.

The two device-side verdicts are summed on the device; the count is read (one host sync, none
when neither applies) only in :meth:`SkipAwareScheduler.step`. So a scheduler stepped once per
epoch advances when the optimizer took at least one real step in the epoch, however many
updates were skipped in it.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import Tensor


def _scaler_found_inf(scaler: Any, optimizer: Any) -> list:
    """The infs GradScaler found in ``optimizer``'s gradients this iteration (its per-optimizer
    record, filled by ``unscale_``; private to torch, so anything unexpected gives nothing),
    as a list of 0-dim bool device tensors."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict) or id(optimizer) not in states:
        return []
    per_device = states[id(optimizer)].get("found_inf_per_device") if isinstance(
        states[id(optimizer)], dict) else None
    if not isinstance(per_device, dict):
        return []
    return [t.detach().reshape(-1).ne(0).any() for t in per_device.values() if isinstance(t, Tensor)]


class SkipAwareScheduler:
    """Wrap a scheduler so that :meth:`step` advances it only if the optimizer stepped since the
    previous call. Everything else (``get_last_lr``, ``state_dict``, ``last_epoch``...) is passed
    through to the wrapped scheduler.

    Example::

        scheduler = SkipAwareScheduler(CosineAnnealingLR(optimizer, T_max=10_000))
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
        scaler: the ``torch.amp.GradScaler``, optional: not needed with optimizers GradScaler
            hands ``found_inf`` to, or that it does not call on an overflow. Given, a step
            without ``found_inf`` is also judged by the scaler's own record of the infs it found
            for this optimizer (optimizers of GradScaler's deprecated ``grad_scaler=`` protocol
            get that scaler passed to ``step`` and need no argument either). Earlier releases
            compared the loss scale before and after ``scaler.update()`` instead, which dropped
            a whole epoch's step when one batch of the epoch overflowed.
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
        self._real_steps = 0                          # steps known real on the host
        self._real_steps_on_device: Optional[Tensor] = None  # plus those judged on the device
        self._real_at_last_call = 0
        self._skip_counter_before: Any = None
        self._hook_handles: list = []       # (picklable: no closures kept on the wrapper)
        self._unwrap_step: Any = None
        self._watch(optimizer)

    # -- watching the optimizer ----------------------------------------------------------------

    def _before_step(self, *_: Any) -> None:
        counter = getattr(self.optimizer, "skipped_steps", None)
        self._skip_counter_before = counter.clone() if isinstance(counter, Tensor) else counter

    def _after_step(self, _optimizer: Any = None, _args: Any = (), kwargs: Any = None) -> None:
        scaler = (kwargs or {}).get("grad_scaler", self.scaler)
        skipped = self._skipped_inside_step(scaler)
        if skipped is None:
            self._real_steps += 1
            return
        real = torch.logical_not(skipped).to(torch.int64)
        tally = self._real_steps_on_device
        self._real_steps_on_device = real if tally is None else tally + real.to(tally.device)

    def _skipped_inside_step(self, scaler: Any) -> Optional[Tensor]:
        """A bool tensor saying whether the step that just ran skipped its update on the device
        (GradScaler's ``found_inf``, fusedopt's ``skip_nonfinite``), or None if it could not."""
        verdicts = []
        found_inf = getattr(self.optimizer, "found_inf", None)
        if isinstance(found_inf, Tensor):
            verdicts.append(found_inf.detach().reshape(-1).ne(0).any())
        else:  # the scaler's own record (optimizers of the deprecated grad_scaler= protocol)
            verdicts.extend(_scaler_found_inf(scaler, self.optimizer))
        counter = getattr(self.optimizer, "skipped_steps", None)
        if isinstance(counter, Tensor):
            before = self._skip_counter_before
            if before is None:
                before = 0
            elif isinstance(before, Tensor):
                before = before.to(counter.device)
            verdicts.append((counter.detach() - before).reshape(-1).ne(0).any())
        if not verdicts:
            return None
        skipped = verdicts[0]
        for verdict in verdicts[1:]:
            skipped = skipped | verdict.to(skipped.device)
        return skipped

    def _watch(self, optimizer: Any) -> None:
        register_pre = getattr(optimizer, "register_step_pre_hook", None)
        register_post = getattr(optimizer, "register_step_post_hook", None)
        if callable(register_pre) and callable(register_post):
            self._hook_handles = [register_pre(self._before_step), register_post(self._after_step)]
            return
        original_step = optimizer.step

        @functools.wraps(original_step)
        def counted_step(*args: Any, **kwargs: Any) -> Any:
            self._before_step()
            result = original_step(*args, **kwargs)
            self._after_step(optimizer, args, kwargs)
            return result

        optimizer.step = counted_step

        def unwrap() -> None:
            if optimizer.__dict__.get("step") is counted_step:
                del optimizer.step

        self._unwrap_step = unwrap

    # -- the guarded step ----------------------------------------------------------------------

    def _count_real_steps(self) -> int:
        on_device = self._real_steps_on_device
        return self._real_steps + (int(on_device) if on_device is not None else 0)

    def optimizer_stepped(self) -> bool:
        """Whether the optimizer took at least one real step (an update it did not skip) since
        the last :meth:`step` of this wrapper. Call it after ``scaler.update()``; it does not
        reset anything."""
        return self._count_real_steps() > self._real_at_last_call

    def step(self, *args: Any, **kwargs: Any) -> bool:
        """Step the wrapped scheduler if the optimizer stepped; return whether it did.

        Arguments are passed on (``ReduceLROnPlateau`` needs the metric).
        """
        real = self._count_real_steps()
        stepped = real > self._real_at_last_call
        self._real_at_last_call = real
        if stepped:
            self.scheduler.step(*args, **kwargs)
        else:
            self.skipped_steps += 1
        return stepped

    def remove(self) -> None:
        """Stop watching the optimizer (remove the hooks)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        if self._unwrap_step is not None:
            self._unwrap_step()
            self._unwrap_step = None

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not found on the wrapper itself
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)
