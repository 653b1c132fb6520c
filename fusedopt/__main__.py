"""``python -m fusedopt info``: which backends work here, why the others don't, build and ISA."""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any, Dict


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    found = [isa for isa in ("avx512f", "avx512bw", "avx512_bf16", "avx2", "fma", "f16c")
                             if isa in flags]
                    return " ".join(found) or "none of avx2/avx512"
    except OSError:
        pass
    return "unknown"


def collect() -> Dict[str, Any]:
    """Everything ``info`` prints, as a dict (also used by the benchmarks' result files)."""
    import torch

    from . import __version__, backends

    info: Dict[str, Any] = {
        "fusedopt": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_flags": _cpu_flags(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:  # triton is optional
        info["triton"] = f"not importable ({type(exc).__name__}: {exc})"
    try:
        from . import _C
        info["build"] = dict(_C.build_info())
        info["cpu_isa"] = _C.cpu_isa()
        # (an extension built before the stream choice existed has no cpu_streams)
        info["cpu_streams"] = _C.cpu_streams() if hasattr(_C, "cpu_streams") else None
    except Exception as exc:
        info["build"] = f"fusedopt._C not importable ({type(exc).__name__}: {exc})"
        info["cpu_isa"] = None
        info["cpu_streams"] = None
    info["backends"] = {name: ("available" if reason is None else f"unavailable: {reason}")
                        for name, reason in backends.available().items()}
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="print backends, build flags, CPU ISA, versions")
    info_parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if args.command == "info":
        info = collect()
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            for key, value in info.items():
                if isinstance(value, dict):
                    print(f"{key}:")
                    for k, v in value.items():
                        print(f"  {k}: {v}")
                else:
                    print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
