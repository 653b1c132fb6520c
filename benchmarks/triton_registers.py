"""Registers and spills of the Triton optimizer kernels for every launch candidate, without a GPU.

Compiles the kernels for a CUDA target (``triton.compile`` to PTX, as on a GPU) for every row of
``fusedopt.backends.triton.config.CANDIDATES`` and runs Triton's bundled ``ptxas -v`` on the
PTX: registers per thread, spill bytes, and what that allows per SM (programs and warps, from
the register file alone: 64K 32-bit registers, at most 64 warps and 32 programs per SM on sm_80
/ sm_90). The variants are those the tuner times: AdamW, AdamW + AMSGrad, SGD with momentum,
each on the aligned (128-bit vector) path.

    python benchmarks/triton_registers.py [--arch 90] [--dtypes float32,...] [--variants adamw,...]
        [--out benchmarks/results/triton-registers-sm90.json]

The tuner picks among these rows by time on the GPU; this says which rows are cheap in
registers and that none spills (a spill would show here before any GPU run).
"""
from __future__ import annotations

import argparse
import json
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (before the kernels are defined)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fusedopt.backends.triton import config  # noqa: E402
from fusedopt.backends.triton.adam_kernel import adam_kernel  # noqa: E402
from fusedopt.backends.triton.sgd_kernel import sgd_kernel  # noqa: E402

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_FLAGS_OFF = dict(MAXIMIZE=False, LR_ON_DEVICE=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False)
VARIANTS = {
    "adamw": (adam_kernel, dict(_FLAGS_OFF, STEP_DTYPE=tl.float32, AMSGRAD=False, DECOUPLED=True,
                                HAS_WEIGHT_DECAY=True)),
    "adamw-amsgrad": (adam_kernel, dict(_FLAGS_OFF, STEP_DTYPE=tl.float32, AMSGRAD=True, DECOUPLED=True,
                                        HAS_WEIGHT_DECAY=True)),
    "sgd-momentum": (sgd_kernel, dict(_FLAGS_OFF, HAS_MOMENTUM=True, NESTEROV=False, FIRST_STEP=False,
                                      HAS_WEIGHT_DECAY=False)),
}
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 65536, 64, 32


def _signature(kernel, constants):
    pointer_types = {"arrivals": "*i32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
    floats = ("lr", "beta1", "beta2", "eps", "decay", "momentum", "dampening")
    return {n: "constexpr" if n in constants else pointer_types.get(n, "fp32" if n.endswith(floats) else "*i64")
            for n in kernel.arg_names}


def _ptxas() -> str:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return here if os.path.exists(here) else "ptxas"


def _source(kernel, constants) -> ASTSource:
    """The kernel specialised on ``constants``. Triton >= 3.3 takes every argument's type by name
    and the constexprs keyed by argument path; older triton (3.1 with torch 2.5, 3.2 with 2.6)
    takes the types of the other arguments and the constants, both by name (3.2 refuses other
    keys)."""
    signature = _signature(kernel, constants)
    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:
        return ASTSource(fn=kernel, signature=signature,
                         constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
    return ASTSource(fn=kernel, signature={n: t for n, t in signature.items() if n not in constants},
                     constants=dict(constants))


def measure(kernel, constants, warps: int, arch: int) -> dict:
    source = _source(kernel, constants)
    ptx = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}).asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        suffix = "a" if arch == 90 else ""
        out = subprocess.run([_ptxas(), "-v", f"-arch=sm_{arch}{suffix}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", out).group(1))
    spill_stores = int(re.search(r"(\d+) bytes spill stores", out).group(1))
    spill_loads = int(re.search(r"(\d+) bytes spill loads", out).group(1))
    # registers are allocated per warp in units of 256 (8 per thread, rounded up)
    per_warp = -(-registers * 32 // 256) * 256
    warps_by_registers = REGISTERS_PER_SM // per_warp
    programs = min(MAX_PROGRAMS_PER_SM, warps_by_registers // warps, MAX_WARPS_PER_SM // warps)
    return dict(registers=registers, spill_bytes=spill_stores + spill_loads, vector_loads="ld.global.v4" in ptx,
                programs_per_sm=programs, warps_per_sm=programs * warps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (80, 90)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    variants = args.variants.split(",")
    rows, start = [], time.time()
    print(f"{'variant':14s} {'dtype':9s} {'row':10s} {'regs':>4s} {'spill':>5s} {'v4':>3s} {'prog/SM':>7s} {'warps/SM':>8s}")
    for dtype in dtypes:
        for variant in variants:
            kernel, flags = VARIANTS[variant]
            for cfg in config.CANDIDATES[dtype]:
                constants = dict(flags, DTYPE=_TL[dtype], BLOCK=cfg.block, TILES=cfg.tiles)
                row = dict(variant=variant, dtype=str(dtype), config=str(cfg),
                           default=cfg == config.DEFAULT_CONFIGS[dtype],
                           **measure(kernel, constants, cfg.num_warps, args.arch))
                rows.append(row)
                print(f"{variant:14s} {str(dtype)[6:]:9s} {str(cfg) + ('*' if row['default'] else ''):10s} "
                      f"{row['registers']:4d} {row['spill_bytes']:5d} {'y' if row['vector_loads'] else 'n':>3s} "
                      f"{row['programs_per_sm']:7d} {row['warps_per_sm']:8d}")
    print(f"(* = default row; sm_{args.arch}; {time.time() - start:.0f} s)")
    if args.out:
        record = dict(arch=f"sm_{args.arch}", triton=triton.__version__, torch=torch.__version__,
                      measured_at=time.strftime("%Y-%m-%d"), rows=rows)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
