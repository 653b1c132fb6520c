"""Adam / AdamW / AMSGrad step throughput: torch.optim (for-loop, foreach, fused, compiled) vs
fusedopt backends vs DeepSpeed / apex when installed.

    python benchmarks/bench_adam.py                  # GPU if there is one, else CPU
    python benchmarks/bench_adam.py --quick          # smoke test, seconds
    python benchmarks/bench_adam.py --algo adamw --dtype bf16 --workloads gpt2 --compile

Byte model (fp32): 28 bytes per parameter per step (read p, g, m, v; write p, m, v), 36 with
AMSGrad; scaled by the element size for other dtypes (the optimizer state in the param dtype, as
torch.optim and fusedopt keep it). See common.py for the method.

DeepSpeedCPUAdam keeps fp32 state for bf16/fp16 params by default (``fp32_optimizer_states=True``):
more bytes than the byte model counts. It is built with ``fp32_optimizer_states=False`` here, so
that every provider keeps its state in the param dtype; DeepSpeed versions without that argument
are built without it, and the note of each deepspeed-cpuadam record says which state dtype it kept.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

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


def deepspeed_maker(cls: Any, decoupled: bool) -> Callable[[List[torch.Tensor], Dict[str, Any]], Any]:
    """``make`` of the deepspeed-cpuadam provider: ``cls(params, ..., fp32_optimizer_states=False)``
    (optimizer state in the param dtype, as torch.optim and fusedopt keep it), or without that
    argument on a DeepSpeed that does not take it (its state dtype then shows in the record's note)."""
    def make(ps: List[torch.Tensor], kw: Dict[str, Any]) -> Any:
        args = dict(lr=kw["lr"], weight_decay=kw.get("weight_decay", 0.0), adamw_mode=decoupled)
        try:
            return cls(ps, fp32_optimizer_states=False, **args)
        except TypeError as exc:
            if "fp32_optimizer_states" not in str(exc):
                raise
            return cls(ps, **args)
    return make


def state_dtype_note(optimizer: Any) -> str:
    """Which dtype the optimizer's state (exp_avg, exp_avg_sq) is kept in, and what was asked."""
    dtypes = sorted({common.dtype_name(st[key].dtype) for st in optimizer.state.values()
                     for key in ("exp_avg", "exp_avg_sq") if key in st})
    asked = getattr(optimizer, "fp32_optimizer_states", None)
    asked_text = "not supported by this DeepSpeed" if asked is None else str(asked)
    return (f"optimizer state dtype {'/'.join(dtypes) or 'unknown'} "
            f"(fp32_optimizer_states={asked_text})")


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
                out.append(Provider("deepspeed-cpuadam", deepspeed_maker(DeepSpeedCPUAdam, decoupled),
                                    note=state_dtype_note))
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
