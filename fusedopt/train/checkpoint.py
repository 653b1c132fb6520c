"""Atomic, self-describing training checkpoints and RNG state capture.

A checkpoint comes in one of two formats (``--checkpoint-format``):

* ``full``: one ``torch.save`` file ``step_XXXXXXXX.pt`` holding the model, optimizer,
  scheduler and grad-scaler state, the data position, the step, the config, and per-rank
  state (RNG streams of torch CPU/CUDA, numpy and ``random``). It is written to a hidden
  temporary file in the same directory, fsync'ed, then moved over the final name with
  ``os.replace``, so a process killed mid-save leaves the previous checkpoints intact and
  never a half-written ``step_*.pt``.
* ``sharded``: a directory ``step_XXXXXXXX/`` holding the model and optimizer as
  ``torch.distributed.checkpoint`` files (every rank writes its own shards; see
  ``sharding.save_sharded``) and ``meta.pt``, the rest of the full format. The ranks write
  into a hidden ``.step_XXXXXXXX.tmp`` directory; rank 0 writes ``meta.pt`` last and renames
  the directory, so only complete checkpoints carry the final name.

All values are tensors or plain Python containers, so checkpoints load with
``torch.load(weights_only=True)`` (no arbitrary unpickling). Which format a checkpoint is
follows from its path (file or directory), so a run resumes from either.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

FORMAT = "fusedopt.train/1"
_NAME_RE = re.compile(r"^step_(\d{8})(\.pt)?$")
_STALE_GLOB = ".step_*.tmp*"  # leftovers of saves killed before their rename
META_NAME = "meta.pt"  # a sharded checkpoint's non-tensor part (written last)
SHARDED_KEYS = ("format", "step", "scheduler", "data", "rank_states")
REQUIRED_KEYS = SHARDED_KEYS + ("model", "optimizer")


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
def checkpoint_name(step: int, sharded: bool = False) -> str:
    return f"step_{step:08d}" if sharded else f"step_{step:08d}.pt"


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint (a directory with its ``meta.pt``)."""
    return Path(path).is_dir() and (Path(path) / META_NAME).is_file()


def _is_checkpoint(p: Path) -> bool:
    match = _NAME_RE.match(p.name)
    if match is None:
        return False
    return p.is_file() if match.group(2) else is_sharded(p)


