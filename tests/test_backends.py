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


# ---- bad input: clear errors, nothing written --------------------------------------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from fusedopt import _ops  # noqa: E402
from conftest import backend_params  # noqa: E402

needs_ext = pytest.mark.skipif(not _ops.available(), reason=f"fusedopt._C: {_ops.LOAD_ERROR}")
ADAM_HYPER = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False,
                  maximize=False, decoupled_weight_decay=False)
SGD_HYPER = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, is_first_step=False)


def _meta(*shape):
    return torch.ones(shape, device="meta")


def _adam_op(p, step=None, **kw):
    torch.ops.fusedopt.adam_([p], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], [],
                             [torch.tensor(0.0) if step is None else step], **ADAM_HYPER, **kw)


MIXED_META_CALLS = {
    "sgd_ lr_tensor": (lambda p: torch.ops.fusedopt.sgd_(
        [p], [torch.ones(3)], [], **SGD_HYPER, lr_tensor=_meta()), "lr_tensor is on meta"),
    "sgd_ found_inf": (lambda p: torch.ops.fusedopt.sgd_(
        [p], [torch.ones(3)], [], **SGD_HYPER, found_inf=_meta()), "found_inf is on meta"),
    "adam_ grad_scale": (lambda p: _adam_op(p, grad_scale=_meta()), "grad_scale is on meta"),
    "adam_ lr_tensor": (lambda p: _adam_op(p, lr_tensor=_meta()), "lr_tensor is on meta"),
    "adam_ state_steps": (lambda p: _adam_op(p, step=_meta()), r"state_steps\[0\] is on meta"),
    "sgd_ second param": (lambda p: torch.ops.fusedopt.sgd_(
        [p, _meta(3)], [torch.ones(3), _meta(3)], [], **SGD_HYPER), "params.* is on meta"),
    "scale_ scale": (lambda p: torch.ops.fusedopt.scale_([p], _meta()), "scale is on meta"),
    "clamp_ list": (lambda p: torch.ops.fusedopt.clamp_([p, _meta(1)], -0.5, 0.5),
                    r"tensors\[1\] is on meta"),
}


@needs_ext
@pytest.mark.parametrize("case", list(MIXED_META_CALLS))
def test_ops_refuse_a_meta_tensor_among_cpu_ones(case):
    """The dispatcher sends a call with any meta tensor to the fake kernel as a whole: it must
    refuse, not silently do nothing with the CPU tensors."""
    call, message = MIXED_META_CALLS[case]
    p = torch.ones(3)
    with pytest.raises(RuntimeError, match=message):
        call(p)
    assert torch.equal(p, torch.ones(3))


@needs_ext
@pytest.mark.parametrize("meta_prescale", [True, False], ids=["meta_prescale", "meta_tensor"])
def test_total_norm_refuses_a_meta_tensor_among_cpu_ones(meta_prescale):
    """(It returned an uninitialised CPU tensor: garbage numbers.)"""
    if meta_prescale:
        args, message = ([torch.ones(3)], 2.0, _meta()), "prescale is on meta"
    else:
        args, message = ([torch.ones(3), _meta(3)], 2.0), r"tensors\[1\] is on meta"
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fusedopt.total_norm(*args)


@needs_ext
def test_ops_on_meta_tensors_only_and_on_fake_tensors_still_run():
    ops = torch.ops.fusedopt
    ops.sgd_([_meta(3)], [_meta(3)], [], **SGD_HYPER, lr_tensor=_meta())
    ops.adam_([_meta(3)], [_meta(3)], [_meta(3)], [_meta(3)], [], [_meta()], **ADAM_HYPER,
              grad_scale=_meta(), found_inf=_meta())
    assert ops.total_norm([_meta(3)], 2.0, _meta()).device.type == "meta"
    assert ops.total_norm([], 2.0, _meta()).device.type == "meta"
    ops.scale_([_meta(3)], _meta())
    ops.clamp_([_meta(3)], 0.0, 1.0)
    with pytest.raises(RuntimeError, match="lr_tensor is on cpu but params are on meta"):
        ops.sgd_([_meta(3)], [_meta(3)], [], **SGD_HYPER, lr_tensor=torch.tensor(1.0))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # what torch.compile traces: fake tensors report their real device
        ops.sgd_([torch.ones(3)], [torch.ones(3)], [], **SGD_HYPER, lr_tensor=torch.tensor(1.0),
                 found_inf=torch.tensor(0.0))
        _adam_op(torch.ones(3), grad_scale=torch.tensor(2.0))
        assert ops.total_norm([torch.ones(3)], 2.0, torch.tensor(1.0)).shape == ()
        ops.scale_([torch.ones(3)], torch.tensor(2.0))
        with pytest.raises(RuntimeError, match="grad_scale must be a tensor with one element"):
            _adam_op(torch.ones(3), grad_scale=torch.ones(2))


