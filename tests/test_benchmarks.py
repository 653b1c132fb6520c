"""Tests of the benchmark harness (benchmarks/): byte model, workloads, schema, timer, scripts, plots.

No test asserts a timing target: shared machines are too noisy, and speed is what the benchmarks
report, not what the tests check.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402
from torch_baselines import get_total_norm  # noqa: E402
from torch_oracles import TORCH_VERSION  # noqa: E402


# ----------------------------------------------------------------------------- byte model


@pytest.mark.parametrize("algo, expected", [
    ("plain", 12), ("momentum", 20), ("nesterov", 20), ("adam", 28), ("adamw", 28), ("amsgrad", 36),
])
def test_byte_model_fp32(algo, expected):
    assert common.bytes_per_param(algo, torch.float32) == expected


@pytest.mark.parametrize("dtype, size", [
    (torch.float64, 8), (torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2),
])
def test_byte_model_scales_with_element_size(dtype, size):
    for algo, streams in common.STREAMS.items():
        assert common.bytes_per_param(algo, dtype) == streams * size
        assert common.bytes_per_step(algo, 1000, dtype) == streams * size * 1000


def test_gbps_is_decimal():
    assert common.gbps(2e9, 1.0) == pytest.approx(2.0)
    assert common.gbps(28 * 10 ** 6, 1e-3) == pytest.approx(28.0)


def test_bench_scripts_cover_the_byte_model():
    import bench_adam
    import bench_sgd
    assert set(bench_adam.ALGOS) == {"adam", "adamw", "amsgrad"}
    assert set(bench_sgd.ALGOS) == {"plain", "momentum", "nesterov"}
    assert set(bench_adam.ALGOS) | set(bench_sgd.ALGOS) == set(common.STREAMS)


# ----------------------------------------------------------------------------- workloads


def test_gpt2_small_shapes():
    shapes = common.gpt2_small_shapes()
    assert len(shapes) == 148
    assert sum(math.prod(s) for _, s in shapes) == 124_439_808
    assert dict(shapes)["wte"] == (50257, 768)
    assert len({name for name, _ in shapes}) == 148


def test_workloads():
    (gpt2,) = common.make_workloads("gpt2")
    assert (gpt2.tensors, gpt2.numel) == (148, 124_439_808)
    (small,) = common.make_workloads("1000x4096")
    assert (small.tensors, small.numel) == (1000, 4096 * 1000)
    (large,) = common.make_workloads("10x4M")
    assert (large.tensors, large.numel) == (10, 10 * 4_194_304)
    sweep = common.make_workloads("sweep", (10, 26))
    assert [w.numel for w in sweep] == [2 ** k for k in range(10, 27)]
    assert all(w.tensors == 1 and w.name == "sweep" for w in sweep)
    with pytest.raises(ValueError):
        common.make_workloads("nope")


def test_make_tensors_populates_grads():
    (w,) = common.make_workloads("tiny")
    params = common.make_tensors(w, torch.device("cpu"), torch.bfloat16)
    assert [tuple(p.shape) for p in params] == list(w.shapes)
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params)


# ----------------------------------------------------------------------------- schema


def _example_record(**overrides):
    rec = {
        "benchmark": "adam", "workload": "tiny", "provider": "torch-fused", "algo": "adam",
        "dtype": "fp32", "numel": 10, "tensors": 1, "status": "ok", "ms_median": 1.0, "ms_min": 0.5,
        "gbps": 1.0, "gbps_median": 0.5, "frac_bw": 0.1, "speedup_vs_torch_fused": 1.0,
        "speedup_vs_torch_fused_median": 1.0, "bandwidth_gbps": 10.0, "bandwidth_ref": "x",
        "bytes_per_step": 280, "repeats": 15, "warmup": 3, "inner": 1, "quick": False, "note": None,
        "load_avg": 0.1, "device": "cpu", "device_type": "cpu", "num_threads": 2,
        "torch_version": torch.__version__, "triton_version": None, "cuda_version": None,
        "fusedopt_build": None, "git_commit": None, "hostname": "h", "date": "2026-01-01T00:00:00+00:00",
        "run_id": "r",
    }
    rec.update(overrides)
    return rec


def test_schema_writer_round_trip(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    assert common.write_records(path, [_example_record(), _example_record(provider="x")]) == 2
    assert common.write_records(path, [_example_record(status="skipped", ms_min=None)]) == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    back = [json.loads(line) for line in lines]
    assert back[0] == _example_record()
    assert common.read_records([path]) == back


@pytest.mark.parametrize("bad", [
    {"ms_min": "fast"}, {"numel": 1.5}, {"quick": 1}, {"numel": True},
])
def test_schema_writer_rejects_wrong_types(tmp_path, bad):
    with pytest.raises(ValueError):
        common.write_records(tmp_path / "r.jsonl", [_example_record(**bad)])


def test_schema_writer_rejects_missing_and_extra_fields(tmp_path):
    rec = _example_record()
    del rec["gbps"]
    with pytest.raises(ValueError, match="gbps"):
        common.check_record(rec)
    with pytest.raises(ValueError, match="surprise"):
        common.check_record(_example_record(surprise=1))


def test_default_results_path():
    path = common.default_results_path("adam", torch.device("cpu"), date="2026-01-02")
    assert path.parent == common.RESULTS_DIR
    assert path.name.startswith("adam-") and path.name.endswith("-2026-01-02.jsonl")
    assert common.default_results_path("adam", torch.device("cpu"), quick=True).parent.name == "quick"


def test_git_commit_marks_code_changes_but_not_appended_results(tmp_path, monkeypatch):
    """Every run appends to benchmarks/results/: that must not make the next run's commit
    '+dirty', while a change to the code measured must."""
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    for rel in ("fusedopt/x.py", "csrc/x.cpp", "benchmarks/bench.py", "benchmarks/results/r.jsonl",
                "docs/d.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    monkeypatch.setattr(common, "REPO_ROOT", tmp_path)
    clean = common.git_commit()
    assert clean and not clean.endswith("+dirty")
    (tmp_path / "benchmarks/results/r.jsonl").write_text("0\n1\n")
    (tmp_path / "docs/d.md").write_text("changed\n")
    assert common.git_commit() == clean
    for rel in ("fusedopt/x.py", "csrc/x.cpp", "benchmarks/bench.py"):
        (tmp_path / rel).write_text("changed\n")
        assert common.git_commit() == clean + "+dirty", rel
        git("checkout", "--", rel)


def test_slug():
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slug("AMD EPYC 9654 96-Core Processor") == "amd-epyc-9654-96-core-processor"


def test_environment_fields_have_schema_types():
    env = common.environment(torch.device("cpu"))
    for key, value in env.items():
        assert isinstance(value, common.RECORD_FIELDS[key]), key


# ----------------------------------------------------------------------------- timer


def test_interleaved_timer_returns_sane_values():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b"),
           "c": lambda: sum(range(1000))}
    timings = common.interleaved_times(fns, repeats=5, warmup=2, min_sample_s=1e-4, max_inner=50)
    assert set(timings) == {"a", "b", "c"}
    for t in timings.values():
        assert len(t.samples) == 5
        assert all(s > 0 and math.isfinite(s) for s in t.samples)
        assert 0 < t.min <= t.median < 1.0
        assert 1 <= t.inner <= 50


def test_interleaved_timer_interleaves_and_rotates():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in "abc"}
    common.interleaved_times(fns, repeats=3, warmup=2, min_sample_s=0, max_inner=1)
    # two warmup rounds, then timed rounds rotated by one each time
    assert order[:6] == list("abcabc")
    assert order[6:] == list("abc") + list("bca") + list("cab")


def test_interleaved_timer_drops_failing_function():
    def boom():
        raise RuntimeError("no kernel\nsecond line")

    errors = {}
    timings = common.interleaved_times({"ok": lambda: None, "bad": boom}, repeats=2, warmup=1,
                                       min_sample_s=0, errors=errors)
    assert set(timings) == {"ok"}
    assert errors == {"bad": "RuntimeError: no kernel"}


def test_bandwidth_probe_counts_read_and_write():
    probe = common.bandwidth_probe(torch.device("cpu"), buffer_bytes=4 * 2 ** 20)
    assert probe.nbytes == 8 * 2 ** 20
    probe.fn()


# ----------------------------------------------------------------------------- providers and guard


def _adam_cfg():
    import bench_adam
    return bench_adam.ALGOS["adam"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_guard_accepts_torch_fused_and_rejects_wrong_numbers(dtype):
    cfg = _adam_cfg()
    cpu = torch.device("cpu")
    fused = common.Provider("torch-fused", lambda ps, kw: torch.optim.Adam(ps, fused=True, **kw))
    assert common.guard_check(fused, cfg, cpu, dtype) is None
    wrong_lr = common.Provider("wrong", lambda ps, kw: torch.optim.Adam(ps, **dict(kw, lr=1.5 * kw["lr"])))
    reason = common.guard_check(wrong_lr, cfg, cpu, dtype)
    assert reason is not None and "differs from torch for-loop" in reason
    wrong_beta2 = common.Provider("wrong", lambda ps, kw: torch.optim.Adam(ps, **dict(kw, betas=(0.9, 0.99))))
    assert common.guard_check(wrong_beta2, cfg, cpu, dtype) is not None


def test_guard_reports_a_provider_that_raises():
    def broken(ps, kw):
        raise RuntimeError("kernel missing")

    reason = common.guard_check(common.Provider("broken", broken), _adam_cfg(), torch.device("cpu"), torch.float32)
    assert reason is not None and "kernel missing" in reason


def test_provider_selection_globs():
    provs = [common.Provider(n, lambda ps, kw: None) for n in
             ("torch-forloop", "torch-fused", "fusedopt-cpu", "fusedopt-reference")]
    names = [p.name for p in common.select_providers(provs, ["torch-fused", "fusedopt-*"])]
    assert names == ["torch-fused", "fusedopt-cpu", "fusedopt-reference"]
    assert len(common.select_providers(provs, None)) == 4


def test_fusedopt_providers_are_providers_or_skips():
    out = common.fusedopt_providers(_adam_cfg(), torch.device("cpu"), torch.float32)
    assert {p.name for p in out} == {"fusedopt-cpu", "fusedopt-reference"}
    for p in out:
        assert isinstance(p, (common.Provider, common.Skip))
        if isinstance(p, common.Skip):
            assert p.reason


# ----------------------------------------------------------------------------- scripts end to end


def _run_script(script, tmp_path, *extra):
    out = tmp_path / f"{script}.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FUSEDOPT_BACKEND", None)
    cmd = [sys.executable, str(BENCH_DIR / script), "--quick", "--device", "cpu", "--workloads", "tiny,sweep",
           "--sweep", "10:11", "--repeats", "2", "--bw-mib", "8", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, common.read_records([out])


@pytest.mark.parametrize("script, algo", [("bench_adam.py", "adamw"), ("bench_sgd.py", "nesterov")])
def test_quick_run_end_to_end(tmp_path, script, algo):
    stdout, records = _run_script(script, tmp_path, "--algo", algo)
    assert "torch-fused" in stdout and "bandwidth reference" in stdout
    for rec in records:
        common.check_record(rec)
    ok = [r for r in records if r["status"] == "ok"]
    # tiny + two sweep sizes, each with at least torch for-loop, foreach and fused
    assert {(r["workload"], r["numel"]) for r in ok} == {("tiny", common.make_workloads("tiny")[0].numel), ("sweep", 1024), ("sweep", 2048)}
    for r in ok:
        assert r["algo"] == algo and r["quick"] is True
        assert r["ms_min"] <= r["ms_median"]
        assert r["gbps"] > 0 and r["frac_bw"] > 0 and r["bandwidth_gbps"] > 0
        assert r["bytes_per_step"] == common.bytes_per_step(algo, r["numel"], torch.float32)
    fused = [r for r in ok if r["provider"] == "torch-fused"]
    assert fused and all(r["speedup_vs_torch_fused"] == pytest.approx(1.0) for r in fused)
    for r in records:
        if r["status"] != "ok":
            assert r["note"] and r["ms_min"] is None


def test_quick_run_on_dtensor_params(tmp_path):
    """--dtensor: the same providers on DTensor params (a one-rank mesh); external providers, whose
    kernels read raw memory, are skipped instead of crashing."""
    stdout, records = _run_script("bench_adam.py", tmp_path, "--algo", "adamw", "--dtensor")
    assert "DTensor params (1-rank mesh)" in stdout
    ok = [r for r in records if r["status"] == "ok"]
    assert {r["workload"] for r in records} == {"tiny-dtensor", "sweep-dtensor"}
    assert {"torch-foreach", "torch-fused", "fusedopt-reference"} <= {r["provider"] for r in ok}
    for r in records:
        if r["provider"].startswith(("deepspeed", "apex")):
            assert r["status"] == "skipped"


def test_main_in_process_provider_filter(tmp_path, monkeypatch, capsys):
    import bench_sgd

    monkeypatch.setenv("FUSEDOPT_BACKEND", "reference")
    out = tmp_path / "r.jsonl"
    records = common.main(bench_sgd.SPEC, ["--quick", "--device", "cpu", "--workloads", "tiny", "--repeats", "1",
                                           "--bw-mib", "4", "--providers", "torch-fu*,nope", "--out", str(out)])
    assert {r["provider"] for r in records} == {"torch-fused"}
    assert common.read_records([out]) == records
    stdout = capsys.readouterr().out
    assert "FUSEDOPT_BACKEND is ignored" in stdout and "'nope' matches no provider" in stdout
    assert os.environ["FUSEDOPT_BACKEND"] == "reference"  # restored


@pytest.mark.parametrize("argv, message", [
    (["--algo", "lion"], "lion"), (["--dtype", "fp8"], "fp8"), (["--workloads", "gpt3"], "gpt3"),
    (["--sweep", "12:10"], "--sweep"), (["--repeats", "0"], "--repeats"),
])
def test_bad_arguments_exit_with_a_message(argv, message):
    import bench_adam

    with pytest.raises(SystemExit, match=message):
        common.main(bench_adam.SPEC, argv + ["--out", "none"])


# ----------------------------------------------------------------------------- plots


def test_plot_generation(tmp_path):
    pytest.importorskip("matplotlib")
    import plot

    recs = [_example_record(provider=p, workload=w, numel=n, gbps=g, frac_bw=g / 10)
            for p in ("torch-fused", "fusedopt-cpu")
            for w, n, g in (("tiny", 10, 1.0), ("sweep", 1024, 2.0), ("sweep", 2048, 3.0))]
    recs.append(_example_record(provider="fusedopt-triton", status="skipped", ms_min=None, gbps=None))
    src = tmp_path / "r.jsonl"
    common.write_records(src, recs)
    paths = plot.main([str(src), "--out-dir", str(tmp_path / "plots")])
    assert len(paths) == 1 and paths[0].suffix == ".png"
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    single = plot.plot_records(recs, tmp_path / "one.png")
    assert single == [tmp_path / "one.png"] and single[0].stat().st_size > 0


def test_plot_keeps_latest_measured_record():
    import plot

    old = _example_record(run_id="1", gbps=1.0)
    new = _example_record(run_id="2", gbps=2.0)
    skipped = _example_record(run_id="3", status="skipped", ms_min=None)
    assert plot.latest_ok([old, new, skipped]) == [new]


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        plot.require_matplotlib()


# ----------------------------------------------------------------------------- screening pipeline


def test_run_group_statuses_for_broken_and_wrong_providers():
    """One in-process group with injected providers: a good one is timed, one that cannot be
    built and one whose step raises are skipped with the reason, a wrong one is rejected."""
    import bench_adam

    def external(algo, cfg, device, dtype):
        def explode(*args):
            raise RuntimeError("boom")

        class BadStep:
            def __init__(self, ps, kw):
                self.state = {}

            def step(self):
                raise RuntimeError("step exploded")

        return [
            common.Provider("good", lambda ps, kw: torch.optim.Adam(ps, foreach=False, **kw)),
            common.Provider("wrong", lambda ps, kw: torch.optim.Adam(ps, **dict(kw, lr=3 * kw["lr"]))),
            common.Provider("unbuildable", explode),
            common.Provider("badstep", BadStep, guard=False),
            common.Skip("absent", "not installed here"),
        ]

    spec = common.BenchSpec("adam", "test", bench_adam.ALGOS, "adam", external_providers=external)
    ctx = common.RunContext(spec=spec, device=torch.device("cpu"), repeats=2, warmup=1,
                            provider_patterns=["torch-fused", "good", "wrong", "unbuildable", "badstep", "absent"],
                            with_compile=False, quick=True, bw_bytes=2 ** 20, sample_s=1e-4,
                            env=common.environment(torch.device("cpu")), run_id="t")
    (workload,) = common.make_workloads("tiny")
    records = common.run_group(ctx, workload, "adam", torch.float32)
    for rec in records:
        common.check_record(rec)
    status = {r["provider"]: (r["status"], r["note"] or "") for r in records}
    assert status["torch-fused"][0] == "ok" and status["good"][0] == "ok"
    assert status["wrong"][0] == "rejected" and "differs from torch for-loop" in status["wrong"][1]
    assert status["unbuildable"] == ("skipped", "failed on a small copy: RuntimeError: boom")
    assert status["badstep"] == ("skipped", "step failed: RuntimeError: step exploded")
    assert status["absent"] == ("skipped", "not installed here")
    assert all(r["bandwidth_gbps"] > 0 for r in records)
    table = common.format_table(workload, records)
    assert "rejected: wrong" in table and "good" in table


# ----------------------------------------------------------------------------- summarize.py

import summarize  # noqa: E402


def _record(run_id, workload, provider, ms, speedup, status="ok", benchmark="adam", numel=10):
    ok = status == "ok"
    return {"benchmark": benchmark, "workload": workload, "provider": provider, "algo": "adamw",
            "dtype": "fp32", "numel": numel, "tensors": 1, "status": status,
            "ms_min": ms if ok else None, "frac_bw": 0.5 if ok else None,
            "speedup_vs_torch_fused": speedup if ok else None, "bandwidth_gbps": 40.0,
            "bandwidth_ref": "x.mul_", "load_avg": 1.0, "device": "CPU X", "device_type": "cpu",
            "num_threads": 2, "torch_version": "2.x", "git_commit": "abc", "run_id": run_id,
            "note": None if ok else "not importable"}


def test_summarize_latest_run_table(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    records = [_record("2026-01-01", "gpt2", "torch-fused", 10.0, 1.0),
               _record("2026-01-01", "gpt2", "fusedopt-cpu", 9.0, 1.11),
               _record("2026-02-01", "gpt2", "torch-fused", 12.0, 1.0),
               _record("2026-02-01", "gpt2", "fusedopt-cpu", 4.0, 3.0),
               _record("2026-02-01", "sweep", "fusedopt-cpu", 1.0, 2.0),
               _record("2026-02-01", "gpt2", "deepspeed-cpuadam", None, None, status="skipped")]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert summarize.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "run 2026-02-01" in out and "2026-01-01" not in out
    row = [line for line in out.splitlines() if line.startswith("| GPT-2")]
    assert row == ["| GPT-2 small (148 tensors, 124.4M params) | adamw | fp32 | 12.00 ms, 50% BW "
                   "| 4.00 ms, 50% BW, **3.00x** |"]
    assert "sweep" not in out  # sweeps only on request
    assert "`deepspeed-cpuadam` not timed: skipped: not importable" in out
    assert summarize.main([str(path), "--run", "all", "--workloads", "sweep"]) == 0
    assert "sweep n=10" in capsys.readouterr().out


def test_summarize_bad_input(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("{not json}\n")
    with pytest.raises(SystemExit, match="r.jsonl:1: not a JSON record"):
        summarize.main([str(path)])
    path.write_text(json.dumps(_record("a", "gpt2", "torch-fused", 1.0, 1.0)) + "\n")
    with pytest.raises(SystemExit, match="no records with run_id 'b'"):
        summarize.main([str(path), "--run", "b"])


# ----------------------------------------------------------------------------- ab_deepspeed.py

def test_ab_deepspeed_without_deepspeed_says_how_to_install(monkeypatch):
    import ab_deepspeed
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    monkeypatch.setitem(sys.modules, "deepspeed.ops", None)
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", None)
    with pytest.raises(SystemExit, match="DeepSpeedCPUAdam is not importable.*pip install deepspeed"):
        ab_deepspeed.main(["--workload", "tiny", "--out", "none"])


# ----------------------------------------------------------------------------- gpu_check.sh
# The GPU check runs where device time is scarce (a few minutes a session, when a GPU is lent at
# all): a syntax error in one of its Python stages, or a stage framework that stops at the first
# failure, would waste it. These run the script's machinery here, where every GPU stage fails.

GPU_CHECK = BENCH_DIR / "gpu_check.sh"


def _heredocs(text, tag="PY"):
    """The bodies of the script's ``<<'PY'`` here-documents."""
    bodies, current = [], None
    for line in text.splitlines():
        if current is None:
            if line.rstrip().endswith(f"<<'{tag}'"):
                current = []
        elif line.strip() == tag:
            bodies.append("\n".join(current))
            current = None
        else:
            current.append(line)
    assert current is None, "unterminated here-document"
    return bodies


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(GPU_CHECK)], check=True)
    bodies = _heredocs(GPU_CHECK.read_text())
    assert len(bodies) >= 5  # versions, launches, sanitizer, cache, sweep
    for i, body in enumerate(bodies):
        compile(body, f"gpu_check.sh heredoc {i}", "exec")


