"""Markdown tables of benchmark result files, for the README's results section.

    python benchmarks/summarize.py benchmarks/results/adam-intel-xeon-2026-12-01.jsonl
    python benchmarks/summarize.py FILE... --run latest|all|RUN_ID --workloads gpt2,1000x4096

One table per run (``run_id``) and benchmark: a row per (workload, algo, dtype), a column group
per provider with the minimum time, the fraction of the bandwidth reference measured in the
same run and the speedup over the row's torch baseline (``torch-fused``; bench_clip's
``clip`` rows: ``torch-foreach``), both from minimum times as the benchmarks print them. Sweep records are left out unless ``--workloads`` names ``sweep``. Skipped and rejected
providers are listed under the table with their reason. Nothing is recomputed: every number is
a field of the records (``common.RECORD_FIELDS``). Records that are not benchmark rows of that
schema (``ab_deepspeed.py``'s A/B records) are left out and listed on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence

WORKLOAD_LABELS = {"gpt2": "GPT-2 small (148 tensors, 124.4M params)",
                   "1000x4096": "1000 x 4096", "10x4M": "10 x 4M", "tiny": "tiny"}


#: Fields without which a record is not a benchmark row (``common.RECORD_FIELDS`` has more; these
#: are the ones the tables read by name).
ROW_FIELDS = ("benchmark", "workload", "provider", "algo", "dtype", "status", "run_id")


def is_row(record) -> bool:
    """A benchmark row of the common schema (``ab_deepspeed.py``'s A/B records, for one, are not)."""
    return isinstance(record, dict) and all(key in record for key in ROW_FIELDS)


def read_records(paths: Sequence[str], skipped: Optional[List[str]] = None) -> List[dict]:
    """The benchmark rows of the JSON-lines ``paths``; records of another kind are left out and
    described in ``skipped`` (``path:line: why``)."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{number}: not a JSON record ({exc})") from None
                if is_row(record):
                    records.append(record)
                elif skipped is not None:
                    kind = record.get("benchmark") if isinstance(record, dict) else None
                    missing = [k for k in ROW_FIELDS if not isinstance(record, dict) or k not in record]
                    skipped.append(f"{path}:{number}: not a benchmark row (benchmark {kind!r}; "
                                   f"no {', '.join(missing)})")
    return records


def select_runs(records: List[dict], run: str) -> "OrderedDict[tuple, List[dict]]":
    """Group records by (benchmark, run_id); keep the latest run per benchmark, all, or one."""
    runs: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in records:
        runs.setdefault((r.get("benchmark"), r.get("run_id")), []).append(r)
    if run == "all":
        return runs
    if run != "latest":
        chosen = OrderedDict((k, v) for k, v in runs.items() if k[1] == run)
        if not chosen:
            raise SystemExit(f"no records with run_id {run!r}")
        return chosen
    latest: Dict[str, tuple] = {}
    for key in runs:
        bench, run_id = key
        if bench not in latest or str(run_id) > str(latest[bench][1]):
            latest[bench] = key
    return OrderedDict((k, runs[k]) for k in runs if latest.get(k[0]) == k)


def _fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def table(records: List[dict], workloads: Optional[Iterable[str]] = None) -> str:
    wanted = set(workloads) if workloads else None
    rows: "OrderedDict[tuple, Dict[str, dict]]" = OrderedDict()
    providers: List[str] = []
    notes: "OrderedDict[str, str]" = OrderedDict()
    ok_notes: "OrderedDict[str, None]" = OrderedDict()
    for r in records:
        workload = r.get("workload")
        if wanted is not None and workload not in wanted:
            continue
        if wanted is None and workload == "sweep":
            continue
        name = r["provider"]
        if r.get("status") != "ok":
            notes.setdefault(name, f"{r.get('status')}: {r.get('note')}")
            continue
        if r.get("note"):
            ok_notes.setdefault(f"{name}: {r['note']}", None)
        if name not in providers:
            providers.append(name)
        size = f" n={r['numel']}" if workload == "sweep" else ""
        rows.setdefault((workload + size, r.get("algo"), r.get("dtype")), {})[name] = r
    if not rows:
        return "(no ok records)\n"
    head = "| workload | algo | dtype | " + " | ".join(providers) + " |"
    sep = "|---|---|---|" + "---|" * len(providers)
    lines = [head, sep]
    for (workload, algo, dtype), by_provider in rows.items():
        cells = []
        for name in providers:
            r = by_provider.get(name)
            if r is None:
                cells.append("")
                continue
            cell = f"{_fmt_ms(r.get('ms_min'))} ms"
            if r.get("frac_bw") is not None:
                cell += f", {100 * r['frac_bw']:.0f}% BW"
            if r.get("speedup_vs_torch_fused") is not None and abs(r["speedup_vs_torch_fused"] - 1) > 1e-9:
                cell += f", **{r['speedup_vs_torch_fused']:.2f}x**"
            cells.append(cell)
        label = WORKLOAD_LABELS.get(workload, workload)
        lines.append(f"| {label} | {algo} | {dtype} | " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    for text in ok_notes:
        name, _, note = text.partition(": ")
        out += f"\n- `{name}`: {note}"
    for name, note in notes.items():
        out += f"\n- `{name}` not timed: {note}"
    return out + ("\n" if notes or ok_notes else "")


def header(records: List[dict]) -> str:
    r = records[0]
    loads = [x["load_avg"] for x in records if x.get("load_avg") is not None]
    bws = [x["bandwidth_gbps"] for x in records
           if x.get("bandwidth_gbps") and x.get("workload") != "sweep"]
    pressures = [x["cpu_pressure"] for x in records if x.get("cpu_pressure") is not None]
    load = f"{min(loads):.2f} to {max(loads):.2f}" if loads else "?"
    bw = f"{min(bws):.1f} to {max(bws):.1f}" if bws else "?"
    pressure = (f", CPU pressure (PSI some avg10) {min(pressures):.1f} to {max(pressures):.1f}%"
                if pressures else "")
    repeats = sorted({x["repeats"] for x in records if x.get("repeats") is not None})
    samples = f", {'/'.join(str(n) for n in repeats)} samples" if repeats else ""
    return (f"**{r.get('benchmark')}** run {r.get('run_id')} on {r.get('device')} "
            f"({r.get('device_type')}, {r.get('num_threads')} threads), torch "
            f"{r.get('torch_version')}, commit {r.get('git_commit')}{samples}, load average {load}{pressure}; "
            f"bandwidth reference {r.get('bandwidth_ref')}: "
            f"{bw} GB/s. Cells: min time, % of that bandwidth, "
            "speedup over the torch baseline of the row (min times, same run): torch-fused, "
            "or for bench_clip's clip rows torch's clip_grad_norm_(foreach=True).\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="JSON-lines result files")
    parser.add_argument("--run", default="latest", help="latest (per benchmark), all, or a run_id")
    parser.add_argument("--workloads", default=None,
                        help="comma list (default: every workload but sweep)")
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",") if args.workloads else None
    skipped: List[str] = []
    records = read_records(args.files, skipped)
    if skipped:
        sys.stderr.write(f"summarize: left out {len(skipped)} record(s) that are not benchmark rows:\n"
                         + "".join(f"  {line}\n" for line in skipped))
    if not records:
        raise SystemExit("no benchmark rows in " + ", ".join(args.files))
    for (_, _), run_records in select_runs(records, args.run).items():
        sys.stdout.write(header(run_records) + "\n" + table(run_records, workloads) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
