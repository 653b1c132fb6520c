"""The launch configuration of the optimizer kernels, timed on the device (autotuning).

Which (block, tiles, warps) row is fastest depends on the GPU, so on CUDA the backend does not
trust a fixed table: the first time it builds tables for a kernel variant (``adam``, ``amsgrad``,
``sgd``, ``sgd-momentum``) and a dtype on a device model, it times the candidates of
:data:`.config.CANDIDATES` and keeps the fastest. How:

* on scratch tensors of its own (:func:`workload_sizes`: about ``WORKLOAD_BYTES`` per list, in
  a few large tensors and many 4096-element ones, so both bandwidth and per-program overheads
  count), never on the caller's: those are stepped exactly once, by the configuration in use.
  The scratch tensors draw from a generator of their own, not from torch's global RNG;
* every candidate runs once first (that compiles it, on the host), then ``ROUNDS`` rounds time
  each candidate over ``INNER`` launches between two CUDA events, in an order rotated every
  round; a candidate's time is its best round. The default row is kept unless another is more
  than ``MARGIN`` faster, so noise does not move the choice. The per-element math does not
  depend on the launch shape, so every choice gives the same numbers (a test checks each
  candidate against the default, bit for bit);
* **without waiting for the device**: the timed launches and their events are enqueued on the
  current stream and the step goes on with tables built on the default row. Later steps ask
  the last event whether it has run (``Event.query``, no synchronisation); once it has, the
  choice is read and the tables are rebuilt with it (:class:`.tables.PlanCache`), usually at
  the second step. So a step never synchronises with the host, even the first one, and
  ``torch.cuda.set_sync_debug_mode("error")`` holds throughout;
* the choice is kept for the process and on disk, in ``triton_tuning.json`` under
  ``$FUSEDOPT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fusedopt``, i.e. ``~/.cache/fusedopt``),
  keyed on the device name and compute capability, the triton version, a hash of the kernel
  sources and of the candidates, the variant and the dtype. Later processes read it and use the
  tuned row from their first step. An unreadable file is ignored (and rewritten); an unwritable
  directory only costs the next process a new tuning.

Cost: the first step of each (variant, dtype) on a machine compiles the candidates (seconds of
host time) and queues ~40 launches per candidate on the device (milliseconds). Not tuned, and
the default row used for those tables: while the current stream captures a CUDA graph (the
timing would be captured too, and an event may not be queried there; a one-time warning says
so, and the next tables built outside a capture start it; a provisional plan used by a capture
keeps its rows, since the graph holds its tables), when the scratch tensors do not fit in memory (warning), with
``FUSEDOPT_TRITON_TUNE=0``, and for the clipping norm kernel. ``FUSEDOPT_TRITON_CONFIG`` rows win
over everything. :func:`tune` (or ``python -m fusedopt.backends.triton``) tunes ahead of
time and waits for the result, e.g. before capturing a graph.

CPU tensors (the interpreter, i.e. CI) use the default row unless ``FUSEDOPT_TRITON_TUNE=1``:
timing interpreted Python says nothing about a GPU. There the runs happen at once (host clock),
so the choice is known when the first tables are built. Tests set it to run this module for
real on a token workload.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import config as launch_config
from . import tuning_cache
from .config import LaunchConfig

#: ``0``/``off``: never tune; ``1``/``on``: tune on every device (CPU tensors too, in the
#: interpreter); unset: tune on CUDA devices.
ENV_TUNE = "FUSEDOPT_TRITON_TUNE"
#: Bytes per list of the scratch workload on a GPU.
WORKLOAD_BYTES = 64 << 20
#: Timing rounds, and launches per timed sample (GPU; the interpreter does 2 x 1).
ROUNDS, INNER = 7, 5
#: The default row stays unless a candidate is faster by more than this fraction.
MARGIN = 0.03

#: (plan kind, number of lists) -> variant name. Other kinds (the clipping norm) use the table.
VARIANT_OF = {("adam", 3): "adam", ("adam", 4): "amsgrad", ("sgd", 1): "sgd", ("sgd", 2): "sgd-momentum"}
VARIANTS = tuple(VARIANT_OF.values())
_LISTS = {variant: n for (_, n), variant in VARIANT_OF.items()}


@dataclass
class TuningResult:
    """What one tuning of a (variant, dtype, device model) found."""
    variant: str
    dtype: torch.dtype
    device: str                      # device name and capability, as in the cache key
    config: LaunchConfig             # the choice
    timings_ms: Dict[str, float] = field(default_factory=dict)  # candidate -> best round / INNER
    failed: Dict[str, str] = field(default_factory=dict)        # candidate -> why it was dropped
    from_cache: bool = False

    def to_json(self) -> dict:
        return {"config": str(self.config), "timings_ms": self.timings_ms, "failed": self.failed,
                "tuned_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__}


_chosen: Dict[str, LaunchConfig] = {}  # cache key -> choice, this process
_pending: Dict[str, "Timing"] = {}     # cache key -> timing in flight on the device
_warned: set = set()


# ---- the entry points of the tables ------------------------------------------------------------
def config_for(kind: str, n_lists: int, dtype: torch.dtype, device: torch.device) -> LaunchConfig:
    """The launch configuration for new tables of ``kind`` over ``n_lists`` lists of ``dtype`` on
    ``device`` (see :func:`row_for`)."""
    return row_for(kind, n_lists, dtype, device)[0]


def row_for(kind: str, n_lists: int, dtype: torch.dtype, device: torch.device) -> Tuple[LaunchConfig, bool]:
    """(row, final) for new tables: the override row, else the tuned choice, else the default
    row. On CUDA a missing choice starts its timing on the device (no wait); until it is read,
    the default row serves and ``final`` is False (the tables should be rebuilt once
    :func:`settled`). While the current stream captures a CUDA graph nothing is asked of the
    device (querying an event is not allowed there) and the row is final: captured tables must
    stay as they are."""
    variant = _variant(kind, n_lists, dtype, device)
    if variant is None:
        return launch_config.config_for(dtype), True
    key = cache_key(variant, dtype, device)
    default = launch_config.DEFAULT_CONFIGS[dtype]
    timing = _pending.get(key)
    if timing is None:
        known = _known(key, dtype)  # (the disk is read only when nothing is in flight)
        if known is not None:
            return known, True
        if capturing(device):
            _warn_capture(dtype)
            return default, True
        timing = _start(variant, dtype, device, key)
        if timing is None:  # could not start (memory): the default row for good
            return default, True
    elif capturing(device):
        return default, True
    if timing.done():
        return _finish(key, timing).config, True
    return default, False


def settled(kind: str, n_lists: int, dtype: torch.dtype, device: torch.device) -> bool:
    """False while the choice for such tables is still being timed on the device (tables built
    with a non-final row should then be rebuilt once this turns True). Never waits; not to be
    asked while a graph is being captured (see :func:`capturing`)."""
    variant = _variant(kind, n_lists, dtype, device)
    if variant is None:
        return True
    key = cache_key(variant, dtype, device)
    timing = _pending.get(key)
    if timing is None:
        return True
    if not timing.done():
        return False
    _finish(key, timing)
    return True


def capturing(device: torch.device) -> bool:
    """Whether the current stream of ``device`` is capturing a CUDA graph."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def enabled(device: torch.device) -> bool:
    """Whether tables on ``device`` are tuned (see ``ENV_TUNE``)."""
    value = os.environ.get(ENV_TUNE, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return False
    if value in ("1", "on", "true", "yes"):
        return True
    if value:
        raise ValueError(f"{ENV_TUNE}={os.environ[ENV_TUNE]!r}: expected 0 or 1")
    return device.type == "cuda"


def lookup_or_tune(variant: str, dtype: torch.dtype, device: torch.device, force: bool = False,
                   sizes: Optional[Sequence[int]] = None) -> TuningResult:
    """The choice for (variant, dtype) on ``device``, waiting for it if needed: from this
    process, from the disk cache, or timed now (``force``: time now whatever is cached). For
    :func:`tune`, which runs ahead of time and may wait for the device."""
    key = cache_key(variant, dtype, device)
    description = device_description(device)
    if not force:
        if key in _chosen:
            return TuningResult(variant, dtype, description, _chosen[key], from_cache=True)
        cached = _cached_entry(key, dtype)
        if cached is not None:
            config, entry = cached
            _chosen[key] = config
            timings, failed = entry.get("timings_ms"), entry.get("failed")
            return TuningResult(variant, dtype, description, config,
                                dict(timings) if isinstance(timings, dict) else {},
                                dict(failed) if isinstance(failed, dict) else {}, from_cache=True)
    timing = _pending.get(key) if not force else None
    if timing is None:
        timing = _start(variant, dtype, device, key, sizes)
        if timing is None:
            return TuningResult(variant, dtype, description, launch_config.DEFAULT_CONFIGS[dtype])
    timing.wait()
    return _finish(key, timing)


def tune(device: Optional[torch.device] = None, dtypes: Iterable[torch.dtype] = launch_config.CANDIDATES,
         variants: Iterable[str] = VARIANTS, force: bool = False) -> List[TuningResult]:
    """Tune ahead of time (for the current CUDA device by default), waiting for the results: one
    per (variant, dtype), from the cache unless ``force``. Later tables of those variants use
    the choices from their first step on."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if isinstance(variants, str):
        variants = [variants]
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes]
    variants, dtypes = list(variants), list(dtypes)
    for variant in variants:
        if variant not in _LISTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    for dtype in dtypes:
        if dtype not in launch_config.CANDIDATES:
            raise ValueError(f"dtype {dtype} is not supported by the triton backend")
    from . import BACKEND  # the kernels must be able to run (e.g. not an interpreter that cannot)
    reason = BACKEND.unavailable_reason()
    if reason is not None:
        from .. import BackendUnavailableError
        raise BackendUnavailableError(f"backend 'triton' is unavailable: {reason}")
    return [lookup_or_tune(variant, dtype, device, force=force) for variant in variants for dtype in dtypes]


def _variant(kind: str, n_lists: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """The variant to tune for such tables, or None when they are not tuned (override row,
    tuning off, a kind that is never tuned)."""
    if launch_config.override_for(dtype) is not None:
        return None
    variant = VARIANT_OF.get((kind, n_lists))
    return variant if variant is not None and enabled(device) else None


def _known(key: str, dtype: torch.dtype) -> Optional[LaunchConfig]:
    """The choice under ``key`` from this process or the disk cache (remembered), or None."""
    if key in _chosen:
        return _chosen[key]
    cached = _cached_entry(key, dtype)
    if cached is None:
        return None
    _chosen[key] = cached[0]
    return cached[0]


def _cached_entry(key: str, dtype: torch.dtype) -> Optional[Tuple[LaunchConfig, dict]]:
    """(choice, entry) from the disk cache when the entry names one of the dtype's candidates;
    None for anything else (missing, malformed, a row that is not a candidate)."""
    entry = tuning_cache.read_entries().get(key)
    if not isinstance(entry, dict):
        return None
    config = tuning_cache.parse_config(entry.get("config"))
    if config not in launch_config.CANDIDATES[dtype]:
        return None
    return config, entry


def _warn_capture(dtype: torch.dtype) -> None:
    _warn_once(f"fusedopt triton: launch configuration not tuned while a CUDA graph is being "
               f"captured; these tables use the default {launch_config.DEFAULT_CONFIGS[dtype]} for "
               f"{dtype}. Tune ahead of time with fusedopt.backends.triton.tune() to capture with "
               "the tuned rows.")


def _start(variant: str, dtype: torch.dtype, device: torch.device, key: str,
           sizes: Optional[Sequence[int]] = None) -> Optional["Timing"]:
    """Enqueue the timing of every candidate (pending under ``key``), or None when the scratch
    tensors do not fit (the default row is then the choice for this process). The caller made
    sure no graph is being captured (the timing would be captured too)."""
    default = launch_config.DEFAULT_CONFIGS[dtype]
    try:
        timing = Timing(variant, dtype, device, sizes=sizes)
    except torch.cuda.OutOfMemoryError:
        _warn_once(f"fusedopt triton: not enough device memory to tune the launch configuration; "
                   f"using the default {default} for {dtype}")
        _chosen[key] = default
        return None
    _pending[key] = timing
    return timing


def _finish(key: str, timing: "Timing") -> TuningResult:
    """Read a completed timing: remember its choice and write it to the disk cache."""
    result = timing.result()
    _pending.pop(key, None)
    _chosen[key] = result.config
    if result.timings_ms:
        problem = tuning_cache.write_entry(key, result.to_json())
        if problem is not None:
            _warn_once(f"fusedopt triton: {problem}; the choice holds for this process only")
    return result


# ---- timing -------------------------------------------------------------------------------------
def choose(timings: Dict[LaunchConfig, float], default: LaunchConfig, margin: float = MARGIN) -> LaunchConfig:
    """The fastest of ``timings``, unless ``default`` is within ``margin`` of it."""
    if not timings:
        return default
    best = min(timings, key=timings.__getitem__)
    if default in timings and timings[default] <= timings[best] * (1.0 + margin):
        return default
    return best


def workload_sizes(dtype: torch.dtype, device: torch.device) -> List[int]:
    """Tensor sizes of the scratch workload: on a GPU ~``WORKLOAD_BYTES`` per list, three
    quarters in 4 large tensors (bandwidth) and a quarter in 4096-element tensors (per-program
    and padding costs, like 1000 x 4096); in the interpreter a token workload."""
    if device.type != "cuda":
        return [3000, 4096, 77]
    elements = WORKLOAD_BYTES // torch.empty((), dtype=dtype).element_size()
    large = elements * 3 // 4 // 4
    return [large] * 4 + [4096] * (elements // 4 // 4096)


class Timing:
    """The timing of ``candidates`` for ``variant`` on scratch tensors, enqueued at creation.

    On CUDA every launch and its CUDA events go to the current stream and nothing waits:
    :meth:`done` asks the last event, :meth:`result` reads the events once it is done. (The
    candidates compile on the host when first run, here.) On CPU (the interpreter) the runs
    happen here, timed with the host clock."""

    def __init__(self, variant: str, dtype: torch.dtype, device: torch.device,
                 candidates: Optional[Sequence[LaunchConfig]] = None,
                 sizes: Optional[Sequence[int]] = None):
        from . import tables  # tables imports this module
        self.result_so_far = TuningResult(variant, dtype, device_description(device),
                                          launch_config.DEFAULT_CONFIGS[dtype])
        self.device = device
        on_gpu = device.type == "cuda"
        rounds, self.inner = (ROUNDS, INNER) if on_gpu else (2, 1)
        # scratch tensors: locals, released when this returns, while their launches may still be
        # queued (safe: the caching allocator reuses their memory in the same stream's order)
        lists, grads, steps = _scratch(variant, dtype, device, list(sizes or workload_sizes(dtype, device)))
        names = _row_names(variant)
        default = launch_config.DEFAULT_CONFIGS[dtype]
        runs: Dict[LaunchConfig, Callable[[], None]] = {}
        # the events go to the current stream of the device the kernels run on
        device_context = torch.cuda.device(device) if on_gpu else contextlib.nullcontext()
        with torch.no_grad(), device_context:
            for cfg in launch_config.CANDIDATES[dtype] if candidates is None else candidates:
                plan = tables.build_plan(None, names, lists, steps, lambda _dtype, cfg=cfg: cfg)
                run = _runner(variant, lists, grads, steps, plan)
                try:
                    run()  # compiles this variant of the kernel
                except Exception as exc:  # e.g. out of registers / shared memory for this shape
                    if cfg == default:
                        raise
                    self.result_so_far.failed[str(cfg)] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                runs[cfg] = run
            order = list(runs)
            if not order:
                raise RuntimeError(f"fusedopt triton: no launch candidate ran for {variant} {dtype}: "
                                   f"{self.result_so_far.failed}")
            self._samples: List[Tuple[LaunchConfig, object]] = []
            for r in range(rounds):
                shift = r % len(order)
                for cfg in order[shift:] + order[:shift]:
                    self._samples.append((cfg, _timed(runs[cfg], self.inner, device)))

    def done(self) -> bool:
        """Whether every timed launch has run (never waits)."""
        last = self._samples[-1][1] if self._samples else None
        return not isinstance(last, tuple) or last[1].query()

    def wait(self) -> None:
        """Wait for the device to finish the timed launches (for :func:`tune`)."""
        last = self._samples[-1][1] if self._samples else None
        if isinstance(last, tuple):
            last[1].synchronize()

    def result(self) -> TuningResult:
        """The timings and the choice; call once :meth:`done`."""
        best: Dict[LaunchConfig, float] = {}
        for cfg, sample in self._samples:
            best[cfg] = min(best.get(cfg, float("inf")), _seconds(sample) / self.inner)
        result = self.result_so_far
        result.timings_ms = {str(cfg): 1e3 * t for cfg, t in best.items()}
        result.config = choose(best, launch_config.DEFAULT_CONFIGS[result.dtype])
        return result


def measure(variant: str, dtype: torch.dtype, device: torch.device,
            candidates: Optional[Sequence[LaunchConfig]] = None,
            sizes: Optional[Sequence[int]] = None) -> TuningResult:
    """Time ``candidates`` (default: the dtype's) for ``variant`` on scratch tensors and wait
    for the result; no caching."""
    timing = Timing(variant, dtype, device, candidates, sizes)
    timing.wait()
    return timing.result()


def _timed(run: Callable[[], None], inner: int, device: torch.device):
    """Run ``inner`` times; a pair of recorded CUDA events, or seconds on the host."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            run()
        end.record()
        return start, end
    t0 = time.perf_counter()
    for _ in range(inner):
        run()
    return time.perf_counter() - t0


def _seconds(sample) -> float:
    if isinstance(sample, float):
        return sample
    start, end = sample
    return start.elapsed_time(end) / 1e3


def _row_names(variant: str) -> Tuple[str, ...]:
    from .launch import ADAM_ROWS, SGD_ROWS
    rows = SGD_ROWS if variant.startswith("sgd") else ADAM_ROWS
    return rows[:_LISTS[variant]]


def _scratch(variant: str, dtype: torch.dtype, device: torch.device, sizes: Sequence[int]):
    """(lists, grads, steps) of the scratch workload: params and grads random (a generator of
    their own), state zero, one fp32 step counter per tensor for Adam."""
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    params = [torch.randn(n, generator=gen, device=device, dtype=dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen, device=device, dtype=dtype) for n in sizes]
    states = [[torch.zeros_like(p) for p in params] for _ in range(_LISTS[variant] - 1)]
    adam = not variant.startswith("sgd")
    steps = [torch.zeros((), device=device) for _ in params] if adam else []
    return [params, *states], grads, steps


def _runner(variant: str, lists, grads, steps, plan) -> Callable[[], None]:
    """One step of ``variant`` over the scratch lists through ``plan`` (one launch)."""
    from . import launch
    if variant.startswith("sgd"):
        params, *buffers = lists
        return lambda: launch.sgd_(params, grads, buffers[0] if buffers else [], lr=1e-3,
                                   momentum=0.9 if buffers else 0.0, dampening=0.0, weight_decay=0.0,
                                   nesterov=False, maximize=False, is_first_step=False, plan=plan)
    params, exp_avgs, exp_avg_sqs, *maxes = lists
    return lambda: launch.adam_(params, grads, exp_avgs, exp_avg_sqs, maxes[0] if maxes else [], steps,
                                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2,
                                amsgrad=bool(maxes), maximize=False, decoupled_weight_decay=True,
                                plan=plan)


# ---- the key of a choice ------------------------------------------------------------------
_descriptions: Dict[torch.device, str] = {}


def device_description(device: torch.device) -> str:
    """Device name and compute capability (the device part of the cache key)."""
    text = _descriptions.get(device)
    if text is None:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            text = f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
        else:
            text = f"{device.type} (triton interpreter)"
        _descriptions[device] = text
    return text


_sources_digest: Optional[str] = None


def _kernel_digest() -> str:
    """Hash of the kernel sources: a changed kernel is tuned again."""
    global _sources_digest
    if _sources_digest is None:
        digest = hashlib.sha1()
        here = os.path.dirname(os.path.abspath(__file__))
        for name in ("adam_kernel.py", "sgd_kernel.py", "program.py", "rules.py", "launch.py",
                     "tables.py"):
            with open(os.path.join(here, name), "rb") as f:
                digest.update(f.read())
        _sources_digest = digest.hexdigest()[:12]
    return _sources_digest


_keys: Dict[tuple, str] = {}


def cache_key(variant: str, dtype: torch.dtype, device: torch.device) -> str:
    """The key of a choice in the caches (computed once per variant, dtype and device)."""
    key = _keys.get((variant, dtype, device))
    if key is None:
        key = _keys[(variant, dtype, device)] = _make_key(variant, dtype, device)
    return key


def _make_key(variant: str, dtype: torch.dtype, device: torch.device) -> str:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # pragma: no cover - the backend is unavailable then
        triton_version = "?"
    candidates = ",".join(map(str, launch_config.CANDIDATES[dtype]))
    tuning = hashlib.sha1(f"{candidates};{launch_config.DEFAULT_CONFIGS[dtype]};{MARGIN}".encode()).hexdigest()[:8]
    return (f"{device_description(device)} | triton {triton_version} | kernels {_kernel_digest()} | "
            f"candidates {tuning} | {variant} | {str(dtype).replace('torch.', '')}")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def clear() -> None:
    """Forget this process's choices and timings in flight (the disk cache stays)."""
    _chosen.clear()
    _pending.clear()
