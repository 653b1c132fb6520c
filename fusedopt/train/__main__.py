"""Command-line entry point: ``python -m fusedopt.train`` or ``torchrun ... -m fusedopt.train``."""

from __future__ import annotations

import sys
from typing import List, Optional

from .config import ConfigError, parse_config


def main(argv: Optional[List[str]] = None) -> int:
    try:
        cfg = parse_config(argv)
    except ConfigError as exc:
        raise SystemExit(f"fusedopt.train: error: {exc}") from None
    from .loop import train  # imports torch; keep --help fast

    try:
        train(cfg)
    except ValueError as exc:  # ConfigError, CheckpointError and data errors
        raise SystemExit(f"fusedopt.train: error: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