def _sgd(backend, p, g, **kw):
    from fusedopt import functional
    functional.sgd_([p], [g], [], **{"lr": 0.1, **kw}, backend=backend)


def _adam(backend, p, g, m=None, v=None, step=None, **kw):
    from fusedopt import functional
    functional.adam_([p], [g], [torch.zeros_like(p) if m is None else m],
                     [torch.zeros_like(p) if v is None else v], [],
                     [torch.tensor(0.0) if step is None else step], backend=backend,
                     **{**{k: ADAM_HYPER[k] for k in ("lr", "beta1", "beta2", "eps",
                                                      "weight_decay")}, **kw})


BAD_BACKEND_CALLS = {
    # (call(backend, p), message)
    "grad shape": (lambda b, p: _sgd(b, p, torch.ones(1)),
                   r"sgd_: grads\[0\] has shape \[1\] but params\[0\] has shape \[4\]"),
    "grad on meta": (lambda b, p: _sgd(b, p, torch.ones(4, device="meta")),
                     r"sgd_: grads\[0\] is on meta"),
    "grad dtype": (lambda b, p: _adam(b, p, torch.ones(4, dtype=torch.float64)),
                   r"adam_: grads\[0\] has dtype .*(Double|float64).* but params\[0\] has dtype"),
    "state shape": (lambda b, p: _adam(b, p, torch.ones(4), v=torch.zeros(4, 1)[0]),
                    r"adam_: exp_avg_sqs\[0\] has shape \[1\] but params\[0\] has shape \[4\]"),
    "grad_scale elements": (lambda b, p: _sgd(b, p, torch.ones(4), grad_scale=torch.ones(4)),
                            "sgd_: grad_scale must be a tensor with one element, got shape"),
    "found_inf elements": (lambda b, p: _sgd(b, p, torch.ones(4),
                                             found_inf=torch.tensor([0.0, 1.0])),
                           "sgd_: found_inf must be a tensor with one element"),
    "lr elements": (lambda b, p: _adam(b, p, torch.ones(4), lr=torch.ones(1, 1, 2)),
                    "must be 1-element"),
    "int step": (lambda b, p: _adam(b, p, torch.ones(4), step=torch.tensor(0)),
                 r"adam_: state_steps\[0\] has dtype .*; expected float32 or float64"),
    "step elements": (lambda b, p: _adam(b, p, torch.ones(4), step=torch.zeros(2)),
                      r"adam_: state_steps\[0\] must have one element"),
    "expanded state": (lambda b, p: _adam(b, p, torch.ones(4),
                                          m=torch.zeros(1).expand(4)),
                       r"adam_: exp_avgs\[0\] has elements that share memory"),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", list(BAD_BACKEND_CALLS))
def test_backends_refuse_bad_lists_and_scalars_alike(case, backend):
    """The reference backend (backend="reference", FUSEDOPT_BACKEND=reference, the auto
    fallback) checks what the cpu backend does, with its words, before writing anything (it
    broadcast a [1] gradient, divided by a [4] grad_scale element-wise, ran a meta gradient as a
    no-op, took an int64 step)."""
    call, message = BAD_BACKEND_CALLS[case]
    p = torch.zeros(4, dtype=torch.bfloat16 if case == "grad dtype" else torch.float32)
    before = p.clone()
    with pytest.raises((RuntimeError, ValueError), match=message):
        call(backend, p)
    assert torch.equal(p, before)


def test_reference_backend_refuses_bad_calls_directly():
    """Called as the backend object (the triton fallback, the optimizers): same checks."""
    ref = backends.get("reference")
    p = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"sgd_: grads has 2 tensors but params has 1"):
        ref.sgd_([p], [torch.ones(4), torch.ones(4)], [], **SGD_HYPER)
    with pytest.raises(RuntimeError, match=r"momentum_buffers \(momentum != 0\) has 0 tensors"):
        ref.sgd_([p], [torch.ones(4)], [], **{**SGD_HYPER, "momentum": 0.9})
    with pytest.raises(RuntimeError, match=r"sgd_: grads\[0\] is undefined \(None\)"):
        ref.sgd_([p], [None], [], **SGD_HYPER)
    with pytest.raises(RuntimeError, match=r"params\[1\] is on meta but params\[0\] is on cpu"):
        ref.sgd_([p, _meta(4)], [torch.ones(4), _meta(4)], [], **SGD_HYPER)
    with pytest.raises(RuntimeError, match=r"params\[0\] has dtype torch.int64, which is not "
                                           "supported"):
        ref.sgd_([torch.zeros(4, dtype=torch.long)], [torch.ones(4, dtype=torch.long)], [],
                 **SGD_HYPER)
    with pytest.raises(RuntimeError, match="grad_scale is on meta but params are on cpu"):
        ref.sgd_([p], [torch.ones(4)], [], **SGD_HYPER, grad_scale=_meta())
    with pytest.raises(RuntimeError, match="lr_tensor must be real"):
        ref.sgd_([p], [torch.ones(4)], [], **{**SGD_HYPER, "lr": torch.tensor(1 + 0j)})
    with pytest.raises(RuntimeError, match=r"grads\[0\] is torch.sparse_coo; sparse tensors"):
        ref.sgd_([p], [torch.ones(4).to_sparse()], [], **SGD_HYPER)
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs \(amsgrad=True\) has 0 tensors"):
        ref.adam_([p], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [],
                  [torch.tensor(0.0)], **{**ADAM_HYPER, "amsgrad": True})
    assert torch.equal(p, torch.zeros(4))
    step = torch.tensor(0.0)
    ref.adam_([p], [torch.ones(4)], [torch.zeros(4)], [torch.zeros(4)], [], [step], **ADAM_HYPER,
              found_inf=torch.tensor(True), grad_scale=torch.tensor(2, dtype=torch.int32))
    assert float(step) == 0.0  # found_inf of another dtype still skips


