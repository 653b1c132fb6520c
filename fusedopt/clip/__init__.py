"""Gradient clipping without host syncs: drop-ins for ``torch.nn.utils``' clipping functions,
an adaptive (percentile) clipper, and the helpers the optimizers use to clip inside their step.

* :func:`clip_grad_norm_`, :func:`get_total_norm`, :func:`clip_grads_with_norm_`,
  :func:`clip_grad_value_`: same signatures and results as torch's; the norm reads every gradient
  once (one native multi-tensor pass per device) and nothing waits on the device unless
  ``error_if_nonfinite=True``.
* :class:`PercentileClipper`: clip to a percentile of the recent norms, kept on the device.
* Inside the step: ``fusedopt.optim.AdamW(..., max_grad_norm=1.0, skip_nonfinite=True)``
  (:mod:`._step`) clips with no extra pass over the gradients.

See ``docs/clip.md``.
"""
from ._adaptive import PercentileClipper
from ._clip import clip_coefficient, clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_
from ._norm import get_total_norm

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm",
           "PercentileClipper", "clip_coefficient"]
