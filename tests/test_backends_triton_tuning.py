"""Launch tuning of the triton backend (fusedopt/backends/triton/tuning.py).

Without a GPU the kernels run in the Triton interpreter on CPU tensors (set here, as in
test_backends_triton.py). There the timings mean nothing, but everything else is real: every
candidate row is run and compared with the default row bit for bit, and the tuner runs the
candidates, picks one, caches it on disk and reads it back, with ``FUSEDOPT_TRITON_TUNE=1``
(CPU tensors are not tuned by default). On a GPU the same tests time real launches.
"""
from __future__ import annotations

import json
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from fusedopt import backends  # noqa: E402
from fusedopt.backends.triton import config as triton_config  # noqa: E402
from fusedopt.backends.triton import interpreting, tables, tuning, tuning_cache  # noqa: E402
from fusedopt.backends.triton.__main__ import main as tuning_main  # noqa: E402
from fusedopt.backends.triton.config import LaunchConfig  # noqa: E402
from test_backends_triton import (ADAM_DEFAULTS, DEVICES, INTERPRETER_PROBLEM,  # noqa: E402
                                  REFERENCE, AdamCase, _randn, launcher)

TRITON = backends.get("triton") if backends.available()["triton"] is None else None
#: for the tests that run kernels on CPU tensors without the ``device`` parameter (whose cpu
#: case skips for the same reason)
needs_interpreter = pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM))
FP32 = torch.float32


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No override rows, the tuning switch unset, a cache directory of the test's own, and no
    choice or plan left from other tests."""
    monkeypatch.delenv(triton_config.ENV_VAR, raising=False)
    monkeypatch.delenv(tuning.ENV_TUNE, raising=False)
    monkeypatch.setenv(tuning_cache.ENV_CACHE_DIR, str(tmp_path / "cache"))
    tuning.clear()
    tables.PLANS.clear()
    yield
    tuning.clear()
    tables.PLANS.clear()


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _cached_entries():
    path = tuning_cache.path()
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)["entries"]


def _sgd_steps(device, dtype, sizes, steps=2):
    gen = torch.Generator().manual_seed(3)
    params = [_randn(s, dtype, device, gen) for s in sizes]
    bufs = [torch.zeros_like(p) for p in params]
    for k in range(steps):
        grads = [_randn(s, dtype, device, gen) for s in sizes]
        TRITON.sgd_(params, grads, bufs, lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01,
                    nesterov=True, maximize=False, is_first_step=k == 0)
    return params + bufs


def _adam_steps(device, dtype, sizes, steps=2):
    case = AdamCase(sizes, dtype, device)
    params, state = case.copy()
    case.run(TRITON, params, state, steps=steps,
             **dict(ADAM_DEFAULTS, amsgrad=True, weight_decay=0.05, decoupled_weight_decay=True))
    return params + [t for v in state.values() for t in v]


_CANDIDATES = [pytest.param(dtype, cfg, id=f"{_name(dtype)}-{cfg}")
               for dtype, rows in triton_config.CANDIDATES.items() for cfg in rows
               if cfg != triton_config.DEFAULT_CONFIGS[dtype]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,cfg", _CANDIDATES)
@pytest.mark.parametrize("algo", ["adamw-amsgrad", "sgd-nesterov"])
def test_every_candidate_steps_like_the_default_row(device, dtype, cfg, algo, monkeypatch):
    """Whatever the tuner picks gives the default row's numbers, bit for bit: empty, one element,
    one tile and a bit, and a chunk of the candidate and a bit (two programs)."""
    sizes = (0, 1, cfg.block + 1, cfg.chunk + 3)
    run = _adam_steps if algo == "adamw-amsgrad" else _sgd_steps
    results = {}
    for row in (cfg, triton_config.DEFAULT_CONFIGS[dtype]):
        monkeypatch.setenv(triton_config.ENV_VAR, f"{_name(dtype)}={row}")
        results[row] = run(device, dtype, sizes)
    for mine, default in zip(*results.values()):
        assert torch.equal(mine, default)


def test_choose_keeps_the_default_unless_another_is_clearly_faster():
    a, b, c = LaunchConfig(512, 8, 4), LaunchConfig(1024, 4, 4), LaunchConfig(256, 16, 2)
    assert tuning.choose({a: 1.00, b: 0.98, c: 1.5}, default=a) == a   # within 3 %: keep
    assert tuning.choose({a: 1.00, b: 0.90, c: 1.5}, default=a) == b   # 10 % faster: move
    assert tuning.choose({b: 0.90, c: 0.80}, default=a) == c           # default dropped
    assert tuning.choose({}, default=a) == a


@pytest.mark.parametrize("device", DEVICES)
def test_first_step_tunes_then_the_cache_answers(device, monkeypatch):
    """The first step times every candidate (on scratch tensors: the caller's are stepped once a
    step, as the reference shows), writes the choice to disk; a new process (here: the choices
    forgotten) reads it back and makes only the step's own launch."""
    monkeypatch.setenv(tuning.ENV_TUNE, "1")
    rng = torch.get_rng_state()
    counts = dict(launcher().LAUNCHES)
    AdamCase((5, 70), FP32, device).compare(TRITON, steps=2, **ADAM_DEFAULTS)
    assert launcher().LAUNCHES["adam_kernel"] - counts.get("adam_kernel", 0) == 2  # the steps' own
    assert launcher().LAUNCHES["adam_kernel (tuning)"] > counts.get("adam_kernel (tuning)", 0)
    assert torch.equal(torch.get_rng_state(), rng)  # the scratch tensors have their own generator
    entries = _cached_entries()
    (key, entry), = entries.items()
    assert key == tuning.cache_key("adam", FP32, torch.device(device))
    assert set(entry["timings_ms"]) == {str(c) for c in triton_config.CANDIDATES[FP32]}
    assert all(t > 0 for t in entry["timings_ms"].values())
    assert tuning_cache.parse_config(entry["config"]) in triton_config.CANDIDATES[FP32]

    tuning.clear()
    tables.PLANS.clear()
    before = launcher().LAUNCHES["adam_kernel"]
    AdamCase((5, 70), FP32, device).compare(TRITON, steps=1, **ADAM_DEFAULTS)
    assert launcher().LAUNCHES["adam_kernel"] - before == 1
    plan = next(iter(tables.PLANS._slots.values()))[0]
    assert str(plan.buckets[0].config) == entry["config"]


