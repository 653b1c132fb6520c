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
