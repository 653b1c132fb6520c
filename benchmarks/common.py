"""Shared machinery of the fusedopt benchmarks: workloads, byte model, interleaved timer,
bandwidth reference, providers, correctness guard, result schema, table, command line.

Every benchmark script (``bench_adam.py``, ``bench_sgd.py``, ...) is a thin :class:`BenchSpec`
handed to :func:`main`. What is measured, for every provider, is the wall time of one whole
``optimizer.step()`` call (Python overhead, dispatch and kernels included) with gradients already
in place (set once, reused), on the same parameter tensors for every provider (each provider
has its own optimizer state; sharing the params keeps memory at params + grads + n x state, and
step time does not depend on their values: they stay normal numbers).

Every provider steps on the same pristine gradients at every timed call: a provider whose step
writes into ``p.grad`` (torch's foreach SGD with Nesterov adds ``momentum * buf`` into it) is found
by an untimed first step and gets its own gradients, restored from a master copy before each of
its timed calls (outside the timed region; its samples are then single calls). After timing, the
shared gradients must still be bit-identical to the master copy and the params finite, or the
group's numbers are discarded (status ``rejected``).

Method (docs/ARCHITECTURE.md, "Benchmarks"): warm up, then interleave the providers and the
bandwidth reference (A, B, C, BW, B, C, BW, A, ... the start rotates each repetition), take
>= 15 samples of each, report min and median. GB/s comes from the byte model
(:func:`bytes_per_step`) and the min time; the fraction of the bandwidth reference divides it by
the reference measured in the same run (a reference, not a ceiling: see :class:`BandwidthProbe`);
the speedup is against ``torch-fused`` from the same run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------

DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name (``fp32``) of a torch dtype."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------
# byte model
# ----------------------------------------------------------------------------------------------

#: Tensor streams (reads + writes) one step touches per parameter element, by algorithm variant.
#: SGD: read p, g; write p = 3.  + momentum buffer read/write = 5 (Nesterov: same bytes).
#: Adam/AdamW: read p, g, m, v; write p, m, v = 7.  AMSGrad: + max_v read/write = 9.
STREAMS: Dict[str, int] = {
    "plain": 3,
    "momentum": 5,
    "nesterov": 5,
    "adam": 7,
    "adamw": 7,
    "amsgrad": 9,
}


def bytes_per_param(algo: str, dtype: torch.dtype = torch.float32) -> int:
    """Minimum bytes moved per parameter element by one step: streams x element size.

    fp32: SGD 12, SGD+momentum 20, Adam/AdamW 28, AMSGrad 36 (state kept in the param dtype,
    as torch.optim does).
    """
    return STREAMS[algo] * element_size(dtype)


def bytes_per_step(algo: str, numel: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one step over ``numel`` parameter elements must move (the byte model)."""
    return bytes_per_param(algo, dtype) * int(numel)


def gbps(nbytes: float, seconds: float) -> float:
    """Decimal GB/s."""
    return nbytes / seconds / 1e9


# ----------------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------------


def gpt2_small_shapes() -> List[Tuple[str, Tuple[int, ...]]]:
    """Parameter names and shapes of GPT-2 small (124,439,808 params in 148 tensors)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes: List[Tuple[str, Tuple[int, ...]]] = [("wte", (vocab, d)), ("wpe", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return shapes


@dataclass(frozen=True)
class Workload:
    """A named list of parameter shapes; one timing group of the benchmark."""

    name: str
    shapes: Tuple[Tuple[int, ...], ...]
    label: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def tensors(self) -> int:
        return len(self.shapes)

    def describe(self) -> str:
        return f"{self.label or self.name} ({self.tensors} tensors, {format_count(self.numel)} params)"


#: Workload names accepted by ``--workloads`` (``sweep`` expands to one workload per size).
WORKLOAD_NAMES = ("gpt2", "1000x4096", "10x4M", "sweep", "tiny")
DEFAULT_WORKLOADS = ("gpt2", "1000x4096", "10x4M", "sweep")
QUICK_WORKLOADS = ("tiny", "sweep")


def make_workloads(name: str, sweep_range: Tuple[int, int] = (10, 26)) -> List[Workload]:
    """The workload(s) called ``name``; ``sweep`` gives one single-tensor workload per 2^k."""
    if name == "gpt2":
        return [Workload("gpt2", tuple(s for _, s in gpt2_small_shapes()), "GPT-2 small")]
    if name == "1000x4096":
        return [Workload("1000x4096", ((4096,),) * 1000, "1000 x 4096")]
    if name == "10x4M":
        return [Workload("10x4M", ((4 * 2 ** 20,),) * 10, "10 x 4M")]
    if name == "tiny":  # smoke tests only: odd sizes, a 2-D tensor, a few thousand elements
        return [Workload("tiny", ((3,), (17, 5), (1031,), (64, 65), (4096,)), "tiny (smoke test)")]
    if name == "sweep":
        lo, hi = sweep_range
        return [Workload("sweep", ((2 ** k,),), f"sweep 2^{k}") for k in range(lo, hi + 1)]
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOAD_NAMES)}")


def format_count(n: float) -> str:
    """124439808 -> '124.4M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def make_tensors(workload: Workload, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, mesh: Any = None) -> List[torch.Tensor]:
    """Parameters of ``workload`` (N(0, 1) values) with gradients populated once; with a device
    ``mesh``, DTensors sharded along dim 0 over it (FSDP2's layout).

    Gradients have random signs and magnitudes uniform in 0.5..1.5: none near zero. With N(0, 1)
    gradients, torch's fp16 for-loop and foreach Adam steps (which compute in fp16) divide by a
    denominator that underflows to 0 for |g| below ~2.4e-4 and write inf into the params every
    provider shares; the clip benchmark's shrinking gradients would reach fp16 subnormals."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in workload.shapes:
        p = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        g = (torch.randn(shape, generator=gen, dtype=torch.float32).sign()
             * (0.5 + torch.rand(shape, generator=gen, dtype=torch.float32))).to(device=device, dtype=dtype)
        if mesh is not None:
            from torch.distributed.tensor import Shard, distribute_tensor
            p = torch.nn.Parameter(distribute_tensor(p, mesh, [Shard(0)]))
            g = distribute_tensor(g, mesh, [Shard(0)])
        p.grad = g
        params.append(p)
    return params


def one_rank_mesh(device: torch.device):
    """A device mesh of this process alone (a one-rank process group, gloo or nccl, with an
    in-memory store): DTensors on it have the whole tensor as their local shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(device.type, (1,))


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for all queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Timing:
    """Per-call seconds of one function, from :func:`interleaved_times`."""

    samples: List[float]
    inner: int  # calls per sample; a sample is the mean of ``inner`` back-to-back calls

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def time_calls(fn: Callable[[], Any], calls: int, sync: Callable[[], None]) -> float:
    """Wall seconds per call of ``calls`` back-to-back calls, device synchronised on both ends."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def interleaved_times(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int,
                      sync: Callable[[], None] = lambda: None, min_sample_s: float = 0.005,
                      max_inner: int = 1000,
                      errors: Optional[Dict[str, str]] = None,
                      before: Optional[Mapping[str, Callable[[], Any]]] = None,
                      single: Iterable[str] = ()) -> Dict[str, Timing]:
    """Time every function of ``fns`` interleaved: round r runs all of them once, in an order
    rotated by r, so that slow drifts of a shared machine hit every function alike.

    Warmup calls come first (interleaved as well, at least one); a function that raises during
    warmup is dropped and its error stored in ``errors``. From the time of its last warmup call,
    each function gets a number of calls per sample (``inner``) so a sample lasts at least
    ``min_sample_s``; samples are per-call seconds. The garbage collector is off while timing.

    ``before[name]``, where given, runs before every sample (and warmup call) of ``name``, outside
    the timed region (the device is synchronised after it); the functions named in ``single``
    are timed one call per sample, so their ``before`` runs before every timed call.
    """
    live = dict(fns)
    before = dict(before or {})
    single = set(single)
    last: Dict[str, float] = {}
    for _ in range(max(warmup, 1)):
        for name, fn in list(live.items()):
            try:
                if name in before:
                    before[name]()
                last[name] = time_calls(fn, 1, sync)
            except Exception as exc:  # a provider that cannot run is dropped, not fatal
                if errors is not None:
                    errors[name] = f"{type(exc).__name__}: {first_line(exc)}"
                del live[name]
    inner = {name: 1 if name in single else
             max(1, min(max_inner, math.ceil(min_sample_s / max(last[name], 1e-9))))
             for name in live}
    samples: Dict[str, List[float]] = {name: [] for name in live}
    names = list(live)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(names) if names else 0
            for name in names[k:] + names[:k]:
                if name in before:
                    before[name]()
                samples[name].append(time_calls(live[name], inner[name], sync))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(samples[name], inner[name]) for name in names}


def first_line(exc: BaseException, limit: int = 300) -> str:
    """First line of an exception message, shortened."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# bandwidth reference
