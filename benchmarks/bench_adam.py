"""Adam / AdamW / AMSGrad step throughput: torch.optim (for-loop, foreach, fused, compiled) vs
fusedopt backends vs DeepSpeed / apex when installed.

    python benchmarks/bench_adam.py                  # GPU if there is one, else CPU
    python benchmarks/bench_adam.py --quick          # smoke test, seconds
    python benchmarks/bench_adam.py --algo adamw --dtype bf16 --workloads gpt2 --compile

Byte model (fp32): 28 bytes per parameter per step (read p, g, m, v; write p, m, v), 36 with
AMSGrad; scaled by the element size for other dtypes. See common.py for the method.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import AlgoConfig, BenchSpec, Provider, Skip  # noqa: E402

LR = 1e-3

ALGOS = {
    "adam": AlgoConfig("Adam", "Adam", dict(lr=LR), state_tensors=2),
    "adamw": AlgoConfig("AdamW", "AdamW", dict(lr=LR, weight_decay=1e-2), state_tensors=2),
    "amsgrad": AlgoConfig("Adam", "Adam", dict(lr=LR, amsgrad=True), state_tensors=3),
}


def external_providers(algo: str, cfg: AlgoConfig, device: torch.device, dtype: torch.dtype) -> List[Any]:
    """DeepSpeedCPUAdam (CPU) and apex FusedAdam (GPU) when importable; Skip entries otherwise."""
    decoupled = cfg.torch_cls == "AdamW"
    out: List[Any] = []
    if device.type == "cpu":
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # type: ignore
        except Exception as exc:
            out.append(Skip("deepspeed-cpuadam", f"not importable: {type(exc).__name__}: {common.first_line(exc)}"))
        else:
            if cfg.kwargs.get("amsgrad"):
                out.append(Skip("deepspeed-cpuadam", "DeepSpeedCPUAdam has no AMSGrad"))
            else:
                out.append(Provider("deepspeed-cpuadam", lambda ps, kw: DeepSpeedCPUAdam(
                    ps, lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0), adamw_mode=decoupled)))
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # type: ignore
        except Exception as exc:
            out.append(Skip("apex-fusedadam", f"not importable: {type(exc).__name__}: {common.first_line(exc)}"))
        else:
            if cfg.kwargs.get("amsgrad"):
                out.append(Skip("apex-fusedadam", "apex FusedAdam has no AMSGrad"))
            else:
                out.append(Provider("apex-fusedadam", lambda ps, kw: FusedAdam(
                    ps, lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0), adam_w_mode=decoupled)))
    return out


SPEC = BenchSpec(
    benchmark="adam",
    description=__doc__.splitlines()[0],
    algos=ALGOS,
    default_algo="adam",
    external_providers=external_providers,
)

if __name__ == "__main__":
    common.main(SPEC)
