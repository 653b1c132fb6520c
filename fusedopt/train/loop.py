"""The training loop: ``Trainer`` builds everything from a TrainConfig and runs the steps.

One optimizer step = ``grad_accum`` micro-batches.  Under DDP every micro-batch
but the last runs forward AND backward inside ``model.no_sync()`` so gradients
are all-reduced once per step; under FSDP2 (``--parallel fsdp2``, see :mod:`.sharding`)
only the last micro-batch's backward reduce-scatters.  Steps are numbered from 1; ``self.step`` is the
number of completed optimizer steps (what checkpoints store).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from fusedopt import _dtensor
from fusedopt.lr_scheduler import SkipAwareScheduler

from . import checkpoint as ckpt
from . import sharding
from .config import TrainConfig
from .data import VOCAB_SIZE, ShardedBatchSampler, load_corpus, make_splits
from .distributed import (DistContext, all_reduce_sum, barrier, broadcast_object, cleanup,
                          gather_objects, init_distributed, resolve_device)
from .metrics import (MetricsLogger, MetricsWindow, RunStats, format_summary, peak_memory_mb,
                      truncate_log)
from .model import build_model, count_parameters, param_groups
from .optimizers import GradNorm, build_optimizer, build_scheduler, describe_optimizer

# Config fields that must match when resuming (they fix the shapes of the model
# and optimizer state, or the meaning of the stored data position).
# Options a resumed run must keep: the model and data shapes, and everything the checkpoint's
# optimizer and scheduler states were built from (loading them would silently keep the saved
# hyperparameters, or graft a saved schedule's state onto another schedule). --max-steps may
# change (the schedule keeps its own horizon); options applied afresh at every step
# (--clip-grad-norm, --dropout, --backend) may too.
RESUME_MUST_MATCH = ("seq_len", "d_model", "n_layer", "n_head", "optimizer", "amp",
                     "batch_size", "grad_accum", "seed", "data", "lr", "weight_decay", "beta1",
                     "scheduler", "warmup_steps")
# ... and those that only some optimizers or schedules read.
RESUME_MUST_MATCH_IF = {"beta2": lambda cfg: cfg.optimizer != "sgd",
                        "eps": lambda cfg: cfg.optimizer != "sgd",
                        "nesterov": lambda cfg: cfg.optimizer == "sgd",
                        "min_lr_ratio": lambda cfg: cfg.scheduler != "constant",
                        "wsd_decay_fraction": lambda cfg: cfg.scheduler == "wsd"}


def _resume_must_match(cfg: TrainConfig) -> List[str]:
    return list(RESUME_MUST_MATCH) + [k for k, used in RESUME_MUST_MATCH_IF.items() if used(cfg)]


def _check_before_joining(cfg: TrainConfig) -> None:
    """What can be refused before joining torchrun's process group (every rank refuses alike)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    sharding.check_supported(cfg.parallel, world_size, device)


def _check_directories(cfg: TrainConfig) -> None:
    """The run and checkpoint directories exist (created) and are writable: refused up front,
    not at the first log line or, for checkpoints, after training up to --save-every."""
    for flag, path in (("--out-dir", cfg.out_dir), ("--ckpt-dir", cfg.checkpoint_dir)):
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"{flag} {path!r} cannot be created: {exc.strerror or exc}") from None
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path!r} is not writable")


