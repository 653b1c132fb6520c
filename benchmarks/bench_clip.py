"""Gradient clipping throughput: torch.nn.utils.clip_grad_norm_ vs fusedopt, alone and with an
AdamW step.

    python benchmarks/bench_clip.py                       # GPU if there is one, else CPU
    python benchmarks/bench_clip.py --quick               # smoke test, seconds
    python benchmarks/bench_clip.py --algo clip,clip+adamw --workloads gpt2

Algorithms ("algo" field of the records):

``clip``        clip_grad_norm_ with clipping active at every call (the threshold is lowered by
                10% per call, so the coefficient is ~0.9 each time). Baseline ``torch-foreach``:
                ``torch.nn.utils.clip_grad_norm_(foreach=True)``. Bytes: 12 per fp32 param (read
                for the norm, read + write to scale).
``clip-noop``   the same with a threshold above the norm (coefficient 1). torch still multiplies
                every gradient by one; fusedopt's CPU kernel knows on the host that it need not.
                Bytes: 4 per fp32 param (the norm's read).
``clip+adamw``  clip, then one AdamW step. Baseline ``torch-fused``: ``clip_grad_norm_(foreach=True)``
                then ``AdamW(fused=True).step()`` (40 B/param). ``fusedopt-<backend>``:
                ``AdamW(max_grad_norm=...)``, clipping inside the step (32 B/param: the norm's
                read + Adam's 28). ``fusedopt-<backend>-2pass``: ``fusedopt.clip_grad_norm_`` then
                the fusedopt AdamW step (40 B/param).

The two passes of ``clip`` apart (not in the default ``--algo``; they show where clip-alone time
goes and how close each implementation's passes run to the memory):

``norm``        ``get_total_norm`` (baseline ``torch.nn.utils.get_total_norm(foreach=True)``):
                one read, 4 B per fp32 param.
``scale``       ``clip_grads_with_norm_`` with a coefficient of -1 (``max_norm = -(total_norm +
                1e-6)``): every element is multiplied by about -1, so magnitudes stay put over the
                calls and neither implementation may skip the pass (baseline
                ``torch.nn.utils.clip_grads_with_norm_(foreach=True)``). 8 B per fp32 param.

On torch 2.5, which has neither ``get_total_norm`` nor ``clip_grads_with_norm_``, the baselines of
``norm`` and ``scale`` are the two halves of that release's ``clip_grad_norm_``
(``torch_baselines.py``).

Records use the schema of common.py; ``bytes_per_step`` is the minimum traffic above and
``speedup_vs_torch_fused`` is against the algorithm's torch baseline (same run). Method (common.py):
providers interleaved with the bandwidth reference, warmup, min and median of --repeats samples.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from torch_baselines import clip_grads_with_norm_, get_total_norm  # noqa: E402

BENCHMARK = "clip"
ALGOS = ("clip", "clip-noop", "clip+adamw", "norm", "scale")
DEFAULT_ALGOS = ("clip", "clip-noop", "clip+adamw")
#: Minimum bytes per parameter element per call, per element byte of the dtype.
STREAMS = {"clip": 3, "clip-noop": 1, "clip+adamw": 8, "norm": 1, "scale": 2}
BASELINE = {"clip": "torch-foreach", "clip-noop": "torch-foreach", "clip+adamw": "torch-fused",
            "norm": "torch-foreach", "scale": "torch-foreach"}
ADAMW = dict(lr=1e-3, weight_decay=1e-2)
SHRINK = 0.9  # per-call factor of the threshold of the "clip" algorithm


def fusedopt_backends(device: torch.device) -> List[str]:
    """fusedopt backends that can run here (names of the norm implementations)."""
    fusedopt, err = common.import_fusedopt()
    if fusedopt is None:
        return []
    reasons = fusedopt.backends.available()
    return [b for b in common.FUSEDOPT_BACKENDS_BY_DEVICE[device.type] if reasons.get(b) is None]


class ActiveClip:
    """Calls ``clip_fn(params, threshold)`` with clipping active at every call.

    A clip leaves the norm at the threshold, so the threshold is lowered by SHRINK per call; every
    RESET_EVERY calls the gradients are restored from a copy (one extra pass per RESET_EVERY
    calls, before values get small enough for subnormal arithmetic to slow anything down).
    """

    RESET_EVERY = 40  # 0.9^40 ~ 1.5e-2

    def __init__(self, params, clip_fn):
        self.params, self.clip_fn = params, clip_fn
        self.master = [p.grad.clone() for p in params]
        self.start = float(get_total_norm([p.grad.float() for p in params]))
        self.calls = 0
        self.threshold = 0.5 * self.start

    def __call__(self):
        if self.calls and self.calls % self.RESET_EVERY == 0:
            for p, m in zip(self.params, self.master):
                p.grad.copy_(m)
            self.threshold = 0.5 * self.start
        self.clip_fn(self.params, self.threshold)
        self.threshold *= SHRINK
        self.calls += 1


def grads_only(workload: common.Workload, device, dtype, seed: int = 0) -> List[torch.Tensor]:
    """Stand-in params for the clip-alone algorithms: zero-byte expanded tensors holding real
    gradients (clipping only touches ``.grad``), so every provider has its own gradients cheaply."""
    params = []
    for p in common.make_tensors(workload, device, dtype, seed):
        holder = torch.zeros(1, device=device, dtype=dtype).expand(p.shape).requires_grad_()
        holder.grad = p.grad
        params.append(holder)
    return params


def clip_callables(algo: str, workload, device, dtype, backends: List[str]) -> Dict[str, Callable[[], Any]]:
    """Timed callables of the clip-alone algorithms; each provider owns its gradients."""
    import fusedopt
    out: Dict[str, Callable[[], Any]] = {}

    def make(clip_fn):
        params = grads_only(workload, device, dtype)
        if algo == "clip-noop":
            return lambda: clip_fn(params, 1e30)
        return ActiveClip(params, clip_fn)

    out["torch-foreach"] = make(lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True))
    for b in backends:
        out[f"fusedopt-{b}"] = make(lambda ps, m, b=b: fusedopt.clip_grad_norm_(ps, m, backend=b))
    return out


def flip_norm(params) -> Tuple[float, torch.Tensor]:
    """``(max_norm, total_norm)`` whose clip coefficient ``max_norm / (total_norm + 1e-6)`` is
    about -1 (within a rounding of the norm's dtype; the norm is float32)."""
    total_norm = torch.tensor(1.0, device=params[0].grad.device)
    return -float(total_norm + 1e-6), total_norm


def pass_callables(algo: str, workload, device, dtype, backends: List[str]) -> Dict[str, Callable[[], Any]]:
    """Timed callables of the passes of clip (``norm``, ``scale``); each provider owns its grads."""
    import fusedopt
    out: Dict[str, Callable[[], Any]] = {}
    if algo == "norm":
        def make(norm_fn):
            grads = [p.grad for p in grads_only(workload, device, dtype)]
            return lambda: norm_fn(grads)
        out["torch-foreach"] = make(lambda gs: get_total_norm(gs, foreach=True))
        for b in backends:
            out[f"fusedopt-{b}"] = make(lambda gs, b=b: fusedopt.get_total_norm(gs, backend=b))
        return out

    def make(scale_fn):
        params = grads_only(workload, device, dtype)
        max_norm, total_norm = flip_norm(params)
        return lambda: scale_fn(params, max_norm, total_norm)
    out["torch-foreach"] = make(lambda ps, m, n: clip_grads_with_norm_(ps, m, n, foreach=True))
    for b in backends:
        out[f"fusedopt-{b}"] = make(lambda ps, m, n, b=b: fusedopt.clip_grads_with_norm_(ps, m, n, backend=b))
    return out


def clip_adamw_callables(workload, device, dtype, backends: List[str]) -> Dict[str, Callable[[], Any]]:
    """Timed callables of clip + AdamW step; the params are shared, state and grads per provider."""
    import fusedopt
    params = common.make_tensors(workload, device, dtype)
    start = float(get_total_norm([p.grad.float() for p in params]))
    out: Dict[str, Callable[[], Any]] = {}

    def with_own_grads(seed: int):
        """The shared params, each call swapping in this provider's own gradients."""
        grads = [g.grad for g in common.make_tensors(workload, device, dtype, seed)]
        def bind():
            for p, g in zip(params, grads):
                p.grad = g
        return bind

    def two_pass(opt, clip_fn, seed):
        bind = with_own_grads(seed)
        clip = ActiveClip(params, clip_fn)

        def call():
            bind()
            clip()
            opt.step()
        return call

    out["torch-fused"] = two_pass(torch.optim.AdamW(params, fused=True, **ADAMW),
                                  lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True), 1)
    for b in backends:
        if b == "reference" and workload.numel > 50e6:
            continue  # slow and memory-hungry on big workloads: not a contender
        opt = fusedopt.optim.AdamW(params, max_grad_norm=0.5 * start, backend=b, **ADAMW)
        bind = with_own_grads(0)  # never written: the clip coefficient is folded into the step

        def fused_call(opt=opt, bind=bind):
            bind()
            opt.step()
        out[f"fusedopt-{b}"] = fused_call
        if b != "reference":
            out[f"fusedopt-{b}-2pass"] = two_pass(
                fusedopt.optim.AdamW(params, backend=b, **ADAMW),
                lambda ps, m, b=b: fusedopt.clip_grad_norm_(ps, m, backend=b), 2)
    return out


