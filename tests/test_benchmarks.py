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


# ----------------------------------------------------------------------------- pristine gradients


def _ctx(spec, patterns, external=None, repeats=3):
    if external is not None:
        spec = common.BenchSpec(spec.benchmark, "test", spec.algos, spec.default_algo,
                                external_providers=external)
    return common.RunContext(spec=spec, device=torch.device("cpu"), repeats=repeats, warmup=1,
                             provider_patterns=patterns, with_compile=False, quick=True, bw_bytes=2 ** 20,
                             sample_s=2e-4, env=common.environment(torch.device("cpu")), run_id="t")


class _GradSpy(torch.optim.Optimizer):
    """Checks, at every step, that the gradients it is handed are the pristine ones; then
    optionally writes into them (``write_from``: from that call on) or into the params."""

    def __init__(self, params, kw, write_from=None, nan_from=None):
        params = list(params)
        super().__init__(params, dict(lr=kw["lr"]))
        self.pristine = [p.grad.clone() for p in params]
        self.calls, self.dirty_calls = 0, 0
        self.write_from, self.nan_from = write_from, nan_from

    @torch.no_grad()
    def step(self):
        self.calls += 1
        ps = self.param_groups[0]["params"]
        if not all(common.bits_equal(p.grad, g) for p, g in zip(ps, self.pristine)):
            self.dirty_calls += 1
        if self.write_from is not None and self.calls >= self.write_from:
            for p in ps:
                p.grad.mul_(1.5)
        if self.nan_from is not None and self.calls >= self.nan_from:
            ps[0].fill_(float("nan"))


def _captured_tensors(monkeypatch):
    captured = []
    original = common.make_tensors

    def capture(*args, **kwargs):
        params = original(*args, **kwargs)
        captured.append((params, [p.grad.clone() for p in params]))
        return params
    monkeypatch.setattr(common, "make_tensors", capture)
    return captured


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nesterov_providers_step_on_pristine_gradients(monkeypatch, dtype):
    """torch's foreach SGD with Nesterov adds momentum * buf into p.grad: it must get its own,
    restored, gradients, and every other provider must see the pristine ones at every call
    (before the fix, the later providers stepped on ever-growing grads; fp16 went inf/NaN)."""
    import bench_sgd
    spies = []

    def external(algo, cfg, device, dt):
        def make(ps, kw):
            spies.append(_GradSpy(ps, kw))
            return spies[-1]
        return [common.Provider("spy", make, guard=False)]

    captured = _captured_tensors(monkeypatch)
    ctx = _ctx(bench_sgd.SPEC, ["torch-foreach", "torch-fused", "fusedopt-cpu", "spy"], external)
    (workload,) = common.make_workloads("tiny")
    records = common.run_group(ctx, workload, "nesterov", dtype)
    status = {r["provider"]: r for r in records}
    assert status["torch-foreach"]["status"] == "ok"
    assert common.OWN_GRADS_NOTE in status["torch-foreach"]["note"]
    assert status["spy"]["status"] == "ok" and not status["spy"]["note"]
    (spy,) = spies
    assert spy.calls > 3 and spy.dirty_calls == 0
    (params, pristine), = captured
    assert all(common.bits_equal(p.grad, g) for p, g in zip(params, pristine))
    assert all(torch.isfinite(p).all() for p in params)
    for rec in records:
        common.check_record(rec)


