"""Device tables for the one-launch step, built once per set of tensors and cached.

A kernel launch needs, for every tensor of one dtype: the address of the param and of each state
tensor, the address of its step counter, its size, and a map from program id to (tensor, first
element). :class:`Plan` holds these as int64 device tensors ("tables"), one :class:`Bucket` per
dtype present (one launch each), plus the entries the kernels cannot address (see below).

Caching. Building a plan costs Python work and a host-to-device copy, so :class:`PlanCache` keeps
plans keyed on the *addresses*: the ``data_ptr()`` and dtype of every param, state tensor and step
counter plus the shape and strides of every param and state tensor. Any change (a reallocated state after
``load_state_dict``, a ``p.data = ...`` swap, a resize, another dtype or layout in reused memory)
changes the key and builds a new plan; an unchanged key means the tables hold exactly the right
numbers, whichever Python objects carry them. Plans hold no reference
to the tensors. Gradients have a table of their own, rebuilt only when a gradient address changes
(``zero_grad(set_to_none=True)`` may reallocate them; the caching allocator usually hands back the
same addresses), or when one's dtype or layout changes. Tables go to the device through pinned memory and a non-blocking copy: even a
rebuild does not synchronise with the host.

Layouts. The kernels see each tensor as its flat storage. That is right whenever the param is
dense (no gaps, no overlap: contiguous, channels_last, ...) and its state tensors have the
param's strides. Entries that break this go to :attr:`Plan.fallback` and are updated by the
reference backend instead (correct, slower, may synchronise). A gradient whose strides differ from
its dense param is copied each step into a persistent buffer laid out like the param.
Not detected: a layout changed in place (``as_strided_``) on the same tensor object.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ... import _ops
from . import config as launch_config
from . import tuning

Tensor = torch.Tensor
# One C++ pass reading every address of a step (fusedopt._C._addresses; ~5 ns a tensor against
# ~70 ns for a data_ptr() call from Python), when the extension is built.
_native_addresses = getattr(_ops._C, "_addresses", None) if _ops.available() else None

#: Parameter dtypes the kernels handle.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Step counter dtypes the kernels read and write.
STEP_DTYPES = (torch.float32, torch.float64)
#: Address alignment the kernels need for 128-bit vector access.
VECTOR_BYTES = 16


def _layout_words(t: Tensor) -> Tuple[int, ...]:
    return (t.dim(), *t.shape, *t.stride())


def address_key(lists: Sequence[Sequence[Tensor]], layouts: int):
    """The ``data_ptr()`` and dtype of every tensor of ``lists``, then the ``dim()``, sizes and
    strides of every tensor of the first ``layouts`` lists: native int64 bytes from the C++
    pass, or a list (same order; dtypes as torch.dtype objects) when the extension is missing or
    a tensor is not a plain one. Keys compare equal only with keys of the same kind, which is all
    the cache needs (one process builds one kind for given tensors)."""
    if _native_addresses is not None:
        key = _native_addresses(lists, layouts)
        if key is not None:
            return key
    key: List[Any] = []
    for lst in lists:
        for t in lst:
            key += (t.data_ptr(), t.dtype)
    for lst in lists[:layouts]:
        for t in lst:
            key += _layout_words(t)
    return key


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers its memory without gaps or overlap, in some dimension order."""
    if t.is_contiguous() or t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(param: Tensor, other: Tensor) -> bool:
    return other.shape == param.shape and (param.numel() <= 1 or other.stride() == param.stride())


class Bucket:
    """The tables of one launch: every directly addressable entry of one (dtype, step dtype)."""

    def __init__(self, dtype: torch.dtype, step_dtype: Optional[torch.dtype], indices: List[int],
                 cfg: launch_config.LaunchConfig):
        self.dtype = dtype
        self.step_dtype = step_dtype
        self.indices = indices            # positions in the caller's lists
        self.config = cfg
        self.rows: Dict[str, Tensor] = {}  # name -> int64 device table (views of one buffer)
        self.arrivals: Optional[Tensor] = None
        self.n_chunks = 0
        self.static_aligned: List[bool] = []  # per tensor: param/state addresses 16-byte aligned
        # gradients (see Plan.bind_gradients)
        self.grad_ptrs: Optional[Tensor] = None  # int64 device table of gradient addresses
        self.vector_ok: Optional[Tensor] = None  # int64 per tensor: every address 16-byte aligned
        self.grad_copies: List[Tuple[int, Tensor]] = []  # (index in caller's lists, buffer)


