"""Shared fixtures: the CPU-capable backends this build has, and small tensor factories."""
from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch

from fusedopt import _compiling, backends

# Triton launch tuning (on by default on CUDA) writes its choices under FUSEDOPT_CACHE_DIR: a
# test run on a GPU keeps them in a directory of its own, not in the user's ~/.cache/fusedopt.
os.environ.setdefault("FUSEDOPT_CACHE_DIR", tempfile.mkdtemp(prefix="fusedopt-test-cache-"))

try:  # the GPU machine may lack hypothesis: its tests then skip, the rest runs
    from hypothesis import settings as _hypothesis_settings
except ImportError:
    _hypothesis_settings = None

if _hypothesis_settings is not None:
    # Property tests draw the same examples on every run (CI must not turn red on a draw nobody
    # can reproduce); HYPOTHESIS_PROFILE=explore draws new ones, to hunt for failures locally.
    _hypothesis_settings.register_profile("deterministic", derandomize=True)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

#: Backends whose parity with torch.optim is tested on CPU tensors by the front-end tests.
#: (triton runs under TRITON_INTERPRET=1 in its own test file; cuda needs a GPU.)
CPU_BACKENDS = ("reference", "cpu")


#: Tests of optimizer.step() traced by torch.compile: only where this torch's dynamo can trace it
#: (fusedopt._compiling.STEP_TRACEABLE); older torch runs the step eagerly inside compiled code,
#: which test_optim.py::test_compiled_step_runs_eagerly_where_torch_cannot_trace_it checks.
needs_traceable_step = pytest.mark.skipif(
    not _compiling.STEP_TRACEABLE,
    reason=f"torch {torch.__version__}'s dynamo cannot trace optimizer.step() (fusedopt traces it "
           f"from torch {'.'.join(map(str, _compiling.STEP_TRACEABLE_FROM))}; older torch steps "
           "eagerly outside the graph)")


def backend_params():
    """pytest params for every CPU backend; the ones not built here are skipped with the reason."""
    out = []
    reasons = backends.available()
    for name in CPU_BACKENDS:
        reason = reasons.get(name)
        marks = [pytest.mark.skip(reason=f"{name} backend unavailable: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


@pytest.fixture(autouse=True)
def _isolate_backend_env(monkeypatch):
    """Tests choose backends explicitly: ignore a FUSEDOPT_BACKEND set in the caller's shell."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.clear_cache()
    yield
    backends.clear_cache()


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, any CUDA operation that waits for the device raises
    (``torch.cuda.set_sync_debug_mode("error")``); the default mode comes back after it."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