def test_grad_writer_is_restored_before_every_timed_call():
    """A provider that writes into its gradients at every step sees pristine ones at every call."""
    import bench_adam
    spies = []

    def external(algo, cfg, device, dt):
        def make(ps, kw):
            spies.append(_GradSpy(ps, kw, write_from=1))
            return spies[-1]
        return [common.Provider("writer", make, guard=False)]

    ctx = _ctx(bench_adam.SPEC, ["torch-fused", "writer"], external)
    records = common.run_group(ctx, common.make_workloads("tiny")[0], "adam", torch.float32)
    rec = {r["provider"]: r for r in records}["writer"]
    assert rec["status"] == "ok" and rec["inner"] == 1 and common.OWN_GRADS_NOTE in rec["note"]
    (spy,) = spies
    assert spy.calls > 3 and spy.dirty_calls == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(write_from=3), "shared gradients"), (dict(nan_from=3), "not finite"),
])
def test_group_fails_loudly_when_grads_change_late_or_params_blow_up(capsys, kwargs, message):
    """A provider that starts writing into the grads after its first step (so it is not given
    its own), or one that leaves non-finite params: no number of the group is kept."""
    import bench_adam

    def external(algo, cfg, device, dt):
        return [common.Provider("late", lambda ps, kw: _GradSpy(ps, kw, **kwargs), guard=False)]

    ctx = _ctx(bench_adam.SPEC, ["torch-fused", "late"], external)
    (workload,) = common.make_workloads("tiny")
    records = common.run_group(ctx, workload, "adam", torch.float32)
    assert {r["provider"] for r in records} == {"torch-fused", "late"}
    for rec in records:
        common.check_record(rec)
        assert rec["status"] == "rejected" and rec["ms_min"] is None
        assert rec["note"].startswith("group failed") and message in rec["note"]
    assert "ERROR" in capsys.readouterr().err
    assert "rejected: late: group failed" in common.format_table(workload, records)


def test_interleaved_timer_runs_before_hooks_outside_single_call_samples():
    events = []
    fns = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    timings = common.interleaved_times(fns, repeats=2, warmup=1, min_sample_s=1.0, max_inner=5,
                                       before={"a": lambda: events.append("prep")}, single={"a"})
    assert timings["a"].inner == 1 and timings["b"].inner == 5
    # every call of "a" (warmup and timed) comes right after its hook
    assert all(events[i - 1] == "prep" for i, e in enumerate(events) if e == "a")
    assert events.count("a") == 3 and events.count("prep") == 3


# ----------------------------------------------------------------------------- stronger guard


def test_guard_checks_fp32_as_well():
    assert common.guard_dtypes(torch.float32) == [torch.float32]
    assert common.guard_dtypes(torch.bfloat16) == [torch.bfloat16, torch.float32]
    assert common.guard_dtypes(torch.float16) == [torch.float16, torch.float32]


