"""Training configuration: one dataclass, overridable from a JSON/YAML file and the CLI.

Precedence is ``dataclass defaults < --config FILE < command-line flags``.  Every
field carries its help text in ``metadata["help"]`` so that ``--help`` documents
every option with its default, and the parser is generated from the dataclass
(adding a field adds a flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

OPTIMIZERS = ("adamw", "adam", "sgd")
OPTIMIZER_LIBS = ("fusedopt", "torch")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
SCHEDULERS = ("cosine", "linear", "wsd", "constant")
AMP_MODES = ("none", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
PARALLEL_MODES = ("ddp", "fsdp2")
CHECKPOINT_FORMATS = ("full", "sharded")


class ConfigError(ValueError):
    """A configuration value (or combination of values) is invalid."""


def _opt(default: Any, help: str, choices: Optional[Sequence[str]] = None, group: str = "misc"):
    meta = {"help": help, "group": group}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """All knobs of ``python -m fusedopt.train``; defaults give the ~1 minute CPU demo."""

    # data
    data: str = _opt(
        "embedded",
        "training text: 'embedded' (the package's own .py/.md files, generated text as "
        "fallback), 'synthetic' (deterministic generated text), or a path to a UTF-8 text "
        "file or a directory of text files",
        group="data",
    )
    seq_len: int = _opt(64, "tokens (bytes) per training sequence", group="data")
    val_fraction: float = _opt(0.1, "fraction of the corpus (its tail) held out for evaluation", group="data")
    max_corpus_bytes: int = _opt(4_000_000, "truncate the corpus to this many bytes", group="data")

    # model
    n_layer: int = _opt(2, "transformer blocks", group="model")
    n_head: int = _opt(4, "attention heads per block", group="model")
    d_model: int = _opt(128, "model width (must be divisible by n_head)", group="model")
    dropout: float = _opt(0.0, "dropout probability", group="model")

    # batch / schedule length
    batch_size: int = _opt(
        32, "GLOBAL micro-batch size in sequences (split evenly over ranks)", group="batch"
    )
    grad_accum: int = _opt(
        1, "micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum)",
        group="batch",
    )
    max_steps: int = _opt(300, "optimizer steps to train", group="batch")

    # optimizer
    optimizer: str = _opt("adamw", "optimizer algorithm", OPTIMIZERS, group="optimizer")
    optimizer_lib: str = _opt(
        "fusedopt", "implementation: fusedopt.optim (fused) or torch.optim (for comparison)",
        OPTIMIZER_LIBS, group="optimizer",
    )
    backend: str = _opt(
        "auto", "fusedopt kernel backend (only with --optimizer-lib fusedopt)", BACKENDS,
        group="optimizer",
    )
    lr: float = _opt(3e-3, "peak learning rate", group="optimizer")
    weight_decay: float = _opt(
        0.1, "weight decay (never applied to biases and norm weights)", group="optimizer"
    )
    beta1: float = _opt(0.9, "Adam beta1 / SGD momentum", group="optimizer")
    beta2: float = _opt(0.99, "Adam beta2", group="optimizer")
    eps: float = _opt(1e-8, "Adam epsilon", group="optimizer")
    nesterov: bool = _opt(False, "Nesterov momentum (SGD only)", group="optimizer")
    clip_grad_norm: float = _opt(
        1.0, "clip the global gradient norm to this value (0 disables clipping)", group="optimizer"
    )

    # lr schedule
    scheduler: str = _opt(
        "cosine", "learning-rate shape after warmup (fusedopt.lr_scheduler): cosine decay, linear "
        "decay, wsd (constant, then linear decay over the last wsd_decay_fraction of training), "
        "or constant", SCHEDULERS, group="schedule",
    )
    warmup_steps: int = _opt(
        20, "linear warmup steps from lr/warmup_steps to lr (must be < max_steps)", group="schedule"
    )
    min_lr_ratio: float = _opt(
        0.1, "lr reached at max_steps, as a fraction of the peak (cosine/linear/wsd)", group="schedule"
    )
    wsd_decay_fraction: float = _opt(0.2, "wsd: fraction of max_steps spent decaying", group="schedule")

    # precision / runtime
    amp: str = _opt(
        "none", "mixed precision: bf16 autocast, or fp16 autocast + GradScaler (for CUDA; also "
        "runs on CPU, slowly)",
        AMP_MODES, group="runtime",
    )
    device: str = _opt("auto", "device: auto picks cuda:LOCAL_RANK when available", DEVICES, group="runtime")
    parallel: str = _opt(
        "ddp", "with several ranks: ddp (a model replica per rank, gradients all-reduced) or fsdp2 "
        "(fully_shard: params, gradients and optimizer state sharded over the ranks; checkpoints "
        "of either mode resume under the other)", PARALLEL_MODES, group="runtime",
    )
    seed: int = _opt(0, "random seed (model init, data order, dropout)", group="runtime")
    num_threads: int = _opt(0, "torch CPU threads per process (0 = torch default)", group="runtime")

    # logging
    out_dir: str = _opt("runs/train", "run directory (metrics.jsonl, checkpoints/)", group="logging")
    log_every: int = _opt(10, "log averaged metrics every N steps", group="logging")
    eval_every: int = _opt(100, "evaluate held-out loss every N steps (0 = only at the end)", group="logging")
    eval_sequences: int = _opt(
        128, "held-out sequences per evaluation (split over ranks, independent of batch size)",
        group="logging",
    )
    progress: bool = _opt(True, "show a tqdm progress bar on rank 0", group="logging")

    # checkpoints / fault tolerance
    save_every: int = _opt(100, "write a checkpoint every N steps (0 = only at the end)", group="checkpoint")
    keep_last: int = _opt(3, "keep only the newest K checkpoints", group="checkpoint")
    checkpoint_format: str = _opt(
        "full", "full: one file step_N.pt, full tensors gathered on rank 0; sharded: a directory "
        "step_N/ of torch.distributed.checkpoint files, every rank writing its shards (for models "
        "too big to gather; the directory must be shared by the ranks). Resuming reads either, "
        "under any world size and --parallel mode", CHECKPOINT_FORMATS, group="checkpoint",
    )
    ckpt_dir: str = _opt("", "checkpoint directory (default: OUT_DIR/checkpoints)", group="checkpoint")
    resume: str = _opt(
        "",
        "'' = start fresh; 'auto' = newest checkpoint in CKPT_DIR if there is one (use this "
        "under torchrun --max-restarts); otherwise a checkpoint file or directory that must exist",
        group="checkpoint",
    )
    fail_at_step: int = _opt(
        -1, "DEBUG: SIGKILL the process once when this step starts (marker file in OUT_DIR)",
        group="checkpoint",
    )
    fail_rank: int = _opt(0, "DEBUG: which rank --fail-at-step kills", group="checkpoint")

    # ------------------------------------------------------------------ helpers
    @property
    def checkpoint_dir(self) -> str:
        return self.ckpt_dir or os.path.join(self.out_dir, "checkpoints")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check values that do not depend on the world size; raise ConfigError."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ConfigError(
                    f"unknown {f.name} {value!r}; choose one of: {', '.join(choices)}"
                )
        positive = ["seq_len", "n_layer", "n_head", "d_model", "batch_size", "grad_accum",
                    "max_steps", "log_every", "eval_sequences", "keep_last", "max_corpus_bytes"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        nonneg = ["warmup_steps", "save_every", "eval_every", "clip_grad_norm", "weight_decay",
                  "num_threads", "lr", "eps"]
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        cpus = os.cpu_count() or 1
        if self.num_threads > 4 * cpus:
            raise ConfigError(f"num_threads={self.num_threads} is more than 4x this machine's "
                              f"{cpus} CPUs; use 0 (torch's default) or at most {4 * cpus}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} must be < max_steps={self.max_steps}"
            )
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.optimizer_lib == "torch" and self.backend != "auto":
            raise ConfigError(
                f"--backend {self.backend} only applies to --optimizer-lib fusedopt "
                "(torch.optim has no backend choice)"
            )
        if self.nesterov and self.optimizer != "sgd":
            raise ConfigError("--nesterov only applies to --optimizer sgd")

    def check_world_size(self, world_size: int) -> None:
        """Raise ConfigError unless the global batch splits evenly over ``world_size`` ranks."""
        if self.batch_size % world_size:
            raise ConfigError(
                f"batch_size={self.batch_size} is not divisible by the world size {world_size}; "
                f"use a multiple of {world_size} (batch_size is the global micro-batch)"
            )


# ---------------------------------------------------------------------- parsing
def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per TrainConfig field, plus ``--config``.

    Flag defaults are ``argparse.SUPPRESS`` so that the parsed namespace holds only
    the flags given on the command line (they override the config file); the real
    default of each option is written into its help text.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fusedopt.train",
        description=(
            "Train a small character-level transformer with fusedopt (or torch.optim) "
            "optimizers, on one process or under torchrun (DDP). Values come from the "
            "defaults, then --config FILE, then these flags."
        ),
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config", metavar="FILE",
        help="JSON or YAML file with a mapping of option names (snake_case) to values",
    )
    groups: Dict[str, argparse._ArgumentGroup] = {}
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        group_name = f.metadata.get("group", "misc")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        default = getattr(defaults, f.name)
        kwargs: Dict[str, Any] = {
            "dest": f.name,
            "help": f"{f.metadata['help']} (default: {default!r})",
        }
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif "choices" in f.metadata:
            kwargs["type"] = type(default)
            kwargs["choices"] = f.metadata["choices"]
        else:
            kwargs["type"] = type(default)
            kwargs["metavar"] = f.name.upper()
        groups[group_name].add_argument(_flag(f.name), **kwargs)
    return parser


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a JSON (``.json``) or YAML (anything else) mapping of option values."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith(".json"):
        parse, errors = json.loads, (ValueError,)
    else:
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - pyyaml is in the train extra
            raise ConfigError(
                f"reading {path!r} needs PyYAML (pip install 'fusedopt[train]'), or use JSON"
            ) from exc
        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    try:
        data = parse(text)
    except errors as exc:
        raise ConfigError(f"config file {path!r} could not be parsed: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must contain a mapping, got {type(data).__name__}")
    return data


def config_from_mapping(values: Mapping[str, Any], base: Optional[TrainConfig] = None,
                        source: str = "config", validate: bool = True) -> TrainConfig:
    """Apply ``values`` (snake_case or dashed keys) on top of ``base``; check types, and
    with ``validate`` also the values (:meth:`TrainConfig.validate`)."""
    base = base or TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    changes: Dict[str, Any] = {}
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in fields:
            raise ConfigError(f"unknown option {raw_key!r} in {source}")
        expected = type(getattr(base, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected is float and isinstance(value, str):
            # PyYAML (YAML 1.1) reads `lr: 3e-4` (no dot in the mantissa) as a string
            try:
                value = float(value)
            except ValueError:
                pass  # reported as a type error below
        if expected is bool and not isinstance(value, bool):
            raise ConfigError(f"option {key!r} in {source} must be true/false, got {value!r}")
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"option {key!r} in {source} must be {expected.__name__}, got {value!r}"
            )
        changes[key] = value
    cfg = dataclasses.replace(base, **changes)
    if validate:
        cfg.validate()
    return cfg


def parse_config(argv: Optional[List[str]] = None) -> TrainConfig:
    """Build the TrainConfig from defaults, an optional --config file and CLI flags.

    Raises ConfigError for bad values (argparse itself exits with status 2 for
    unknown flags and for values outside a flag's choices).
    """
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config", None)
    cfg = TrainConfig()
    if config_path:
        # Validated together with the flags below (they may fix a combination).
        cfg = config_from_mapping(load_config_file(config_path), cfg, source=config_path,
                                  validate=False)
    return config_from_mapping(args, cfg, source="command line")
