"""``python -m fusedopt.backends.triton``: tune the Triton launch rows of this GPU ahead of time
and print every candidate's time (see :mod:`fusedopt.backends.triton.tuning`; ``--help``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from . import BACKEND, tuning, tuning_cache
from . import config as launch_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt.backends.triton",
                                     description="Time the Triton launch candidates on this GPU and "
                                                 "cache the choices.")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--variants", default=",".join(tuning.VARIANTS))
    parser.add_argument("--force", action="store_true", help="time again even if cached")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    names = {str(d).replace("torch.", ""): d for d in launch_config.CANDIDATES}
    dtypes = []
    for name in filter(None, (n.strip() for n in args.dtypes.split(","))):
        if name not in names:
            parser.error(f"--dtypes: {name!r} is not one of {', '.join(names)}")
        dtypes.append(names[name])
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for variant in variants:
        if variant not in tuning.VARIANTS:
            parser.error(f"--variants: {variant!r} is not one of {', '.join(tuning.VARIANTS)}")
    device = torch.device(args.device)
    reason = BACKEND.supports(device, dtypes[0] if dtypes else torch.float32)
    if reason is not None:
        parser.error(f"the triton backend cannot run on {device}: {reason}")
    if os.environ.get(launch_config.ENV_VAR):
        print(f"note: {launch_config.ENV_VAR} is set; its rows win over these choices in the optimizers")
    results = tuning.tune(device, dtypes, variants, force=args.force)
    rows = []
    for r in results:
        default = launch_config.DEFAULT_CONFIGS[r.dtype]
        timings = "  ".join(f"{c} {t:.4f}" for c, t in sorted(r.timings_ms.items(), key=lambda kv: kv[1]))
        print(f"{r.device} {r.variant:12s} {str(r.dtype):15s} -> {r.config} (default {default}; "
              f"{'cached' if r.from_cache else 'timed'})  ms/launch: {timings}")
        for c, why in r.failed.items():
            print(f"    dropped {c}: {why}")
        rows.append(dict(device=r.device, variant=r.variant, dtype=str(r.dtype), config=str(r.config),
                         default=str(default), timings_ms=r.timings_ms, failed=r.failed,
                         from_cache=r.from_cache, torch=torch.__version__))
    print(f"cache: {tuning_cache.path()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