# ----------------------------------------------------------------------------------------------

BANDWIDTH_NAME = "bandwidth"


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 size of the GPU or the largest CPU cache size in sysfs (0 if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    best = 0
    for size_file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size_file.read_text().strip()
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[m.group(2)])
    return best


@dataclass
class BandwidthProbe:
    """The bandwidth reference: a memory-bound kernel with a known byte count.

    CPU: in-place ``x.mul_(-1.0)`` (exact, values never drift) of an fp32 buffer: read + write,
    8 bytes per element; a plain copy would undercount (write-allocate reads the target line).
    GPU: device-to-device copy ``dst.copy_(src)``: read + write, 8 bytes per fp32 element.

    A reference, not a ceiling: it measures what one torch elementwise op gets, which on CPU is
    one sequential read + write stream per thread. Kernels that keep more streams in flight
    (fusedopt's CPU kernels walk 2 sub-ranges per thread) can and do exceed it: up to 147% in the
    committed Intel records (torch's fused steps up to 132%); the memory's limit is higher
    (benchmarks/stream_count.cpp measures it with more streams per core).
    """

    fn: Callable[[], Any]
    nbytes: int  # bytes moved per call
    description: str


def bandwidth_probe(device: torch.device, buffer_bytes: Optional[int] = None) -> BandwidthProbe:
    """Make the bandwidth reference for ``device``; default buffer max(256 MiB, 4 x LLC)."""
    if buffer_bytes is None:
        buffer_bytes = max(256 * 2 ** 20, 4 * last_level_cache_bytes(device))
    n = buffer_bytes // 4
    mib = buffer_bytes / 2 ** 20
    if device.type == "cuda":
        src = torch.ones(n, device=device)
        dst = torch.empty_like(src)
        return BandwidthProbe(lambda: dst.copy_(src), 8 * n, f"device-to-device copy, {mib:.0f} MiB")
    x = torch.ones(n, device=device)
    return BandwidthProbe(lambda: x.mul_(-1.0), 8 * n, f"in-place x.mul_(c), {mib:.0f} MiB")


# ----------------------------------------------------------------------------------------------
# providers
# ----------------------------------------------------------------------------------------------


@dataclass
class Provider:
    """One implementation of a step: ``make(params, hyper)`` returns the optimizer over ``params``
    with the hyperparameters ``hyper`` (torch.optim spelling: lr, betas, momentum, ...).

    ``wrap`` turns the optimizer into the timed callable (default: its bound ``step``).
    ``guard``: check against torch for-loop on a small copy before timing it.
    ``note``: called with the built optimizer after its first step; its answer (say, the dtype of
    the optimizer state it keeps) goes into the ``note`` of the provider's records.
    """

    name: str
    make: Callable[[List[torch.Tensor], Dict[str, Any]], Any]
    guard: bool = True
    wrap: Optional[Callable[[Any], Callable[[], Any]]] = None
    note: Optional[Callable[[Any], Optional[str]]] = None

    def step_fn(self, optimizer) -> Callable[[], Any]:
        return self.wrap(optimizer) if self.wrap is not None else optimizer.step


@dataclass
class Skip:
    """A provider that will not be measured, and why."""

    name: str
    reason: str


@dataclass
class AlgoConfig:
    """How to build one algorithm variant (``adam``, ``amsgrad``, ``nesterov``, ...)."""

    torch_cls: str           # class name in torch.optim
    fusedopt_cls: str        # class name in fusedopt.optim
    kwargs: Dict[str, Any]   # hyperparameters, torch.optim spelling, shared by every provider
    state_tensors: int       # per-parameter state tensors (memory estimate)


@dataclass
class BenchSpec:
    """What a benchmark script contributes: its name, algorithm variants, extra providers."""

    benchmark: str
    description: str
    algos: Dict[str, AlgoConfig]
    default_algo: str
    external_providers: Callable[[str, AlgoConfig, torch.device, torch.dtype], List[Any]] = \
        field(default=lambda algo, cfg, device, dtype: [])


def import_fusedopt():
    """Import fusedopt (installed, else the source tree of this checkout); return (module, error)."""
    try:
        import fusedopt  # noqa: F401
        import fusedopt.optim  # noqa: F401
        import fusedopt.backends  # noqa: F401
        return sys.modules["fusedopt"], None
    except Exception as exc:
        first_error = exc
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
        for mod in [m for m in sys.modules if m == "fusedopt" or m.startswith("fusedopt.")]:
            del sys.modules[mod]
        try:
            import fusedopt  # noqa: F401
            import fusedopt.optim  # noqa: F401
            import fusedopt.backends  # noqa: F401
            return sys.modules["fusedopt"], None
        except Exception as exc:
            first_error = exc
    return None, f"{type(first_error).__name__}: {first_line(first_error)}"


#: fusedopt backends worth timing per device type (reference is pure torch: a baseline of ours).
FUSEDOPT_BACKENDS_BY_DEVICE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