def _run_gpu_check(tmp_path, stages, budget_s):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), GPU_CHECK_STAGES=stages, GPU_CHECK_BUDGET_S=str(budget_s),
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(GPU_CHECK)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = {line.split()[0]: " ".join(line.split()[1:])
               for line in (out / "summary.txt").read_text().splitlines()}
    return out, summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's behaviour without a GPU")
def test_gpu_check_runs_every_stage_and_packs_the_rest(tmp_path):
    """Without a GPU the launch-count stage fails; the stages after it still run, the summary
    records each, and with $OUT set all but the headline files are packed into one archive."""
    import tarfile
    out, summary = _run_gpu_check(tmp_path, "versions,launches,cache", budget_s=200)
    assert summary["versions"].startswith("ok")
    assert summary["launches"].startswith("failed")
    assert summary["cache"].startswith("failed")
    assert "NO CUDA DEVICE" in (out / "versions.txt").read_text()
    assert sorted(p.name for p in out.iterdir()) == [
        "gpu_check_rest.tar.gz", "launches.json", "summary.txt", "versions.txt"]
    with tarfile.open(out / "gpu_check_rest.tar.gz") as tar:
        names = tar.getnames()
    assert "./logs/launches.log" in names and "./logs/cache.log" in names


def test_gpu_check_skips_stages_the_budget_cannot_hold(tmp_path):
    _, summary = _run_gpu_check(tmp_path, "versions,launches", budget_s=5)
    assert summary == {"versions": "skipped: budget 0 s", "launches": "skipped: budget 0 s"}


