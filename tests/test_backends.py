"""The backend registry: available(), select() and the auto rule, explicit requests, errors."""
from __future__ import annotations

import pytest
import torch

from fusedopt import backends


def test_available_lists_every_backend_with_reason_or_none():
    result = backends.available()
    assert set(result) == set(backends.BACKEND_NAMES)
    assert result["reference"] is None
    for name, reason in result.items():
        assert reason is None or (isinstance(reason, str) and reason)


def test_auto_on_cpu_prefers_cpu_backend_else_reference():
    chosen = backends.select("auto", torch.device("cpu"), torch.float32)
    expected = "cpu" if backends.available()["cpu"] is None else "reference"
    assert chosen.name == expected


def test_auto_falls_back_to_reference_with_warning_when_no_fused_backend(monkeypatch):
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ())
    monkeypatch.setattr(backends, "_warned_fallback", set())
    backends.clear_cache()
    chosen = backends.select("auto", torch.device("cpu"), torch.float32)
    assert chosen.name == "reference"
    monkeypatch.setitem(backends._AUTO_ORDER, "cpu", ("triton",))
    monkeypatch.setattr(backends, "_warned_fallback", set())
    backends.clear_cache()
    if backends.available()["triton"] is not None or \
            backends.get("triton").supports(torch.device("cpu"), torch.float32) is not None:
        with pytest.warns(RuntimeWarning, match="reference backend"):
            backends.select("auto", torch.device("cpu"), torch.float32)


def test_explicit_reference_always_works():
    assert backends.select("reference", torch.device("cpu"), torch.float16).name == "reference"


def test_explicit_request_that_cannot_be_met_says_why():
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        backends.select("cuda", torch.device("cpu"), torch.float32)
    with pytest.raises(backends.BackendUnavailableError, match="int32"):
        backends.select("reference", torch.device("cpu"), torch.int32)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown fusedopt backend"):
        backends.get("tpu")
    with pytest.raises(ValueError, match="Invalid backend"):
        backends.validate_choice("fast")


def test_env_var_overrides_and_is_validated(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("auto", torch.device("cpu"), torch.float32).name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="FUSEDOPT_BACKEND"):
        backends.select("auto", torch.device("cpu"), torch.float32)


def test_selection_is_cached_per_request():
    a = backends.select("reference", torch.device("cpu"), torch.float32)
    assert backends._select_cache[("reference", "cpu", torch.float32)] is a
