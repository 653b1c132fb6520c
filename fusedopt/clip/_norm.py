r"""The global norm of a list of tensors, in one read of every element, with no host sync.

.. math::

    \|x\|_p = \Big(\sum_i |x_i|^p\Big)^{1/p}, \qquad
    \|x\|_\infty = \max_i |x_i|, \qquad \|x\|_{-\infty} = \min_i |x_i|

over all elements of all tensors as one vector (for ``p = 0`` torch counts the tensors that have
a nonzero element, and so does fusedopt). Elements are accumulated in float32 (float64 when
a tensor is float64), whatever their storage dtype: float16 gradients with values whose squares
overflow float16 still give the right norm.

Implementations, per device (``backend="auto"`` picks the first that applies):

``cpu``        ``torch.ops.fusedopt.total_norm``: one parallel region over all tensors.
``cuda``       the same op's CUDA kernel, when the extension was built with it.
``triton``     :mod:`fusedopt.backends.triton.norm`: one launch per dtype plus one to finish.
``reference``  ``torch._foreach_norm`` per dtype, then the norm of the per-tensor norms (torch's
               own method, accumulating in float32).

DTensors (FSDP2, tensor parallel): the norm of their local shards, per layout, reduced over the
mesh dimensions that shard them (:func:`sharded_norm`); every rank gets the global norm.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .. import _dtensor, _norm_ops, _ops, backends
from .._compiling import is_compiling as _is_compiling

Tensor = torch.Tensor
TensorOrTensors = Union[Tensor, Iterable[Tensor]]

_COMPLEX_TO_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64,
                    torch.complex32: torch.float16}
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_NORMS = (2.0, 1.0, float("inf"))


def as_list(tensors: TensorOrTensors) -> List[Tensor]:
    return [tensors] if isinstance(tensors, Tensor) else list(tensors)


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return _COMPLEX_TO_REAL.get(dtype, dtype)


# Every Tensor attribute read from Python costs ~0.1 us (torch's getters), so the metadata of a
# list is read in ONE pass (one C-level map over the list), not once per question asked of it.
_METADATA = operator.attrgetter("device", "dtype", "layout")


class Summary:
    """What the clipping code needs to know about a list of tensors, read in one pass."""

    __slots__ = ("devices", "dtypes", "any_complex", "any_sparse", "any_dtensor")

    def __init__(self, tensors: Sequence[Tensor]):
        # One C++ pass when every element is a plain tensor (~10 ns a tensor against ~0.6 us);
        # not under torch.compile, where dynamo traces the Python pass instead.
        if not isinstance(tensors, (list, tuple)):
            tensors = list(tensors)  # read twice when the C++ pass declines
        summarize = getattr(_ops._C, "_summarize", None)
        native = None if summarize is None or _is_compiling() else summarize(tensors)
        if native is not None:  # (it declines tensor subclasses: no DTensor here)
            self.devices, dtypes, self.any_sparse = native
            self.dtypes = set(dtypes)
            self.any_complex = any(d.is_complex for d in self.dtypes)
            self.any_dtensor = False
            return
        self.any_dtensor = _dtensor.any_dtensor(tensors)
        if _is_compiling():  # dynamo cannot call an attrgetter object
            metadata = {(t.device, t.dtype, t.layout) for t in tensors}
        else:
            metadata = set(map(_METADATA, tensors))
        #: distinct devices, in order of first appearance when there are several
        self.devices: List[torch.device] = list({m[0]: None for m in metadata})
        if len(self.devices) > 1:
            self.devices = list({t.device: None for t in tensors})
        self.dtypes = {m[1] for m in metadata}
        self.any_complex = any(d.is_complex for d in self.dtypes)
        self.any_sparse = any(m[2] != torch.strided for m in metadata)

    @classmethod
    def from_parts(cls, devices: Sequence[torch.device], dtypes: Iterable[torch.dtype],
                   any_sparse: bool = False) -> "Summary":
        """A summary from what the caller knows already (the optimizers' buckets)."""
        summary = cls.__new__(cls)
        summary.devices = list(dict.fromkeys(devices))
        summary.dtypes = set(dtypes)
        summary.any_complex = any(d.is_complex for d in summary.dtypes)
        summary.any_sparse = any_sparse
        summary.any_dtensor = False
        return summary

    @classmethod
    def of(cls, tensors: Sequence[Tensor], summary: Optional["Summary"]) -> "Summary":
        return summary if summary is not None else cls(tensors)

    def result_dtype(self) -> torch.dtype:
        return functools.reduce(torch.promote_types, sorted(
            (real_dtype(d) for d in self.dtypes), key=str))

    def accumulate_dtype(self) -> torch.dtype:
        return torch.float64 if any(real_dtype(d) == torch.float64 for d in self.dtypes) \
            else torch.float32


def result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The dtype torch's ``get_total_norm`` returns: the promotion of the (real) grad dtypes."""
    return Summary(tensors).result_dtype()


def accumulate_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 if any tensor is (complex) float64, else float32."""
    return Summary(tensors).accumulate_dtype()


def to_device(t: Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t`` on ``device``: asynchronous towards a GPU; blocking towards the CPU, where the value
    is read right away (an asynchronous device-to-host copy could still be in flight)."""
    device = torch.device(device)
    return t.to(device=device, dtype=dtype, non_blocking=device.type != "cpu")


def by_device(tensors: Sequence[Tensor],
              summary: Optional[Summary] = None) -> Dict[torch.device, List[Tensor]]:
    summary = Summary.of(tensors, summary)
    if len(summary.devices) == 1:
        return {summary.devices[0]: list(tensors)}
    groups: Dict[torch.device, List[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups


def check_backend(backend: str, devices: Iterable[torch.device] = ()) -> None:
    """Refuse an explicit ``backend=`` of the clipping functions that cannot run here, as the
    optimizers do: an unknown name (``ValueError``), a backend that is unavailable or cannot run
    tensors on one of ``devices`` (:class:`~fusedopt.backends.BackendUnavailableError`, saying
    why). ``FUSEDOPT_BACKEND`` overrides ``backend``. A dtype, norm order or layout a usable
    backend has no kernel for is not an error: it is computed by the reference (same math)."""
    backends.validate_choice(backend)
    name = backends.requested(backend)
    if name in ("auto", "reference"):
        return
    impl = backends.get(name)  # raises, saying why, when unavailable in this process
    for device in devices:
        reason = impl.supports(device, torch.float32)
        if reason is not None:
            raise backends.BackendUnavailableError(
                f"backend {name!r} cannot clip tensors on {device}: {reason}")


def choose(backend: str, device: torch.device, tensors: Sequence[Tensor], norm_type: float,
           summary: Optional[Summary] = None) -> str:
    """Which implementation computes the norm of ``tensors`` (all on ``device``); ``summary``
    may describe a superset of ``tensors`` (the whole call's list)."""
    backend = backends.requested(backend)
    summary = Summary.of(tensors, summary)
    if backend in ("cpu", "cuda"):
        return "native" if _native_ok(device, summary) else "reference"
    if backend == "triton":
        return "triton" if _triton_ok(device, summary, norm_type) else "reference"
    if backend == "reference":
        return "reference"
    if _native_ok(device, summary):
        return "native"
    if device.type == "cuda" and _triton_ok(device, summary, norm_type):
        return "triton"
    return "reference"


def _native_ok(device: torch.device, summary: Summary) -> bool:
    return (_norm_ops.has_kernel("total_norm", device.type)
            and not summary.any_complex and not summary.any_sparse)


def _triton_ok(device: torch.device, summary: Summary, norm_type: float) -> bool:
    if (norm_type not in _TRITON_NORMS or not summary.dtypes <= set(_TRITON_DTYPES)
            or summary.any_sparse):
        return False
    try:
        triton_backend = backends.get("triton")
    except backends.BackendUnavailableError:
        return False
    return triton_backend.supports(device, next(iter(summary.dtypes))) is None


def device_norm(tensors: Sequence[Tensor], norm_type: float, backend: str = "auto",
                summary: Optional[Summary] = None, prescale: Optional[Tensor] = None) -> Tensor:
    """Norm of tensors that share one device (of ``prescale * tensors`` when ``prescale`` is
    given), as a 0-dim tensor of :func:`accumulate_dtype`."""
    if summary is None or len(summary.devices) > 1:
        summary = Summary(tensors)
    device = summary.devices[0]
    if prescale is not None:
        prescale = to_device(prescale, device)
    how = choose(backend, device, tensors, norm_type, summary)
    if how == "native":
        return _norm_ops.total_norm(tensors, norm_type, prescale)
    if how == "triton":
        from ..backends.triton import norm as triton_norm
        return triton_norm.total_norm(tensors, norm_type, prescale)
    return reference_norm(tensors, norm_type, prescale)


def reference_norm(tensors: Sequence[Tensor], norm_type: float,
                   prescale: Optional[Tensor] = None) -> Tensor:
    """torch's method (norm of the per-tensor norms), accumulating in :func:`accumulate_dtype`;
    with ``prescale``, of the tensors multiplied by it first, in float32 (float64 for float64)
    and not rounded back to 16 bits: what the native and Triton kernels compute."""
    acc = accumulate_dtype(tensors)
    groups: Dict[torch.dtype, List[Tensor]] = {}
    for t in tensors:
        if t.layout != torch.strided:  # a sparse grad (Embedding(sparse=True)): its values
            t = _sparse_values(t)
        if prescale is not None:
            wide = torch.promote_types(t.dtype, torch.float32)
            t = t.to(wide) * prescale.to(real_dtype(wide))
        groups.setdefault(t.dtype, []).append(t.abs() if t.is_complex() else t)
    norms: List[Tensor] = []
    for group in groups.values():
        if norm_type < 0 or math.isinf(norm_type):
            # torch refuses these norms of an empty tensor (max/min of nothing, 0^(1/p) with
            # p < 0); an empty tensor has no element to contribute, as in the native kernels
            group = [t for t in group if t.numel() > 0]
        if group:
            norms.extend(torch._foreach_norm(group, norm_type, dtype=acc))
    if not norms:  # no element at all: the native kernels' value (min over nothing: +inf)
        empty = float("inf") if norm_type < 0 else 0.0
        return torch.full((), empty, dtype=acc, device=tensors[0].device)
    return torch.linalg.vector_norm(torch.stack(norms), norm_type)


def _sparse_values(t: Tensor) -> Tensor:
    """The specified values of a sparse tensor, duplicates of a COO tensor summed: torch's norm
    of a sparse tensor is theirs (the dense tensor's for p > 0; for -inf and 0 the unspecified
    zeros do not count, as in torch)."""
    return t.coalesce().values() if t.layout == torch.sparse_coo else t.values()


def total_norm(tensors: Sequence[Tensor], norm_type: float = 2.0, backend: str = "auto",
               summary: Optional[Summary] = None, prescale: Optional[Tensor] = None) -> Tensor:
    """Norm of tensors on any devices, in :func:`accumulate_dtype`, on the first tensor's device.

    Per-device norms are combined as torch does (the norm of the per-device norms; for ``p = 0``
    their sum, as each is a count). Nothing here reads a value on the host. ``summary``: the
    :class:`Summary` of ``tensors`` when the caller has it already. ``prescale`` (a one-element
    tensor): the norm of ``prescale * tensors``, each element multiplied before its term is
    taken, as GradScaler's ``unscale_`` would rewrite it; the optimizers pass ``1 / scale``, so
    the norm of the unscaled gradients stays in range however large the scale.
    """
    norm_type = float(norm_type)
    if len(tensors) == 0:
        return torch.tensor(0.0)
    summary = Summary.of(tensors, summary)
    if summary.any_dtensor:
        return sharded_norm(by_layout(tensors), norm_type, backend, prescale)
    groups = by_device(tensors, summary)
    norms = [device_norm(group, norm_type, backend, summary if len(groups) == 1 else None,
                         prescale)
             for group in groups.values()]
    return combine_norms(norms, norm_type)


def combine_norms(norms: Sequence[Tensor], norm_type: float) -> Tensor:
    """The norm of the union of disjoint sets of elements, given their norms (0-dim tensors):
    the norm of the norms (for ``p = 0`` their sum, as each is a count), on the first one's
    device, in the widest of their dtypes."""
    if len(norms) == 1:
        return norms[0]
    acc = functools.reduce(torch.promote_types, (n.dtype for n in norms))
    stacked = torch.stack([to_device(n, norms[0].device, acc) for n in norms])
    return stacked.sum() if norm_type == 0.0 else torch.linalg.vector_norm(stacked, norm_type)


def by_layout(tensors: Sequence[Tensor]) -> Dict[_dtensor.Layout, List[Tensor]]:
    """The local tensors of a list of DTensors, by layout (mesh and placements)."""
    groups: Dict[_dtensor.Layout, List[Tensor]] = {}
    for t in tensors:
        layout = _dtensor.layout_of(t)
        if layout is None:
            raise ValueError("cannot take one norm of DTensors and plain tensors together: a "
                             "plain tensor's values may differ between ranks (make every "
                             "gradient a DTensor, or take the norms apart)")
        groups.setdefault(layout, []).append(_dtensor.local(t))
    return groups


def sharded_norm(groups: Dict[_dtensor.Layout, List[Tensor]], norm_type: float,
                 backend: str = "auto", prescale: Optional[Tensor] = None) -> Tensor:
    r"""Norm of DTensors given as their local tensors by layout (:func:`by_layout`), the same on
    every rank: each layout's local norm (:func:`total_norm`) is combined over the mesh
    dimensions that shard it, by a collective on the device (no host sync):

    .. math::

        \|x\|_p = \Big(\sum_{\text{shards}} \|x_{\text{shard}}\|_p^p\Big)^{1/p},
        \qquad \|x\|_{\pm\infty} = \max / \min_{\text{shards}} \|x_{\text{shard}}\|_{\pm\infty}

    (a NaN on any shard makes the norm NaN). Layouts reduced over the same mesh dimensions (as
    ``(Shard(0), Shard(0))`` and ``(Shard(0), Shard(1))`` under FSDP2 + tensor parallelism)
    share one collective: one per (mesh, sharded dimensions), whatever the norm type. ``p = 0``
    (torch counts the *tensors* with a nonzero element, which no shard knows alone) is refused.
    """
    if norm_type == 0.0:
        raise ValueError("norm_type=0 (the number of nonzero tensors) is not supported for "
                         "DTensor gradients")
    by_reduction: Dict[Tuple[Any, Tuple[int, ...]], List[Tensor]] = {}
    prescale = _dtensor.plain(prescale) if prescale is not None else None
    for layout, local in groups.items():
        key = (layout[0], tuple(_dtensor.sharded_dims(layout)))
        by_reduction.setdefault(key, []).append(
            total_norm(local, norm_type, backend, prescale=prescale))
    norms = [_reduce_norms(local_norms, mesh, dims, norm_type)
             for (mesh, dims), local_norms in by_reduction.items()]
    return combine_norms(norms, norm_type)


def _reduce_norms(norms: List[Tensor], mesh: Any, dims: Tuple[int, ...],
                  norm_type: float) -> Tensor:
    """The global norm of layouts reduced over the same mesh dimensions, from their local norms
    on every rank, in one collective (see :func:`sharded_norm`). The shards' p-th powers are
    summed in float64: each shard's may fit float32 while their sum does not (the native
    kernels likewise combine their per-chunk partials in float64). Layouts with nothing to
    reduce keep their norms bit for bit."""
    if not dims:
        return combine_norms(norms, norm_type)
    dtype = functools.reduce(torch.promote_types, (n.dtype for n in norms))
    if norm_type in (float("inf"), float("-inf")):
        # A collective max/min need not propagate NaN, so NaN rides along as a flag in the
        # same collective: max of [norm with NaN as -inf, 1 if NaN] (min: +inf and -1).
        sign = 1.0 if norm_type > 0 else -1.0
        local = torch.stack([n.to(dtype) for n in norms])
        local = local.amax() if sign > 0 else local.amin()  # NaN if any is
        nan = torch.isnan(local)
        pair = torch.stack([torch.where(nan, torch.full_like(local, -sign * float("inf")), local),
                            nan.to(dtype) * sign])
        pair = _dtensor.reduce_over_shards(pair, mesh, dims, "max" if sign > 0 else "min")
        return torch.where(pair[1] * sign > 0, torch.full_like(pair[0], float("nan")), pair[0])
    wide = torch.stack([n.to(torch.float64) for n in norms])
    if norm_type == 1.0:
        powers = wide.sum()
    elif norm_type == 2.0:
        powers = (wide * wide).sum()
    else:
        powers = (wide ** norm_type).sum()
    total = _dtensor.reduce_over_shards(powers, mesh, dims, "sum")
    if norm_type == 2.0:
        total = torch.sqrt(total)
    elif norm_type != 1.0:
        total = total ** (1.0 / norm_type)
    return total.to(dtype)


def check_finite(norm: Tensor, norm_type: float) -> None:
    """torch's ``error_if_nonfinite`` check (the one place that reads the norm on the host)."""
    if not bool(torch.isfinite(norm)):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")


def get_total_norm(tensors: TensorOrTensors, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: Optional[bool] = None, *,
                   backend: str = "auto") -> Tensor:
    """Drop-in for :func:`torch.nn.utils.get_total_norm`: the norm of all ``tensors`` as one vector.

    Returns a 0-dim tensor on the first tensor's device, of the dtype torch returns (the promotion
    of the tensors' dtypes; float32 ``0.`` for no tensors). The value is accumulated in float32
    (float64 for float64 tensors) and rounded once, so float16/bfloat16 results are torch's up
    to that rounding. ``error_if_nonfinite`` checks the accumulated value (a float16 norm above
    65504 is not an error: the gradients are finite) and is the only option that synchronises
    with the host. ``foreach`` is accepted for compatibility: every path is multi-tensor.
    ``backend`` picks the implementation (see the module docstring).
    """
    with torch.no_grad():
        tensors = as_list(tensors)
        if not tensors:
            check_backend(backend)
            return total_norm(tensors, norm_type, backend)
        summary = Summary(tensors)
        check_backend(backend, summary.devices)
        norm = total_norm(tensors, norm_type, backend, summary)
        if error_if_nonfinite:
            check_finite(norm, norm_type)
        norm = norm.to(summary.result_dtype())
        return _dtensor.replicated_like(norm, tensors) if summary.any_dtensor else norm
