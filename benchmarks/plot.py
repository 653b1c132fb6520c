"""Draw PNGs from benchmark result files (JSON lines written by bench_*.py).

    python benchmarks/plot.py benchmarks/results/adam-*.jsonl --out-dir benchmarks/results/plots

One figure per (benchmark, algo, dtype, device): left, fraction of the measured bandwidth per
provider for each workload (bars); right, the size sweep, GB/s against tensor size per provider
with the bandwidth reference as a dashed line. When a file holds several runs, the latest record
of each (workload, size, provider) is used. matplotlib is optional: without it this script exits
with a clear message (``pip install matplotlib`` or ``pip install -e .[bench]``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

Record = Mapping[str, Any]
FigureKey = Tuple[str, str, str, str]


def require_matplotlib():
    """Import matplotlib with the Agg backend, or exit with an install hint."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"plotting needs matplotlib ({exc}); install it with "
                         "`pip install matplotlib` (or `pip install -e .[bench]`)") from None
    return plt


def latest_ok(records: Iterable[Record]) -> List[Record]:
    """Measured records only, the latest per (benchmark, device, algo, dtype, workload, numel, provider)."""
    best: Dict[Tuple, Record] = {}
    for r in records:
        if r.get("status", "ok") != "ok" or r.get("ms_min") is None:
            continue
        key = (r["benchmark"], r["device"], r["algo"], r["dtype"], r["workload"], r["numel"], r["provider"])
        if key not in best or (r["run_id"], r["date"]) >= (best[key]["run_id"], best[key]["date"]):
            best[key] = r
    return list(best.values())


def figure_groups(records: Iterable[Record]) -> Dict[FigureKey, List[Record]]:
    """Records split by (benchmark, algo, dtype, device): one figure each."""
    groups: Dict[FigureKey, List[Record]] = {}
    for r in latest_ok(records):
        groups.setdefault((r["benchmark"], r["algo"], r["dtype"], r["device"]), []).append(r)
    return groups


def providers_in_order(records: Sequence[Record]) -> List[str]:
    """Provider names in first-seen order (torch baselines first, as the scripts emit them)."""
    seen: List[str] = []
    for r in records:
        if r["provider"] not in seen:
            seen.append(r["provider"])
    return seen


def draw_bandwidth_bars(ax, records: Sequence[Record]) -> None:
    """Grouped bars: fraction of measured bandwidth per provider, one group per workload."""
    rows = [r for r in records if r["workload"] != "sweep" and r.get("frac_bw") is not None]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    providers = providers_in_order(rows)
    if not rows:
        ax.set_axis_off()
        ax.set_title("no workload results")
        return
    width = 0.8 / max(len(providers), 1)
    for j, prov in enumerate(providers):
        xs, ys = [], []
        for i, w in enumerate(workloads):
            match = [r for r in rows if r["workload"] == w and r["provider"] == prov]
            if match:
                xs.append(i + (j - (len(providers) - 1) / 2) * width)
                ys.append(100 * match[0]["frac_bw"])
        ax.bar(xs, ys, width, label=prov)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("% of measured bandwidth (min time)")
    ax.set_title("step throughput vs bandwidth reference")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)


def draw_sweep(ax, records: Sequence[Record]) -> None:
    """GB/s against tensor size (log2 axis) per provider; dashed line: median bandwidth reference."""
    rows = sorted((r for r in records if r["workload"] == "sweep"), key=lambda r: r["numel"])
    if not rows:
        ax.set_axis_off()
        ax.set_title("no size sweep results")
        return
    for prov in providers_in_order(rows):
        pts = [(r["numel"], r["gbps"]) for r in rows if r["provider"] == prov]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
    bws = sorted(r["bandwidth_gbps"] for r in rows if r.get("bandwidth_gbps"))
    if bws:
        ax.axhline(bws[len(bws) // 2], color="k", linestyle="--", linewidth=1, label="bandwidth reference")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("parameter elements (one tensor)")
    ax.set_ylabel("GB/s (byte model / min time)")
    ax.set_title("size sweep")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def draw_figure(key: FigureKey, records: Sequence[Record], path: Path) -> Path:
    """One PNG with the bandwidth bars and the sweep of one (benchmark, algo, dtype, device)."""
    plt = require_matplotlib()
    benchmark, algo, dtype, device = key
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5))
    draw_bandwidth_bars(left, records)
    draw_sweep(right, records)
    r0 = records[0]
    fig.suptitle(f"{benchmark}/{algo} {dtype} on {device} ({r0['device_type']}, {r0['num_threads']} threads), "
                 f"torch {r0['torch_version']}, {r0['date'][:10]}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_path(key: FigureKey, out_dir: Path) -> Path:
    benchmark, algo, dtype, device = key
    return out_dir / f"{benchmark}-{algo}-{dtype}-{common.slug(device)}.png"


def plot_records(records: Iterable[Record], out: Path) -> List[Path]:
    """Draw ``records``. ``out`` ending in .png: that file for the first figure, the others next to it
    with their key appended; otherwise a folder receiving one PNG per figure."""
    require_matplotlib()
    groups = figure_groups(records)
    paths = []
    for i, (key, recs) in enumerate(sorted(groups.items())):
        if out.suffix.lower() == ".png":
            path = out if i == 0 else out.with_name(f"{out.stem}-{figure_path(key, Path()).stem}.png")
        else:
            path = figure_path(key, out)
        paths.append(draw_figure(key, recs, path))
    return paths


def main(argv=None) -> List[Path]:
    parser = argparse.ArgumentParser(description="Draw PNGs from benchmark JSON-lines results.")
    parser.add_argument("files", nargs="+", type=Path, help="result files (.jsonl)")
    parser.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR / "plots",
                        help="folder for the PNGs (or a .png path for a single figure)")
    args = parser.parse_args(argv)
    paths = plot_records(common.read_records(args.files), args.out_dir)
    if not paths:
        print("no measured records in those files")
    for p in paths:
        print(f"wrote {p}")
    return paths


if __name__ == "__main__":
    main()
