"""Optimizer, learning-rate schedule and gradient-clipping choices for the harness."""

from __future__ import annotations

import importlib
from typing import Dict, Iterable, List

import torch

from .config import ConfigError, TrainConfig

CLASS_NAMES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}


def _optimizer_module(lib: str):
    if lib == "torch":
        return torch.optim
    try:
        return importlib.import_module("fusedopt.optim")
    except ImportError as exc:
        raise ConfigError(
            f"--optimizer-lib fusedopt: fusedopt.optim could not be imported ({exc}); "
            "use --optimizer-lib torch"
        ) from exc


def build_optimizer(cfg: TrainConfig, groups: List[Dict]) -> torch.optim.Optimizer:
    """``cfg.optimizer`` from fusedopt.optim (with ``backend=``) or torch.optim."""
    module = _optimizer_module(cfg.optimizer_lib)
    class_name = CLASS_NAMES[cfg.optimizer]
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"{module.__name__} has no optimizer {class_name}")
    if cfg.optimizer == "sgd":
        kwargs = dict(lr=cfg.lr, momentum=cfg.beta1, nesterov=cfg.nesterov,
                      weight_decay=cfg.weight_decay)
    else:
        kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                      weight_decay=cfg.weight_decay)
    if cfg.optimizer_lib == "fusedopt":
        kwargs["backend"] = cfg.backend
        devices = {p.device for g in groups for p in g["params"]}
        for device in devices:
            resolved_backend(cfg.backend, device)  # fail now, not at the first step
    return cls(groups, **kwargs)


def resolved_backend(choice: str, device: torch.device) -> str:
    """Name of the fusedopt backend that ``choice`` selects for fp32 params on ``device``.

    Raises ConfigError when an explicitly requested backend cannot run here.
    """
    from fusedopt import backends

    try:
        return backends.select(choice, device, torch.float32).name
    except (backends.BackendUnavailableError, ValueError) as exc:
        raise ConfigError(f"--backend {choice}: {exc}") from exc


def describe_optimizer(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> str:
    """E.g. ``fusedopt.optim.AdamW(backend=auto -> reference)``."""
    cls = type(optimizer)
    name = f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"
    if cfg.optimizer_lib == "fusedopt":
        device = optimizer.param_groups[0]["params"][0].device
        name += f"(backend={cfg.backend} -> {resolved_backend(cfg.backend, device)})"
    return name


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """Linear warmup then the ``--scheduler`` shape, from :mod:`fusedopt.lr_scheduler`.

    The warmup starts at ``lr / warmup_steps`` (not 0, so no step is wasted) and
    reaches ``lr`` after ``warmup_steps`` steps; decays end at ``min_lr_ratio * lr``
    at ``max_steps``.  The schedulers are closed-form in the step, so a resumed
    run gets exactly the same lrs.
    """
    from fusedopt import lr_scheduler as sched

    warmup = cfg.warmup_steps
    start = 1.0 / warmup if warmup else 1.0
    if cfg.scheduler == "cosine":
        return sched.WarmupCosineLR(optimizer, warmup_steps=warmup, total_steps=cfg.max_steps,
                                    min_lr_ratio=cfg.min_lr_ratio, warmup_start_factor=start)
    if cfg.scheduler in ("linear", "wsd"):
        decay = cfg.max_steps - warmup
        if cfg.scheduler == "wsd":
            decay = min(decay, max(1, round(cfg.wsd_decay_fraction * cfg.max_steps)))
        return sched.WarmupStableDecayLR(optimizer, warmup_steps=warmup, total_steps=cfg.max_steps,
                                         decay_steps=decay, decay_type="linear",
                                         min_lr_ratio=cfg.min_lr_ratio, warmup_start_factor=start)
    # constant after warmup
    return sched.LinearLR(optimizer, start_factor=start, end_factor=1.0, total_iters=warmup)


class GradNorm:
    """The global L2 norm of a step's gradients, clipped to ``--clip-grad-norm`` when that is
    > 0 (``fusedopt.clip_grad_norm_``; else only measured, ``fusedopt.get_total_norm``).

    The norm is computed with the run's ``--backend`` request, as the optimizer step is (with
    ``--optimizer-lib torch`` that is ``auto``; ``FUSEDOPT_BACKEND`` overrides both, as
    everywhere in fusedopt). The implementations round differently in the last bits (the native
    kernels sum in float64 and round once; the reference takes torch's norm of per-tensor
    norms), and the norm sets the clip coefficient, so it is part of the run's numbers: a run
    must compute it the same way in every process, e.g. after a restart. (Before, it was always
    ``auto``: a process in which ``fusedopt._C`` did not load took the reference silently, and
    a killed and resumed ``--backend reference`` run differed from an uninterrupted one.)
    """

    def __init__(self, cfg: TrainConfig):
        self.max_norm = cfg.clip_grad_norm
        self.backend = cfg.backend

    def __call__(self, params: Iterable[torch.Tensor]) -> torch.Tensor:
        import fusedopt

        if self.max_norm > 0:
            return fusedopt.clip_grad_norm_(params, self.max_norm, backend=self.backend)
        grads = [p.grad for p in params if p.grad is not None]
        return fusedopt.get_total_norm(grads, 2.0, backend=self.backend)

    def implementation(self, device: torch.device) -> str:
        """What computes the norm of float32 gradients on ``device``: ``cpu`` / ``cuda`` (the
        native kernels), ``triton`` or ``reference``."""
        from fusedopt.clip import _norm

        try:
            how = _norm.choose(self.backend, device, [torch.empty(0, device=device)], 2.0)
        except ValueError as exc:  # a bad FUSEDOPT_BACKEND
            raise ConfigError(str(exc)) from exc
        return device.type if how == "native" else how

    def describe(self, device: torch.device) -> str:
        """E.g. ``fusedopt.clip_grad_norm_(backend=auto -> cpu)``."""
        fn = "clip_grad_norm_" if self.max_norm > 0 else "get_total_norm"
        return f"fusedopt.{fn}(backend={self.backend} -> {self.implementation(device)})"
