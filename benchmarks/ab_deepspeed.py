"""Whole-step A/B of fusedopt's AdamW (cpu backend) against DeepSpeedCPUAdam, outside bench_adam.

    python benchmarks/ab_deepspeed.py [--workload gpt2] [--repeats 15] [--out FILE|none]

A cross-check of bench_adam's big-tensor comparison with a simpler method: two optimizers over
their own copies of the same shapes, steps alternated (A B, B A, ...), the caches flushed with
an in-place pass over a buffer larger than the last-level cache before every timed step, min of
``--repeats``. Prints the two minimum times and their ratio and appends one JSON record to
``benchmarks/results/ab-deepspeed-<device>-<date>.jsonl``. Needs ``pip install deepspeed``.

Its records are A/B records (``benchmark: "ab-deepspeed"``, both times in one record), not rows of
the benchmarks' schema (common.RECORD_FIELDS): ``summarize.py`` leaves them out and says so. The
params are fp32, so both optimizers keep fp32 state (DeepSpeed's ``fp32_optimizer_states`` makes
no difference here); the record says which dtype each kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import fusedopt  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="gpt2", help="a bench workload name (gpt2, 10x4M, ...)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default=None, help="JSON-lines file, or 'none'")
    args = parser.parse_args(argv)
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to stop
        raise SystemExit(f"DeepSpeedCPUAdam is not importable ({type(exc).__name__}: {exc}); "
                         "pip install deepspeed") from None
    workload = common.make_workloads(args.workload)[0]

    def params():
        ps = [torch.nn.Parameter(torch.randn(s)) for s in workload.shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    opts = {"fusedopt-cpu": fusedopt.optim.AdamW(params(), lr=1e-3, weight_decay=0.01, backend="cpu"),
            "deepspeed-cpuadam": DeepSpeedCPUAdam(params(), lr=1e-3, weight_decay=0.01, adamw_mode=True)}
    cpu = torch.device("cpu")
    flush = torch.empty(max(256 * 2 ** 20, 4 * common.last_level_cache_bytes(cpu)) // 4)
    for opt in opts.values():
        for _ in range(2):
            opt.step()
    times = {name: [] for name in opts}
    names = list(opts)
    for i in range(args.repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            flush.mul_(1.0)
            start = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - start)
    fo, ds = (min(times[n]) * 1e3 for n in names)
    record = {"benchmark": "ab-deepspeed", "workload": workload.name, "repeats": args.repeats,
              "ms_min": {"fusedopt-cpu": fo, "deepspeed-cpuadam": ds}, "fusedopt_over_deepspeed": fo / ds,
              "device": common.cpu_model(), "num_threads": torch.get_num_threads(),
              "torch_version": torch.__version__, "git_commit": common.git_commit(),
              "load_avg": os.getloadavg()[0], "cpu_pressure": common.cpu_pressure(),
              "state_dtype": {name: sorted({common.dtype_name(st["exp_avg"].dtype)
                                            for st in opt.state.values() if "exp_avg" in st})
                              for name, opt in opts.items()},
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(f"{workload.label}: fusedopt-cpu {fo:.2f} ms, deepspeed-cpuadam {ds:.2f} ms, "
          f"fusedopt/deepspeed {fo / ds:.3f}")
    if args.out != "none":
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"ab-deepspeed-{common.slug(common.cpu_model())}-"
                                       f"{datetime.date.today().isoformat()}.jsonl")
        with open(out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