class Plan:
    """Everything a step of one set of tensors needs besides gradients and hyperparameters."""

    def __init__(self, key, device: torch.device):
        self.key = key
        self.device = device
        self.buckets: List[Bucket] = []
        self.fallback: List[int] = []     # entries the kernels cannot address (non-dense layouts)
        self.grad_key = None  # address_key of the gradients the tables point at
        self.builds_of_grad_tables = 0
        # built with default rows while their tuning was still timing on the device: the cache
        # rebuilds the plan (same key) once the tuned rows are known, unless a CUDA graph
        # captured it first (then it stays as it is)
        self.provisional = False

    # ---- gradients ---------------------------------------------------------------------------
    def bind_gradients(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """Make every bucket's gradient table point at ``grads``; cheap when they did not move.

        Also refreshes the copies of gradients whose layout differs from their param's."""
        grad_key = address_key((grads,), 1)  # the layouts decide the copies
        if grad_key != self.grad_key:
            for bucket in self.buckets:
                self._build_grad_table(bucket, grads, params)
            self.grad_key = grad_key
            self.builds_of_grad_tables += 1
        for bucket in self.buckets:
            for index, buffer in bucket.grad_copies:
                buffer.copy_(grads[index])

    def _build_grad_table(self, bucket: Bucket, grads: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        addresses, copies = [], []
        for i in bucket.indices:
            grad, param = grads[i], params[i]
            if grad.dtype != param.dtype or grad.shape != param.shape or grad.device != param.device:
                raise ValueError(f"fusedopt triton: gradient {i} ({grad.dtype}, {tuple(grad.shape)}, "
                                 f"{grad.device}) does not match its param ({param.dtype}, "
                                 f"{tuple(param.shape)}, {param.device})")
            if not _same_layout(param, grad):
                buffer = torch.empty_like(param)  # a dense param's layout is preserved
                copies.append((i, buffer))
                grad = buffer
            addresses.append(grad.data_ptr())
        bucket.grad_copies = copies
        vector_ok = [int(ok and a % VECTOR_BYTES == 0) for ok, a in zip(bucket.static_aligned, addresses)]
        n, pad = len(addresses), len(addresses) % 2  # pad: both tables start 16-byte aligned
        packed = _to_device(torch.tensor(addresses + [0] * pad + vector_ok, dtype=torch.int64),
                            self.device)
        bucket.grad_ptrs, bucket.vector_ok = packed[:n], packed[n + pad:]


class PlanCache:
    """Plans by key, least recently used dropped first.

    Lookup: a cheap signature (algorithm, list names, tensor count, first param's address,
    device, config override) picks a short list of candidates, which are compared on the full
    address key with one list comparison (C speed).

    ``capacity`` signatures are kept, enough for one per param group of models with hundreds of
    groups (a cache smaller than the working set would rebuild every plan at every step). Stale
    plans (state reallocated, e.g. by ``load_state_dict``) usually share their live plan's
    signature, so ``per_signature`` bounds them."""

    def __init__(self, capacity: int = 1024, per_signature: int = 4):
        self.capacity = capacity
        self.per_signature = per_signature
        self._slots: "OrderedDict[tuple, List[Plan]]" = OrderedDict()
        self.builds = 0  # plans built so far (tests and docs read it)

    def clear(self) -> None:
        self._slots.clear()

    def get(self, kind: str, names: Sequence[str], lists: Sequence[Sequence[Tensor]],
            steps: Sequence[Tensor]) -> Plan:
        """The plan for ``lists`` (params first, then the state lists; ``names`` names their
        address tables) and ``steps`` (may be empty)."""
        params = lists[0]
        key = address_key((*lists, steps), len(lists))  # (steps are 0-dim)
        signature = (kind, tuple(names), len(params), len(steps), params[0].data_ptr(),
                     params[0].device, os.environ.get(launch_config.ENV_VAR),
                     os.environ.get(tuning.ENV_TUNE))
        plans = self._slots.get(signature)
        device = params[0].device
        if plans is not None:
            self._slots.move_to_end(signature)
            for position, plan in enumerate(plans):
                if plan.key == key:
                    if position:
                        plans.insert(0, plans.pop(position))
                    if plan.provisional:
                        if tuning.capturing(device):
                            plan.provisional = False  # captured with these tables: they stay
                        elif self._settled(plan, kind, len(names), device):
                            break  # its tuned rows are known now: rebuild it with them
                    return plan
        final = []

        def config_of(dtype):
            row, is_final = tuning.row_for(kind, len(names), dtype, device)
            final.append(is_final)
            return row

        plan = build_plan(key, names, lists, steps, config_of)
        plan.provisional = not all(final)
        self.builds += 1
        if plans is None:
            plans = self._slots[signature] = []
        if plans and plans[0].key == key:  # the provisional plan it replaces
            plans[0] = plan
        else:
            plans.insert(0, plan)
        del plans[self.per_signature:]
        while len(self._slots) > self.capacity:
            self._slots.popitem(last=False)
        return plan


    @staticmethod
    def _settled(plan: "Plan", kind: str, n_lists: int, device: torch.device) -> bool:
        """Whether every bucket's launch row is final (no tuning in flight for it)."""
        return all(tuning.settled(kind, n_lists, bucket.dtype, device) for bucket in plan.buckets)


def build_plan(key, names: Sequence[str], lists: Sequence[Sequence[Tensor]], steps: Sequence[Tensor],
               config_of: Callable[[torch.dtype], launch_config.LaunchConfig] = launch_config.config_for
               ) -> Plan:
    """Validate the tensors, split them into dtype buckets and fallback entries, build the tables
    (chunks of the size ``config_of(dtype)`` gives)."""
    params = lists[0]
    device = params[0].device
    plan = Plan(key, device)
    groups: Dict[Tuple[torch.dtype, Optional[torch.dtype]], List[int]] = {}
    for i, param in enumerate(params):
        entry = [lst[i] for lst in lists]
        step = steps[i] if steps else None
        _validate_entry(i, entry, step, device)
        if all(is_dense(param) and _same_layout(param, t) for t in entry):
            groups.setdefault((param.dtype, None if step is None else step.dtype), []).append(i)
        else:
            plan.fallback.append(i)
    for (dtype, step_dtype), indices in groups.items():
        bucket = Bucket(dtype, step_dtype, indices, config_of(dtype))
        _fill_tables(bucket, names, lists, steps, device)
        plan.buckets.append(bucket)
    return plan


def _validate_entry(i: int, entry: List[Tensor], step: Optional[Tensor], device: torch.device) -> None:
    param = entry[0]
    if param.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"fusedopt triton: param {i} has dtype {param.dtype}; supported: "
                         f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    for t in entry[1:]:
        if t.dtype != param.dtype or t.shape != param.shape or t.device != param.device:
            raise ValueError(f"fusedopt triton: a state tensor of param {i} ({t.dtype}, "
                             f"{tuple(t.shape)}, {t.device}) does not match it ({param.dtype}, "
                             f"{tuple(param.shape)}, {param.device})")
    if param.device != device:
        raise ValueError(f"fusedopt triton: param {i} is on {param.device}, param 0 on {device}; "
                         "one call takes one device")
    if step is not None and (step.device != device or step.dtype not in STEP_DTYPES or step.numel() != 1):
        raise ValueError(f"fusedopt triton: state_steps[{i}] must be a one-element float32/float64 "
                         f"tensor on {device} (got {step.dtype}, {tuple(step.shape)}, {step.device}); "
                         "the kernel increments it in place")


def _fill_tables(bucket: Bucket, names: Sequence[str], lists: Sequence[Sequence[Tensor]],
                 steps: Sequence[Tensor], device: torch.device) -> None:
    """Pack the address rows, sizes and chunk map into one int64 buffer; copy it to the device."""
    idx = bucket.indices
    rows = {}
    for name, lst in zip(names, lists):
        rows[name] = [lst[i].data_ptr() for i in idx]
    bucket.static_aligned = [all(r[k] % VECTOR_BYTES == 0 for r in rows.values()) for k in range(len(idx))]
    if steps:
        rows["step_ptrs"] = [steps[i].data_ptr() for i in idx]
    numels = torch.tensor([lists[0][i].numel() for i in idx], dtype=torch.int64)
    chunk = bucket.config.chunk
    counts = ((numels + chunk - 1) // chunk).clamp_(min=1)  # an empty tensor still steps
    chunk_tensor = torch.repeat_interleave(torch.arange(len(idx), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    chunk_start = (torch.arange(chunk_tensor.numel(), dtype=torch.int64) - first_chunk[chunk_tensor]) * chunk
    parts = [torch.tensor(r, dtype=torch.int64) for r in rows.values()]
    parts += [numels, counts, chunk_tensor, chunk_start]
    row_names = list(rows) + ["numels", "chunk_counts", "chunk_tensor", "chunk_start"]
    # every table starts 16 bytes aligned, so Triton compiles one variant whatever the sizes
    padded = [torch.nn.functional.pad(p, (0, p.numel() % 2)) for p in parts]
    packed = _to_device(torch.cat(padded), device)
    offset = 0
    for name, part, pad in zip(row_names, parts, padded):
        bucket.rows[name] = packed[offset:offset + part.numel()]
        offset += pad.numel()
    bucket.n_chunks = chunk_tensor.numel()
    bucket.arrivals = torch.zeros(len(idx), dtype=torch.int32, device=device)


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a host table to ``device`` without synchronising: pinned memory, non-blocking copy
    (torch's caching host allocator keeps the pinned block until the copy has run)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


#: The process-wide cache used by the launchers.
PLANS = PlanCache()
