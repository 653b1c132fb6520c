"""SGD step throughput (plain, momentum, Nesterov): torch.optim (for-loop, foreach, fused,
compiled) vs fusedopt backends vs apex FusedSGD when installed.

    python benchmarks/bench_sgd.py                   # GPU if there is one, else CPU
    python benchmarks/bench_sgd.py --quick           # smoke test, seconds
    python benchmarks/bench_sgd.py --algo momentum,nesterov --workloads gpt2

Byte model (fp32): 12 bytes per parameter per step (read p, g; write p), 20 with a momentum
buffer (plain momentum and Nesterov alike); scaled by the element size for other dtypes.

With Nesterov, torch's foreach step adds ``momentum * buf`` into ``p.grad``: common.time_providers
finds that in an untimed first step and times it on its own gradients, restored before each timed
call, so that it and every other provider step on the same pristine gradients (its record's note
says so).
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
    "plain": AlgoConfig("SGD", "SGD", dict(lr=LR), state_tensors=0),
    "momentum": AlgoConfig("SGD", "SGD", dict(lr=LR, momentum=0.9), state_tensors=1),
    "nesterov": AlgoConfig("SGD", "SGD", dict(lr=LR, momentum=0.9, nesterov=True), state_tensors=1),
}


def external_providers(algo: str, cfg: AlgoConfig, device: torch.device, dtype: torch.dtype) -> List[Any]:
    """apex FusedSGD (GPU) when importable; a Skip entry otherwise."""
    if device.type != "cuda":
        return []
    try:
        from apex.optimizers import FusedSGD  # type: ignore
    except Exception as exc:
        return [Skip("apex-fusedsgd", f"not importable: {type(exc).__name__}: {common.first_line(exc)}")]
    return [Provider("apex-fusedsgd", lambda ps, kw: FusedSGD(ps, **kw))]


SPEC = BenchSpec(
    benchmark="sgd",
    description=__doc__.splitlines()[0],
    algos=ALGOS,
    default_algo="momentum",
    external_providers=external_providers,
)

if __name__ == "__main__":
    common.main(SPEC)
