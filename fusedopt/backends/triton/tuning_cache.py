"""The on-disk cache of the launch tuning (:mod:`.tuning`): one JSON file of entries by key.

``{"version": 1, "entries": {key: {"config": "512x8x4", "timings_ms": {...}, ...}}}`` in
``triton_tuning.json`` under ``$FUSEDOPT_CACHE_DIR`` (default ``$XDG_CACHE_HOME/fusedopt``,
i.e. ``~/.cache/fusedopt``). Readers treat a missing or unreadable file as empty; writers take
an exclusive lock on a lock file beside it, merge, and replace the file atomically (0644: the
cache may be shared). What an entry means is for :mod:`.tuning` to check.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

from .config import LaunchConfig

#: Directory of the cache file (default ``$XDG_CACHE_HOME/fusedopt``).
ENV_CACHE_DIR = "FUSEDOPT_CACHE_DIR"
CACHE_FILE = "triton_tuning.json"


def path() -> str:
    """The cache file: ``$FUSEDOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedopt``, else
    ``~/.cache/fusedopt``, then ``triton_tuning.json``."""
    root = os.environ.get(ENV_CACHE_DIR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fusedopt")
    return os.path.join(root, CACHE_FILE)


def read_entries() -> dict:
    """The entries of the cache file; {} when it is missing or unreadable."""
    try:
        with open(path(), encoding="utf-8") as f:
            data = json.load(f)
        entries = data.get("entries") if isinstance(data, dict) else None
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def write_entry(key: str, entry) -> Optional[str]:
    """Add ``entry`` under ``key``, keeping the other entries (also those other processes, e.g.
    DDP ranks, add at the same time: read-modify-write under an exclusive lock on a lock file
    beside it), then replace the file atomically. None, or what went wrong."""
    file = path()
    directory = os.path.dirname(file)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        with open(file + ".lock", "a") as lock:
            _lock(lock)
            entries = read_entries()
            entries[key] = entry
            fd, tmp = tempfile.mkstemp(prefix=".triton_tuning.", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "entries": entries}, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)  # (mkstemp makes it private; the cache may be shared)
            os.replace(tmp, file)
            tmp = None
        return None
    except OSError as exc:
        return f"cannot write the tuning cache {file} ({exc})"
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _lock(f) -> None:
    """An exclusive lock on ``f`` until it is closed (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)


def parse_config(text) -> Optional[LaunchConfig]:
    """The row an entry names (``"BxTxW"``), or None when it names none."""
    try:
        return LaunchConfig.parse(text) if isinstance(text, str) else None
    except ValueError:
        return None