def test_triton_registers_script_reports_every_candidate(tmp_path):
    """The register table behind config.py's notes: one dtype and variant here (the whole table
    takes ~1.5 min); skipped where triton cannot compile for a CUDA target."""
    pytest.importorskip("triton")
    out = tmp_path / "regs.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "triton_registers.py"), "--dtypes", "float32",
                           "--variants", "sgd-momentum", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode != 0 and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this triton cannot compile for a CUDA target here")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from fusedopt.backends.triton import config
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == [str(c) for c in config.CANDIDATES[torch.float32]]
    assert all(r["registers"] > 0 and r["programs_per_sm"] > 0 and r["vector_loads"] for r in rows)


def test_checkpoint_timing_measures_both_formats(tmp_path):
    from fusedopt.train import sharding
    if TORCH_VERSION < sharding.FSDP2_CPU_MIN_TORCH:  # the benchmark runs FSDP2 on 2 gloo ranks
        pytest.skip(f"FSDP2 on CPU needs torch >= {sharding.FSDP2_CPU_MIN_TORCH} (the harness refuses it)")
    out = tmp_path / "timing.json"
    cmd = [sys.executable, str(BENCH_DIR / "checkpoint_timing.py"), "--d-model", "48", "--n-layer",
           "1", "--repeats", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["world_size"] == 2 and record["params"] > 0
    for fmt in ("full", "sharded"):
        assert len(record[fmt]) == 2
        assert all(r["save_s"] > 0 and r["load_s"] > 0 for r in record[fmt])


# ----------------------------------------------------------------------------- bench_clip.py


def _clip_callables(algo, backends=("cpu", "reference")):
    import bench_clip
    workload = common.make_workloads("tiny")[0]
    cpu = torch.device("cpu")
    backends = [b for b in backends if b in bench_clip.fusedopt_backends(cpu)]
    if algo in ("norm", "scale"):
        return bench_clip.pass_callables(algo, workload, cpu, torch.float32, backends)
    return bench_clip.clip_callables(algo, workload, cpu, torch.float32, backends)


def _grads_of(fn):
    """The gradients a clip-alone callable works on (ActiveClip's params or a lambda's closure)."""
    params = fn.params if hasattr(fn, "params") else next(
        c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, list))
    return [p.grad if p.grad is not None else p for p in params]


