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

``clip+adamw``'s single-pass ``fusedopt-<backend>`` runs with ``max_grad_norm = 0.5 x`` the
gradients' starting norm (coefficient 0.5 at every call: its gradients are never written), its
two-pass providers with the threshold of ``clip`` (0.5 x the starting norm, then lowered by 10% a
call). ``fusedopt-reference`` is not timed on ``clip+adamw`` above 50M params (slow and memory-hungry:
not a contender); its record says so (status ``skipped``).

Before timing, every provider but the torch baseline is checked on a small copy (in the run's
dtype and in fp32) against torch: ``clip``/``clip-noop`` one call against
``clip_grad_norm_(foreach=False)`` on float64 copies (the returned norm and the clipped grads),
``norm`` against ``get_total_norm``, ``scale`` against ``clip_grads_with_norm_``, ``clip+adamw``
two steps (clipped, then below the threshold) against ``clip_grad_norm_`` + ``AdamW(foreach=False)``
(the param updates, relative to the update, and the clipped grads of the two-pass providers).
One that disagrees is ``rejected`` and not timed.

Records use the schema of common.py; ``bytes_per_step`` is the minimum traffic above and
``speedup_vs_torch_fused`` is against the algorithm's torch baseline (same run). Method (common.py):
providers interleaved with the bandwidth reference, warmup, min and median of --repeats samples.
``--providers`` takes names or globs (``'fusedopt-*'``), as the other benchmarks.
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


def everything(name: str) -> bool:
    return True


def clip_fns(backends: List[str]) -> Dict[str, Callable[..., Any]]:
    """Per provider, ``fn(params, max_norm)``: clip the params' gradients, return the total norm."""
    import fusedopt
    out: Dict[str, Callable[..., Any]] = {
        "torch-foreach": lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True)}
    for b in backends:
        out[f"fusedopt-{b}"] = lambda ps, m, b=b: fusedopt.clip_grad_norm_(ps, m, backend=b)
    return out


def norm_fns(backends: List[str]) -> Dict[str, Callable[..., Any]]:
    """Per provider, ``fn(grads)``: the total 2-norm of the gradients."""
    import fusedopt
    out: Dict[str, Callable[..., Any]] = {"torch-foreach": lambda gs: get_total_norm(gs, foreach=True)}
    for b in backends:
        out[f"fusedopt-{b}"] = lambda gs, b=b: fusedopt.get_total_norm(gs, backend=b)
    return out


def scale_fns(backends: List[str]) -> Dict[str, Callable[..., Any]]:
    """Per provider, ``fn(params, max_norm, total_norm)``: scale the gradients as clipping does."""
    import fusedopt
    out: Dict[str, Callable[..., Any]] = {
        "torch-foreach": lambda ps, m, n: clip_grads_with_norm_(ps, m, n, foreach=True)}
    for b in backends:
        out[f"fusedopt-{b}"] = lambda ps, m, n, b=b: fusedopt.clip_grads_with_norm_(ps, m, n, backend=b)
    return out


#: fusedopt-reference is not timed on clip+adamw above this many params
REFERENCE_MAX_NUMEL = 50e6


#: one clip+adamw provider: (make_opt(params, hyper, max_norm), clip_fn or None)
Variant = Tuple[Callable[..., Any], Optional[Callable[..., Any]]]