def run_group(args, env, run_id: str, workload: common.Workload, algo: str,
              dtype: torch.dtype) -> List[Dict[str, Any]]:
    device = args.device
    backends = [b for b in fusedopt_backends(device) if not args.providers or f"fusedopt-{b}" in args.providers]
    base = {
        "benchmark": BENCHMARK, "workload": workload.name, "provider": "", "algo": algo,
        "dtype": common.dtype_name(dtype), "numel": workload.numel, "tensors": workload.tensors,
        "status": "ok", "ms_median": None, "ms_min": None, "gbps": None, "gbps_median": None,
        "frac_bw": None, "speedup_vs_torch_fused": None, "speedup_vs_torch_fused_median": None,
        "bandwidth_gbps": None, "bandwidth_ref": "",
        "bytes_per_step": STREAMS[algo] * common.element_size(dtype) * workload.numel,
        "repeats": args.repeats, "warmup": args.warmup, "inner": None, "quick": args.quick,
        "note": None, "load_avg": common.load_average(),
    }
    base.update(env)
    base["date"], base["run_id"] = common.now_iso(), run_id
    if algo == "clip+adamw":
        fns = clip_adamw_callables(workload, device, dtype, backends)
    elif algo in ("norm", "scale"):
        fns = pass_callables(algo, workload, device, dtype, backends)
    else:
        fns = clip_callables(algo, workload, device, dtype, backends)
    if args.providers:
        fns = {k: v for k, v in fns.items() if any(common.fnmatch.fnmatchcase(k, p) for p in args.providers)}
    probe = common.bandwidth_probe(device, args.bw_mib * 2 ** 20 if args.bw_mib else None)
    fns[common.BANDWIDTH_NAME] = probe.fn
    errors: Dict[str, str] = {}
    timings = common.interleaved_times(fns, repeats=args.repeats, warmup=args.warmup,
                                       min_sample_s=args.sample_ms / 1e3,
                                       sync=common.synchronizer(device), errors=errors)
    del fns
    gc.collect()
    bw = timings.pop(common.BANDWIDTH_NAME, None)
    base["bandwidth_gbps"] = common.gbps(probe.nbytes, bw.min) if bw else None
    base["bandwidth_ref"] = probe.description
    ref = timings.get(BASELINE[algo])
    records = [common.measured_record(base, name, t, ref) for name, t in timings.items()]
    records += [common.skip_record(base, name, "skipped", err) for name, err in errors.items()]
    return records


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--algo", default=",".join(DEFAULT_ALGOS), help=f"comma list of {', '.join(ALGOS)}")
    p.add_argument("--workloads", default=None, help="comma list of gpt2, 1000x4096, 10x4M, tiny "
                   "[default: gpt2,1000x4096; --quick: tiny]")
    p.add_argument("--dtype", default="fp32", help="comma list of fp32, bf16, fp16, fp64")
    p.add_argument("--providers", default=None, help="comma list of provider names or globs")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=None, help="[15; --quick: 3]")
    p.add_argument("--warmup", type=int, default=None, help="[3; --quick: 1]")
    p.add_argument("--sample-ms", type=float, default=None, help="[1 on CPU, 5 on GPU]")
    p.add_argument("--bw-mib", type=int, default=None, help="bandwidth buffer [256 or 4 x LLC; --quick: 64]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON-lines file [benchmarks/results/clip-<device>-<date>.jsonl]; 'none'")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    args.device = common.resolve_device(args.device)
    args.repeats = args.repeats or (3 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.algo = common.comma_list(args.algo)
    for a in args.algo:
        if a not in ALGOS:
            raise SystemExit(f"unknown --algo {a!r}; choose from {', '.join(ALGOS)}")
    args.workloads = common.comma_list(args.workloads or ("tiny" if args.quick else "gpt2,1000x4096"))
    args.dtype = [common.DTYPES[d] for d in common.comma_list(args.dtype)]
    args.providers = common.comma_list(args.providers) if args.providers else None
    args.sample_ms = args.sample_ms or (5.0 if args.device.type == "cuda" else 1.0)
    if args.bw_mib is None and args.quick:
        args.bw_mib = 64
    if args.out is None:
        args.out = common.default_results_path(BENCHMARK, args.device, args.quick)
    elif args.out.lower() == "none":
        args.out = None
    return args


def main(argv=None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.pop("FUSEDOPT_BACKEND", None)
    env, run_id = common.environment(args.device), common.now_iso()
    started = time.perf_counter()
    out: List[Dict[str, Any]] = []
    for algo in args.algo:
        for dtype in args.dtype:
            for wname in args.workloads:
                for workload in common.make_workloads(wname):
                    records = run_group(args, env, run_id, workload, algo, dtype)
                    print(common.format_table(workload, records).replace("vs fused", "vs torch"), flush=True)
                    print(flush=True)
                    if args.out is not None:
                        common.write_records(Path(args.out), records)
                    out += records
    print(f"done in {time.perf_counter() - started:.0f} s")
    if args.out is not None:
        print(f"results appended to {args.out}")
    return out


if __name__ == "__main__":
    main()
