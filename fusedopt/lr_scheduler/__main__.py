"""Command line: ``python -m fusedopt.lr_scheduler plot SPEC [SPEC ...] --steps N --out FILE.png``.

Prints the lr of each schedule at the chosen steps (``--at``) and draws all of them to a PNG.
Example::

    python -m fusedopt.lr_scheduler plot \\
        "WarmupCosineLR(warmup_steps=100, total_steps=1000, min_lr_ratio=0.1)" \\
        "OneCycleLR(max_lr=0.1, total_steps=1000)" --steps 1000 --lr 0.1 --at 0 100 500 999
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._plot import _as_labelled, draw_curves, format_table, plot_schedule


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fusedopt.lr_scheduler",
                                     description="Inspect fusedopt learning-rate schedules.")
    commands = parser.add_subparsers(dest="command", required=True)
    plot = commands.add_parser("plot", help="print and draw one or more schedules",
                               description="Each SPEC is a scheduler call without the optimizer, e.g. "
                                           "'CosineAnnealingLR(T_max=1000, eta_min=1e-4)'.")
    plot.add_argument("specs", nargs="+", metavar="SPEC", help="schedule, e.g. 'StepLR(step_size=30, gamma=0.5)'")
    plot.add_argument("--steps", type=int, default=1000, help="number of steps (default: 1000)")
    plot.add_argument("--lr", type=float, default=0.1, help="optimizer lr before the scheduler (default: 0.1)")
    plot.add_argument("--out", default="lr_schedule.png", help="PNG to write (default: lr_schedule.png)")
    plot.add_argument("--no-png", action="store_true", help="only print the values")
    plot.add_argument("--at", type=int, nargs="*", default=None,
                      help="steps whose lr is printed (default: 0, N/4, N/2, 3N/4, N-1)")
    plot.add_argument("--log", action="store_true", help="logarithmic lr axis")
    plot.add_argument("--title", default=None, help="figure title")
    return parser


def _default_steps_to_print(steps: int) -> List[int]:
    return sorted({0, steps // 4, steps // 2, (3 * steps) // 4, steps - 1})


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    at = args.at if args.at else _default_steps_to_print(args.steps)
    bad = [s for s in at if not 0 <= s < args.steps]
    if bad:
        print(f"error: --at steps must be in [0, {args.steps - 1}], got {bad}", file=sys.stderr)
        return 2
    try:
        curves = plot_schedule(_as_labelled(args.specs), args.steps, path=None, base_lr=args.lr)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(curves, at))
    if args.no_png:
        return 0
    try:
        draw_curves(curves, args.out, log_scale=args.log, title=args.title)
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