def clip_adamw_variants(backends: List[str], numel: int) -> Tuple[Dict[str, Variant], Dict[str, str]]:
    """Per provider of ``clip+adamw``, ``(make_opt(params, hyper, max_norm), clip_fn or None)``:
    the optimizer (``max_norm`` is used by the single-pass providers, which clip inside the
    step) and, for the two-pass providers, the clip run before its step. Also the providers left
    out on this workload, with the reason."""
    import fusedopt
    variants: Dict[str, Variant] = {
        "torch-fused": (lambda ps, kw, m: torch.optim.AdamW(ps, fused=True, **kw),
                        lambda ps, m: torch.nn.utils.clip_grad_norm_(ps, m, foreach=True))}
    skips: Dict[str, str] = {}
    for b in backends:
        if b == "reference" and numel > REFERENCE_MAX_NUMEL:
            skips[f"fusedopt-{b}"] = (f"not timed above {REFERENCE_MAX_NUMEL / 1e6:.0f}M params on clip+adamw "
                                      "(slow and memory-hungry: not a contender)")
            continue
        variants[f"fusedopt-{b}"] = (
            lambda ps, kw, m, b=b: fusedopt.optim.AdamW(ps, max_grad_norm=m, backend=b, **kw), None)
        if b != "reference":
            variants[f"fusedopt-{b}-2pass"] = (
                lambda ps, kw, m, b=b: fusedopt.optim.AdamW(ps, backend=b, **kw),
                lambda ps, m, b=b: fusedopt.clip_grad_norm_(ps, m, backend=b))
    return variants, skips


def clip_callables(algo: str, workload, device, dtype, backends: List[str],
                   want: Callable[[str], bool] = everything) -> Dict[str, Callable[[], Any]]:
    """Timed callables of the clip-alone algorithms; each provider owns its gradients."""
    out: Dict[str, Callable[[], Any]] = {}

    def make(clip_fn):
        params = grads_only(workload, device, dtype)
        if algo == "clip-noop":
            return lambda: clip_fn(params, 1e30)
        return ActiveClip(params, clip_fn)

    for name, fn in clip_fns(backends).items():
        if want(name):
            out[name] = make(fn)
    return out


def flip_norm(params) -> Tuple[float, torch.Tensor]:
    """``(max_norm, total_norm)`` whose clip coefficient ``max_norm / (total_norm + 1e-6)`` is
    about -1 (within a rounding of the norm's dtype; the norm is float32)."""
    total_norm = torch.tensor(1.0, device=params[0].grad.device)
    return -float(total_norm + 1e-6), total_norm


def pass_callables(algo: str, workload, device, dtype, backends: List[str],
                   want: Callable[[str], bool] = everything) -> Dict[str, Callable[[], Any]]:
    """Timed callables of the passes of clip (``norm``, ``scale``); each provider owns its grads."""
    out: Dict[str, Callable[[], Any]] = {}
    if algo == "norm":
        def make_norm(norm_fn):
            grads = [p.grad for p in grads_only(workload, device, dtype)]
            return lambda: norm_fn(grads)
        for name, fn in norm_fns(backends).items():
            if want(name):
                out[name] = make_norm(fn)
        return out

    def make(scale_fn):
        params = grads_only(workload, device, dtype)
        max_norm, total_norm = flip_norm(params)
        return lambda: scale_fn(params, max_norm, total_norm)
    for name, fn in scale_fns(backends).items():
        if want(name):
            out[name] = make(fn)
    return out


def clip_adamw_callables(workload, device, dtype, backends: List[str],
                         want: Callable[[str], bool] = everything,
                         skipped: Optional[Dict[str, str]] = None) -> Dict[str, Callable[[], Any]]:
    """Timed callables of clip + AdamW step; the params are shared, state and grads per provider.
    Providers left out on this workload go into ``skipped`` (name -> reason) where wanted."""
    params = common.make_tensors(workload, device, dtype)
    start = float(get_total_norm([p.grad.float() for p in params]))
    out: Dict[str, Callable[[], Any]] = {}
    variants, skips = clip_adamw_variants(backends, workload.numel)
    if skipped is not None:
        skipped.update({name: why for name, why in skips.items() if want(name)})

    def with_own_grads(seed: int):
        """The shared params, each call swapping in this provider's own gradients."""
        grads = [g.grad for g in common.make_tensors(workload, device, dtype, seed)]
        def bind():
            for p, g in zip(params, grads):
                p.grad = g
        return bind

    seeds = iter(range(1, 1000))
    for name, (make_opt, clip_fn) in variants.items():
        if not want(name):
            continue
        if clip_fn is None:  # the clip is folded into the step: coefficient 0.5 at every call
            opt = make_opt(params, ADAMW, 0.5 * start)
            bind = with_own_grads(0)  # never written: the clip coefficient is folded into the step

            def fused_call(opt=opt, bind=bind):
                bind()
                opt.step()
            out[name] = fused_call
            continue
        opt = make_opt(params, ADAMW, None)
        bind = with_own_grads(next(seeds))
        clip = ActiveClip(params, clip_fn)

        def two_pass(opt=opt, bind=bind, clip=clip):
            bind()
            clip()
            opt.step()
        out[name] = two_pass
    return out


