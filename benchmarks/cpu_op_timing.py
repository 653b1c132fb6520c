"""Op-level timing of the cpu backend against torch's fused CPU optimizers (a developer tool).

    python benchmarks/cpu_op_timing.py adamw gpt2,10x4M,1000x4096 --reps 30
    python benchmarks/cpu_op_timing.py sgd 1000x4096

For each workload it times, interleaved (A, B, C, D, A, B, ...) and taking the minimum:
  * torch.ops.fusedopt.adam_/sgd_           (the dispatcher path, what torch.compile traces)
  * fusedopt._C._adam_cpu/_sgd_cpu          (the eager path backends/cpu.py takes)
  * torch.optim.AdamW/SGD(fused=True).step  (the baseline)
  * x.mul_(c) on a 256 MiB buffer           (bandwidth probe: 8 bytes per element)
and prints ratios from the same run. The full benchmark suite is bench_adam.py / bench_sgd.py.

``--streams 1,2`` times the direct path once per stream count of the kernels (``direct s1``,
``direct s2``: csrc/cpu/kernels_impl.h, for_each_index; ``_C._set_cpu_streams`` before each
call), interleaved like the rest, to see which count suits this machine. The ``torch.ops`` column
then sets the default stream count (``_C.cpu_streams()`` at start) before each of its calls too,
and is labelled with it (``torch.ops s2``): the stream count is a process-wide setting, so without
that it would run at whatever count the previous ``direct sN`` call left.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from fusedopt import _C, _ops  # noqa: E402,F401  (_ops registers the ops)

BYTES_PER_ELEMENT = {"adamw": 28, "amsgrad": 36, "sgd": 20}  # fp32, SGD with momentum


def gpt2_small_shapes():
    shapes = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,),
                   (768, 3072), (3072,), (3072, 768), (768,)]
    return shapes + [(768,), (768,)]


WORKLOADS = {"gpt2": gpt2_small_shapes(), "10x4M": [(4 * 1024 * 1024,)] * 10,
             "1000x4096": [(4096,)] * 1000}


def providers(algo, shapes):
    params = [torch.randn(s) * 0.1 for s in shapes]
    grads = [torch.randn(s) * 0.01 for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    if algo in ("adamw", "amsgrad"):
        ams = algo == "amsgrad"
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        vmax = [torch.zeros_like(p) for p in params] if ams else []
        steps = [torch.tensor(0.0) for _ in params]
        hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=ams,
                     maximize=False, decoupled_weight_decay=True)
        lists = (params, grads, m, v, vmax, steps)
        ops = lambda: torch.ops.fusedopt.adam_(*lists, **hyper)  # noqa: E731
        direct = lambda: _C._adam_cpu(*lists, *hyper.values(), None, None, None)  # noqa: E731
        torch_opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, amsgrad=ams, fused=True)
    else:
        bufs = [torch.zeros_like(p) for p in params]
        hyper = dict(lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
                     maximize=False, is_first_step=False)
        ops = lambda: torch.ops.fusedopt.sgd_(params, grads, bufs, **hyper)  # noqa: E731
        direct = lambda: _C._sgd_cpu(params, grads, bufs, *hyper.values(), None, None, None)  # noqa: E731
        torch_opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, fused=True)
    numel = sum(p.numel() for p in params)
    return {"torch.ops": ops, "direct": direct, "torch fused": torch_opt.step}, numel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("algo", choices=sorted(BYTES_PER_ELEMENT))
    parser.add_argument("workloads", nargs="?", default="gpt2,10x4M,1000x4096")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--streams", default=None,
                        help="comma-separated stream counts (1, 2) to time the direct path with")
    args = parser.parse_args()
    stream_counts = [int(n) for n in args.streams.split(",")] if args.streams else []
    default_streams = _C.cpu_streams()
    probe_buffer = torch.ones(64 * 1024 * 1024)
    probe = lambda: probe_buffer.mul_(1.0000001)  # noqa: E731
    for workload in args.workloads.split(","):
        fns, numel = providers(args.algo, WORKLOADS[workload])
        if stream_counts:
            direct = fns.pop("direct")
            ops = fns.pop("torch.ops")
            # every entry sets its stream count (a process-wide setting) before each call
            fns = {f"torch.ops s{default_streams}":
                   (lambda: (_C._set_cpu_streams(default_streams), ops())), **fns}
            for n in stream_counts:
                fns[f"direct s{n}"] = (lambda n: lambda: (_C._set_cpu_streams(n), direct()))(n)
        fns["probe"] = probe
        best = dict.fromkeys(fns, float("inf"))
        for fn in fns.values():  # warm-up
            fn(), fn()
        for _ in range(args.reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        bandwidth = probe_buffer.numel() * 8 / best["probe"]
        nbytes = numel * BYTES_PER_ELEMENT[args.algo]
        cols = [f"{name} {best[name] * 1e3:8.3f} ms ({best['torch fused'] / best[name]:4.2f}x, "
                f"{nbytes / best[name] / bandwidth:4.2f} of bw)"
                for name in fns if name not in ("torch fused", "probe")]
        print(f"{args.algo:8s} {workload:10s} n={len(WORKLOADS[workload]):4d} | " + " | ".join(cols)
              + f" | torch fused {best['torch fused'] * 1e3:8.3f} ms | probe "
              f"{bandwidth / 1e9:5.1f} GB/s", flush=True)
    _C._set_cpu_streams(default_streams)


if __name__ == "__main__":
    main()
