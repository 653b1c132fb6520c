"""Atomic, self-describing training checkpoints and RNG state capture.

A checkpoint is one ``torch.save`` file ``step_XXXXXXXX.pt`` holding the model,
optimizer, scheduler and grad-scaler state, the data position, the step, the
config, and per-rank state (RNG streams of torch CPU/CUDA, numpy and ``random``).
It is written to a hidden temporary file in the same directory, fsync'ed, then
moved over the final name with ``os.replace``, so a process killed mid-save
leaves the previous checkpoints intact and never a half-written ``step_*.pt``.
All values are tensors or plain Python containers, so checkpoints load with
``torch.load(weights_only=True)`` (no arbitrary unpickling).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT = "fusedopt.train/1"
_NAME_RE = re.compile(r"^step_(\d{8})\.pt$")
REQUIRED_KEYS = ("format", "step", "model", "optimizer", "scheduler", "data", "rank_states")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit this run."""


# ------------------------------------------------------------------ RNG state
def capture_rng_state() -> Dict[str, Any]:
    """The RNG streams of this process as weights_only-loadable values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    nps = state["numpy"]
    np.random.set_state((nps["kind"], nps["keys"].cpu().numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ------------------------------------------------------------------ files
def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def list_checkpoints(directory: str) -> List[Path]:
    """Complete checkpoints in ``directory``, oldest first (temp files are ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_file() and _NAME_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME_RE.match(p.name).group(1)))


def latest_checkpoint(directory: str) -> Optional[Path]:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(payload: Dict[str, Any], directory: str, keep_last: int) -> Path:
    """Atomically write ``payload`` as ``step_<payload['step']>.pt``; keep the newest ``keep_last``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / checkpoint_name(int(payload["step"]))
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(d)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    # Leftovers of saves that were killed before os.replace.
    for stale in d.glob(".step_*.pt.tmp-*"):
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load and sanity-check a checkpoint; raise CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a fusedopt.train checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a {FORMAT} checkpoint (missing: {missing or 'format'})"
        )
    return payload


def resolve_resume(resume: str, ckpt_dir: str) -> Optional[Path]:
    """Which checkpoint ``--resume`` means: None (start fresh) or an existing file path.

    ``''`` -> None; ``'auto'`` -> newest in ``ckpt_dir`` or None when there is none;
    a directory -> its newest checkpoint (error if it has none); a file -> itself
    (error if missing).
    """
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    p = Path(resume)
    if p.is_dir():
        latest = latest_checkpoint(str(p))
        if latest is None:
            raise CheckpointError(f"--resume {resume!r}: directory holds no step_*.pt checkpoint")
        return latest
    if not p.is_file():
        raise CheckpointError(f"--resume {resume!r}: checkpoint does not exist")
    return p