def torch_providers(cfg: AlgoConfig, with_compile: bool) -> List[Provider]:
    """torch.optim for-loop, foreach, fused, and (optionally) the torch.compile'd step."""
    cls = getattr(torch.optim, cfg.torch_cls)
    providers = [
        Provider("torch-forloop", lambda ps, kw: cls(ps, foreach=False, **kw), guard=False),
        Provider("torch-foreach", lambda ps, kw: cls(ps, foreach=True, **kw), guard=False),
        Provider("torch-fused", lambda ps, kw: cls(ps, fused=True, **kw), guard=False),
    ]
    if with_compile:
        providers.append(Provider("torch-compile", lambda ps, kw: cls(ps, **kw), guard=False,
                                  wrap=compiled_step))
    return providers


def compiled_step(optimizer) -> Callable[[], Any]:
    """``optimizer.step`` under torch.compile (compiled on its first call, i.e. in warmup).

    Inductor compiles in this process (compile_threads = 1): a pool of compile workers would
    linger and steal CPU time from the measurement.
    """
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1

    @torch.compile(fullgraph=False)
    def step():
        optimizer.step()

    return step


def fusedopt_providers(cfg: AlgoConfig, device: torch.device, dtype: torch.dtype) -> List[Any]:
    """One provider per fusedopt backend usable for ``device``/``dtype``; Skip entries otherwise."""
    fusedopt, error = import_fusedopt()
    candidates = FUSEDOPT_BACKENDS_BY_DEVICE.get(device.type, ())
    if fusedopt is None:
        return [Skip(f"fusedopt-{b}", f"fusedopt not importable: {error}") for b in candidates]
    try:
        cls = getattr(fusedopt.optim, cfg.fusedopt_cls)
        available = fusedopt.backends.available()
    except Exception as exc:
        return [Skip(f"fusedopt-{b}", f"fusedopt not usable: {type(exc).__name__}: {first_line(exc)}")
                for b in candidates]
    out: List[Any] = []
    for backend in candidates:
        name = f"fusedopt-{backend}"
        reason = available.get(backend, "unknown backend")
        if reason is None:
            try:
                fusedopt.backends.select(backend, device, dtype)
            except Exception as exc:
                reason = first_line(exc)
        if reason is not None:
            out.append(Skip(name, reason))
            continue
        out.append(Provider(name, lambda ps, kw, b=backend: cls(ps, backend=b, **kw)))
    return out


def select_providers(providers: Sequence[Any], patterns: Optional[Sequence[str]]) -> List[Any]:
    """Keep providers whose name matches one of the fnmatch ``patterns`` (all if None)."""
    if not patterns:
        return list(providers)
    return [p for p in providers if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]


# ----------------------------------------------------------------------------------------------
# correctness guard
# ----------------------------------------------------------------------------------------------

GUARD_SHAPES = ((3,), (17, 5), (1031,), (64, 65), (4096,))
GUARD_STEPS = 3
#: learning rate of the guard: large enough that a wrong update shows above bf16 rounding
GUARD_LR = 0.05
#: weight decay of the guard where the algorithm has one (AdamW): lr x wd = 0.1, so the decay
#: term of an update is 10% of |p| (params are 0.1..0.3 in magnitude): 20-60% of an Adam update
#: of ~lr, far above 16-bit rounding. The benchmark's own 1e-2 would be lost in bf16 rounding.
GUARD_WEIGHT_DECAY = 2.0
#: start of the guard's answer when the provider raised (a "skipped", not a "rejected" provider)
GUARD_RAISED = "failed on a small copy"
#: Relative tolerance of the update ``p_after - p_before`` per dtype: relative to |update| (plus
#: the rounding of the stored param, one unit in its last place, and a floor of rtol x the mean
#: |update| of the tensor for elements whose terms cancel). The reference (torch for-loop, fp32
#: for 16-bit params) starts every step from the provider's own params; what is left is the
#: rounding of the provider's 16-bit state (m, v rounded to 8 or 11 bits: ~0.3% of an update).
GUARD_DELTA_RTOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 1e-2,
}
#: (rtol, atol) per dtype for the optimizer state after the steps, about 4 units in the last place
#: for low precision (the reference state is not rounded).
GUARD_TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 1e-2),
    torch.float16: (4e-3, 1e-3),
}
GUARD_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")
#: magnitude of the gradients of the guard's extra "tiny" tensor (dtypes with float32's exponent
#: range only): there sqrt(v) is ~1e-7, so Adam's eps (1e-8) is 5-10% of the denominator and a
#: wrong eps changes the update visibly.
GUARD_TINY_GRAD = 2e-7


def guard_reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch for-loop runs in for the guard: fp32 for bf16/fp16 storage.

    fusedopt computes low-precision steps in fp32 (ARCHITECTURE.md, "Numbers"); torch for-loop in
    fp16 rounds every intermediate and, with eps=1e-8 underflowing to 0, divides by zero.
    """
    return torch.float32 if element_size(dtype) < 4 else dtype


def guard_dtypes(dtype: torch.dtype) -> List[torch.dtype]:
    """The dtypes the guard checks a provider in: the benchmark's, and always fp32 too (a wrong
    eps, for one, only shows where gradients can be tiny: not in fp16)."""
    return [dtype] if dtype == torch.float32 else [dtype, torch.float32]


def _guard_values(shape, gen: torch.Generator, low: float, high: float) -> torch.Tensor:
    """Random signs times magnitudes uniform in [low, high): never near zero."""
    return torch.randn(shape, generator=gen).sign() * (low + (high - low) * torch.rand(shape, generator=gen))


def guard_tensors(device: torch.device, dtype: torch.dtype) -> List[torch.Tensor]:
    """Small params of magnitude 0.1..0.3 (so that a step of ~lr is large against their rounding)
    with gradients of magnitude 0.5..1.5 (second moments stay normal numbers even in fp16), plus,
    where the dtype has float32's exponent range, a tensor with gradients of ~GUARD_TINY_GRAD."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    shapes = list(GUARD_SHAPES) + ([(257,)] if torch.finfo(dtype).tiny < 1e-30 else [])
    params = []
    for shape in shapes:
        p = _guard_values(shape, gen, 0.1, 0.3).to(device=device, dtype=dtype)
        p.grad = torch.zeros(shape, device=device, dtype=dtype)
        params.append(p)
    return params


def guard_grads(params: Sequence[torch.Tensor], step: int) -> List[torch.Tensor]:
    """Gradients of guard step ``step`` (fp32, CPU): different at every step, so that wrong betas
    show in the update and not only in the state; the last tensor's are tiny where it exists."""
    gen = torch.Generator(device="cpu").manual_seed(100 + step)
    out = []
    for i, p in enumerate(params):
        g = _guard_values(tuple(p.shape), gen, 0.5, 1.5)
        if i >= len(GUARD_SHAPES):
            g = g * GUARD_TINY_GRAD
        out.append(g)
    return out