@pytest.mark.parametrize("device", DEVICES)
def test_unreadable_cache_file_is_timed_again_and_rewritten(device, monkeypatch):
    path = tuning_cache.path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("{not json")
    result = tuning.lookup_or_tune("sgd", FP32, torch.device(device), sizes=[100, 7])
    assert not result.from_cache and result.config in triton_config.CANDIDATES[FP32]
    assert _cached_entries()[tuning.cache_key("sgd", FP32, torch.device(device))]["config"] == str(result.config)
    again = tuning.lookup_or_tune("sgd", FP32, torch.device(device))
    assert again.from_cache and again.config == result.config


@pytest.mark.parametrize("device", DEVICES)
def test_unwritable_cache_warns_and_keeps_the_choice_in_the_process(device, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(tuning_cache.ENV_CACHE_DIR, str(blocker / "sub"))
    with pytest.warns(RuntimeWarning, match="cannot write the tuning cache"):
        result = tuning.lookup_or_tune("sgd", torch.bfloat16, torch.device(device), sizes=[50])
    assert tuning.lookup_or_tune("sgd", torch.bfloat16, torch.device(device)).config == result.config


@pytest.mark.parametrize("device", DEVICES)
def test_a_candidate_that_fails_is_dropped(device):
    """A row the compiler refuses (here a block that is not a power of two) is reported, not
    fatal; the default row failing would be."""
    bad, default = LaunchConfig(48, 1, 4), triton_config.DEFAULT_CONFIGS[FP32]
    result = tuning.measure("sgd-momentum", FP32, torch.device(device), candidates=[default, bad], sizes=[64])
    assert set(result.timings_ms) == {str(default)} and str(bad) in result.failed
    assert result.config == default
    with pytest.raises(RuntimeError, match="no launch candidate ran for sgd"):
        tuning.measure("sgd", FP32, torch.device(device), candidates=[bad], sizes=[64])


@pytest.mark.parametrize("entry", [
    {"config": "3x1x1"},                       # not a power of two: would fail in the kernel
    {"config": "512x8x3"},                     # warps not a power of two
    {"config": "16x1x1"},                      # valid Triton, but not a candidate
    {"config": "512x8x4", "timings_ms": [1, 2], "failed": 5},  # a candidate, odd extras
    "512x8x4", ["512x8x4"], None,
], ids=repr)
@needs_interpreter
def test_cache_entries_that_are_not_candidates_are_timed_again(entry):
    cpu = torch.device("cpu")
    key = tuning.cache_key("sgd", FP32, cpu)
    tuning_cache.write_entry(key, entry)
    result = tuning.lookup_or_tune("sgd", FP32, cpu, sizes=[50])
    expect_cached = isinstance(entry, dict) and entry.get("config") == "512x8x4"
    assert result.from_cache == expect_cached and result.config in triton_config.CANDIDATES[FP32]


@needs_interpreter
def test_a_cache_file_too_deep_to_parse_is_ignored():
    path = tuning_cache.path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    assert not tuning.lookup_or_tune("sgd", FP32, torch.device("cpu"), sizes=[50]).from_cache


_WRITER = """
import sys
from fusedopt.backends.triton import tuning_cache
for k in range(10):
    tuning_cache.write_entry(f"{sys.argv[1]}-{k}", {"config": "512x8x4"})
"""


def test_concurrent_writers_keep_every_entry(tmp_path):
    """DDP ranks on one machine tune and write at the same time: nothing is lost."""
    import subprocess
    import sys
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, f"rank{r}"], env=env) for r in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    entries = _cached_entries()
    assert len(entries) == 40
    assert oct(os.stat(tuning_cache.path()).st_mode & 0o777) == "0o644"
    assert not [n for n in os.listdir(os.path.dirname(tuning_cache.path())) if n.startswith(".triton_tuning.")]


