"""Step metrics: windowed accumulation, cross-rank reduction, JSONL log, tqdm bar, summary.

Losses and grad norms are accumulated as device tensors (no host sync per
step) and all-reduced only on logging steps.  Only rank 0 writes anything.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .distributed import DistContext, all_reduce_sum


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on ``device``, or the process's peak RSS on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class MetricsWindow:
    """Per-rank sums over the steps since the last log line.

    ``loss_sum`` and ``grad_norm_sum`` are float64 device tensors; the window is
    part of each rank's checkpointed state so a resumed run logs exactly what an
    uninterrupted one would.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grad_norm_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.steps = 0
        self.grad_norm_steps = 0  # the steps whose norm counts: those GradScaler did not skip
        self.step_time = 0.0
        self.opt_time = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, step_time: float, opt_time: float,
            skipped: bool = False) -> None:
        """One step. A step GradScaler ``skipped`` (inf/NaN gradients: its norm is inf) adds its
        loss but not its gradient norm, so that one skip does not make the window's norm inf."""
        self.loss_sum += loss.detach().to(torch.float64)
        if not skipped:
            self.grad_norm_sum += grad_norm.detach().to(torch.float64)
            self.grad_norm_steps += 1
        self.steps += 1
        self.step_time += step_time
        self.opt_time += opt_time

    def state_dict(self) -> Dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "grad_norm_sum": self.grad_norm_sum.cpu(),
                "steps": self.steps, "grad_norm_steps": self.grad_norm_steps,
                "step_time": self.step_time, "opt_time": self.opt_time}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.loss_sum = state["loss_sum"].to(self.device)
        self.grad_norm_sum = state["grad_norm_sum"].to(self.device)
        self.steps = int(state["steps"])
        self.grad_norm_steps = int(state.get("grad_norm_steps", self.steps))  # (older checkpoints)
        self.step_time = float(state["step_time"])
        self.opt_time = float(state["opt_time"])

    def reduce(self, ctx: DistContext) -> Dict[str, float]:
        """Global window means (a collective: every rank must call it); the gradient norm is
        None when every step of the window was skipped."""
        sums = all_reduce_sum(torch.stack([self.loss_sum, self.grad_norm_sum]), ctx)
        n = max(self.steps, 1) * ctx.world_size
        n_norms = self.grad_norm_steps * ctx.world_size
        return {"loss": float(sums[0]) / n,
                "grad_norm": float(sums[1]) / n_norms if n_norms else None}


class RunStats:
    """Totals for the final summary (rank 0's timings; first step of a process excluded)."""

    def __init__(self) -> None:
        self.timed_steps = 0
        self.step_time = 0.0
        self.opt_time = 0.0
        self.tokens = 0
        self.first_step_done = False
        self.start = time.perf_counter()

    def add(self, step_time: float, opt_time: float, tokens: int) -> None:
        if not self.first_step_done:  # warm-up (allocations, kernel compilation)
            self.first_step_done = True
            return
        self.timed_steps += 1
        self.step_time += step_time
        self.opt_time += opt_time
        self.tokens += tokens

    def summary(self) -> Dict[str, float]:
        """Timing means; all NaN when no step was timed (e.g. resuming a finished run)."""
        st = self.step_time if self.timed_steps else float("nan")
        n = self.timed_steps or float("nan")
        return {
            "timed_steps": self.timed_steps,
            "mean_step_ms": 1000.0 * st / n,
            "optimizer_share": self.opt_time / st,
            "mean_optimizer_ms": 1000.0 * self.opt_time / n,
            "tokens_per_s": self.tokens / st,
            "wall_s": time.perf_counter() - self.start,
        }


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    with open(path, "r", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def truncate_log(path: str, last_step: int) -> None:
    """Drop metric records after ``last_step`` (what a killed attempt logged past its
    last checkpoint, which the resumed run logs again); keep event records; atomic."""
    if not os.path.isfile(path):
        return
    kept = [r for r in read_jsonl(path) if "event" in r or r.get("step", -1) <= last_step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in kept:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class MetricsLogger:
    """Rank-0 sink: appends JSON lines to ``path`` and drives a tqdm bar."""

    def __init__(self, path: str, enabled: bool, progress: bool, total_steps: int, initial_step: int):
        self.enabled = enabled
        self.path = path
        self._fh = None
        self._bar = None
        if not enabled:
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", encoding="utf-8")
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                             dynamic_ncols=True, desc="train")

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()

    def event(self, name: str, **fields: Any) -> None:
        self.write({"event": name, "time": time.time(), **fields})

    def progress(self, steps: int, postfix: Optional[Dict[str, str]] = None) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def format_summary(summary: Dict[str, Any]) -> str:
    """Human-readable final summary block."""
    lines = ["==== fusedopt.train summary ===="]
    for key, value in summary.items():
        if isinstance(value, float):
            if key.endswith("share"):
                text = f"{100 * value:.1f}%"
            elif abs(value) >= 1000:
                text = f"{value:,.0f}"
            else:
                text = f"{value:.4g}"
        else:
            text = str(value)
        lines.append(f"{key:>22}: {text}")
    return "\n".join(lines)
