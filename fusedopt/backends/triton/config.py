"""Launch configurations of the Triton kernels: candidates per parameter dtype, and the fallback row.

A program owns one *chunk* of one tensor: ``tiles`` tiles of ``block`` elements, processed in a
loop. Bigger chunks mean fewer programs and fewer table reads per element; smaller chunks mean less
padding waste on tensors that are not a multiple of the chunk and better balance on small models.

Which row is fastest depends on the GPU, so on CUDA the optimizer kernels do not use a fixed
row: :mod:`.tuning` times the :data:`CANDIDATES` of a dtype on the device the first time it is
needed and keeps the fastest (cached on disk). :data:`DEFAULT_CONFIGS` is the row used when
tuning is off or not allowed (under CUDA graph capture, on CPU tensors in the interpreter),
while the timing runs, and by the clipping norm kernel, and the row tuning keeps unless a
candidate is measurably faster. It was NOT timed (no session so far had a GPU); it follows the
usual shape of memory-bound elementwise kernels on NVIDIA GPUs:

* one 16-byte vector per tensor per thread per tile: fp32 512 x 4 warps (4 elements a thread),
  bf16/fp16 1024 x 4 warps (8 elements); twice that per thread roughly doubles the registers
  for no more bytes in flight per SM;
* 8 (fp32) / 4 (16-bit) tiles per program: a 4096-element chunk, so the ~10 scalar table loads,
  the step atomics and the bias corrections of a program are spread over 16 KiB (fp32) of every
  tensor, while a 124M-parameter model still launches ~30k programs, far more than an H100's
  132 SMs hold at once.

Registers per thread, from ptxas on the kernels compiled for sm_90a without a GPU
(``benchmarks/triton_registers.py``; every candidate in ``results/triton-registers-sm90.json``
and ``-sm80.json``, triton 3.8): default rows fp32 AdamW 56 (9 programs per SM by registers),
AMSGrad 72 (7), SGD with momentum 38 (12); bf16 AdamW 94 (5), AMSGrad 113 (4), SGD 55 (9).
The most is 250 (16-bit AMSGrad 2048 x 4 warps, 2 programs per SM). Nothing spills but one
8-byte value (a store and a load) of fp32 AdamW with 512-element tiles on sm_90, where ptxas
stays at 56 registers; none on sm_80.

The candidates vary each of those choices around the default: fewer and more tiles per program
(chunk size), twice the elements per thread, more warps per program. Every candidate is tested
under the interpreter to give bit-identical results to the default row (the per-element math
does not depend on the launch shape). ``benchmarks/gpu_check.sh`` (stage ``tune``) writes the
tuned choices and every candidate's time to its results.

``FUSEDOPT_TRITON_CONFIG`` overrides rows without editing code and wins over tuning, e.g.
``FUSEDOPT_TRITON_CONFIG="float32=2048x2x8,bfloat16=4096x1x8"`` (block x tiles x warps).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

#: Environment variable overriding rows (read at every lookup; wins over tuning).
ENV_VAR = "FUSEDOPT_TRITON_CONFIG"


@dataclass(frozen=True)
class LaunchConfig:
    block: int       # elements per tile: one vector load / store per tensor
    tiles: int       # tiles per program; a program owns block * tiles elements of one tensor
    num_warps: int   # warps per program

    @property
    def chunk(self) -> int:
        """Elements owned by one program."""
        return self.block * self.tiles

    def __str__(self) -> str:
        return f"{self.block}x{self.tiles}x{self.num_warps}"  # the FUSEDOPT_TRITON_CONFIG spelling

    @classmethod
    def parse(cls, spec: str) -> "LaunchConfig":
        """The row spelled ``"BxTxW"`` (as :meth:`__str__` writes it); ValueError if it is not."""
        block, tiles, warps = (int(x) for x in spec.lower().split("x"))
        return cls(block, tiles, warps)


#: The fallback row per dtype (see above). Keys are the parameter dtypes the backend supports.
DEFAULT_CONFIGS: Dict[torch.dtype, LaunchConfig] = {
    torch.float32: LaunchConfig(block=512, tiles=8, num_warps=4),
    torch.bfloat16: LaunchConfig(block=1024, tiles=4, num_warps=4),
    torch.float16: LaunchConfig(block=1024, tiles=4, num_warps=4),
}

#: What :mod:`.tuning` times per dtype (the default row first). Change the candidates here.
CANDIDATES: Dict[torch.dtype, Tuple[LaunchConfig, ...]] = {
    torch.float32: (DEFAULT_CONFIGS[torch.float32], LaunchConfig(512, 2, 4), LaunchConfig(512, 32, 4),
                    LaunchConfig(1024, 4, 4), LaunchConfig(1024, 4, 8), LaunchConfig(256, 16, 2),
                    LaunchConfig(2048, 2, 8)),
    torch.bfloat16: (DEFAULT_CONFIGS[torch.bfloat16], LaunchConfig(1024, 1, 4), LaunchConfig(1024, 16, 4),
                     LaunchConfig(512, 8, 4), LaunchConfig(2048, 2, 8), LaunchConfig(2048, 2, 4)),
}
CANDIDATES[torch.float16] = CANDIDATES[torch.bfloat16]

_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_parsed: Dict[str, Dict[torch.dtype, LaunchConfig]] = {}


def parse_overrides(text: str) -> Dict[torch.dtype, LaunchConfig]:
    """Parse ``"float32=1024x4x4,bfloat16=2048x2x4"`` into config rows; raise ValueError if bad."""
    rows: Dict[torch.dtype, LaunchConfig] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, spec = item.partition("=")
        try:
            dtype = _NAMES[name.strip()]
            row = LaunchConfig.parse(spec)
        except (KeyError, ValueError):
            raise ValueError(f"{ENV_VAR}: cannot parse {item!r}; expected e.g. float32=1024x4x4") from None
        block = row.block
        if block < 16 or block & (block - 1) or row.tiles < 1 or row.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"{ENV_VAR}: {item!r}: block must be a power of two >= 16, tiles >= 1, "
                             "warps a power of two <= 32")
        rows[dtype] = row
    return rows


def override_for(dtype: torch.dtype) -> Optional[LaunchConfig]:
    """The row of ``FUSEDOPT_TRITON_CONFIG`` for ``dtype``, or None (read at every call)."""
    text = os.environ.get(ENV_VAR)
    if not text:
        return None
    rows = _parsed.get(text)
    if rows is None:
        rows = _parsed[text] = parse_overrides(text)
    return rows.get(dtype)


def config_for(dtype: torch.dtype) -> LaunchConfig:
    """The untuned configuration for parameters of ``dtype``: the override, else the default."""
    return override_for(dtype) or DEFAULT_CONFIGS[dtype]