@pytest.mark.parametrize("device", DEVICES)
def test_override_rows_and_the_switch_decide_before_tuning(device, monkeypatch):
    dev = torch.device(device)
    monkeypatch.setenv(tuning.ENV_TUNE, "1")
    monkeypatch.setenv(triton_config.ENV_VAR, "float32=64x2x4")
    assert tuning.config_for("adam", 3, FP32, dev) == LaunchConfig(64, 2, 4)
    monkeypatch.delenv(triton_config.ENV_VAR)
    monkeypatch.setenv(tuning.ENV_TUNE, "0")
    assert tuning.config_for("adam", 3, FP32, dev) == triton_config.DEFAULT_CONFIGS[FP32]
    monkeypatch.setenv(tuning.ENV_TUNE, "1")
    assert tuning.config_for("norm", 1, FP32, dev) == triton_config.DEFAULT_CONFIGS[FP32]  # not tuned
    assert _cached_entries() == {}
    monkeypatch.setenv(tuning.ENV_TUNE, "sometimes")
    with pytest.raises(ValueError, match="FUSEDOPT_TRITON_TUNE"):
        tuning.config_for("adam", 3, FP32, dev)


def test_cpu_tensors_are_not_tuned_by_default():
    assert not tuning.enabled(torch.device("cpu"))
    assert tuning.config_for("adam", 3, FP32, torch.device("cpu")) == triton_config.DEFAULT_CONFIGS[FP32]
    assert _cached_entries() == {}


def test_command_line_refuses_unknown_names(capsys):
    with pytest.raises(SystemExit):
        tuning_main(["--device", "cpu", "--dtypes", "float8"])
    assert "'float8' is not one of float32, bfloat16, float16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tuning_main(["--device", "cpu", "--variants", "lamb"])
    assert "'lamb' is not one of adam, amsgrad, sgd, sgd-momentum" in capsys.readouterr().err


def test_tune_refuses_unknown_variants_and_dtypes():
    with pytest.raises(ValueError, match="unknown variant 'lamb'"):
        tuning.tune(torch.device("cpu"), variants=["lamb"])
    with pytest.raises(ValueError, match="float64 is not supported"):
        tuning.tune(torch.device("cpu"), dtypes=[torch.float64], variants=["sgd"])


@pytest.mark.skipif(not interpreting(), reason="the interpreter's problems")
def test_tune_refuses_when_the_interpreter_cannot_run_the_kernels(monkeypatch):
    """tune() (and the command line) runs kernels outside the backend's dispatch: an interpreter
    that would lose stores or crash (triton 3.1 with numpy 2, see compat.py) is refused there too."""
    from fusedopt.backends.triton import compat
    monkeypatch.setattr(compat, "interpreter_problem", lambda: "the interpreter cannot")
    with pytest.raises(backends.BackendUnavailableError, match="unavailable: the interpreter cannot"):
        tuning.tune(torch.device("cpu"), dtypes=[FP32], variants=["sgd"])
    assert _cached_entries() == {}