def test_bench_clip_active_clip_clips_at_every_call():
    """``clip``: every call scales the gradients (coefficient ~0.9), also across a reset from
    the master copy, and torch's and fusedopt's providers end with the same gradients."""
    import bench_clip
    fns = _clip_callables("clip")
    assert set(fns) >= {"torch-foreach", "fusedopt-reference"}
    finals = {}
    for name, fn in fns.items():
        for call in range(bench_clip.ActiveClip.RESET_EVERY + 3):
            threshold = fn.threshold if call % bench_clip.ActiveClip.RESET_EVERY else None
            before = float(get_total_norm(_grads_of(fn)))
            fn()
            after = float(get_total_norm(_grads_of(fn)))
            if threshold is not None:  # clipped down to the threshold of the call
                assert before > threshold
                assert after == pytest.approx(threshold, rel=1e-5)
        finals[name] = [g.clone() for g in _grads_of(fn)]
    for name, grads in finals.items():
        for g, want in zip(grads, finals["torch-foreach"]):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7, msg=name)


def test_bench_clip_noop_changes_nothing():
    for name, fn in _clip_callables("clip-noop").items():
        before = [g.clone() for g in _grads_of(fn)]
        fn()
        assert all(torch.equal(a, b) for a, b in zip(_grads_of(fn), before)), name