def list_checkpoints(directory: str) -> List[Path]:
    """Complete checkpoints in ``directory`` (files and sharded directories), oldest first;
    temporary files and directories are ignored. One step saved in both formats sorts the
    directory first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _is_checkpoint(p)]
    return sorted(found, key=lambda p: (int(_NAME_RE.match(p.name).group(1)), p.is_file()))


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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_fsynced(payload: Dict[str, Any], path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_atomically(payload: Dict[str, Any], final: Path) -> Path:
    """``payload`` into ``final`` through a hidden fsync'ed temporary file moved over it (a
    reader never sees a half-written file); returns the temporary name (gone by then)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        _write_fsynced(payload, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return tmp


def _prune(d: Path, keep_last: int, keep: Path) -> None:
    """Keep the newest ``keep_last`` checkpoints; remove leftovers of killed saves."""
    for old in list_checkpoints(str(d))[:-keep_last]:
        _remove(old)
    for stale in d.glob(_STALE_GLOB):
        if stale != keep:
            _remove(stale)


def save_checkpoint(payload: Dict[str, Any], directory: str, keep_last: int) -> Path:
    """Atomically write ``payload`` as ``step_<payload['step']>.pt``; keep the newest ``keep_last``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / checkpoint_name(int(payload["step"]))
    tmp = _write_atomically(payload, final)
    _fsync_dir(d)
    _prune(d, keep_last, keep=tmp)
    return final


def begin_sharded_checkpoint(directory: str, step: int) -> Path:
    """The empty temporary directory the ranks write a sharded checkpoint of ``step`` into
    (rank 0 calls it; a leftover of a killed save of the same step is cleared)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{checkpoint_name(step, sharded=True)}.tmp"
    _remove(tmp)
    tmp.mkdir()
    return tmp


def finish_sharded_checkpoint(meta: Dict[str, Any], tmp: Path, keep_last: int) -> Path:
    """Rank 0, once every rank has written its shards into ``tmp``: write ``meta.pt`` (the
    payload without model and optimizer), then move ``tmp`` to its final name and prune."""
    tmp = Path(tmp)
    d = tmp.parent
    final = d / checkpoint_name(int(meta["step"]), sharded=True)
    _write_fsynced(meta, tmp / META_NAME)
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (a finished run resumed): replace it
        old = d / f".{final.name}.tmp-old"
        _remove(old)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(d)
    _prune(d, keep_last, keep=tmp)
    return final


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load and sanity-check a checkpoint; raise CheckpointError naming the file otherwise.

    For a sharded checkpoint this is its ``meta.pt``, with ``"sharded": True``: the model and
    optimizer stay in the directory's ``torch.distributed.checkpoint`` files
    (``sharding.load_sharded`` reads them, ``consolidate`` makes a full checkpoint of them).
    """
    path = Path(path)
    sharded = path.is_dir()
    if sharded and not is_sharded(path):
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory without {META_NAME}: "
                              "not a (complete) sharded checkpoint")
    if not sharded and not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        payload = torch.load(path / META_NAME if sharded else path, map_location=map_location,
                             weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or unreadable ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a fusedopt.train checkpoint")
    missing = [k for k in (SHARDED_KEYS if sharded else REQUIRED_KEYS) if k not in payload]
    if missing or payload.get("format") != FORMAT or bool(payload.get("sharded")) != sharded:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a {FORMAT} checkpoint (missing: {missing or 'format'})"
        )
    return payload


def load_full_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint of either format as a full one holds it (model and optimizer included, full
    tensors, torch.optim's layout), on the CPU. For a sharded checkpoint this gathers every
    tensor into this process."""
    payload = load_checkpoint(path)
    if payload.pop("sharded", False):
        from .sharding import consolidate

        try:
            payload.update(consolidate(Path(path)))
        except Exception as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or unreadable "
                                  f"({type(exc).__name__}: {exc})") from exc
    return payload


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fusedopt.train.checkpoint consolidate STEP_DIR OUT.pt``: a sharded
    checkpoint as one full checkpoint file (which ``torch.load`` and ``--resume`` read)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fusedopt.train.checkpoint",
                                     description=main.__doc__.split(":", 1)[1].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser("consolidate", help="write a sharded checkpoint as one full file")
    cons.add_argument("sharded", help="a sharded checkpoint directory (step_XXXXXXXX/)")
    cons.add_argument("output", help="the full checkpoint file to write")
    args = parser.parse_args(argv)
    try:
        payload = load_full_checkpoint(Path(args.sharded))
        out = Path(args.output)
        _write_atomically(payload, out)
    except (CheckpointError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"wrote {out} (step {payload['step']}, {len(payload['model'])} model tensors)")
    return 0


def resolve_resume(resume: str, ckpt_dir: str) -> Optional[Path]:
    """Which checkpoint ``--resume`` means: None (start fresh) or an existing file path.

    ``''`` -> None; ``'auto'`` -> newest in ``ckpt_dir`` or None when there is none;
    a sharded checkpoint's directory (``step_XXXXXXXX``) -> itself; another directory -> its
    newest checkpoint (error if it has none); a file -> itself (error if missing).
    """
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_dir)
    p = Path(resume)
    match = _NAME_RE.match(p.name)
    if p.is_dir() and match and not match.group(2):  # a sharded checkpoint (load checks it)
        return p
    if p.is_dir():
        latest = latest_checkpoint(str(p))
        if latest is None:
            raise CheckpointError(f"--resume {resume!r}: directory holds no step_* checkpoint "
                                  "(file or sharded directory)")
        return latest
    if not p.is_file():
        raise CheckpointError(f"--resume {resume!r}: checkpoint does not exist")
    return p


if __name__ == "__main__":
    raise SystemExit(main())
