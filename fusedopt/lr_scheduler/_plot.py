"""See a schedule: compute it over N steps, print it, draw it to a PNG (matplotlib, optional).

A schedule is given as a callable ``optimizer -> scheduler`` or as a spec string, a call with
literal arguments, without the optimizer::

    "WarmupCosineLR(warmup_steps=100, total_steps=1000, min_lr_ratio=0.1)"
    "SequentialLR(schedulers=[LinearLR(start_factor=0.01, total_iters=100), "
    "ExponentialLR(gamma=0.99)], milestones=[100])"

Spec strings are parsed with :mod:`ast` (never ``eval``): only scheduler names and literals.
"""
from __future__ import annotations

import ast
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch

ScheduleSpec = Union[str, Callable[[Any], Any]]

_DEFAULT_MOMENTUM = 0.9


def _registry() -> Dict[str, type]:
    from . import SCHEDULERS
    return SCHEDULERS


def _dummy_optimizer(base_lr: float) -> torch.optim.Optimizer:
    """A one-parameter SGD with momentum (so momentum-cycling schedules work)."""
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr, momentum=_DEFAULT_MOMENTUM)


def _build(node: ast.AST, optimizer: Any) -> Any:
    """A scheduler for a call node (recursively for nested schedulers), else a literal value."""
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _registry():
            name = ast.unparse(node.func)
            raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(sorted(_registry()))}")
        cls = _registry()[node.func.id]
        args = [_build(a, optimizer) for a in node.args]
        kwargs = {kw.arg: _build(kw.value, optimizer) for kw in node.keywords if kw.arg is not None}
        if cls.__name__ == "ChainedScheduler":
            return cls(*args, **kwargs)
        return cls(optimizer, *args, **kwargs)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_build(e, optimizer) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"only literal arguments are allowed in a schedule spec, got {ast.unparse(node)!r}") from None


def build_scheduler(spec: ScheduleSpec, optimizer: Any) -> Any:
    """Create the scheduler described by ``spec`` (a spec string or a callable) on ``optimizer``."""
    if callable(spec):
        return spec(optimizer)
    try:
        tree = ast.parse(spec.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"cannot parse schedule spec {spec!r}: {error.msg}") from None
    if not isinstance(tree.body, ast.Call):
        raise ValueError(f"a schedule spec is a call like 'StepLR(step_size=10)', got {spec!r}")
    return _build(tree.body, optimizer)


def schedule_values(spec: ScheduleSpec, steps: int, base_lr: float = 0.1) -> List[float]:
    """The lr (of the first param group) at steps ``0 .. steps-1``: step 0 is the lr right after
    the scheduler is created, step ``i`` the lr after ``i`` calls of ``scheduler.step()``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    optimizer = _dummy_optimizer(base_lr)
    scheduler = build_scheduler(spec, optimizer)
    if type(scheduler).__name__ == "ReduceLROnPlateau":
        raise ValueError("ReduceLROnPlateau depends on a metric and has no fixed schedule to plot")
    values = [float(optimizer.param_groups[0]["lr"])]
    for _ in range(steps - 1):
        scheduler.step()
        values.append(float(optimizer.param_groups[0]["lr"]))
    return values


def _label(spec: ScheduleSpec) -> str:
    if isinstance(spec, str):
        return " ".join(spec.split())
    return getattr(spec, "__name__", repr(spec))


def _as_labelled(schedules: Union[ScheduleSpec, Sequence[ScheduleSpec], Mapping[str, ScheduleSpec]]) -> Dict[str, ScheduleSpec]:
    if isinstance(schedules, Mapping):
        return dict(schedules)
    if isinstance(schedules, str) or callable(schedules):
        schedules = [schedules]
    return {_label(s): s for s in schedules}


def _require_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "plotting a schedule needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'fusedopt[bench]'). schedule_values() gives the numbers without it."
        ) from error
    return Figure, FigureCanvasAgg


def plot_schedule(schedules: Union[ScheduleSpec, Sequence[ScheduleSpec], Mapping[str, ScheduleSpec]],
                  steps: int, path: Optional[str] = "lr_schedule.png", base_lr: float = 0.1,
                  log_scale: bool = False, title: Optional[str] = None) -> Dict[str, List[float]]:
    """Compute one or more schedules over ``steps`` steps and draw them to a PNG at ``path``.

    Args:
        schedules: a spec string or ``optimizer -> scheduler`` callable, a list of them, or a
            dict ``label -> spec``.
        steps: number of steps drawn.
        path: where the PNG goes; None computes the values without drawing (no matplotlib needed).
        base_lr: the optimizer's lr before the scheduler is created (the peak for most schedules).
        log_scale: logarithmic lr axis.
        title: figure title.

    Returns:
        ``{label: [lr at step 0, ..., lr at step steps-1]}``.

    Raises:
        ImportError: matplotlib is missing (and ``path`` is not None).
    """
    labelled = _as_labelled(schedules)
    if path is not None:
        _require_matplotlib()
    curves = {label: schedule_values(spec, steps, base_lr) for label, spec in labelled.items()}
    if path is not None:
        draw_curves(curves, path, log_scale=log_scale, title=title)
    return curves


def draw_curves(curves: Mapping[str, Sequence[float]], path: str, log_scale: bool = False,
                title: Optional[str] = None) -> None:
    """Draw ``{label: values}`` (as returned by :func:`plot_schedule`) to a PNG at ``path``."""
    Figure, FigureCanvasAgg = _require_matplotlib()
    figure = Figure(figsize=(9, 4.5 + 0.22 * len(curves)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for label, values in curves.items():
        axes.plot(range(len(values)), values, label=label, linewidth=1.6)
    axes.set_xlabel("step")
    axes.set_ylabel("learning rate")
    if log_scale:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    if title:
        axes.set_title(title)
    # below the axes, so that it never hides a curve
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.12), frameon=False)
    figure.savefig(path, bbox_inches="tight")


def format_table(curves: Mapping[str, Sequence[float]], at: Sequence[int]) -> str:
    """A text table: one row per requested step, one column per schedule."""
    labels = list(curves)
    header = ["step"] + [f"[{i}]" for i in range(len(labels))]
    rows = [header]
    for step in at:
        rows.append([str(step)] + [f"{curves[label][step]:.8g}" for label in labels])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in rows]
    legend = [f"[{i}] {label}" for i, label in enumerate(labels)]
    return "\n".join(legend + lines)