def test_bench_clip_passes_do_what_they_say():
    """``norm`` returns the gradients' norm; ``scale`` multiplies every element by about -1."""
    for name, fn in _clip_callables("norm").items():
        want = torch.linalg.vector_norm(torch.cat([g.flatten() for g in _grads_of(fn)]).double())
        assert float(fn()) == pytest.approx(float(want), rel=1e-5), name
    for name, fn in _clip_callables("scale").items():
        before = [g.clone() for g in _grads_of(fn)]
        fn()
        for g, b in zip(_grads_of(fn), before):
            torch.testing.assert_close(g, -b, rtol=2.5e-7, atol=0, msg=name)


def test_bench_clip_quick_run_end_to_end(tmp_path):
    import bench_clip
    out = tmp_path / "clip.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FUSEDOPT_BACKEND", None)
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "bench_clip.py"), "--quick", "--device", "cpu",
                           "--algo", ",".join(bench_clip.ALGOS), "--repeats", "2", "--bw-mib", "8",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = common.read_records([out])
    numel = common.make_workloads("tiny")[0].numel
    assert {r["algo"] for r in records} == set(bench_clip.ALGOS)
    for rec in records:
        common.check_record(rec)
        assert rec["status"] == "ok", rec
        assert rec["bytes_per_step"] == bench_clip.STREAMS[rec["algo"]] * 4 * numel
        if rec["provider"] == bench_clip.BASELINE[rec["algo"]]:
            assert rec["speedup_vs_torch_fused"] == pytest.approx(1.0)
    for algo in bench_clip.ALGOS:
        names = {r["provider"] for r in records if r["algo"] == algo}
        assert {bench_clip.BASELINE[algo], "fusedopt-reference"} <= names, (algo, names)
