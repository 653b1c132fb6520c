"""Shared fixtures: the CPU-capable backends this build has, and small tensor factories."""
from __future__ import annotations

import pytest
import torch

from fusedopt import backends

#: Backends whose parity with torch.optim is tested on CPU tensors by the front-end tests.
#: (triton runs under TRITON_INTERPRET=1 in its own test file; cuda needs a GPU.)
CPU_BACKENDS = ("reference", "cpu")


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