def guard_hyper(cfg: AlgoConfig) -> Dict[str, Any]:
    """The guard's hyperparameters: the benchmark's, with GUARD_LR and (where the algorithm has a
    weight decay) GUARD_WEIGHT_DECAY, so that both matter against 16-bit rounding."""
    hyper = dict(cfg.kwargs, lr=GUARD_LR)
    if hyper.get("weight_decay"):
        hyper["weight_decay"] = GUARD_WEIGHT_DECAY
    return hyper


def update_mismatch(before: torch.Tensor, want_after: torch.Tensor, got_after: torch.Tensor,
                    storage: torch.dtype, rtol: float) -> Optional[Tuple[int, float, float]]:
    """Compare the update ``got_after - before`` of a provider with the reference's
    ``want_after - before``; None if every element is within ``rtol`` of |reference update|
    (plus one unit in the last place of the stored param, plus rtol x the mean |update|), else
    (flat index, wanted update, got update) of the worst element."""
    before, want, got = before.double(), want_after.double() - before.double(), got_after.double() - before.double()
    ulp = torch.finfo(storage).eps * torch.maximum(before.abs(), got_after.double().abs())
    allowed = rtol * (want.abs() + want.abs().mean()) + ulp
    err = (got - want).abs().nan_to_num(float("inf"))
    excess = err - allowed
    if bool((excess <= 0).all()):
        return None
    i = int(excess.flatten().argmax())
    return i, float(want.flatten()[i]), float(got.flatten()[i])


def _guard_one(provider: Provider, cfg: AlgoConfig, device: torch.device,
               dtype: torch.dtype) -> Optional[str]:
    test_params = guard_tensors(device, dtype)
    ref_dtype = guard_reference_dtype(dtype)
    ref_params = []
    for p in test_params:
        r = p.detach().clone().to(ref_dtype)
        r.grad = torch.zeros_like(r)
        ref_params.append(r)
    hyper = guard_hyper(cfg)
    rtol = GUARD_DELTA_RTOL[dtype]
    try:
        ref_opt = getattr(torch.optim, cfg.torch_cls)(ref_params, foreach=False, **hyper)
        opt = provider.make(test_params, hyper)
        step = provider.step_fn(opt)
    except Exception as exc:
        return f"{GUARD_RAISED}: {type(exc).__name__}: {first_line(exc)}"
    for k in range(GUARD_STEPS):
        grads = guard_grads(test_params, k)
        with torch.no_grad():
            for p, r, g in zip(test_params, ref_params, grads):
                p.grad.copy_(g)   # rounded to the storage dtype; the reference gets the same values
                r.grad.copy_(p.grad)
                r.copy_(p)        # the same inputs: the reference steps from the provider's params
        before = [p.detach().clone() for p in test_params]
        try:
            ref_opt.step()
            step()
        except Exception as exc:
            return f"{GUARD_RAISED}: {type(exc).__name__}: {first_line(exc)}"
        for i, (b, r, p) in enumerate(zip(before, ref_params, test_params)):
            bad = update_mismatch(b, r.detach(), p.detach(), dtype, rtol)
            if bad is not None:
                j, want, got = bad
                return (f"differs from torch for-loop ({dtype_name(ref_dtype)}) on {dtype_name(dtype)} params: "
                        f"step {k + 1}, tensor {i} {tuple(p.shape)}, element {j}: update {got:.6g}, "
                        f"want {want:.6g} (rtol {rtol} of |update|; hyperparameters {hyper})")
    s_rtol, s_atol = GUARD_TOLERANCE[dtype]
    for i, (p_ref, p) in enumerate(zip(ref_params, test_params)):
        pairs = [(key, ref_opt.state[p_ref][key], opt.state[p][key]) for key in GUARD_STATE_KEYS
                 if key in ref_opt.state[p_ref] and key in getattr(opt, "state", {}).get(p, {})]
        for what, want, got in pairs:
            want, got = want.double(), got.double()
            if not torch.isfinite(got).all() or not torch.allclose(got, want, rtol=s_rtol, atol=s_atol):
                diff = (got - want).abs().nan_to_num(float("inf")).max().item()
                return (f"differs from torch for-loop ({dtype_name(ref_dtype)}) on {dtype_name(dtype)} params "
                        f"after {GUARD_STEPS} steps: {what} of tensor {i} {tuple(p.shape)}, max |diff| "
                        f"{diff:.3g} (rtol {s_rtol}, atol {s_atol})")
    return None


def guard_check(provider: Provider, cfg: AlgoConfig, device: torch.device,
                dtype: torch.dtype) -> Optional[str]:
    """Run ``provider`` and torch for-loop (fp32 for bf16/fp16) for a few steps on a small copy,
    in ``dtype`` and in fp32 (:func:`guard_dtypes`); None if they agree, else why not.

    At every step both start from the provider's params and the same fresh gradients, and the
    provider's update ``p_after - p_before`` must match torch's within a tolerance relative to
    the update (:data:`GUARD_DELTA_RTOL`), not to |p|: with lr 0.05 and weight decay 2.0, a
    dropped weight decay, L2 instead of decoupled decay, a wrong lr, betas or (in fp32) eps all
    show. The optimizer state is compared after the last step."""
    for d in guard_dtypes(dtype):
        reason = _guard_one(provider, cfg, device, d)
        if reason is not None:
            return reason
    return None


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available")
    return device


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git_commit() -> Optional[str]:
    """Short commit of this checkout, with '+dirty' when the code measured (fusedopt/, csrc/,
    benchmarks/ except the result files, which every run appends to) has uncommitted changes."""
    paths = ["fusedopt", "csrc", "benchmarks", ":(exclude)benchmarks/results"]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def fusedopt_build_info() -> Optional[Dict[str, Any]]:
    """fusedopt version and path, ``fusedopt._C.build_info()`` and ``cpu_isa()`` (None without fusedopt)."""
    fusedopt, _ = import_fusedopt()
    if fusedopt is None:
        return None
    info: Dict[str, Any] = {"version": getattr(fusedopt, "__version__", None),
                            "path": str(Path(fusedopt.__file__).parent)}
    try:
        from fusedopt import _C  # type: ignore
    except Exception as exc:
        info["extension"] = f"not importable: {type(exc).__name__}: {first_line(exc)}"
        return info
    try:
        info.update(dict(_C.build_info()))
    except Exception:
        pass
    try:
        info["cpu_isa"] = str(_C.cpu_isa())
    except Exception:
        pass
    return json.loads(json.dumps(info, default=str))


def load_average() -> Optional[float]:
    """1-minute load average (a busy shared machine shows here), None where unknown."""
    try:
        return float(os.getloadavg()[0])
    except (OSError, AttributeError):
        return None


PRESSURE_FILE = Path("/proc/pressure/cpu")