@pytest.mark.parametrize("device", DEVICES)
def test_command_line_tunes_and_writes_json(device, tmp_path, capsys):
    out = tmp_path / "tuned.json"
    assert tuning_main(["--device", device, "--dtypes", "float16", "--variants", "sgd", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["variant"] == "sgd" and row["dtype"] == "torch.float16" and not row["from_cache"]
    assert tuning_cache.parse_config(row["config"]) in triton_config.CANDIDATES[torch.float16]
    printed = capsys.readouterr().out
    assert "sgd" in printed and row["config"] in printed and tuning_cache.path() in printed


class _StillTiming:
    """A timing whose launches have not run yet, as on a busy GPU (on CPU tensors the
    interpreter runs them at once, so a real one is done before anyone asks)."""

    def __init__(self, result):
        self.finished = False
        self._result = result

    def done(self):
        return self.finished

    def result(self):
        return self._result


@needs_interpreter
def test_tables_built_while_timing_are_rebuilt_with_the_tuned_row(monkeypatch):
    """The first steps use the default row without waiting; the step after the timing is done
    rebuilds the tables with the chosen row (same numbers throughout, cache file written)."""
    monkeypatch.setenv(tuning.ENV_TUNE, "1")
    cpu, chosen, default = torch.device("cpu"), LaunchConfig(64, 2, 4), triton_config.DEFAULT_CONFIGS[FP32]
    key = tuning.cache_key("adam", FP32, cpu)
    timing = _StillTiming(tuning.TuningResult("adam", FP32, "cpu", chosen, timings_ms={str(chosen): 1.0}))
    tuning._pending[key] = timing
    case = AdamCase((5, 300), FP32, "cpu")
    mine, theirs = case.copy(), case.copy()
    rows, builds = [], tables.PLANS.builds
    for step in range(4):
        if step == 2:
            timing.finished = True
        case.run(TRITON, *mine, steps=1, **ADAM_DEFAULTS)
        case.run(REFERENCE, *theirs, steps=1, **ADAM_DEFAULTS)
        (plans,) = tables.PLANS._slots.values()
        assert len(plans) == 1
        rows.append((plans[0].buckets[0].config, plans[0].provisional))
    assert rows == [(default, True), (default, True), (chosen, False), (chosen, False)]
    assert tables.PLANS.builds - builds == 2 and key not in tuning._pending
    assert _cached_entries()[key]["config"] == str(chosen)
    for a, b in zip(mine[0] + mine[1]["exp_avgs"], theirs[0] + theirs[1]["exp_avgs"]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7)


class _FinishesWhenAsked(_StillTiming):
    """Not done when the tables ask for their row, done at the next question: the timing ends
    while the tables are being built."""

    def done(self):
        self.finished, was = True, self.finished
        return was


@needs_interpreter
def test_a_timing_that_ends_while_tables_are_built_still_gets_them_rebuilt(monkeypatch):
    monkeypatch.setenv(tuning.ENV_TUNE, "1")
    cpu, chosen = torch.device("cpu"), LaunchConfig(64, 2, 4)
    tuning._pending[tuning.cache_key("sgd", FP32, cpu)] = _FinishesWhenAsked(
        tuning.TuningResult("sgd", FP32, "cpu", chosen, timings_ms={str(chosen): 1.0}))
    params = [torch.randn(300)]
    rows = []
    for _ in range(2):
        TRITON.sgd_(params, [torch.ones(300)], [], lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                    nesterov=False, maximize=False, is_first_step=False)
        (plans,) = tables.PLANS._slots.values()
        rows.append(plans[0].buckets[0].config)
    assert rows == [triton_config.DEFAULT_CONFIGS[FP32], chosen]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_first_steps_never_wait_for_the_timing():
    """Under set_sync_debug_mode("error") the first step starts the timing and steps with the
    default row; a later step (once the timing has run) rebuilds the tables with the choice,
    still without a synchronisation; the numbers equal the reference's."""
    case = AdamCase((5, 70, 70000), FP32, "cuda")
    mine, theirs = case.copy(), case.copy()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        case.run(TRITON, *mine, steps=1, **ADAM_DEFAULTS)
        key = tuning.cache_key("adam", FP32, torch.device("cuda"))
        assert key in tuning._pending or key in tuning._chosen
        for _ in range(200):  # the timing's ~300 launches finish while the host polls
            if tuning.settled("adam", 3, FP32, torch.device("cuda")):
                break
            time.sleep(0.05)
        case.run(TRITON, *mine, steps=2, **ADAM_DEFAULTS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    case.run(REFERENCE, *theirs, steps=1, **ADAM_DEFAULTS)
    case.run(REFERENCE, *theirs, steps=2, **ADAM_DEFAULTS)
    (plans,) = tables.PLANS._slots.values()
    assert not plans[0].provisional
    assert str(plans[0].buckets[0].config) == _cached_entries()[key]["config"]
    for a, b in zip(mine[0], theirs[0]):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-6)