def eval_chunks(eval_sequences: int, world: int, rank: int, chunk: int):
    """This rank's evaluation forwards: ``(positions, counted)`` pairs, positions being indices
    of validation sequences (the caller wraps them around a small split) and ``counted`` whether
    each is one of the first ``eval_sequences``. Every rank gets the same number of forwards
    (FSDP2's collectives need it), so when ``world`` does not divide ``eval_sequences`` the last
    ranks' surplus positions run but count for nothing: the set is the same for any world size."""
    per_rank = -(-eval_sequences // world)
    first = rank * per_rank
    for start in range(first, first + per_rank, chunk):
        positions = torch.arange(start, min(start + chunk, first + per_rank))
        yield positions, positions < eval_sequences


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


class Trainer:
    """Owns model, optimizer, scheduler, scaler, data sampler, metrics and checkpoints."""

    def __init__(self, cfg: TrainConfig, ctx: Optional[DistContext] = None):
        cfg.validate()
        _check_directories(cfg)
        self.cfg = cfg
        if ctx is None:
            _check_before_joining(cfg)
        self.ctx = ctx or init_distributed(cfg.device)
        cfg.check_world_size(self.ctx.world_size)
        sharding.check_supported(cfg.parallel, self.ctx.world_size, self.ctx.device)
        self.device = self.ctx.device
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)

        # Identical model initialisation on every rank.
        seed_everything(cfg.seed)
        # Rank 0 reads the text and shares it, so all ranks train on the same bytes
        # even if the files change while the ranks start.
        corpus, self.corpus_desc = self._on_rank0(lambda: load_corpus(cfg.data, cfg.max_corpus_bytes))
        self.train_set, self.val_set = make_splits(corpus, cfg.seq_len, cfg.val_fraction, self.device)
        self.sampler = ShardedBatchSampler(len(self.train_set), cfg.batch_size, self.ctx.rank,
                                           self.ctx.world_size, cfg.seed)
        self.raw_model = build_model(cfg, VOCAB_SIZE).to(self.device)
        # FSDP2 shards the model in place (its params become DTensors); one rank has nothing to
        # shard, and trains the plain model like ddp does.
        self.sharded = self.ctx.distributed and cfg.parallel == "fsdp2"
        if self.sharded:
            self.model = sharding.shard(self.raw_model)
        elif self.ctx.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.raw_model, device_ids=device_ids)
        else:
            self.model = self.raw_model
        self.optimizer = build_optimizer(cfg, param_groups(self.raw_model, cfg.weight_decay))
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.grad_norm = GradNorm(cfg)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        # Per-rank streams (dropout) differ between ranks.
        seed_everything(cfg.seed + 1 + self.ctx.rank)

        self.step = 0
        self.window = MetricsWindow(self.device)
        self.stats = RunStats()
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        self.log_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.resumed_from: Optional[str] = None
        self.last_eval_loss = float("nan")
        self.last_train_loss = float("nan")
        self.skipped_steps = 0  # fp16 steps GradScaler skipped (inf/NaN gradients)
        self._maybe_resume()
        # With fp16 the scheduler advances only on steps GradScaler did not skip. Built
        # after resuming: it remembers the loss scale it starts from.
        self.schedule_guard = SkipAwareScheduler(self.scheduler) if self.scaler else None
        self.logger = MetricsLogger(self.log_path, enabled=self.ctx.is_main, progress=cfg.progress,
                                    total_steps=cfg.max_steps, initial_step=self.step)

    # ------------------------------------------------------------ helpers
    def autocast(self):
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def implementations(self) -> Dict[str, str]:
        """What computes this process's optimizer steps and gradient norms (saved with each
        checkpoint: a resumed run that computes differently is warned about)."""
        return {"optimizer": describe_optimizer(self.cfg, self.optimizer),
                "grad_norm": self.grad_norm.describe(self.device)}

    # ------------------------------------------------------------ one step
    def train_step(self) -> Dict[str, Any]:
        """Run one optimizer step over ``grad_accum`` micro-batches; return its raw metrics."""
        cfg = self.cfg
        self.model.train()
        self._sync()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.train_set.batch(self.sampler.next_indices())
            last = micro == cfg.grad_accum - 1
            # no_sync must cover the forward too: DDP decides in forward whether
            # the following backward all-reduces. FSDP2 reduce-scatters only the last one.
            if self.sharded:
                self.model.set_requires_gradient_sync(last)
                sync_ctx = contextlib.nullcontext()
            else:
                sync_ctx = self.model.no_sync() if (self.ctx.distributed and not last) else contextlib.nullcontext()
            with sync_ctx:
                with self.autocast():
                    logits = self.model(x)
                    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
                scaled = loss / cfg.grad_accum
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            loss_sum += loss.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.grad_norm(self.params)  # clipped to cfg.clip_grad_norm when > 0
        lr = self.current_lr()
        self._sync()
        t_opt = time.perf_counter()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._sync()
        opt_time = time.perf_counter() - t_opt
        self.optimizer.zero_grad(set_to_none=True)
        skipped = False
        if self.schedule_guard is not None:
            skipped = not self.schedule_guard.step()
            self.skipped_steps += int(skipped)
        else:
            self.scheduler.step()
        self.step += 1
        step_time = time.perf_counter() - t0
        grad_norm = _dtensor.plain(grad_norm)  # (a replicated DTensor for sharded gradients)
        return {"loss": loss_sum / cfg.grad_accum, "grad_norm": torch.as_tensor(grad_norm),
                "lr": lr, "step_time": step_time, "opt_time": opt_time, "skipped": skipped}

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss per token over the first ``eval_sequences`` validation sequences.

        The set does not depend on batch size, accumulation or world size: the
        sequences are split evenly over ranks (wrapping around a small validation
        split) and token-loss sums are all-reduced.  Every rank must call this.
        """
        cfg = self.cfg
        self.raw_model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for positions, counted in eval_chunks(cfg.eval_sequences, self.ctx.world_size,
                                              self.ctx.rank, max(1, cfg.batch_size // self.ctx.world_size)):
            x, y = self.val_set.batch(positions % len(self.val_set))
            counted = counted.to(self.device)
            with self.autocast():
                logits = self.raw_model(x)
                token_losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                               y.reshape(-1), reduction="none")
            per_sequence = token_losses.double().view(y.shape[0], -1).sum(dim=1)
            total[0] += torch.where(counted, per_sequence, 0.0).sum()  # (not * : NaN * 0 is NaN)
            total[1] += counted.sum() * y.shape[1]
        total = all_reduce_sum(total, self.ctx)
        return float(total[0] / total[1])

    # ------------------------------------------------------------ checkpoints
    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (collective; rank 0 writes all of a full one,
        every rank its shards of a sharded one)."""
        rank_state = {"rng": ckpt.capture_rng_state(), "window": self.window.state_dict()}
        rank_states = gather_objects(rank_state, self.ctx)
        payload = {
            "format": ckpt.FORMAT,
            "step": self.step,
            "world_size": self.ctx.world_size,
            "config": self.cfg.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self.sampler.state_dict(),
            "rank_states": rank_states,
            "last_eval_loss": self.last_eval_loss,
            "last_train_loss": self.last_train_loss,
            "skipped_steps": self.skipped_steps,
            "implementations": self.implementations(),
        }
        path = None
        if self.cfg.checkpoint_format == "sharded":
            tmp = Path(self._on_rank0(lambda: str(ckpt.begin_sharded_checkpoint(
                self.cfg.checkpoint_dir, self.step))))
            sharding.save_sharded(self.raw_model, self.optimizer, tmp)  # every rank its shards
            if self.ctx.is_main:
                path = ckpt.finish_sharded_checkpoint(dict(payload, sharded=True), tmp,
                                                      self.cfg.keep_last)
        else:
            if self.sharded:  # full tensors, gathered on rank 0 (collectives: every rank calls)
                model_state = sharding.full_model_state(self.model)
                optimizer_state = sharding.full_optimizer_state(self.model, self.optimizer)
            elif self.ctx.is_main:
                model_state, optimizer_state = self.raw_model.state_dict(), self.optimizer.state_dict()
            if self.ctx.is_main:
                payload.update(model=model_state, optimizer=optimizer_state)
                path = ckpt.save_checkpoint(payload, self.cfg.checkpoint_dir, self.cfg.keep_last)
        barrier(self.ctx)
        return path

    def _on_rank0(self, fn):
        """``fn()`` evaluated on rank 0 and broadcast; a ValueError it raises is raised on every
        rank (so the others do not wait forever for a broadcast)."""
        outcome: Any = None
        if self.ctx.is_main:
            try:
                outcome = ("ok", fn())
            except ValueError as exc:
                outcome = ("error", exc)
        outcome = broadcast_object(outcome, self.ctx)
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]

    def _resume_path(self) -> Optional[str]:
        path = ckpt.resolve_resume(self.cfg.resume, self.cfg.checkpoint_dir)
        existing = ckpt.latest_checkpoint(self.cfg.checkpoint_dir)
        if path is None and existing is not None:
            raise ckpt.CheckpointError(
                f"{self.cfg.checkpoint_dir!r} already holds checkpoints (newest {existing.name}) "
                "of another run; pass --resume auto to continue it, or use a new --out-dir"
            )
        return str(path) if path else None

    def _maybe_resume(self) -> None:
        # Rank 0 decides which file; every rank then loads the same one.
        path = self._on_rank0(self._resume_path)
        if path is None:
            if self.ctx.is_main:
                # Metrics of an earlier attempt that died before its first checkpoint.
                truncate_log(self.log_path, 0)
            return
        self.load(Path(path))

    def load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, map_location=self.device)
        saved_cfg = state.get("config", {})
        changed = [k for k in _resume_must_match(self.cfg)
                   if k in saved_cfg and saved_cfg[k] != getattr(self.cfg, k)]
        if changed:
            details = ", ".join(f"{k}={saved_cfg[k]!r} (now {getattr(self.cfg, k)!r})" for k in changed)
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} does not fit this run: it was written with {details}")
        try:
            if state.get("sharded"):  # every rank reads its part of each tensor
                sharding.load_sharded(self.raw_model, self.optimizer, path)
            elif self.sharded:  # every rank keeps its shards of the full tensors
                sharding.load_model_state(self.model, state["model"])
                sharding.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
            else:
                self.raw_model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler") is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.sampler.load_state_dict(state["data"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} could not be restored: {exc}") from exc
        self.step = int(state["step"])
        self.last_eval_loss = float(state.get("last_eval_loss", float("nan")))
        saved, current = state.get("implementations"), self.implementations()
        if saved is not None and saved != current:
            warnings.warn(
                f"checkpoint {str(path)!r} was written by a run that computed with {saved}; this "
                f"process computes with {current}: the resumed run continues, but "
                "not bit for bit as an uninterrupted run would (pass the same --backend)",
                UserWarning, stacklevel=2)
        self.last_train_loss = float(state.get("last_train_loss", float("nan")))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        rank_states = state["rank_states"]
        if state.get("world_size") == self.ctx.world_size and len(rank_states) == self.ctx.world_size:
            mine = rank_states[self.ctx.rank]
            ckpt.restore_rng_state(mine["rng"])
            self.window.load_state_dict(mine["window"])
        else:
            warnings.warn(
                f"checkpoint was written by {state.get('world_size')} ranks, now {self.ctx.world_size}: "
                "RNG streams are re-seeded and the current log window restarts"
            )
            seed_everything(self.cfg.seed + 1 + self.ctx.rank + 7919 * self.step)
        self.resumed_from = str(path)
        if self.ctx.is_main:
            truncate_log(self.log_path, self.step)

    # ------------------------------------------------------------ fault injection
    def _maybe_fail(self) -> None:
        """DEBUG --fail-at-step: SIGKILL this process once, before step N runs."""
        cfg = self.cfg
        if cfg.fail_at_step != self.step + 1 or cfg.fail_rank != self.ctx.rank:
            return
        marker = Path(cfg.out_dir) / f"fail_at_step_{cfg.fail_at_step}.marker"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {self.ctx.rank} pid {os.getpid()} before step {self.step + 1}\n")
        self.logger.event("fail_injected", step=self.step, rank=self.ctx.rank)
        self.logger.close()
        os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------ main loop
    def _log(self, last: Dict[str, Any]) -> None:
        reduced = self.window.reduce(self.ctx)  # collective
        self.last_train_loss = reduced["loss"]
        if self.ctx.is_main:
            w = self.window
            record = {
                "step": self.step,
                "epoch": self.sampler.last_epoch,  # of the step's last batch
                "loss": reduced["loss"],
                "lr": last["lr"],
                "grad_norm": reduced["grad_norm"],
                "tokens_per_s": self.tokens_per_step * w.steps / w.step_time if w.step_time else None,
                "step_ms": 1000.0 * w.step_time / max(w.steps, 1),
                "opt_ms": 1000.0 * w.opt_time / max(w.steps, 1),
                "opt_share": w.opt_time / w.step_time if w.step_time else None,
                "peak_mem_mb": peak_memory_mb(self.device),
            }
            self.logger.write(record)
            self.logger.progress(0, {"loss": f"{record['loss']:.3f}", "lr": f"{record['lr']:.2e}",
                                     "tok/s": f"{record['tokens_per_s'] or 0:,.0f}"})
        self.window.reset()

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        log = self.logger
        if self.ctx.is_main:
            restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            log.event("start", step=self.step, world_size=self.ctx.world_size, device=str(self.device),
                      resumed_from=self.resumed_from, restart_count=restarts, config=cfg.to_dict())
            log.print(
                f"fusedopt.train: {self.corpus_desc}; {len(self.train_set):,} train sequences; "
                f"model {count_parameters(self.raw_model):,} params; "
                f"optimizer {describe_optimizer(cfg, self.optimizer)}; "
                f"{'clipping' if cfg.clip_grad_norm > 0 else 'clipping off, grad norm'} "
                f"{self.grad_norm.describe(self.device)}; world size {self.ctx.world_size} "
                f"({self.ctx.backend}{', ' + cfg.parallel if self.ctx.distributed else ''}) on {self.device}"
                + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else "")
            )
        while self.step < cfg.max_steps:
            self._maybe_fail()
            out = self.train_step()
            self.window.add(out["loss"], out["grad_norm"], out["step_time"], out["opt_time"],
                            skipped=out["skipped"])
            self.stats.add(out["step_time"], out["opt_time"], self.tokens_per_step)
            log.progress(1)
            done = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or done:
                self._log(out)
            if done or (cfg.eval_every and self.step % cfg.eval_every == 0):
                self.last_eval_loss = self.evaluate()
                if self.ctx.is_main:
                    log.write({"step": self.step, "eval_loss": self.last_eval_loss})
            if done or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save()
        summary = self.summary()
        if self.ctx.is_main:
            log.write({"event": "summary", "step": self.step, **summary})
            log.close()
            print(format_summary(summary), flush=True)
        return summary

    def summary(self) -> Dict[str, Any]:
        stats = self.stats.summary()
        return {
            "steps": self.step,
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "optimizer": describe_optimizer(self.cfg, self.optimizer),
            "params": count_parameters(self.raw_model),
            "final_train_loss": self.last_train_loss,
            "final_eval_loss": self.last_eval_loss,
            "tokens_per_s": stats["tokens_per_s"],
            "mean_step_ms": stats["mean_step_ms"],
            "mean_optimizer_ms": stats["mean_optimizer_ms"],
            "optimizer_share": stats["optimizer_share"],
            **({"amp_skipped_steps": self.skipped_steps} if self.scaler is not None else {}),
            "peak_mem_mb": peak_memory_mb(self.device),
            "wall_s": stats["wall_s"],
            "log": self.log_path,
        }


def train(cfg: TrainConfig, ctx: Optional[DistContext] = None) -> Dict[str, Any]:
    """Build a Trainer for ``cfg`` and run it to ``cfg.max_steps``; return the summary.

    Joins (and afterwards leaves) the torchrun process group unless ``ctx`` is given.
    """
    own_ctx = ctx is None
    if own_ctx:
        _check_before_joining(cfg)
    ctx = ctx or init_distributed(cfg.device)
    try:
        trainer = Trainer(cfg, ctx)
        try:
            return trainer.fit()
        finally:
            trainer.logger.close()
    finally:
        if own_ctx:
            cleanup(ctx)