def cpu_pressure(path: Path = PRESSURE_FILE) -> Optional[float]:
    """``some avg10`` of Linux's CPU pressure stall information: the percentage of the last 10 s
    in which at least one runnable task waited for a CPU (other work competing with the
    benchmark shows here, also where the load average misses it). None where the file does not
    exist (not Linux, PSI disabled) or cannot be parsed."""
    try:
        for line in Path(path).read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == "some":
                for item in fields[1:]:
                    key, _, value = item.partition("=")
                    if key == "avg10":
                        return float(value)
    except (OSError, ValueError):
        return None
    return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Fields of every record that describe the machine and software."""
    try:
        import triton  # type: ignore
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda,
        "fusedopt_build": fusedopt_build_info(),
        "git_commit": git_commit(),
        "hostname": platform.node(),
    }


# ----------------------------------------------------------------------------------------------
# result schema
# ----------------------------------------------------------------------------------------------

#: The one record schema of every benchmark (JSON lines), field -> allowed types.
#: status "ok" records carry numbers; "skipped" (not runnable here) and "rejected" (failed the
#: correctness guard) records carry a note and None numbers.
RECORD_FIELDS: Dict[str, Tuple[type, ...]] = {
    "benchmark": (str,), "workload": (str,), "provider": (str,), "algo": (str,), "dtype": (str,),
    "numel": (int,), "tensors": (int,), "status": (str,),
    "ms_median": (float, type(None)), "ms_min": (float, type(None)),
    "gbps": (float, type(None)), "gbps_median": (float, type(None)),
    "frac_bw": (float, type(None)),
    "speedup_vs_torch_fused": (float, type(None)), "speedup_vs_torch_fused_median": (float, type(None)),
    "bandwidth_gbps": (float, type(None)), "bandwidth_ref": (str,),
    "bytes_per_step": (int,), "repeats": (int,), "warmup": (int,), "inner": (int, type(None)),
    "quick": (bool,), "note": (str, type(None)), "load_avg": (float, type(None)),
    "device": (str,), "device_type": (str,), "num_threads": (int,),
    "torch_version": (str,), "triton_version": (str, type(None)), "cuda_version": (str, type(None)),
    "fusedopt_build": (dict, type(None)), "git_commit": (str, type(None)), "hostname": (str,),
    "date": (str,), "run_id": (str,),
}


#: Fields added to the schema later: the benchmarks write them, older records lack them.
#: ``cpu_pressure``: :func:`cpu_pressure` read right after the group's timing (None: no PSI).
OPTIONAL_RECORD_FIELDS: Dict[str, Tuple[type, ...]] = {
    "cpu_pressure": (float, type(None)),
}


def check_record(record: Mapping[str, Any]) -> None:
    """Raise ValueError unless ``record`` has the schema's fields (:data:`RECORD_FIELDS`, and any
    of :data:`OPTIONAL_RECORD_FIELDS`), nothing else, with allowed types."""
    missing = set(RECORD_FIELDS) - set(record)
    extra = set(record) - set(RECORD_FIELDS) - set(OPTIONAL_RECORD_FIELDS)
    if missing or extra:
        raise ValueError(f"record fields: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for key, types in {**RECORD_FIELDS, **OPTIONAL_RECORD_FIELDS}.items():
        if key not in record:
            continue
        value = record[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"record field {key}={value!r} is not {types}")


def write_records(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Validate and append ``records`` as JSON lines to ``path`` (parents created); count written."""
    records = list(records)
    for record in records:
        check_record(record)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=False) + "\n")
    return len(records)


def read_records(paths: Iterable[Path]) -> List[Dict[str, Any]]:
    """All records of the JSON-lines ``paths`` (blank lines ignored)."""
    out = []
    for path in paths:
        with Path(path).open() as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def default_results_path(benchmark: str, device: torch.device, quick: bool = False,
                         date: Optional[str] = None) -> Path:
    """``benchmarks/results/<benchmark>-<device-slug>-<date>.jsonl`` (quick runs: results/quick/)."""
    date = date or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    folder = RESULTS_DIR / "quick" if quick else RESULTS_DIR
    return folder / f"{benchmark}-{slug(device_name(device))}-{date}.jsonl"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# one timing group -> records
# ----------------------------------------------------------------------------------------------


@dataclass
class RunContext:
    """What is constant across the timing groups of one invocation."""

    spec: BenchSpec
    device: torch.device
    repeats: int
    warmup: int
    provider_patterns: Optional[List[str]]
    with_compile: bool
    quick: bool
    bw_bytes: Optional[int]
    sample_s: float
    env: Dict[str, Any]
    run_id: str
    guard_cache: Dict[Tuple[str, str, str], Optional[str]] = field(default_factory=dict)
    printed_skips: set = field(default_factory=set)
    mesh: Any = None  # --dtensor: the one-rank device mesh of the params


def all_providers(ctx: RunContext, algo: str, dtype: torch.dtype) -> List[Any]:
    """Every provider (and Skip) for ``algo``/``dtype`` on the run's device."""
    cfg = ctx.spec.algos[algo]
    providers = torch_providers(cfg, ctx.with_compile)
    providers += fusedopt_providers(cfg, ctx.device, dtype)
    external = ctx.spec.external_providers(algo, cfg, ctx.device, dtype)
    if ctx.mesh is not None:  # their kernels read raw memory (DeepSpeedCPUAdam segfaults on one)
        external = [c if isinstance(c, Skip) else Skip(c.name, "takes no DTensor params")
                    for c in external]
    return providers + external


def candidate_providers(ctx: RunContext, algo: str, dtype: torch.dtype) -> List[Any]:
    """Providers (and Skips) for ``algo``/``dtype`` on the run's device, filtered by --providers."""
    return select_providers(all_providers(ctx, algo, dtype), ctx.provider_patterns)


def unmatched_patterns(ctx: RunContext, algo: str, dtype: torch.dtype) -> List[str]:
    """--providers patterns that name no provider of this device (typos, other devices)."""
    names = [p.name for p in all_providers(ctx, algo, dtype)]
    return [pat for pat in ctx.provider_patterns or ()
            if not any(fnmatch.fnmatchcase(n, pat) for n in names)]


def memory_needed(workload: Workload, cfg: AlgoConfig, dtype: torch.dtype, n_providers: int) -> int:
    """Bytes the group will allocate: params + grads + the grads' master copy + one more copy for
    a provider that writes into its grads, each provider's state, temporaries."""
    esize = element_size(dtype)
    largest = max(math.prod(s) for s in workload.shapes)
    return esize * (workload.numel * (4 + cfg.state_tensors * n_providers) + 4 * largest)