_WRONG_ADAMW = {
    "weight decay dropped": lambda ps, kw: torch.optim.AdamW(ps, **dict(kw, weight_decay=0.0)),
    "L2 instead of decoupled": lambda ps, kw: torch.optim.Adam(ps, **kw),
    "eps 1e-6": lambda ps, kw: torch.optim.AdamW(ps, eps=1e-6, **kw),
    "beta1 0.8": lambda ps, kw: torch.optim.AdamW(ps, betas=(0.8, 0.999), **kw),
    "lr 1.1x": lambda ps, kw: torch.optim.AdamW(ps, **dict(kw, lr=1.1 * kw["lr"])),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_guard_rejects_wrong_adamw_in_every_dtype(dtype):
    """The old guard (tolerance relative to |p|, weight decay 1e-2) accepted in 16-bit an AdamW
    without weight decay, Adam's L2 decay, and a wrong eps."""
    import bench_adam
    cfg = bench_adam.ALGOS["adamw"]
    cpu = torch.device("cpu")
    good = common.Provider("fused", lambda ps, kw: torch.optim.AdamW(ps, fused=True, **kw))
    assert common.guard_check(good, cfg, cpu, dtype) is None
    for name, make in _WRONG_ADAMW.items():
        reason = common.guard_check(common.Provider("wrong", make), cfg, cpu, dtype)
        assert reason is not None and "differs from torch for-loop" in reason, name


def test_guard_rejects_in_16_bit_without_the_fp32_check():
    """Weight decay and decoupling are caught by the 16-bit comparison itself."""
    import bench_adam
    cfg = bench_adam.ALGOS["adamw"]
    for dtype in (torch.bfloat16, torch.float16):
        for name in ("weight decay dropped", "L2 instead of decoupled", "lr 1.1x"):
            provider = common.Provider("wrong", _WRONG_ADAMW[name])
            assert common._guard_one(provider, cfg, torch.device("cpu"), dtype) is not None, (name, dtype)


def test_guard_rejects_momentum_for_nesterov():
    import bench_sgd
    cfg = bench_sgd.ALGOS["nesterov"]
    wrong = common.Provider("wrong", lambda ps, kw: torch.optim.SGD(ps, **dict(kw, nesterov=False)))
    for dtype in (torch.float32, torch.bfloat16):
        assert common.guard_check(wrong, cfg, torch.device("cpu"), dtype) is not None


@pytest.mark.parametrize("bench", ["adam", "sgd"])
def test_guard_accepts_fusedopt_in_every_dtype(bench):
    import bench_adam
    import bench_sgd
    spec = {"adam": bench_adam.SPEC, "sgd": bench_sgd.SPEC}[bench]
    cpu = torch.device("cpu")
    for algo, cfg in spec.algos.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for p in common.fusedopt_providers(cfg, cpu, dtype):
                if isinstance(p, common.Provider):
                    assert common.guard_check(p, cfg, cpu, dtype) is None, (algo, dtype, p.name)


def test_guard_update_tolerance_is_relative_to_the_update():
    before = torch.tensor([1.0, 1.0], dtype=torch.float64)
    want = before - torch.tensor([1e-3, 1e-3], dtype=torch.float64)
    assert common.update_mismatch(before, want, want.clone(), torch.float64, 1e-3) is None
    got = before - torch.tensor([1e-3, 1.1e-3], dtype=torch.float64)  # 10% off, 1e-4 of |p|
    bad = common.update_mismatch(before, want, got, torch.float64, 1e-3)
    assert bad is not None and bad[0] == 1


# ----------------------------------------------------------------------------- DeepSpeed provider


class _FakeDeepSpeedCPUAdam(torch.optim.AdamW):
    """DeepSpeedCPUAdam's signature, torch's AdamW (state in the param dtype) behind it."""

    def __init__(self, model_params, lr=1e-3, weight_decay=0, adamw_mode=True, fp32_optimizer_states=True):
        super().__init__(model_params, lr=lr, weight_decay=weight_decay, foreach=False)
        self.fp32_optimizer_states = fp32_optimizer_states


class _OldFakeDeepSpeedCPUAdam(torch.optim.AdamW):
    def __init__(self, model_params, lr=1e-3, weight_decay=0, adamw_mode=True):
        super().__init__(model_params, lr=lr, weight_decay=weight_decay, foreach=False)


def test_deepspeed_provider_asks_for_16_bit_state_and_notes_it(monkeypatch):
    import types
    import bench_adam
    module = types.ModuleType("deepspeed.ops.adam")
    module.DeepSpeedCPUAdam = _FakeDeepSpeedCPUAdam
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.ops", types.ModuleType("deepspeed.ops"))
    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", module)
    cfg = bench_adam.ALGOS["adamw"]
    (provider,) = bench_adam.external_providers("adamw", cfg, torch.device("cpu"), torch.bfloat16)
    assert provider.name == "deepspeed-cpuadam" and provider.note is not None
    assert common.guard_check(provider, cfg, torch.device("cpu"), torch.bfloat16) is None
    ctx = _ctx(bench_adam.SPEC, ["torch-fused", "deepspeed-cpuadam"],
               lambda *a: bench_adam.external_providers(*a))
    records = common.run_group(ctx, common.make_workloads("tiny")[0], "adamw", torch.bfloat16)
    rec = {r["provider"]: r for r in records}["deepspeed-cpuadam"]
    assert rec["status"] == "ok"
    assert rec["note"] == "optimizer state dtype bf16 (fp32_optimizer_states=False)"
    # a DeepSpeed without the argument: built without it, and the note says so
    old = bench_adam.deepspeed_maker(_OldFakeDeepSpeedCPUAdam, True)
    (p,) = common.make_tensors(common.Workload("one", ((8,),)), torch.device("cpu"), torch.bfloat16)
    opt = old([p], dict(lr=1e-3, weight_decay=0.01))
    opt.step()
    assert bench_adam.state_dtype_note(opt) == ("optimizer state dtype bf16 "
                                                "(fp32_optimizer_states=not supported by this DeepSpeed)")


# ----------------------------------------------------------------------------- noise: PSI, stalls


def test_cpu_pressure_reads_some_avg10(tmp_path):
    path = tmp_path / "cpu"
    path.write_text("some avg10=4.34 avg60=10.16 avg300=13.73 total=10009106145\n"
                    "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert common.cpu_pressure(path) == pytest.approx(4.34)
    assert common.cpu_pressure(tmp_path / "missing") is None
    path.write_text("garbage\n")
    assert common.cpu_pressure(path) is None


def test_cpu_pressure_is_an_optional_schema_field():
    rec = _example_record()
    common.check_record(rec)  # older records have no cpu_pressure
    common.check_record(dict(rec, cpu_pressure=3.5))
    common.check_record(dict(rec, cpu_pressure=None))
    with pytest.raises(ValueError, match="cpu_pressure"):
        common.check_record(dict(rec, cpu_pressure="high"))


def test_stall_note_when_fused_is_twice_as_slow_as_forloop():
    fast, slow = common.Timing([1.0, 1.2], 1), common.Timing([2.5, 2.6], 1)
    assert common.stall_note({"torch-fused": fast, "torch-forloop": fast}) is None
    assert common.stall_note({"torch-fused": slow}) is None
    note = common.stall_note({"torch-fused": slow, "torch-forloop": fast})
    assert note.startswith(common.STALL_PREFIX) and "2.5x" in note
    recs = [_example_record(provider=p, note=note) for p in ("torch-forloop", "torch-fused")]
    table = common.format_table(common.make_workloads("tiny")[0], recs)
    assert table.count("stall suspected") == 1 and "! stall suspected" in table


def test_run_group_records_cpu_pressure_in_every_record(monkeypatch):
    import bench_sgd
    monkeypatch.setattr(common, "cpu_pressure", lambda path=None: 12.5)
    ctx = _ctx(bench_sgd.SPEC, ["torch-fused", "nope-*"])
    records = common.run_group(ctx, common.make_workloads("tiny")[0], "momentum", torch.float32)
    assert records and all(r["cpu_pressure"] == 12.5 for r in records)
    assert "CPU pressure (PSI some avg10) after timing: 12.5%" in common.format_table(
        common.make_workloads("tiny")[0], records)


# ----------------------------------------------------------------------------- bench_clip: globs, skips, guard


def _clip_args(providers=None, algo="clip"):
    import argparse
    return argparse.Namespace(device=torch.device("cpu"), providers=providers, repeats=1, warmup=1,
                              quick=True, sample_ms=0.2, bw_mib=1, algo=[algo])


def _clip_group(algo, providers=None, dtype=torch.float32):
    import bench_clip
    return bench_clip.run_group(_clip_args(providers, algo), common.environment(torch.device("cpu")), "t",
                                common.make_workloads("tiny")[0], algo, dtype)


def test_bench_clip_providers_take_globs():
    import bench_clip
    backends = bench_clip.fusedopt_backends(torch.device("cpu"))
    if not backends:
        pytest.skip("no fusedopt backend here")
    records = _clip_group("clip", ["fusedopt-*"])
    assert {r["provider"] for r in records} == {f"fusedopt-{b}" for b in backends}
    records = _clip_group("clip+adamw", ["*-2pass", "torch-f?sed"])
    assert {r["provider"] for r in records} == {"torch-fused"} | {
        f"fusedopt-{b}-2pass" for b in backends if b != "reference"}
    for rec in records:
        common.check_record(rec)
        assert rec["status"] == "ok" and "cpu_pressure" in rec


def test_bench_clip_skip_record_for_reference_on_big_workloads(monkeypatch):
    import bench_clip
    if "reference" not in bench_clip.fusedopt_backends(torch.device("cpu")):
        pytest.skip("no reference backend")
    monkeypatch.setattr(bench_clip, "REFERENCE_MAX_NUMEL", 100)  # tiny counts as big
    records = _clip_group("clip+adamw", ["fusedopt-ref*", "torch-fused"])
    rec = {r["provider"]: r for r in records}["fusedopt-reference"]
    assert rec["status"] == "skipped" and "not timed above" in rec["note"]
    common.check_record(rec)
    variants, skips = bench_clip.clip_adamw_variants(["reference"], 60_000_000)
    assert "fusedopt-reference" in skips and "fusedopt-reference" not in variants


def test_bench_clip_adamw_single_pass_clips_at_half_the_starting_norm():
    """What the README's clip+adamw rows say: max_grad_norm = 0.5 x the starting norm."""
    import bench_clip
    workload = common.make_workloads("tiny")[0]
    cpu = torch.device("cpu")
    if "cpu" not in bench_clip.fusedopt_backends(cpu):
        pytest.skip("no cpu backend")
    fns = bench_clip.clip_adamw_callables(workload, cpu, torch.float32, ["cpu"])
    opt = fns["fusedopt-cpu"].__defaults__[0]
    start = float(get_total_norm([p.grad for p in common.make_tensors(workload, cpu, torch.float32)]))
    assert opt.param_groups[0]["max_grad_norm"] == pytest.approx(0.5 * start)


def test_bench_clip_guard_rejects_wrong_providers(monkeypatch):
    import bench_clip
    import fusedopt
    cpu = torch.device("cpu")
    no_scaling = lambda ps, m: fusedopt.get_total_norm([p.grad for p in ps], backend="reference")  # noqa: E731
    low = lambda ps, m: fusedopt.clip_grad_norm_(ps, 0.9 * m, backend="reference")  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert bench_clip.guard_provider("clip", "x", no_scaling, cpu, dtype) is not None
        assert bench_clip.guard_provider("clip", "x", low, cpu, dtype) is not None
        no_clip = (lambda ps, kw, m: fusedopt.optim.AdamW(ps, backend="reference", **kw), None)
        assert bench_clip.guard_provider("clip+adamw", "x", no_clip, cpu, dtype) is not None
    wrong_norm = lambda gs: fusedopt.get_total_norm(gs[1:], backend="reference")  # noqa: E731
    assert bench_clip.guard_provider("norm", "x", wrong_norm, cpu, torch.bfloat16) is not None
    wrong_scale = lambda ps, m, n: fusedopt.clip_grads_with_norm_(ps, 1.01 * m, n, backend="reference")  # noqa: E731
    assert bench_clip.guard_provider("scale", "x", wrong_scale, cpu, torch.float32) is not None
    # and in a run: a wrong provider is rejected, not timed
    real = bench_clip.clip_fns
    monkeypatch.setattr(bench_clip, "clip_fns", lambda backends: dict(real(backends), **{"fusedopt-bad": no_scaling}))
    records = _clip_group("clip", ["torch-foreach", "fusedopt-bad"])
    status = {r["provider"]: (r["status"], r["note"]) for r in records}
    assert status["torch-foreach"][0] == "ok"
    assert status["fusedopt-bad"][0] == "rejected" and "differs from torch" in status["fusedopt-bad"][1]


@pytest.mark.parametrize("algo", ["clip", "clip-noop", "norm", "scale", "clip+adamw"])
def test_bench_clip_guard_accepts_fusedopt(algo):
    import bench_clip
    cpu = torch.device("cpu")
    backends = bench_clip.fusedopt_backends(cpu)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, prim in bench_clip.primitives(algo, backends, 10).items():
            assert bench_clip.guard_provider(algo, name, prim, cpu, dtype) is None, (name, dtype)


# ----------------------------------------------------------------------------- summarize: other records


def test_summarize_leaves_out_records_that_are_not_benchmark_rows(tmp_path, capsys):
    """ab_deepspeed.py appends A/B records of its own schema into results/: summarize used to
    crash on them (KeyError 'provider')."""
    path = tmp_path / "mixed.jsonl"
    ab = {"benchmark": "ab-deepspeed", "workload": "gpt2", "repeats": 15,
          "ms_min": {"fusedopt-cpu": 60.0, "deepspeed-cpuadam": 70.0}, "fusedopt_over_deepspeed": 0.86}
    rows = [_record("r1", "gpt2", "torch-fused", 10.0, 1.0), _record("r1", "gpt2", "fusedopt-cpu", 5.0, 2.0)]
    path.write_text("\n".join(json.dumps(r) for r in [ab] + rows) + "\n")
    assert summarize.main([str(path)]) == 0
    captured = capsys.readouterr()
    assert "**2.00x**" in captured.out
    assert "left out 1 record(s) that are not benchmark rows" in captured.err and "ab-deepspeed" in captured.err
    only_ab = tmp_path / "ab.jsonl"
    only_ab.write_text(json.dumps(ab) + "\n")
    with pytest.raises(SystemExit, match="no benchmark rows"):
        summarize.main([str(only_ab)])


def test_summarize_reads_every_committed_result_file(capsys):
    files = sorted(str(p) for p in (BENCH_DIR / "results").glob("*.jsonl"))
    if not files:  # .ci/oldest_torch_check.sh copies the tree without benchmarks/results/
        repo = BENCH_DIR.parent
        assert not (repo / ".git").exists() or not subprocess.run(
            ["git", "-C", str(repo), "ls-files", "benchmarks/results"], capture_output=True,
            text=True).stdout.strip(), "committed result files are missing"
        pytest.skip("this copy of the tree has no benchmarks/results/")
    assert summarize.main(files + ["--run", "all"]) == 0


# ----------------------------------------------------------------------------- cpu_op_timing.py


def test_cpu_op_timing_torch_ops_runs_at_the_default_stream_count(monkeypatch, capsys):
    pytest.importorskip("fusedopt._C")
    import cpu_op_timing
    from fusedopt import _C
    default = _C.cpu_streams()
    seen = []

    def providers(algo, shapes):
        return {"torch.ops": lambda: seen.append(_C.cpu_streams()), "direct": lambda: None,
                "torch fused": lambda: sum(range(100))}, 10

    monkeypatch.setattr(cpu_op_timing, "providers", providers)
    monkeypatch.setattr(cpu_op_timing.torch, "ones", lambda n: torch.empty(1024))
    counts = [default] + [n for n in (1, 2) if n != default]  # the last one set is not the default
    monkeypatch.setattr(sys, "argv", ["cpu_op_timing.py", "sgd", "1000x4096", "--reps", "3",
                                      "--streams", ",".join(map(str, counts))])
    try:
        cpu_op_timing.main()
    finally:
        _C._set_cpu_streams(default)
    assert seen and set(seen) == {default}
    out = capsys.readouterr().out
    assert f"torch.ops s{default}" in out and all(f"direct s{n}" in out for n in counts)


# ----------------------------------------------------------------------------- docs


def test_benchmarks_readme_links_resolve():
    import re
    text = (BENCH_DIR / "README.md").read_text()
    assert "Measuring on these machines" not in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (BENCH_DIR / target).exists(), target
