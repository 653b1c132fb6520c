"""C-level helpers for per-step passes over lists of 1000s of tensors.

Every Tensor attribute read from Python costs ~0.1 us (torch's getters); a generator expression
costs about twice as much per element as ``map`` with a C function. The step and clipping code
share these instead of writing their own loops.

Under ``torch.compile`` the same helpers use plain comprehensions: dynamo cannot trace a call to
an ``operator.attrgetter`` object (a graph break, an error with ``fullgraph=True``), and the
traced graph does not pay the per-element cost anyway.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Iterable, List, Optional, Sequence

import torch

from ._compiling import is_compiling
from ._ops import _C

_grad = operator.attrgetter("grad")
_is_sparse = operator.attrgetter("is_sparse")
_same_objects = getattr(_C, "_same_objects", None)  # (None without the extension)
_sparse_positions = getattr(_C, "_sparse_positions", None)
_memory_shared = getattr(_C, "_memory_shared", None)

#: the error of an optimizer call whose tensors share memory (see :func:`memory_shared`)
SHARED_MEMORY_MESSAGE = (
    "tensors of the call share memory: a param listed twice, a state tensor (or step counter) "
    "that is (a view of) a param or another state tensor, or a grad that views a param or state "
    "tensor. Every param and state tensor must own its elements (grads may share theirs with "
    "other grads)")


def grads_of(params: Iterable[Any]) -> List[Optional[Any]]:
    """``[p.grad for p in params]`` in one C-level pass."""
    if is_compiling():
        return [p.grad for p in params]
    return list(map(_grad, params))


def any_none(items: List[Any]) -> bool:
    """``None in items`` without calling ``Tensor.__eq__`` on every tensor (~25 us each)."""
    if is_compiling():
        return any(x is None for x in items)
    return any(map(operator.is_, items, itertools.repeat(None)))


def same_objects(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Whether sequences ``a`` and ``b`` hold the same objects (identity) in the same order: one
    C++ pass (``fusedopt._C._same_objects``, ~1 ns an element) where the extension has it and
    both are lists (a group's ``params`` is one unless the user put a tuple there)."""
    if is_compiling() or _same_objects is None or not (type(a) is list and type(b) is list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return _same_objects(a, b)


def _element_span(t: Any):
    """(storage, begin, end): the bytes [begin, end) of ``t``'s storage its elements span (strides
    >= 0), or None (None, empty, sparse, or a wrapper without storage such as a DTensor)."""
    if t is None or t.numel() == 0 or t.layout != torch.strided:
        return None
    try:
        storage = t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    size = t.element_size()
    last = sum((n - 1) * stride for n, stride in zip(t.shape, t.stride()))
    begin = t.storage_offset() * size
    return storage, begin, begin + (last + 1) * size


def memory_shared(written: Sequence[Sequence[Any]], read: Sequence[Sequence[Any]] = ()) -> bool:
    """Whether a tensor of the ``written`` lists shares memory with another tensor of the call
    (written or read): one parallel region or launch would then have threads rewrite the same
    elements in an unspecified order. Tensors of ``read`` lists may share memory among
    themselves. Spans are compared within a storage, by offsets (fake and meta tensors too);
    conservative: interleaved views of one buffer (``W[:, :3]``, ``W[:, 3:]``) count as sharing.
    Tensors without storage (DTensor wrappers: pass their local shards) are passed over. One
    C++ pass (``fusedopt._C._memory_shared``, ~30 ns a tensor) where the extension has it;
    while torch.compile traces, nothing is compared."""
    if is_compiling():
        return False
    if _memory_shared is not None:
        return _memory_shared(written, read) and _elements_meet(written, read)
    return _spans_meet(written, read) and _elements_meet(written, read)


def _sorted_spans(written: Sequence[Sequence[Any]], read: Sequence[Sequence[Any]]) -> list:
    """``(storage, begin, end, is_written, tensor)`` of every tensor with data, sorted by
    storage and begin."""
    spans = []
    for lists, is_written in ((written, True), (read, False)):
        for tensors in lists:
            for t in tensors:
                span = _element_span(t)
                if span is not None:
                    spans.append((*span, is_written, t))
    spans.sort(key=lambda s: (s[0], s[1]))
    return spans


def _spans_meet(written: Sequence[Sequence[Any]], read: Sequence[Sequence[Any]]) -> bool:
    """The conservative test (element spans) in Python: what ``_C._memory_shared`` computes."""
    storage = None
    for key, begin, end, is_written, _ in _sorted_spans(written, read):
        if key != storage:
            storage, written_reach, read_reach = key, -1, -1
        if begin < written_reach or (is_written and begin < read_reach):
            return True
        if is_written:
            written_reach = max(written_reach, end)
        else:
            read_reach = max(read_reach, end)
    return False


_ENUMERABLE = 1 << 22  # elements of a tensor whose offsets the exact test lists (32 MB of int64)


def _byte_intervals(t: Any) -> Tensor:
    """Start byte of every element of ``t`` within its storage, sorted (int64)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for d, (size, stride) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[d] = size
        offsets = offsets + torch.arange(size, dtype=torch.int64).view(shape) * stride
    return ((offsets.reshape(-1) + t.storage_offset()) * t.element_size()).sort().values


def _pair_meets(a: Any, b: Any) -> bool:
    """Whether an element of ``a`` and one of ``b`` share a byte (same storage assumed);
    True (conservative) for tensors too large to list."""
    if a.numel() > _ENUMERABLE or b.numel() > _ENUMERABLE or a.device.type == "meta" \
            or b.device.type == "meta":
        return True
    try:  # (on the CPU: only shapes and strides are read, never the data)
        with torch._C._DisableTorchDispatch():
            starts_a, starts_b = _byte_intervals(a), _byte_intervals(b)
            size_a, size_b = a.element_size(), b.element_size()
            # An element of b starting at s meets one of a iff the last start of a at or before
            # s + size_b - 1 ends after s.
            idx = torch.searchsorted(starts_a, starts_b + size_b - 1, right=True) - 1
            hit = (idx >= 0) & (starts_a[idx.clamp(min=0)] + size_a > starts_b)
            return bool(hit.any())
    except Exception:  # a mode that cannot run it (fake tensors): conservative
        return True


def _elements_meet(written: Sequence[Sequence[Any]], read: Sequence[Sequence[Any]]) -> bool:
    """The exact test, run only when the span test found a meeting (a rare path): two views
    whose spans interleave without sharing an element (``W[:, :3]`` and ``W[:, 3:]``, a
    complex buffer's real and imaginary parts) are told apart from real sharing."""
    active: list = []
    storage = None
    for key, begin, end, is_written, t in _sorted_spans(written, read):
        if key != storage:
            storage, active = key, []
        active = [a for a in active if a[2] > begin]
        for _, _, _, other_written, other in active:
            if (is_written or other_written) and _pair_meets(other, t):
                return True
        active.append((key, begin, end, is_written, t))
    return False


def sparse_positions(tensors: List[Optional[Any]]) -> List[int]:
    """Positions of the sparse (not strided) tensors of a list of tensors and Nones: one C++
    pass (``fusedopt._C._sparse_positions``, ~2 ns an element) where the extension has it."""
    if is_compiling() or _sparse_positions is None:
        return [i for i, t in enumerate(tensors) if t is not None and t.layout != torch.strided]
    return _sparse_positions(tensors)


def any_sparse(tensors: Iterable[Any]) -> bool:
    """Whether any tensor has a sparse layout."""
    if is_compiling():
        return any(t.is_sparse for t in tensors)
    return any(map(_is_sparse, tensors))