def memory_available(device: torch.device) -> Optional[int]:
    """Free bytes on ``device`` (MemAvailable on CPU), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def base_record(ctx: RunContext, workload: Workload, algo: str, dtype: torch.dtype) -> Dict[str, Any]:
    """Fields shared by all records of one timing group (numbers left None)."""
    rec: Dict[str, Any] = {
        "benchmark": ctx.spec.benchmark, "provider": "", "algo": algo,
        "workload": workload.name + ("-dtensor" if ctx.mesh is not None else ""),
        "dtype": dtype_name(dtype), "numel": workload.numel, "tensors": workload.tensors,
        "status": "ok", "ms_median": None, "ms_min": None, "gbps": None, "gbps_median": None,
        "frac_bw": None, "speedup_vs_torch_fused": None, "speedup_vs_torch_fused_median": None,
        "bandwidth_gbps": None, "bandwidth_ref": "",
        "bytes_per_step": bytes_per_step(algo, workload.numel, dtype),
        "repeats": ctx.repeats, "warmup": ctx.warmup, "inner": None, "quick": ctx.quick, "note": None,
        "load_avg": load_average(), "cpu_pressure": None,
    }
    rec.update(ctx.env)
    rec["date"] = now_iso()
    rec["run_id"] = ctx.run_id
    return rec


def skip_record(base: Mapping[str, Any], name: str, status: str, note: str) -> Dict[str, Any]:
    rec = dict(base)
    rec.update(provider=name, status=status, note=note)
    return rec


def screen_providers(ctx: RunContext, algo: str, dtype: torch.dtype,
                     base: Mapping[str, Any]) -> Tuple[List[Provider], List[Dict[str, Any]]]:
    """Providers to time, plus records of those that will not be: not runnable here ("skipped")
    or failing the correctness guard ("rejected"). Guard results are cached per (provider,
    algo, dtype) for the whole run."""
    cfg = ctx.spec.algos[algo]
    providers: List[Provider] = []
    records: List[Dict[str, Any]] = []
    for c in candidate_providers(ctx, algo, dtype):
        if isinstance(c, Skip):
            records.append(skip_record(base, c.name, "skipped", c.reason))
            continue
        if c.guard:
            key = (c.name, algo, dtype_name(dtype))
            if key not in ctx.guard_cache:
                ctx.guard_cache[key] = guard_check(c, cfg, ctx.device, dtype)
            reason = ctx.guard_cache[key]
            if reason is not None:
                status = "skipped" if reason.startswith(GUARD_RAISED) else "rejected"
                records.append(skip_record(base, c.name, status, reason))
                continue
        providers.append(c)
    return providers, records


@dataclass
class GroupTiming:
    """What :func:`time_providers` measured for one group."""

    timings: Dict[str, Timing]           # per provider, and the bandwidth reference
    probe: BandwidthProbe
    errors: Dict[str, str]               # provider -> why it could not be built or run
    notes: Dict[str, str]                # provider -> note for its record (state dtype, own grads)
    failure: Optional[str]               # why the group's numbers cannot be trusted, if they cannot
    cpu_pressure: Optional[float]        # PSI "some avg10" right after the timing


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical tensors (NaN payloads and signed zeros included)."""
    a, b = local_tensor(a), local_tensor(b)
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def bind_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def join_notes(*notes: Optional[str]) -> Optional[str]:
    text = "; ".join(n for n in notes if n)
    return text or None


OWN_GRADS_NOTE = ("its step writes into p.grad: timed on its own copy of the gradients, restored "
                  "from the master copy before each timed call (outside the timed region; samples of "
                  "one call)")


def time_providers(ctx: RunContext, workload: Workload, cfg: AlgoConfig, dtype: torch.dtype,
                   providers: Sequence[Provider]) -> GroupTiming:
    """Build every provider's optimizer over one shared set of params and time their steps
    interleaved with the bandwidth reference.

    Every provider steps on the same pristine gradients at every timed call. A master copy of
    the gradients is kept; each provider takes one untimed step first, and one whose step changed
    the gradients (torch's foreach SGD with Nesterov adds ``momentum * buf`` into them) has them
    restored and is timed on its own copy, restored from the master before each of its timed
    calls, outside the timed region. After timing, the shared gradients must still be
    bit-identical to the master and every param finite; otherwise ``failure`` says why."""
    params = make_tensors(workload, ctx.device, dtype, mesh=ctx.mesh)
    shared = [p.grad for p in params]
    master = [g.detach().clone() for g in shared]
    sync = synchronizer(ctx.device)
    errors: Dict[str, str] = {}
    notes: Dict[str, str] = {}
    fns: Dict[str, Callable[[], Any]] = {}
    opts: Dict[str, Any] = {}

    def step_error(name: str, exc: BaseException) -> str:
        return (("torch.compile failed: " if name == "torch-compile" else "step failed: ")
                + f"{type(exc).__name__}: {first_line(exc)}")

    for p in providers:
        try:
            opts[p.name] = p.make(params, cfg.kwargs)
            fns[p.name] = p.step_fn(opts[p.name])
        except Exception as exc:
            errors[p.name] = f"construction failed: {type(exc).__name__}: {first_line(exc)}"
    mutators: List[str] = []
    for p in providers:  # one untimed step each: state allocated, grad writers found
        if p.name not in fns:
            continue
        try:
            fns[p.name]()
            sync()
        except Exception as exc:
            errors[p.name] = step_error(p.name, exc)
            del fns[p.name]
            continue
        if not all(bits_equal(g, m) for g, m in zip(shared, master)):
            mutators.append(p.name)
            notes[p.name] = OWN_GRADS_NOTE
            with torch.no_grad():
                for g, m in zip(shared, master):
                    g.copy_(m)
        if p.note is not None:
            try:
                notes[p.name] = join_notes(p.note(opts[p.name]), notes.get(p.name)) or ""
            except Exception as exc:
                notes[p.name] = join_notes(f"note failed: {type(exc).__name__}", notes.get(p.name)) or ""
    before: Dict[str, Callable[[], Any]] = {}
    if mutators:
        for name in fns:
            before[name] = lambda: bind_grads(params, shared)
        for name in mutators:
            own = [m.clone() for m in master]

            def restore(own=own):
                with torch.no_grad():
                    for g, m in zip(own, master):
                        g.copy_(m)
                bind_grads(params, own)
            before[name] = restore
    probe = bandwidth_probe(ctx.device, ctx.bw_bytes)
    fns[BANDWIDTH_NAME] = probe.fn
    step_errors: Dict[str, str] = {}
    timings = interleaved_times(fns, repeats=ctx.repeats, warmup=ctx.warmup, min_sample_s=ctx.sample_s,
                                sync=sync, errors=step_errors, before=before, single=mutators)
    pressure = cpu_pressure()
    for name, err in step_errors.items():
        errors[name] = ("torch.compile failed: " if name == "torch-compile" else "step failed: ") + err
    bind_grads(params, shared)
    changed = [i for i, (g, m) in enumerate(zip(shared, master)) if not bits_equal(g, m)]
    nonfinite = [i for i, p in enumerate(params) if not bool(torch.isfinite(local_tensor(p.detach())).all())]
    failure = None
    if changed or nonfinite:
        failure = ("group failed: after timing, " + ", ".join(
            ([f"the shared gradients of {len(changed)} of {len(params)} tensors differ from their master copy "
              "(a provider wrote into p.grad after its first step)"] if changed else []) +
            ([f"{len(nonfinite)} of {len(params)} params are not finite"] if nonfinite else []))
            + "; no number of this group is kept")
    del fns, opts, params, shared, master, before, probe.fn  # free the optimizers' state
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return GroupTiming(timings, probe, errors, notes, failure, pressure)


