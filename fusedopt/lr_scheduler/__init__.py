"""Learning-rate schedulers in pure Python, API- and number-compatible with ``torch.optim.lr_scheduler``.

They work with any optimizer that has ``param_groups`` (``torch.optim``, ``fusedopt.optim``, ...).

* The torch schedules (``StepLR`` ... ``ChainedScheduler``): same arguments and defaults, same
  ``step()`` / ``get_last_lr()`` / ``last_epoch`` / ``state_dict()`` / ``load_state_dict()``, and
  the same values as torch (same floating-point recursion), including after a resume.
* LLM schedules: :class:`WarmupCosineLR`, :class:`WarmupStableDecayLR` (``WSD``),
  :class:`InverseSqrtLR`.
* A tensor ``lr`` / ``momentum`` / ``betas[0]`` is updated in place, so CUDA graphs and compiled
  steps see the new value.
* :class:`SkipAwareScheduler` steps a scheduler only when the optimizer stepped (GradScaler).
* :func:`plot_schedule` / ``python -m fusedopt.lr_scheduler plot ...`` draw schedules.

See ``docs/lr_scheduler.md``.
"""
from ._base import LRScheduler, MissingGroupKeyError
from ._composite import ChainedScheduler, SequentialLR
from ._cyclic import CosineAnnealingWarmRestarts, CyclicLR, OneCycleLR
from ._decay import (
    ConstantLR,
    CosineAnnealingLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiplicativeLR,
    MultiStepLR,
    PolynomialLR,
    StepLR,
)
from ._llm import WSD, InverseSqrtLR, WarmupCosineLR, WarmupStableDecayLR
from ._plateau import ReduceLROnPlateau
from ._plot import build_scheduler, draw_curves, plot_schedule, schedule_values
from ._skip import SkipAwareScheduler

#: Every scheduler class by name (used by the spec strings of :func:`plot_schedule`).
SCHEDULERS = {
    cls.__name__: cls
    for cls in (
        LambdaLR, MultiplicativeLR, StepLR, MultiStepLR, ConstantLR, LinearLR, ExponentialLR,
        PolynomialLR, CosineAnnealingLR, CosineAnnealingWarmRestarts, CyclicLR, OneCycleLR,
        ReduceLROnPlateau, SequentialLR, ChainedScheduler, WarmupCosineLR, WarmupStableDecayLR,
        InverseSqrtLR,
    )
}
SCHEDULERS["WSD"] = WarmupStableDecayLR

__all__ = [
    "LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR",
    "ExponentialLR", "PolynomialLR", "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR",
    "OneCycleLR", "ReduceLROnPlateau", "SequentialLR", "ChainedScheduler", "WarmupCosineLR",
    "WarmupStableDecayLR", "WSD", "InverseSqrtLR", "SkipAwareScheduler", "MissingGroupKeyError",
    "plot_schedule", "schedule_values", "build_scheduler", "draw_curves", "SCHEDULERS",
]