# ---------------------------------------------------------------------------------- guard
#: relative tolerance of a total norm against float64 torch, per dtype of the gradients
NORM_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


def _guard_params(device, dtype, step: int = 0, scale: float = 1.0):
    """The common guard's small tensors with gradients ``scale`` x those of guard step ``step``,
    and float64 copies with the same gradient values (torch's side)."""
    params = common.guard_tensors(device, dtype)
    ref = []
    with torch.no_grad():
        for p, g in zip(params, common.guard_grads(params, step)):
            p.grad.copy_(g * scale)
            r = p.detach().to(torch.float64).clone()
            r.grad = p.grad.detach().to(torch.float64).clone()
            ref.append(r)
    return params, ref


def _grads_mismatch(what: str, got: List[torch.Tensor], want: List[torch.Tensor], dtype,
                    rtol: float) -> Optional[str]:
    """None if every gradient is within rtol + one unit in the last place of ``dtype`` of torch's."""
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach().double(), w.detach().double()
        allowed = (rtol + torch.finfo(dtype).eps) * w.abs() + torch.finfo(dtype).tiny
        err = (g - w).abs().nan_to_num(float("inf"))
        if not bool((err <= allowed).all()):
            j = int((err - allowed).flatten().argmax())
            return (f"{what}: gradient {j} of tensor {i} {tuple(g.shape)} is {float(g.flatten()[j]):.6g}, "
                    f"torch gives {float(w.flatten()[j]):.6g}")
    return None


def _norm_mismatch(got, want: float, dtype) -> Optional[str]:
    """None if the returned norm is within NORM_RTOL of torch's float64 one, plus the rounding to
    its own dtype (torch returns a bf16 grad's norm as bf16, and so does fusedopt)."""
    rounding = torch.finfo(got.dtype).eps / 2 if isinstance(got, torch.Tensor) and got.is_floating_point() else 0.0
    got = float(got)
    rtol = NORM_RTOL[dtype] + rounding
    if not math.isfinite(got) or abs(got - want) > rtol * abs(want):
        return f"total norm {got:.8g}, torch gives {want:.8g} (rtol {rtol:.3g})"
    return None


def guard_clip(clip_fn, device, dtype, noop: bool = False) -> Optional[str]:
    """One call of ``clip_fn(params, max_norm)`` against torch's clip_grad_norm_ (float64)."""
    params, ref = _guard_params(device, dtype)
    norm = float(get_total_norm([r.grad for r in ref]))
    max_norm = 1e30 if noop else 0.5 * norm
    want = float(torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=False))
    got = clip_fn(params, max_norm)
    bad = _norm_mismatch(got, want, dtype)
    if bad is None:
        bad = _grads_mismatch("clipped", [p.grad for p in params], [r.grad for r in ref], dtype,
                              NORM_RTOL[dtype])
    return bad


def guard_norm(norm_fn, device, dtype) -> Optional[str]:
    """One call of ``norm_fn(grads)`` against torch's get_total_norm (float64)."""
    params, ref = _guard_params(device, dtype)
    return _norm_mismatch(norm_fn([p.grad for p in params]), float(get_total_norm([r.grad for r in ref])), dtype)


def guard_scale(scale_fn, device, dtype) -> Optional[str]:
    """One call of ``scale_fn(params, 0.3, norm 1)`` against torch's clip_grads_with_norm_."""
    params, ref = _guard_params(device, dtype)
    scale_fn(params, 0.3, torch.tensor(1.0, device=device))
    clip_grads_with_norm_(ref, 0.3, torch.tensor(1.0, dtype=torch.float64, device=device), foreach=False)
    return _grads_mismatch("scaled", [p.grad for p in params], [r.grad for r in ref], dtype, NORM_RTOL[dtype])