def measured_record(base: Mapping[str, Any], name: str, t: Timing,
                    fused: Optional[Timing]) -> Dict[str, Any]:
    """The record of one timed provider: times, GB/s from the byte model, fraction of the
    bandwidth reference and speedup vs torch-fused (both from the same run)."""
    rec = dict(base)
    rec.update(provider=name, ms_median=t.median * 1e3, ms_min=t.min * 1e3, inner=t.inner,
               gbps=gbps(base["bytes_per_step"], t.min),
               gbps_median=gbps(base["bytes_per_step"], t.median))
    if base["bandwidth_gbps"]:
        rec["frac_bw"] = rec["gbps"] / base["bandwidth_gbps"]
    if fused is not None:
        rec["speedup_vs_torch_fused"] = fused.min / t.min
        rec["speedup_vs_torch_fused_median"] = fused.median / t.median
    return rec


def run_group(ctx: RunContext, workload: Workload, algo: str, dtype: torch.dtype) -> List[Dict[str, Any]]:
    """Screen, build and time every provider on one workload; one record per provider
    (status ok, skipped or rejected), in provider order."""
    cfg = ctx.spec.algos[algo]
    base = base_record(ctx, workload, algo, dtype)
    providers, records = screen_providers(ctx, algo, dtype, base)

    need = memory_needed(workload, cfg, dtype, len(providers)) + (ctx.bw_bytes or 256 * 2 ** 20)
    free = memory_available(ctx.device)
    if free is not None and need > 0.8 * free:
        note = (f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; "
                "run fewer --providers or a smaller --dtype")
        return records + [skip_record(base, p.name, "skipped", note) for p in providers]

    group = time_providers(ctx, workload, cfg, dtype, providers)
    timings = group.timings
    records += [skip_record(base, name, "skipped", err) for name, err in group.errors.items()]
    bw = timings.pop(BANDWIDTH_NAME, None)
    base["bandwidth_gbps"] = gbps(group.probe.nbytes, bw.min) if bw else None
    base["bandwidth_ref"] = group.probe.description
    base["cpu_pressure"] = group.cpu_pressure
    for rec in records:
        rec["bandwidth_gbps"], rec["bandwidth_ref"] = base["bandwidth_gbps"], base["bandwidth_ref"]
        rec["cpu_pressure"] = base["cpu_pressure"]
    if group.failure is not None:
        print(f"ERROR: {ctx.spec.benchmark}/{algo} {workload.describe()} {dtype_name(dtype)}: {group.failure}",
              file=sys.stderr, flush=True)
        records += [skip_record(base, p.name, "rejected", group.failure) for p in providers if p.name in timings]
    else:
        stall = stall_note(timings)
        fused = timings.get("torch-fused")
        for p in providers:
            if p.name in timings:
                rec = measured_record(base, p.name, timings[p.name], fused)
                rec["note"] = join_notes(group.notes.get(p.name), stall)
                records.append(rec)
    order = {p.name: i for i, p in enumerate(providers)}
    records.sort(key=lambda r: (r["status"] != "ok", order.get(r["provider"], len(order))))
    return records


#: torch-fused slower than torch-forloop by more than this (min times, same group): a stall
STALL_RATIO = 2.0
STALL_PREFIX = "stall suspected"


def stall_note(timings: Mapping[str, Timing]) -> Optional[str]:
    """A note for every record of a group where torch-fused took more than STALL_RATIO x the time
    of torch-forloop: the fused step does the same work in one pass and should not be that much
    slower, so the machine most likely stalled it (another process, a frequency drop) and the
    group's numbers are suspect."""
    fused, forloop = timings.get("torch-fused"), timings.get("torch-forloop")
    if fused is None or forloop is None or not fused.min > STALL_RATIO * forloop.min:
        return None
    return (f"{STALL_PREFIX}: torch-fused {fused.min / forloop.min:.1f}x slower than torch-forloop "
            "in this group (min times): re-run before trusting its numbers")


# ----------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------


def group_header(workload: Workload, records: Sequence[Mapping[str, Any]]) -> str:
    """Title lines of one group's table."""
    r = records[0]
    dtensor = " | DTensor params (1-rank mesh)" if r["workload"].endswith("-dtensor") else ""
    lines = [f"== {r['benchmark']}/{r['algo']} | {workload.describe()}{dtensor} | {r['dtype']} | "
             f"{r['device']} ({r['device_type']}, {r['num_threads']} threads) =="]
    if r["bandwidth_gbps"]:
        lines.append(f"bandwidth reference ({r['bandwidth_ref']}): {r['bandwidth_gbps']:.1f} GB/s | "
                     f"byte model: {r['bytes_per_step'] / max(r['numel'], 1):.0f} B/param/step")
    return "\n".join(lines)


#: median / min above which a row is flagged as noisy in the table
NOISY_SPREAD = 1.5


