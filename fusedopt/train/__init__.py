"""DDP / FSDP2 training harness demonstrating fusedopt optimizers end to end.

Run ``python -m fusedopt.train --help``; see docs/train.md.  Modules: ``config``
(options), ``data`` (corpus, sharded sampler), ``model`` (byte transformer,
parameter groups), ``optimizers`` (optimizer/schedule/clipping choice),
``loop`` (Trainer), ``checkpoint`` (atomic save/resume), ``metrics`` (logging),
``distributed`` (process group), ``sharding`` (FSDP2 and its checkpoints).
"""

from .config import ConfigError, TrainConfig, parse_config

__all__ = ["ConfigError", "TrainConfig", "parse_config", "train"]


def train(cfg: TrainConfig):
    """Run training for ``cfg`` (see :func:`fusedopt.train.loop.train`)."""
    from .loop import train as _train

    return _train(cfg)
