r"""Adaptive clipping: clip to a percentile of the recent gradient norms (AutoClip).

At call :math:`t`, with :math:`n_t = \|g_t\|_p` the global norm of the gradients and
:math:`H_t` the last ``history`` finite norms including :math:`n_t`:

.. math::

    \tau_t = \operatorname{quantile}_{q/100}(H_t), \qquad
    g_t \leftarrow g_t \cdot \min\Big(1, \frac{\tau_t}{n_t + 10^{-6}}\Big)

(Seetharaman et al., "AutoClip: Adaptive Gradient Clipping for Source Separation Networks",
2020). The history is a ring buffer tensor on the gradients' device, written with ``scatter_``
at position ``count mod history``; unfilled slots and non-finite norms hold NaN, which the
percentile (``torch.nanquantile``'s numbers, see :func:`nanquantile`) ignores. Everything stays on
the device: no host sync.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._clip import _grads, clip_coefficient, scale_
from .. import backends
from ._norm import Summary, TensorOrTensors, check_backend, total_norm

Tensor = torch.Tensor


def _probe_rank_dtype() -> Optional[torch.dtype]:
    """float64 if the installed torch's quantile ranks float32 data in float64, else None (in the
    data's dtype). Probe: the 0.9-quantile of [0, 0, 0, 1] is the rank's fraction, 0.9f * 3 - 2,
    which is 0.6999998f in float32 and 0.69999993f from float64."""
    # dtype and device pinned: the probe runs at import, whatever default dtype (float64 would
    # make every rank float64 and the answer wrong) or default device (meta cannot be read) is set
    cpu32 = dict(dtype=torch.float32, device="cpu")
    got = torch.nanquantile(torch.tensor([0.0, 0.0, 0.0, 1.0], **cpu32), 0.9)
    in_float64 = float(torch.tensor(0.9, **cpu32).double() * 3 - 2)
    return torch.float64 if float(got) == float(torch.tensor(in_float64, **cpu32)) else None


_RANK_DTYPE: Optional[torch.dtype] = _probe_rank_dtype()


def nanquantile(x: Tensor, q: float) -> Tensor:
    """``torch.nanquantile(x, q)`` (linear interpolation) of a 1-d ``x``, bit for bit, written with
    ops that ``torch.compile`` traces on every supported torch: torch 2.5's fake-tensor
    ``nanquantile`` checks its input with a data-dependent ``aten.equal`` and cannot be traced.

    Same steps as torch's: sort (NaNs last); ``q`` rounded to ``x``'s dtype, then the rank
    ``q * (finite count - 1)``, clamped at 0; the values at its floor and ceiling; ``lerp`` by
    the rank's fraction rounded to ``x``'s dtype. All-NaN gives NaN (the rank is 0 and the first
    sorted value is NaN). torch 2.5 takes the rank in ``x``'s dtype, later releases in float64
    (a float32 rank differs in the last bit): :data:`_RANK_DTYPE` is what the installed torch does.
    """
    ordered = torch.sort(x).values
    count = ordered.isnan().logical_not().sum()
    q_in_x = torch.full((), q, dtype=x.dtype, device=x.device)
    rank = (q_in_x.to(_RANK_DTYPE or x.dtype) * (count - 1)).clamp_min(0)
    below = rank.long()
    above = rank.ceil().long()
    low, high = ordered.gather(0, below.view(1)), ordered.gather(0, above.view(1))
    return low.lerp(high, (rank - below).to(x.dtype).view(1)).view(())


class PercentileClipper:
    """Clip gradients to the ``percentile``-th percentile of the last ``history`` global norms.

    ``clipper(model.parameters())`` computes the norm (one read of the gradients), records it,
    scales the gradients in place and returns the norm before clipping (float32, or float64 for
    float64 gradients). ``threshold`` and ``history_norms`` are device tensors; the state
    (``state_dict``) holds them and the call count, for checkpoints.
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000, norm_type: float = 2.0,
                 backend: str = "auto"):
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        if int(history) < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        self.percentile = float(percentile)
        self.history = int(history)
        self.norm_type = float(norm_type)
        self.backend = backends.validate_choice(backend)
        self.history_norms: Optional[Tensor] = None   # [history] ring buffer, NaN = empty
        self.count: Optional[Tensor] = None           # int64 0-dim: norms recorded so far
        self.threshold: Optional[Tensor] = None       # the last clipping threshold

    def _ensure_buffers(self, like: Tensor) -> None:
        if self.history_norms is None or self.history_norms.device != like.device:
            self.history_norms = torch.full((self.history,), float("nan"), dtype=like.dtype,
                                            device=like.device)
            self.count = torch.zeros((), dtype=torch.int64, device=like.device)
        elif self.history_norms.dtype != like.dtype:
            self.history_norms = self.history_norms.to(like.dtype)

    def record(self, norm: Tensor) -> Tensor:
        """Record ``norm`` (non-finite ones as NaN, i.e. not at all) and return the threshold."""
        self._ensure_buffers(norm)
        slot = torch.remainder(self.count, self.history).view(1)
        value = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("nan")))
        self.history_norms.scatter_(0, slot, value.view(1))
        self.count += 1
        self.threshold = nanquantile(self.history_norms, self.percentile / 100.0)
        return self.threshold

    def __call__(self, parameters: TensorOrTensors) -> Tensor:
        with torch.no_grad():
            grads = _grads(parameters)
            if not grads:
                return torch.tensor(0.0)
            summary = Summary(grads)
            check_backend(self.backend, summary.devices)
            norm = total_norm(grads, self.norm_type, self.backend, summary)
            threshold = self.record(norm)
            scale_(grads, clip_coefficient(threshold, norm), self.backend, summary)
            return norm

    def state_dict(self) -> Dict[str, Any]:
        return {"percentile": self.percentile, "history": self.history,
                "norm_type": self.norm_type, "history_norms": self.history_norms,
                "count": self.count}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.percentile = float(state["percentile"])
        self.history = int(state["history"])
        self.norm_type = float(state["norm_type"])
        # Copies, as torch.optim's load_state_dict makes: the buffers are updated in place
        # (scatter_, +=), which must not write into the state dict or another clipper.
        history_norms, count = state["history_norms"], state["count"]
        if history_norms is not None and history_norms.shape != (self.history,):
            raise ValueError(f"PercentileClipper.load_state_dict: history_norms has shape "
                             f"{tuple(history_norms.shape)}, expected ({self.history},)")
        self.history_norms = None if history_norms is None else history_norms.detach().clone()
        self.count = None if count is None else torch.as_tensor(count).detach().clone()
        self.threshold = None


__all__ = ["PercentileClipper"]