# ---- environment variables the extension ignores -----------------------------------------------
@pytest.mark.parametrize("name,value", [("FUSEDOPT_CPU_ISA", "AVX2"), ("FUSEDOPT_CPU_ISA", "avx-2"),
                                        ("FUSEDOPT_CPU_STREAMS", "4")])
def test_invalid_cpu_env_values_are_warned_about(name, value):
    valid = "avx512bf16|avx512|avx2|scalar" if name.endswith("ISA") else "1|2"
    with pytest.warns(RuntimeWarning, match=f"{name}='{value}' is not one of {valid}.*ignored"):
        _ops.warn_invalid_cpu_env({name: value})


def test_valid_or_empty_cpu_env_values_are_not_warned_about():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ops.warn_invalid_cpu_env({"FUSEDOPT_CPU_ISA": "avx2", "FUSEDOPT_CPU_STREAMS": "1"})
        _ops.warn_invalid_cpu_env({"FUSEDOPT_CPU_ISA": "", "FUSEDOPT_CPU_STREAMS": ""})
        _ops.warn_invalid_cpu_env({})


@needs_ext
def test_invalid_cpu_env_values_warn_when_the_extension_loads():
    env = dict(os.environ, FUSEDOPT_CPU_ISA="AVX2", FUSEDOPT_CPU_STREAMS="4")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", "import fusedopt"], env=env, capture_output=True,
                         text=True, check=True, cwd=root)
    assert "FUSEDOPT_CPU_ISA='AVX2' is not one of avx512bf16|avx512|avx2|scalar" in out.stderr
    assert "FUSEDOPT_CPU_STREAMS='4' is not one of 1|2" in out.stderr
