r"""Clipping and non-finite skipping folded into an optimizer step, on the device.

Every backend divides the gradients by a 0-dim ``grad_scale`` tensor inside its update kernel
(GradScaler's scale :math:`s`). Clipping by global norm becomes one more factor in it: with
:math:`g` the gradients as stored,

.. math::

    \hat n = \|g \cdot (1/s)\|_2 \ \ (\text{the norm of the unscaled gradients}), \qquad
    c = \min\Big(1, \frac{\text{max\_grad\_norm}}{\hat n + 10^{-6}}\Big), \qquad
    s_{\text{eff}} = s / c

and the kernel computes :math:`g / s_{\text{eff}} = c\,g/s`: the gradients are read once for the
norm and once by the update, never written. The norm kernel multiplies each element by
:math:`1/s` before squaring it (its ``prescale``), as ``GradScaler.unscale_`` would rewrite it:
taking the norm of the scaled gradients and dividing it by :math:`s` afterwards overflows
float32 once :math:`s |g|` passes ~1.8e19 (GradScaler keeps doubling its scale while nothing
overflows, e.g. under bf16 autocast), and underflows for tiny scales. With ``skip_nonfinite`` the step's ``found_inf``
becomes ``found_inf + (not isfinite(n))``, so a NaN/inf gradient anywhere makes every kernel of
the step a no-op. All of it is a handful of 0-dim tensor ops: nothing is read on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from ._clip import clip_coefficient
from ._norm import to_device

Tensor = torch.Tensor


@dataclass
class StepScaling:
    """What the kernels of one step get instead of GradScaler's ``grad_scale`` / ``found_inf``."""

    norm: Optional[Tensor] = None                # norm of the unscaled gradients, pre-clip
    grad_scales: Dict[Optional[float], Optional[Tensor]] = field(default_factory=dict)
    found_inf: Optional[Tensor] = None

    def grad_scale_for(self, max_grad_norm: Optional[float]) -> Optional[Tensor]:
        return self.grad_scales[max_grad_norm]


def unscaling(grad_scale: Optional[Tensor]) -> Optional[Tensor]:
    """The ``prescale`` of the step's norm (:func:`fusedopt.clip._norm.total_norm`): ``1 / s``,
    correctly rounded in float32 as GradScaler's ``unscale_`` computes it, or None without a
    scale. A device op: nothing is read on the host."""
    if grad_scale is None:
        return None
    return torch.reciprocal(grad_scale.to(torch.float64)).to(torch.float32) \
        if grad_scale.dtype != torch.float32 else torch.reciprocal(grad_scale)


def fold_norm(norm: Tensor, max_grad_norms: Sequence[Optional[float]],
              grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
              skip_nonfinite: bool) -> StepScaling:
    """The effective grad scales of one step from the global 2-norm of the *unscaled*
    gradients (computed by the caller, once, with ``prescale=unscaling(grad_scale)``):
    ``max_grad_norms`` are the thresholds in use (one per param group; ``None``: no clipping for
    that group, which then gets ``grad_scale`` unchanged)."""
    out = StepScaling(norm=norm, found_inf=found_inf)
    for max_norm in set(max_grad_norms):
        if max_norm is None:
            out.grad_scales[None] = grad_scale
            continue
        # s / c in float64: near GradScaler's float32 ceiling (s ~ 2^127) it passes float32's
        # range, and the kernels divide by such a scale in two exact steps (rules.h,
        # grad_divisor) instead of by inf; within range the float64 quotient rounds to the
        # float32 one (one rounding of s / c either way).
        coef = clip_coefficient(float(max_norm), norm).to(torch.float64)
        if grad_scale is None:
            out.grad_scales[max_norm] = torch.reciprocal(coef)
        else:
            out.grad_scales[max_norm] = to_device(grad_scale, norm.device, torch.float64) / coef
    if skip_nonfinite:
        bad = torch.logical_not(torch.isfinite(norm)).to(torch.float32)
        out.found_inf = bad if found_inf is None else to_device(found_inf, bad.device) + bad
    return out


__all__ = ["StepScaling", "fold_norm"]