def format_table(workload: Workload, records: Sequence[Mapping[str, Any]]) -> str:
    """A readable table of one group; skipped/rejected providers listed under it with the reason."""
    if not records:
        return ""
    lines = [group_header(workload, records),
             f"{'provider':<20}{'ms min':>10}{'ms median':>12}{'GB/s':>9}{'% BW':>7}"
             f"{'vs fused (min)':>16}{'(median)':>10}"]
    noisy = False
    for r in records:
        if r["status"] != "ok":
            continue
        sp = r["speedup_vs_torch_fused"]
        spm = r["speedup_vs_torch_fused_median"]
        frac = r["frac_bw"]
        flag = "*" if r["ms_median"] > NOISY_SPREAD * r["ms_min"] else " "
        noisy = noisy or flag == "*"
        lines.append(f"{r['provider']:<20}{r['ms_min']:>10.3f}{r['ms_median']:>11.3f}{flag}{r['gbps']:>9.1f}"
                     f"{(f'{100 * frac:.0f}%' if frac is not None else '-'):>7}"
                     f"{(f'{sp:.2f}x' if sp is not None else '-'):>16}"
                     f"{(f'{spm:.2f}x' if spm is not None else '-'):>10}")
    if noisy:
        lines.append(f"  * median > {NOISY_SPREAD}x min: the machine was busy; trust the min and "
                     "ratios of mins, re-run to confirm")
    pressure = records[0].get("cpu_pressure")
    if pressure is not None:
        lines.append(f"  CPU pressure (PSI some avg10) after timing: {pressure:.1f}%")
    stall = None
    for r in records:
        if r["status"] != "ok" or not r.get("note"):
            continue
        own = [n for n in r["note"].split("; ") if not n.startswith(STALL_PREFIX)]
        stall = stall or next((n for n in r["note"].split("; ") if n.startswith(STALL_PREFIX)), None)
        if own:
            lines.append(f"  note: {r['provider']}: {'; '.join(own)}")
    if stall:
        lines.append(f"  ! {stall}")
    for r in records:
        if r["status"] != "ok":
            lines.append(f"  {r['status']}: {r['provider']}: {r['note']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def comma_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(spec: BenchSpec) -> argparse.ArgumentParser:
    """The command line every benchmark script shares."""
    p = argparse.ArgumentParser(
        description=spec.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Times the whole optimizer.step() (grads populated once), providers interleaved with "
               "a bandwidth reference; min and median over --repeats samples. GB/s = byte model / "
               "min time; %%BW = GB/s / bandwidth reference of the same run; 'vs fused' = time of "
               "torch-fused / time of the provider (>1 is faster than torch fused).")
    p.add_argument("--workloads", default=None,
                   help=f"comma list of {', '.join(WORKLOAD_NAMES)} "
                        f"[default: {','.join(DEFAULT_WORKLOADS)}; --quick: {','.join(QUICK_WORKLOADS)}]")
    p.add_argument("--providers", default=None,
                   help="comma list of provider names or globs, e.g. 'torch-fused,fusedopt-*' "
                        "[default: all available except torch-compile]")
    p.add_argument("--compile", action="store_true",
                   help="add the torch.compile'd step as provider torch-compile (slow to compile)")
    p.add_argument("--algo", default=spec.default_algo,
                   help=f"comma list of {', '.join(spec.algos)}")
    p.add_argument("--dtype", default="fp32", help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--device", default="auto", help="auto (GPU if there is one), cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per provider [15; --quick: 3]")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per provider first (>= 1) [2; --quick: 1]")
    p.add_argument("--sweep", default=None,
                   help="log2 range of the size sweep, LO:HI [10:26 on GPU, 10:24 on CPU; --quick: 10:14]")
    p.add_argument("--bw-mib", type=int, default=None,
                   help="bandwidth reference buffer in MiB [max(256, 4 x last-level cache); --quick: 64]")
    p.add_argument("--sample-ms", type=float, default=None,
                   help="fast steps are timed in back-to-back batches of at least this long "
                        "[1 on CPU (short samples let the min dodge a busy machine), 5 on GPU "
                        "(amortises the synchronisation)]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--dtensor", action="store_true",
                   help="params and grads as DTensors sharded over a one-rank device mesh (FSDP2's "
                   "layout): what each provider's step costs on them (workload names get -dtensor)")
    p.add_argument("--out", default=None,
                   help="JSON-lines file to append to [benchmarks/results/<benchmark>-<device>-<date>.jsonl;"
                        " --quick: benchmarks/results/quick/...]; 'none' to write nothing")
    p.add_argument("--plot", default=None, help="also draw this run's results to this PNG")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny workloads, 3 repeats, 1 warmup; numbers are not meaningful")
    return p


def parse_sweep(text: str) -> Tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 0 <= lo_i <= hi_i <= 34:
        raise SystemExit(f"--sweep {text}: want LO:HI with 0 <= LO <= HI <= 34")
    return lo_i, hi_i


def resolve_args(spec: BenchSpec, args: argparse.Namespace) -> argparse.Namespace:
    """Fill defaults that depend on --quick and the device; validate names."""
    args.device = resolve_device(args.device)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    args.workloads = comma_list(args.workloads) if args.workloads else list(
        QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
    for w in args.workloads:
        if w not in WORKLOAD_NAMES:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOAD_NAMES)}")
    default_sweep = "10:14" if args.quick else ("10:26" if args.device.type == "cuda" else "10:24")
    args.sweep = parse_sweep(args.sweep or default_sweep)
    args.algo = comma_list(args.algo)
    for a in args.algo:
        if a not in spec.algos:
            raise SystemExit(f"unknown --algo {a!r}; choose from {', '.join(spec.algos)}")
    args.dtype = comma_list(args.dtype)
    for d in args.dtype:
        if d not in DTYPES:
            raise SystemExit(f"unknown --dtype {d!r}; choose from {', '.join(DTYPES)}")
    args.providers = comma_list(args.providers) if args.providers else None
    if args.providers and "torch-compile" in args.providers:  # named exactly, not via a glob
        args.compile = True
    if args.sample_ms is None:
        args.sample_ms = 5.0 if args.device.type == "cuda" else 1.0
    if args.bw_mib is None and args.quick:
        args.bw_mib = 64
    if args.out is None:
        args.out = default_results_path(spec.benchmark, args.device, args.quick)
    elif args.out.lower() == "none":
        args.out = None
    else:
        args.out = Path(args.out)
    return args


def main(spec: BenchSpec, argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Run the benchmark described by ``spec`` with the command line ``argv``; return its records.

    ``FUSEDOPT_BACKEND`` is unset while it runs (each fusedopt provider names its backend) and
    restored afterwards.
    """
    args = resolve_args(spec, build_parser(spec).parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    saved_backend = os.environ.pop("FUSEDOPT_BACKEND", None)
    if saved_backend:
        print("note: FUSEDOPT_BACKEND is ignored here: every fusedopt provider names its backend")
    try:
        return run(spec, args)
    finally:
        if saved_backend is not None:
            os.environ["FUSEDOPT_BACKEND"] = saved_backend


def run(spec: BenchSpec, args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Every (algo, dtype, workload) group of the resolved command line: tables, file, plot."""
    ctx = RunContext(spec=spec, device=args.device, repeats=args.repeats, warmup=args.warmup,
                     provider_patterns=args.providers, with_compile=args.compile, quick=args.quick,
                     bw_bytes=args.bw_mib * 2 ** 20 if args.bw_mib else None,
                     sample_s=args.sample_ms / 1e3,
                     env=environment(args.device), run_id=now_iso(),
                     mesh=one_rank_mesh(args.device) if args.dtensor else None)
    if args.quick:
        print("note: --quick is a smoke test; its numbers are not meaningful")
    load, cores = load_average(), os.cpu_count() or 1
    if load is not None and load > 0.5:
        print(f"note: load average {load:.1f} on {cores} cores before starting; other work on this "
              "machine makes timings noisy (compare ratios within a run only)")
    for pat in unmatched_patterns(ctx, args.algo[0], DTYPES[args.dtype[0]]):
        print(f"note: --providers {pat!r} matches no provider on {ctx.device.type}")
    started = time.perf_counter()
    all_records: List[Dict[str, Any]] = []
    for algo in args.algo:
        for dname in args.dtype:
            for wname in args.workloads:
                for workload in make_workloads(wname, args.sweep):
                    records = run_group(ctx, workload, algo, DTYPES[dname])
                    print(format_table(workload, records), flush=True)
                    print(flush=True)
                    if args.out is not None:
                        write_records(args.out, records)
                    all_records += records
    print(f"done in {time.perf_counter() - started:.0f} s")
    if args.out is not None:
        print(f"results appended to {args.out}")
    if args.plot:
        if str(BENCH_DIR) not in sys.path:
            sys.path.insert(0, str(BENCH_DIR))
        import plot  # benchmarks/plot.py
        for path in plot.plot_records(all_records, Path(args.plot)):
            print(f"plot written to {path}")
    return all_records
