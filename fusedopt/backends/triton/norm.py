r"""Global norm of a list of tensors with Triton: one launch per dtype, one launch to finish.

.. math::

    \|x\|_2 = \sqrt{\textstyle\sum_i x_i^2}, \qquad \|x\|_1 = \textstyle\sum_i |x_i|, \qquad
    \|x\|_\infty = \max_i |x_i|

over all elements of all tensors, accumulated in fp32 (a NaN anywhere gives NaN, like torch).
With a ``prescale`` tensor, the norm of ``prescale * x``: each element is multiplied before its
term is taken (the optimizers pass GradScaler's ``1 / scale``, so the norm of the unscaled
gradients stays in range however large the scale).

Launch 1 (per dtype present): program ``pid`` reduces chunk ``pid`` (``TILES`` tiles of
``BLOCK`` elements of one tensor, the chunk map of :mod:`.tables`) to one fp32 partial, stored
at its own slot of a partials buffer. Launch 2: one program reduces the partials in slot order
and writes the norm. No atomics, so the result is the same on every run. Tables and the
partials buffer are cached with the plan (keyed on the tensors' addresses), so a training loop
whose gradients stay in place rebuilds nothing. Nothing is read on the host.

Used by :func:`fusedopt.get_total_norm` / :func:`fusedopt.clip_grad_norm_` and the optimizers'
``max_grad_norm`` for CUDA tensors when the ``cuda`` extension has no norm kernel, and on CPU
tensors under ``TRITON_INTERPRET=1`` (tests).
"""
# No ``from __future__ import annotations`` here, nor in any module that defines a ``@triton.jit``
# function: it turns ``BLOCK: tl.constexpr`` into the string "tl.constexpr", which triton 3.1's
# interpreter does not take for a constexpr (it compares the annotation with "constexpr"), so it
# passes BLOCK as a tensor and ``tl.arange(0, BLOCK)`` fails. Compiled kernels (every version) and
# newer interpreters accept both forms; the annotation object works everywhere.
# tests/test_backends_triton.py::test_kernel_annotations_are_objects checks it.
from collections import Counter
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..._compiling import is_compiling
from .program import chunk_of, tensor_at
from .tables import PLANS

Tensor = torch.Tensor

#: Norm orders with a kernel, and their KIND constant.
KINDS = {2.0: 0, 1.0: 1, float("inf"): 2}
#: Launches so far by kernel name (tests count them).
LAUNCHES: Counter = Counter()
#: Elements the finishing program reduces per loop iteration.
FINISH_BLOCK = 1024

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# Only builtins of triton.language here (tl.full, tl.reduce, ...), not the @jit helpers of its
# standard library (tl.zeros, tl.sum, tl.max): those stay compiled-mode functions when triton was
# imported before TRITON_INTERPRET was set, and then fail under the interpreter.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _larger(a, b):
    return tl.where(a > b, a, b)


@triton.jit
def _reduce(acc, KIND: tl.constexpr):
    """Sum (KIND 0, 1) or max (KIND 2) of a 1-D block."""
    if KIND == 2:
        return tl.reduce(acc, 0, _larger)
    else:
        return tl.reduce(acc, 0, _add)


@triton.jit
def _tile_term(x, mask, KIND: tl.constexpr):
    """Contribution of a tile of fp32 values (masked lanes contribute 0)."""
    if KIND == 0:
        t = x * x
    else:
        t = tl.abs(x)
    return tl.where(mask, t, 0.0)


@triton.jit
def norm_partials_kernel(ptrs, numels, chunk_tensor, chunk_start, partials, slot0, prescale,
                         DTYPE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr,
                         ALIGNED: tl.constexpr, KIND: tl.constexpr, PRESCALE: tl.constexpr):
    """partials[slot0 + pid] = reduction of this program's chunk (sum, or max |x|; NaN if any),
    of ``prescale[0] * x`` when PRESCALE."""
    tensor, start, numel = chunk_of(chunk_tensor, chunk_start, numels, BLOCK)
    x_ptr = tensor_at(ptrs, tensor, DTYPE, ALIGNED)
    factor = 1.0
    if PRESCALE:
        factor = tl.load(prescale).to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    nans = tl.full([BLOCK], 0, tl.int32)
    for tile in range(TILES):
        offsets = start + tile * BLOCK + lanes
        mask = offsets < numel
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if PRESCALE:
            x = x * factor
        t = _tile_term(x, mask, KIND)
        if KIND == 2:
            acc = tl.where(t > acc, t, acc)
        else:
            acc += t
        nans += (x != x).to(tl.int32)
    partial = _reduce(acc, KIND)
    partial = tl.where(tl.reduce(nans, 0, _add) > 0, float("nan"), partial)
    tl.store(partials + slot0 + tl.program_id(0), partial)