def guard_clip_adamw(variant, device, dtype) -> Optional[str]:
    """Two steps of a clip+adamw provider against torch's clip_grad_norm_ + AdamW(foreach=False)
    (float32 for 16-bit params, as common.guard_check): the first with gradients at twice the
    threshold (clipped, coefficient 0.5), the second at half of it (not clipped). Each step starts
    both from the provider's params; the updates must agree relative to the update
    (common.GUARD_DELTA_RTOL), the clipped gradients of a two-pass provider as for ``clip``."""
    make_opt, clip_fn = variant
    params, _ = _guard_params(device, dtype)
    ref_dtype = common.guard_reference_dtype(dtype)
    ref = []
    for p in params:
        r = p.detach().to(ref_dtype).clone()
        r.grad = torch.zeros_like(r)
        ref.append(r)
    hyper = dict(ADAMW, lr=common.GUARD_LR, weight_decay=common.GUARD_WEIGHT_DECAY)
    max_norm = 0.5 * float(get_total_norm([g for g in common.guard_grads(params, 0)]))
    ref_opt = torch.optim.AdamW(ref, foreach=False, **hyper)
    opt = make_opt(params, hyper, max_norm)
    for k, scale in enumerate((1.0, 0.25)):  # norms 2x and 0.5x the threshold
        with torch.no_grad():
            for p, r, g in zip(params, ref, common.guard_grads(params, k)):
                p.grad.copy_(g * scale)
                r.grad.copy_(p.grad)
                r.copy_(p)
        before = [p.detach().clone() for p in params]
        torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=False)
        ref_opt.step()
        if clip_fn is not None:
            clip_fn(params, max_norm)
            bad = _grads_mismatch(f"step {k + 1}, clipped", [p.grad for p in params], [r.grad for r in ref],
                                  dtype, NORM_RTOL[dtype])
            if bad:
                return bad
        opt.step()
        rtol = common.GUARD_DELTA_RTOL[dtype]
        for i, (b, r, p) in enumerate(zip(before, ref, params)):
            bad = common.update_mismatch(b, r.detach(), p.detach(), dtype, rtol)
            if bad is not None:
                j, want, got = bad
                return (f"step {k + 1}: update of element {j} of tensor {i} {tuple(p.shape)} is {got:.6g}, "
                        f"torch clip_grad_norm_ + AdamW(foreach=False) gives {want:.6g} (rtol {rtol} of |update|)")
    return None


def guard_provider(algo: str, name: str, primitive, device, dtype) -> Optional[str]:
    """None if provider ``name`` of ``algo`` (its primitive: a clip/norm/scale function, or a
    clip+adamw variant) agrees with torch on a small copy, in ``dtype`` and fp32; else why not
    (starting with common.GUARD_RAISED when it raised)."""
    check = {"clip": guard_clip, "clip-noop": lambda fn, dv, dt: guard_clip(fn, dv, dt, noop=True),
             "norm": guard_norm, "scale": guard_scale, "clip+adamw": guard_clip_adamw}[algo]
    for d in common.guard_dtypes(dtype):
        try:
            reason = check(primitive, device, d)
        except Exception as exc:
            return f"{common.GUARD_RAISED}: {type(exc).__name__}: {common.first_line(exc)}"
        if reason is not None:
            return f"differs from torch ({common.dtype_name(d)}): {reason}"
    return None


def primitives(algo: str, backends: List[str], numel: int) -> Dict[str, Any]:
    """What :func:`guard_provider` checks, per provider of ``algo``."""
    if algo in ("clip", "clip-noop"):
        return clip_fns(backends)
    if algo == "norm":
        return norm_fns(backends)
    if algo == "scale":
        return scale_fns(backends)
    return clip_adamw_variants(backends, numel)[0]