@triton.jit
def norm_finish_kernel(partials, n, out, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """out[0] = the norm from the ``n`` partials (one program)."""
    lanes = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    nans = tl.full([BLOCK], 0, tl.int32)
    for begin in range(0, n, BLOCK):
        offsets = begin + lanes
        mask = offsets < n
        v = tl.load(partials + offsets, mask=mask, other=0.0)
        if KIND == 2:
            acc = tl.where(v > acc, v, acc)
        else:
            acc += v
        nans += (v != v).to(tl.int32)
    total = _reduce(acc, KIND)
    if KIND == 0:
        total = tl.sqrt(total)
    total = tl.where(tl.reduce(nans, 0, _add) > 0, float("nan"), total)
    tl.store(out, total)


def supports(norm_type: float, dtype: torch.dtype) -> bool:
    return float(norm_type) in KINDS and dtype in _TL_DTYPES


def total_norm(tensors: Sequence[Tensor], norm_type: float = 2.0,
               prescale: Optional[Tensor] = None) -> Tensor:
    """The ``norm_type``-norm (2, 1 or inf) of ``tensors`` (one device; fp32/bf16/fp16), of
    ``prescale * tensors`` when ``prescale`` (a one-element tensor) is given, as a 0-dim fp32
    tensor on that device. Under ``torch.compile``, through a custom op (the launch reads tensor
    addresses, which traced tensors do not have)."""
    if is_compiling():
        from . import compile_ops
        return compile_ops.total_norm(tensors, norm_type, prescale)
    return launch_total_norm(tensors, norm_type, prescale)


def launch_total_norm(tensors: Sequence[Tensor], norm_type: float = 2.0,
                      prescale: Optional[Tensor] = None) -> Tensor:
    """:func:`total_norm`, launched here and now."""
    kind = KINDS[float(norm_type)]
    tensors = list(tensors)
    plan = PLANS.get("norm", ("param_ptrs",), [tensors], [])
    device = plan.device
    partials = getattr(plan, "norm_partials", None)
    n_partials = sum(b.n_chunks for b in plan.buckets)
    if partials is None or partials.numel() < max(n_partials, 1):
        partials = plan.norm_partials = torch.empty(max(n_partials, 1), dtype=torch.float32,
                                                    device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    if prescale is not None:  # one float32 element on the device (no host read)
        prescale = prescale.detach().reshape(1).to(device=device, dtype=torch.float32,
                                                   non_blocking=True)
    slot = 0
    with _on_device(device):
        for bucket in plan.buckets:
            cfg = bucket.config
            norm_partials_kernel[(bucket.n_chunks,)](
                bucket.rows["param_ptrs"], bucket.rows["numels"], bucket.rows["chunk_tensor"],
                bucket.rows["chunk_start"], partials, slot,
                partials if prescale is None else prescale,
                DTYPE=_TL_DTYPES[bucket.dtype], BLOCK=cfg.block, TILES=cfg.tiles,
                ALIGNED=all(bucket.static_aligned), KIND=kind, PRESCALE=prescale is not None,
                num_warps=cfg.num_warps)
            LAUNCHES["norm_partials_kernel"] += 1
            slot += bucket.n_chunks
        if slot == 0:
            out.zero_()
        else:
            norm_finish_kernel[(1,)](partials, slot, out, KIND=kind, BLOCK=FINISH_BLOCK,
                                     num_warps=4)
            LAUNCHES["norm_finish_kernel"] += 1
    if plan.fallback:  # tensors the kernels cannot address (not dense): torch, then combine
        from ...clip._norm import reference_norm
        rest = reference_norm([tensors[i] for i in plan.fallback], norm_type,
                              prescale).to(torch.float32)
        out = torch.linalg.vector_norm(torch.stack([out, rest]), norm_type)
    return out


def _on_device(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


__all__ = ["total_norm", "supports", "LAUNCHES", "KINDS"]