def run_group(args, env, run_id: str, workload: common.Workload, algo: str,
              dtype: torch.dtype, guard_cache: Optional[Dict[Tuple[str, str, str], Optional[str]]] = None
              ) -> List[Dict[str, Any]]:
    device = args.device
    backends = fusedopt_backends(device)
    patterns = args.providers

    def selected(name: str) -> bool:
        return not patterns or any(common.fnmatch.fnmatchcase(name, pat) for pat in patterns)

    base = {
        "benchmark": BENCHMARK, "workload": workload.name, "provider": "", "algo": algo,
        "dtype": common.dtype_name(dtype), "numel": workload.numel, "tensors": workload.tensors,
        "status": "ok", "ms_median": None, "ms_min": None, "gbps": None, "gbps_median": None,
        "frac_bw": None, "speedup_vs_torch_fused": None, "speedup_vs_torch_fused_median": None,
        "bandwidth_gbps": None, "bandwidth_ref": "",
        "bytes_per_step": STREAMS[algo] * common.element_size(dtype) * workload.numel,
        "repeats": args.repeats, "warmup": args.warmup, "inner": None, "quick": args.quick,
        "note": None, "load_avg": common.load_average(), "cpu_pressure": None,
    }
    base.update(env)
    base["date"], base["run_id"] = common.now_iso(), run_id
    records: List[Dict[str, Any]] = []
    cache = guard_cache if guard_cache is not None else {}
    rejected: Dict[str, Tuple[str, str]] = {}
    for name, prim in primitives(algo, backends, workload.numel).items():
        if not selected(name) or name == BASELINE[algo]:
            continue
        key = (name, algo, common.dtype_name(dtype))
        if key not in cache:
            cache[key] = guard_provider(algo, name, prim, device, dtype)
        if cache[key] is not None:
            status = "skipped" if cache[key].startswith(common.GUARD_RAISED) else "rejected"
            rejected[name] = (status, cache[key])

    def want(name: str) -> bool:
        return selected(name) and name not in rejected

    skipped: Dict[str, str] = {}
    if algo == "clip+adamw":
        fns = clip_adamw_callables(workload, device, dtype, backends, want, skipped)
    elif algo in ("norm", "scale"):
        fns = pass_callables(algo, workload, device, dtype, backends, want)
    else:
        fns = clip_callables(algo, workload, device, dtype, backends, want)
    probe = common.bandwidth_probe(device, args.bw_mib * 2 ** 20 if args.bw_mib else None)
    fns[common.BANDWIDTH_NAME] = probe.fn
    errors: Dict[str, str] = {}
    timings = common.interleaved_times(fns, repeats=args.repeats, warmup=args.warmup,
                                       min_sample_s=args.sample_ms / 1e3,
                                       sync=common.synchronizer(device), errors=errors)
    base["cpu_pressure"] = common.cpu_pressure()
    del fns
    gc.collect()
    bw = timings.pop(common.BANDWIDTH_NAME, None)
    base["bandwidth_gbps"] = common.gbps(probe.nbytes, bw.min) if bw else None
    base["bandwidth_ref"] = probe.description
    ref = timings.get(BASELINE[algo])
    records += [common.measured_record(base, name, t, ref) for name, t in timings.items()]
    records += [common.skip_record(base, name, status, why) for name, (status, why) in rejected.items()]
    records += [common.skip_record(base, name, "skipped", why) for name, why in skipped.items()]
    records += [common.skip_record(base, name, "skipped", err) for name, err in errors.items()]
    return records


def all_provider_names(device: torch.device) -> List[str]:
    """Every provider name bench_clip can time on ``device`` (all algorithms)."""
    backends = fusedopt_backends(device)
    names = set(clip_fns(backends)) | set(clip_adamw_variants(backends, 0)[0])
    return sorted(names)


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
    guard_cache: Dict[Tuple[str, str, str], Optional[str]] = {}
    if args.providers:
        names = set(all_provider_names(args.device))
        for pat in args.providers:
            if not any(common.fnmatch.fnmatchcase(n, pat) for n in names):
                print(f"note: --providers {pat!r} matches no provider on {args.device.type}")
    for algo in args.algo:
        for dtype in args.dtype:
            for wname in args.workloads:
                for workload in common.make_workloads(wname):
                    records = run_group(args, env, run_id, workload, algo, dtype, guard_cache)
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
