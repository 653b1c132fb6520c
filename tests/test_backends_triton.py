"""The triton backend against the reference backend and torch.optim.

Without a GPU, the kernels run on CPU tensors in the Triton interpreter: this module sets
``TRITON_INTERPRET=1`` when it is imported (pytest imports every test module before running any
test). That is early enough even if other modules imported fusedopt or triton before: the kernels
are defined (``@triton.jit``) when the backend's launcher is first imported, at the first step.
With a GPU and without TRITON_INTERPRET, the same tests run on CUDA tensors with compiled kernels
(the ``cuda`` params; ``benchmarks/gpu_check.sh`` runs them).

Most tests shrink the launch configuration (``FUSEDOPT_TRITON_CONFIG``) so that small tensors
straddle several tiles and programs: the interpreter is slow, and the multi-program paths (step
counter hand-off, tail chunks) are what needs testing.
"""

import math
import os
import re
import subprocess
import sys
import textwrap
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt import backends  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fusedopt.backends.triton import compat  # noqa: E402
from fusedopt.backends.triton import config as triton_config  # noqa: E402
from fusedopt.backends.triton import interpreting, tables  # noqa: E402
from fusedopt.backends.triton.rules import bias_correction  # noqa: E402
from conftest import needs_traceable_step  # noqa: E402
from test_optim import DEVICE_STEP_CASES, check_compiled_step, check_graphed_step  # noqa: E402

INTERPRETED = interpreting()
#: Why this triton's interpreter cannot run the kernels with this numpy (triton 3.1 with numpy 2,
#: ...: fusedopt/backends/triton/compat.py), or None. The backend then reports itself unavailable
#: under the interpreter, with this reason, and the tests that need kernels on CPU tensors skip.
INTERPRETER_PROBLEM = compat.interpreter_problem() if INTERPRETED else None
#: (device, reason to skip or None): CPU tensors need the interpreter, CUDA tensors need a GPU
#: and compiled kernels.
_DEVICES = {
    "cpu": INTERPRETER_PROBLEM if INTERPRETED else "CPU tensors need TRITON_INTERPRET=1",
    "cuda": ("no CUDA device" if not torch.cuda.is_available() else
             "TRITON_INTERPRET=1: CUDA tensors would run in the interpreter" if INTERPRETED else None),
}
DEVICES = [pytest.param(d, id=d, marks=[pytest.mark.skip(reason=r)] if r else
                        ([pytest.mark.gpu] if d == "cuda" else [])) for d, r in _DEVICES.items()]
DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in
          (torch.float32, torch.bfloat16, torch.float16)]
#: tiles of 32 elements, 2 per program: a 100-element tensor spans 2 programs, 4 tiles
SMALL_CONFIG = "float32=32x2x4,bfloat16=32x2x4,float16=32x2x4"
SIZES = (0, 1, 31, 64, 65, 100, 200)


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setenv(triton_config.ENV_VAR, SMALL_CONFIG)
    yield


@pytest.fixture(scope="module")
def triton_backend():
    if INTERPRETER_PROBLEM is not None:
        pytest.skip(INTERPRETER_PROBLEM)
    return backends.get("triton")


REFERENCE = backends.get("reference")


def launcher():
    from fusedopt.backends.triton import launch
    return launch


# ---- helpers ---------------------------------------------------------------------------------
def _randn(size, dtype, device, gen, scale=1.0):
    shape = size if isinstance(size, tuple) else (size,)
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _tolerances(dtype, device="cpu"):
    """fp32: a few ulp of rounding differences (more on a GPU, where the compiler contracts
    a * b + c into FMAs and tl.exp is approximate); 16-bit: one ulp of the storage."""
    if dtype == torch.float32:
        return dict(rtol=2e-6, atol=2e-7) if device == "cpu" else dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-5)


def _assert_lists_close(actual, expected, dtype, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a.cpu(), e.cpu(), msg=lambda m: f"{what}[{i}]: {m}",
                                   **_tolerances(dtype, a.device.type))


class AdamCase:
    """Params, grads and Adam state for two backends, identical at the start."""

    def __init__(self, sizes, dtype, device, seed=0, initial_step=0.0, amsgrad=True):
        gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.params = [_randn(s, dtype, device, gen) for s in sizes]
        self.grad_steps = [[_randn(s, dtype, device, gen) for s in sizes] for _ in range(3)]
        m = [_randn(s, dtype, device, gen, 0.1) for s in sizes]
        v = [_randn(s, dtype, device, gen, 0.1).abs() for s in sizes]
        self.state = dict(exp_avgs=m, exp_avg_sqs=v, max_exp_avg_sqs=[x * 1.5 for x in v] if amsgrad else [],
                          state_steps=[torch.full((), initial_step, device=device) for _ in sizes])

    def copy(self):
        return [p.clone() for p in self.params], {k: [t.clone() for t in v] for k, v in self.state.items()}

    def run(self, backend, params, state, steps=3, **hyper):
        for k in range(steps):
            backend.adam_(params, self.grad_steps[k % 3], state["exp_avgs"], state["exp_avg_sqs"],
                          state["max_exp_avg_sqs"], state["state_steps"], **hyper)

    def compare(self, backend, steps=3, **hyper):
        mine, theirs = self.copy(), self.copy()
        self.run(backend, *mine, steps=steps, **hyper)
        self.run(REFERENCE, *theirs, steps=steps, **hyper)
        _assert_lists_close(mine[0], theirs[0], self.dtype, "param")
        for key in theirs[1]:
            _assert_lists_close(mine[1][key], theirs[1][key],
                                torch.float32 if key == "state_steps" else self.dtype, key)
        return mine


ADAM_DEFAULTS = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                     maximize=False, decoupled_weight_decay=False)
ADAM_VARIANTS = {
    "adam": {},
    "adam-l2": dict(weight_decay=0.1),
    "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "amsgrad-maximize": dict(amsgrad=True, maximize=True),
    "adamw-amsgrad": dict(amsgrad=True, weight_decay=0.05, decoupled_weight_decay=True),
    "beta1-zero": dict(beta1=0.0, beta2=0.5),
}


# ---- registration ----------------------------------------------------------------------------
def test_registered_and_available_here():
    if INTERPRETER_PROBLEM is not None:  # an interpreter that cannot run the kernels: refused
        assert backends.available()["triton"] == INTERPRETER_PROBLEM
        with pytest.raises(backends.BackendUnavailableError,
                           match="backend 'triton' is unavailable: the Triton interpreter"):
            backends.get("triton")
        return
    assert backends.available()["triton"] is None
    assert backends.get("triton").name == "triton"


def test_interpreter_problems_are_decided_by_versions(monkeypatch):
    """triton < 3.2 with numpy >= 2: refused whatever the probe would say (its interpreter
    misreads numpy 2 arrays and may crash the process, so it is not run); with numpy 1.x, and
    numpy < 2.4 on newer triton, no problem and no probe."""
    monkeypatch.setattr(compat, "_run_loop_probe", lambda: pytest.fail("the probe must not run"))
    monkeypatch.setattr(compat, "_loop_probe", [])
    for triton_version, numpy_version, problem in (((3, 1, 0), (2, 0, 0), "install numpy<2 or triton>=3.2"),
                                                   ((3, 1, 0), (2, 4, 6), "install numpy<2 or triton>=3.2"),
                                                   ((3, 1, 0), (1, 26, 4), None),
                                                   ((3, 2, 0), (2, 3, 5), None),
                                                   ((3, 8, 0), (1, 26, 4), None)):
        monkeypatch.setattr(compat, "TRITON_VERSION", triton_version)
        monkeypatch.setattr(compat, "NUMPY_VERSION", numpy_version)
        reason = compat.interpreter_problem()
        assert (reason is None) if problem is None else (problem in reason), \
            (triton_version, numpy_version, reason)
    monkeypatch.setattr(compat, "TRITON_VERSION", (3, 2, 0))
    monkeypatch.setattr(compat, "NUMPY_VERSION", (2, 4, 0))
    monkeypatch.setattr(compat, "_loop_probe", ["the probe's verdict"])
    assert compat.interpreter_problem() == "the probe's verdict"  # numpy >= 2.4: the probe decides
    assert compat.version_tuple("3.1.0") == (3, 1, 0)
    assert compat.version_tuple("3.2.0+git1a2b3c") == (3, 2, 0)
    assert compat.version_tuple("2.4.0rc1") == (2, 4, 0)


@pytest.mark.skipif(not INTERPRETED, reason="the refusal is an interpreter matter")
def test_an_interpreter_problem_makes_the_backend_unavailable(monkeypatch):
    monkeypatch.setattr(compat, "interpreter_problem", lambda: "the interpreter cannot")
    assert backends.available()["triton"] == "the interpreter cannot"
    with pytest.raises(backends.BackendUnavailableError,
                       match="backend 'triton' is unavailable: the interpreter cannot"):
        backends.get("triton")


def test_kernel_annotations_are_objects():
    """Every @triton.jit function (ours and this module's) has its constexpr parameters annotated
    with the tl.constexpr object, not the string a ``from __future__ import annotations`` makes of
    it: triton 3.1's interpreter takes only the object for a constexpr (its GridExecutor compares
    the annotation's name with "constexpr"), and would pass BLOCK to tl.arange as a tensor."""
    import importlib
    names = ("adam_kernel", "sgd_kernel", "program", "rules", "norm", "interpreter_probe")
    kernels = {}
    modules = [importlib.import_module(f"fusedopt.backends.triton.{n}") for n in names]
    for module in modules + [sys.modules[__name__]]:
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if callable(fn) and getattr(fn, "__module__", None) == module.__name__:
                kernels[f"{module.__name__}.{name}"] = fn
    assert len(kernels) >= 20, sorted(kernels)  # the kernels and helpers were found
    constexprs = 0
    for name, fn in kernels.items():
        for param, annotation in fn.__annotations__.items():
            assert not isinstance(annotation, str), f"{name}({param}: {annotation!r}): a string annotation"
            constexprs += annotation is tl.constexpr
    assert constexprs >= 50


def test_supports_reasons(triton_backend):
    assert triton_backend.supports(torch.device("cpu"), torch.float64) is not None
    assert triton_backend.supports(torch.device("meta"), torch.float32) is not None
    if INTERPRETED:
        assert triton_backend.supports(torch.device("cpu"), torch.bfloat16) is None


def test_config_override_parsing():
    rows = triton_config.parse_overrides("float32=256x2x8, bfloat16=512x1x4")
    assert rows[torch.float32] == triton_config.LaunchConfig(256, 2, 8)
    assert rows[torch.bfloat16].chunk == 512
    with pytest.raises(ValueError):
        triton_config.parse_overrides("float32=100x2x4")  # not a power of two
    with pytest.raises(ValueError):
        triton_config.parse_overrides("float64=128x1x4")


def test_is_dense():
    x = torch.zeros(4, 6)
    assert tables.is_dense(x) and tables.is_dense(x.t()) and tables.is_dense(x[:, :0])
    assert not tables.is_dense(x[:, ::2]) and not tables.is_dense(x[:, :3])
    assert not tables.is_dense(torch.zeros(3, 1).expand(3, 4))
    assert tables.is_dense(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))


@triton.jit
def _bias_correction_kernel(steps, out, log_beta, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out + offsets, bias_correction(tl.load(steps + offsets), log_beta))


@pytest.mark.parametrize("device", DEVICES)
def test_bias_correction_is_accurate(device):
    """1 - beta**t in fp32 from ln(beta): relative error ~1e-7 (~1e-6 with the GPU's approximate
    exp) where the naive fp32 form loses ~1e-5."""
    steps = torch.tensor([1, 2, 3, 10, 100, 1000, 10 ** 4, 10 ** 5, 10 ** 6, 2 ** 24] + [1] * 6,
                         dtype=torch.float32, device=device)
    for beta in (0.0, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.999999):
        out = torch.empty(16, device=device)
        log_beta = math.log(beta) if beta > 0 else -math.inf
        _bias_correction_kernel[(1,)](steps, out, log_beta, BLOCK=16)
        expected = torch.tensor([1 - beta ** int(t) for t in steps[:10].tolist()], dtype=torch.float64)
        torch.testing.assert_close(out[:10].cpu().double(), expected, atol=0,
                                   rtol=5e-7 if device == "cpu" else 2e-6,
                                   msg=lambda m: f"beta={beta}: {m}")


# ---- parity with the reference backend -------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(ADAM_VARIANTS))
def test_adam_matches_reference(triton_backend, device, dtype, variant):
    hyper = dict(ADAM_DEFAULTS, **ADAM_VARIANTS[variant])
    case = AdamCase(SIZES, dtype, device, amsgrad=hyper["amsgrad"])
    params, state = case.compare(triton_backend, **hyper)
    assert all(s.item() == 3 for s in state["state_steps"])  # also the empty tensor's


@pytest.mark.parametrize("device", DEVICES)
def test_adam_late_steps_bias_correction(triton_backend, device):
    """Bias corrections at large step counts (and 1 - beta2**t near 0 at t = 1 is covered above)."""
    for initial in (9.0, 999.0, 123456.0):
        AdamCase((5, 70), torch.float32, device, initial_step=initial).compare(
            triton_backend, **dict(ADAM_DEFAULTS, amsgrad=True))


@pytest.mark.parametrize("device", DEVICES)
def test_float64_step_counters(triton_backend, device):
    """torch.optim keeps CPU step counters in the default dtype, float64 when that is the default."""
    case = AdamCase((5, 70), torch.float32, device)
    case.state["state_steps"] = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(2)]
    params, state = case.compare(triton_backend, **ADAM_DEFAULTS)
    assert all(s.dtype == torch.float64 and s.item() == 3 for s in state["state_steps"])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_values_propagate_like_the_reference(triton_backend, device):
    case = AdamCase((40, 70), torch.float32, device)
    case.grad_steps[0][0][3] = float("nan")
    case.grad_steps[0][1][5] = float("inf")
    case.params[1][7] = float("-inf")
    hyper = dict(ADAM_DEFAULTS, weight_decay=0.1, amsgrad=True)
    mine, theirs = case.copy(), case.copy()
    case.run(triton_backend, *mine, steps=2, **hyper)
    case.run(REFERENCE, *theirs, steps=2, **hyper)
    for a, b in zip(mine[0] + mine[1]["exp_avgs"] + mine[1]["max_exp_avg_sqs"],
                    theirs[0] + theirs[1]["exp_avgs"] + theirs[1]["max_exp_avg_sqs"]):
        torch.testing.assert_close(a.cpu(), b.cpu(), equal_nan=True, **_tolerances(torch.float32, device))


try:  # an optional test dependency: without it, this one test is skipped, not the module
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:
    given = None


def _adam_random_case(sizes, dtype, amsgrad, maximize, decoupled, weight_decay, beta1, lr_tensor, seed):
    device = "cpu" if INTERPRETED else "cuda"
    if _DEVICES[device] is not None:
        pytest.skip(_DEVICES[device])
    hyper = dict(ADAM_DEFAULTS, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled, beta1=beta1,
                 lr=torch.tensor(1e-2, device=device) if lr_tensor else 1e-2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(triton_config.ENV_VAR, SMALL_CONFIG)
        AdamCase(sizes, dtype, device, seed=seed, amsgrad=amsgrad).compare(
            backends.get("triton"), steps=2, **hyper)


if given is not None:
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sizes=st.lists(st.integers(0, 150), min_size=1, max_size=5),
           dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
           amsgrad=st.booleans(), maximize=st.booleans(), decoupled=st.booleans(),
           weight_decay=st.sampled_from([0.0, 0.1]), beta1=st.sampled_from([0.0, 0.5, 0.9]),
           lr_tensor=st.booleans(), seed=st.integers(0, 2 ** 16))
    def test_adam_random_cases_match_reference(**case):
        _adam_random_case(**case)
else:
    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_adam_random_cases_match_reference():
        pass


SGD_VARIANTS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "dampening-wd": dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    "nesterov-maximize": dict(momentum=0.8, nesterov=True, maximize=True, weight_decay=0.02),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
def test_sgd_matches_reference(triton_backend, device, dtype, variant):
    hyper = dict(dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                      maximize=False), **SGD_VARIANTS[variant])
    gen = torch.Generator().manual_seed(1)
    params = [_randn(s, dtype, device, gen) for s in SIZES]
    grads = [[_randn(s, dtype, device, gen) for s in SIZES] for _ in range(3)]
    results = []
    for backend in (triton_backend, REFERENCE):
        p = [t.clone() for t in params]
        bufs = [torch.zeros_like(t) for t in params] if hyper["momentum"] else []
        for k in range(3):
            backend.sgd_(p, grads[k], bufs, is_first_step=k == 0, **hyper)
        results.append((p, bufs))
    _assert_lists_close(results[0][0], results[1][0], dtype, "param")
    _assert_lists_close(results[0][1], results[1][1], dtype, "momentum_buffer")


@pytest.mark.parametrize("device", DEVICES)
def test_many_tiny_tensors(triton_backend, device, monkeypatch):
    """1000 tensors of 1..9 elements: one launch per step (one 16-element tile per program)."""
    monkeypatch.setenv(triton_config.ENV_VAR, "float32=16x1x4")
    sizes = [1 + (i * 7) % 9 for i in range(1000)]
    before = launcher().LAUNCHES["adam_kernel"]
    AdamCase(sizes, torch.float32, device, initial_step=4.0).compare(
        triton_backend, steps=1, **dict(ADAM_DEFAULTS, weight_decay=0.1, decoupled_weight_decay=True))
    assert launcher().LAUNCHES["adam_kernel"] - before == 1


@pytest.mark.parametrize("device", DEVICES)
def test_default_config_straddling_chunks(triton_backend, device, monkeypatch):
    """Default blocks: tensors just below, at and above one program's chunk, and several chunks.
    (The other candidate rows, which tuning may pick on a GPU: test_backends_triton_tuning.py.)"""
    monkeypatch.delenv(triton_config.ENV_VAR)
    monkeypatch.setenv("FUSEDOPT_TRITON_TUNE", "0")
    chunk = triton_config.config_for(torch.float32).chunk
    sizes = (chunk - 1, chunk, chunk + 1, 2 * chunk + 3)
    AdamCase(sizes, torch.float32, device).compare(triton_backend, steps=2, **ADAM_DEFAULTS)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_param_saved_for_backward_then_stepped_raises_like_torch(triton_backend, device, name):
    """The kernels write behind autograd's back; the launcher bumps the params' version counters,
    so a backward through a param updated since the forward raises instead of using new values."""
    w = torch.nn.Parameter(torch.randn(5, device=device))
    x = torch.randn(5, device=device, requires_grad=True)
    y = (w * x).sum()  # saves w to compute x's gradient
    w.grad = torch.ones_like(w)
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    opt = getattr(fusedopt.optim, name)([w], backend="triton", **kwargs)
    version = w._version
    opt.step()
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(triton_backend, device):
    triton_backend.adam_([], [], [], [], [], [], **ADAM_DEFAULTS)
    triton_backend.sgd_([], [], [], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                        nesterov=False, maximize=False, is_first_step=True)
    case = AdamCase((0, 0), torch.float32, device)
    case.compare(triton_backend, **ADAM_DEFAULTS)


# ---- GradScaler inputs, lr tensor -------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["adam", "sgd"])
def test_found_inf_changes_nothing(triton_backend, device, algo):
    case = AdamCase(SIZES, torch.bfloat16, device, amsgrad=True)
    params, state = case.copy()
    bufs = [torch.randn_like(p) for p in params]
    before = [t.clone() for t in params + bufs + [s for v in state.values() for s in v]]
    found_inf = torch.ones((), device=device)
    if algo == "adam":
        case.run(triton_backend, params, state, steps=1, found_inf=found_inf,
                 **dict(ADAM_DEFAULTS, amsgrad=True))
    else:
        triton_backend.sgd_(params, case.grad_steps[0], bufs, lr=0.1, momentum=0.9, dampening=0.0,
                            weight_decay=0.1, nesterov=True, maximize=False, is_first_step=False,
                            found_inf=found_inf)
    after = params + bufs + [s for v in state.values() for s in v]
    for b, a in zip(before, after):
        assert torch.equal(b.view(torch.int16) if b.dtype == torch.bfloat16 else b,
                           a.view(torch.int16) if a.dtype == torch.bfloat16 else a)
    # found_inf == 0: an ordinary step
    case.compare(triton_backend, steps=1, found_inf=torch.zeros((), device=device),
                 **dict(ADAM_DEFAULTS, amsgrad=True))


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_divides_and_never_writes(triton_backend, device):
    case = AdamCase(SIZES, torch.float32, device)
    grads_before = [g.clone() for g in case.grad_steps[0]]
    scale = torch.full((), 1024.0, device=device)
    case.compare(triton_backend, steps=1, grad_scale=scale, **ADAM_DEFAULTS)
    for g, b in zip(case.grad_steps[0], grads_before):
        assert torch.equal(g, b)
    gen = torch.Generator().manual_seed(3)
    params = [_randn(s, torch.float32, device, gen) for s in SIZES]
    grads = [_randn(s, torch.float32, device, gen) for s in SIZES]
    results = []
    for backend in (triton_backend, REFERENCE):
        p = [t.clone() for t in params]
        backend.sgd_(p, grads, [], lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False, is_first_step=False, grad_scale=scale)
        results.append(p)
    _assert_lists_close(results[0], results[1], torch.float32, "param")


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scale_beyond_float32(triton_backend, device):
    """A float64 grad_scale beyond float32's range (GradScaler's scale near its ceiling divided
    by a clip coefficient) divides in two exact steps, not by inf (which zeroed the gradients)."""
    gen = torch.Generator().manual_seed(5)
    params = [_randn(s, torch.float32, device, gen) for s in SIZES]
    grads = [_randn(s, torch.float32, device, gen).clamp(-3, 3) for s in SIZES]
    scaled = [(g.double() * 2.0 ** 125).float() for g in grads]  # finite: |g| 2^125 < FLT_MAX
    scale = torch.tensor(2.0 ** 125 * 37.0, dtype=torch.float64, device=device)
    results = []
    for backend, gs, grad_scale in ((triton_backend, scaled, scale),
                                    (REFERENCE, [g / 37.0 for g in grads], None)):
        p = [t.clone() for t in params]
        backend.sgd_(p, gs, [], lr=0.5, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False, is_first_step=False, grad_scale=grad_scale)
        results.append(p)
    _assert_lists_close(results[0], results[1], torch.float32, "param")
    assert any(not torch.equal(a, b) for a, b in zip(results[0], params))


@pytest.mark.parametrize("device", DEVICES)
def test_lr_tensor_equals_float_lr(triton_backend, device):
    case = AdamCase(SIZES, torch.float32, device)
    by_float, by_tensor = case.copy(), case.copy()
    hyper = dict(ADAM_DEFAULTS, weight_decay=0.1, decoupled_weight_decay=True)
    case.run(triton_backend, *by_float, **hyper)
    case.run(triton_backend, *by_tensor, **dict(hyper, lr=torch.tensor(1e-2, device=device)))
    for a, b in zip(by_float[0], by_tensor[0]):
        assert torch.equal(a, b)
    case.compare(triton_backend, **dict(hyper, lr=torch.tensor(3e-3, device=device, dtype=torch.float64)))


BAD_SCALARS = {
    # found_inf flags the overflow in element 1: reading element 0 applied the step
    "found_inf with two elements": (dict(found_inf=[0.0, 1.0]),
                                    "found_inf must be a tensor with one element, got shape [2]"),
    "lr with two elements": (dict(lr=[0.5, 2.0]),
                             "lr_tensor must be a tensor with one element, got shape [2]"),
    "grad_scale with two elements": (dict(grad_scale=[2.0, 4.0]),
                                     "grad_scale must be a tensor with one element, got shape [2]"),
    "empty grad_scale": (dict(grad_scale=[]),
                         "grad_scale must be a tensor with one element, got shape [0]"),
    # (a KeyError 'complex64' from the launcher's dtype table)
    "complex lr": (dict(lr=1 + 0j), "lr_tensor has dtype torch.complex64; it must be a real"),
    "complex found_inf": (dict(found_inf=0j), "found_inf has dtype torch.complex64"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["adam", "sgd"])
@pytest.mark.parametrize("case", list(BAD_SCALARS))
def test_scalar_tensors_are_checked_like_the_cpu_backend(triton_backend, device, algo, case):
    """lr / grad_scale / found_inf tensors must hold one real element (the cpu backend's checks
    and words); a bad one changes nothing."""
    values, message = BAD_SCALARS[case]
    kwargs = dict(ADAM_DEFAULTS) if algo == "adam" else dict(
        lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
        is_first_step=False)
    kwargs.update({k: torch.tensor(v, device=device) for k, v in values.items()})
    p, g, m, v = (torch.full((5,), x, device=device) for x in (1.0, 1.0, 0.0, 0.0))
    step = torch.zeros((), device=device)
    with pytest.raises(RuntimeError, match=f"fusedopt::{algo}_ \\(triton\\): " + re.escape(message)):
        if algo == "adam":
            triton_backend.adam_([p], [g], [m], [v], [], [step], **kwargs)
        else:
            triton_backend.sgd_([p], [g], [m], **kwargs)
    assert torch.equal(p, torch.ones(5, device=device)) and torch.equal(m, torch.zeros(5, device=device))
    assert float(step) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_scalar_tensors_of_other_real_dtypes(triton_backend, device):
    """Integer, bool and float8 scalars are read as their value (a float8 found_inf failed in the
    kernel, comparing fp8 with an int)."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    for dtype in [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float16] + ([fp8] if fp8 else []):
        for flag, expected in ((0, 0.95), (1, 1.0)):
            p = torch.ones(3, device=device)
            triton_backend.sgd_([p], [torch.ones(3, device=device)], [], lr=0.05, momentum=0.0,
                                dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                                is_first_step=False, found_inf=torch.tensor(flag).to(device, dtype),
                                grad_scale=torch.tensor(1).to(device, dtype))
            torch.testing.assert_close(p, torch.full((3,), expected, device=device),
                                       msg=lambda m: f"{dtype}: {m}")


# ---- one launch per dtype, the table cache --------------------------------------------------
class _CountingKernel:
    """Stands in for a ``@triton.jit`` kernel and counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def counted(*args, **kwargs):
            self.launches += 1
            return run(*args, **kwargs)
        return counted


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_per_dtype(triton_backend, device, monkeypatch):
    launch = launcher()
    adam_kernel = _CountingKernel(launch.adam_kernel)
    sgd_kernel = _CountingKernel(launch.sgd_kernel)
    monkeypatch.setattr(launch, "adam_kernel", adam_kernel)
    monkeypatch.setattr(launch, "sgd_kernel", sgd_kernel)
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] * 10
    params = [_randn(7 + i, d, device, gen) for i, d in enumerate(dtypes)]
    grads = [torch.ones_like(p) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    counted = launch.LAUNCHES["adam_kernel"]
    triton_backend.adam_(params, grads, m, v, [], steps, **ADAM_DEFAULTS)
    assert adam_kernel.launches == 3 and launch.LAUNCHES["adam_kernel"] - counted == 3
    triton_backend.sgd_(params, grads, bufs, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                        nesterov=False, maximize=False, is_first_step=True)
    assert sgd_kernel.launches == 3
    triton_backend.sgd_(params[::3], grads[::3], bufs[::3], lr=0.1, momentum=0.9, dampening=0.0,
                        weight_decay=0.0, nesterov=False, maximize=False, is_first_step=False)
    assert sgd_kernel.launches == 4  # ten fp32 tensors: one launch
    # through the optimizer: one group of 30 tensors in three dtypes, then 10 of one dtype
    opt = fusedopt.optim.AdamW([torch.nn.Parameter(p) for p in params], backend="triton")
    for p, g in zip(opt.param_groups[0]["params"], grads):
        p.grad = g
    opt.step()
    assert adam_kernel.launches == 6
    single = fusedopt.optim.SGD([torch.nn.Parameter(p) for p in params[::3]], lr=0.1, momentum=0.9,
                                backend="triton")
    for p in single.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    single.step()  # creates the buffers (is_first_step)
    single.step()
    assert sgd_kernel.launches == 6


@pytest.fixture(params=["native", "python"])
def address_keys(request, monkeypatch):
    """Cache keys from the C++ pass (fusedopt._C._addresses) or, without it, Python's."""
    if request.param == "native" and tables._native_addresses is None:
        pytest.skip("fusedopt._C has no _addresses (extension not built)")
    if request.param == "python":
        monkeypatch.setattr(tables, "_native_addresses", None)
    tables.PLANS.clear()
    yield request.param
    tables.PLANS.clear()


def test_address_key_lists_every_address_and_dtype_then_every_layout(address_keys):
    class Sub(torch.Tensor):
        pass

    a = [torch.zeros(3), torch.zeros(0), torch.zeros(5, 2)[:, 1]]
    b = [torch.zeros(()), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(2)]
    native = address_keys == "native"
    # c10::ScalarType numbers in the native key, torch.dtype objects in Python's
    dtype_word = {torch.float32: 6, torch.bfloat16: 15} if native else {d: d for d in (torch.float32, torch.bfloat16)}
    expected = [w for t in a + b for w in (t.data_ptr(), dtype_word[t.dtype])]
    expected += [1, 3, 1] + [1, 0, 1] + [1, 5, 2]  # dim, sizes, strides of each tensor of a
    key = tables.address_key((a, b), 1)
    if native:
        assert isinstance(key, bytes)
        key = [int.from_bytes(key[i:i + 8], sys.byteorder, signed=True) for i in range(0, len(key), 8)]
    assert key == expected
    # a subclass (which may answer data_ptr() its own way) takes the Python path: a list
    sub = torch.zeros(2).as_subclass(Sub)
    assert tables.address_key(([a[0], sub],), 0) == [a[0].data_ptr(), torch.float32,
                                                     sub.data_ptr(), torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_table_cache_reuse_and_rebuild(triton_backend, device, address_keys):
    plans = tables.PLANS
    case = AdamCase((10, 100, 3), torch.float32, device)
    params, state = case.copy()
    hyper = dict(ADAM_DEFAULTS, amsgrad=True)
    case.run(triton_backend, params, state, steps=1, **hyper)
    builds = plans.builds
    case.run(triton_backend, params, state, steps=2, **hyper)
    assert plans.builds == builds, "unchanged tensors must reuse the tables"
    # same tensors in new list objects (the functional API builds lists per call): still cached
    triton_backend.adam_(list(params), list(case.grad_steps[0]), *[list(state[k]) for k in state], **hyper)
    assert plans.builds == builds
    # a reallocated state tensor (same values, new address): new tables, same numbers
    state["exp_avgs"][1] = state["exp_avgs"][1].clone()
    params[2].data = params[2].data.clone()
    reference_params, reference_state = [p.clone() for p in params], {k: [t.clone() for t in v] for k, v in state.items()}
    case.run(triton_backend, params, state, steps=1, **hyper)
    assert plans.builds == builds + 1
    case.run(REFERENCE, reference_params, reference_state, steps=1, **hyper)
    _assert_lists_close(params, reference_params, torch.float32, "param")
    _assert_lists_close(state["exp_avgs"], reference_state["exp_avgs"], torch.float32, "exp_avg")


@pytest.mark.parametrize("device", DEVICES)
def test_state_of_another_layout_at_the_same_address_rebuilds(triton_backend, device, address_keys):
    """A state tensor replaced by one of another layout over the same memory (same address and
    dtype) must not be read through the old tables, which walk it in the param's order."""
    torch.manual_seed(0)
    p = torch.randn(6, 4, device=device).t()           # dense, column-major (4, 6)
    g = torch.randn(4, 6, device=device)
    m_mem, v_mem = torch.zeros(24, device=device), torch.zeros(24, device=device)
    steps = [torch.zeros((), device=device)]
    hyper = dict(ADAM_DEFAULTS)
    triton_backend.adam_([p], [g], [m_mem.as_strided((4, 6), (1, 4))],
                         [v_mem.as_strided((4, 6), (1, 4))], [], steps, **hyper)
    builds = tables.PLANS.builds
    m, v = m_mem.as_strided((4, 6), (6, 1)), v_mem.as_strided((4, 6), (6, 1))  # row-major now
    p_ref, m_ref, v_ref, steps_ref = p.clone(), m.clone(), v.clone(), [steps[0].clone()]
    triton_backend.adam_([p], [g], [m], [v], [], steps, **hyper)
    REFERENCE.adam_([p_ref], [g], [m_ref], [v_ref], [], steps_ref, **hyper)
    assert tables.PLANS.builds == builds + 1
    torch.testing.assert_close(p, p_ref)
    torch.testing.assert_close(m, m_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_many_param_groups_stay_cached(triton_backend, device):
    """One plan per group: 80 groups stepping in turn must not evict each other."""
    groups = [[torch.zeros(3, device=device) for _ in range(1 + i % 5)] for i in range(80)]
    builds = None
    for rounds in range(2):
        if rounds == 1:
            builds = tables.PLANS.builds
        for params in groups:
            triton_backend.sgd_(params, [torch.ones_like(p) for p in params], [], lr=0.1, momentum=0.0,
                                dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                                is_first_step=False)
    assert tables.PLANS.builds == builds
    assert all(torch.allclose(p, torch.full_like(p, -0.2)) for params in groups for p in params)


@pytest.mark.parametrize("device", DEVICES)
def test_moved_gradients_rebuild_only_the_gradient_table(triton_backend, device, address_keys):
    case = AdamCase((10, 100), torch.float32, device)
    params, state = case.copy()
    case.run(triton_backend, params, state, steps=1, **ADAM_DEFAULTS)
    plan = tables.PLANS.get("adam", ("param_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs"),
                            [params, state["exp_avgs"], state["exp_avg_sqs"]], state["state_steps"])
    builds, grad_builds = tables.PLANS.builds, plan.builds_of_grad_tables
    fresh = [g.clone() for g in case.grad_steps[0]]  # zero_grad(set_to_none=True) + backward
    triton_backend.adam_(params, fresh, state["exp_avgs"], state["exp_avg_sqs"], [], state["state_steps"],
                         **ADAM_DEFAULTS)
    assert tables.PLANS.builds == builds
    assert plan.builds_of_grad_tables == grad_builds + 1


# ---- layouts ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:fusedopt triton:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_layouts(triton_backend, device):
    """Dense transposed params (kernel), strided views (reference fallback), and gradients laid
    out differently from their param (copied for the kernel) all give the reference numbers."""
    gen = torch.Generator().manual_seed(7)
    base = _randn((8, 40), torch.float32, device, gen)
    params = [
        _randn((40, 6), torch.float32, device, gen).t(),       # dense, column-major
        base[:, ::2],                                            # not dense: fallback
        _randn((5, 9), torch.float32, device, gen),             # contiguous, grad transposed
        _randn(50, torch.float32, device, gen),
    ]
    grads = [torch.randn_like(params[0]), torch.randn_like(params[1]),
             _randn((9, 5), torch.float32, device, gen).t(), _randn(50, torch.float32, device, gen)]
    results = []
    for backend in (triton_backend, REFERENCE):
        p = [t.clone() if i != 1 else base.clone()[:, ::2] for i, t in enumerate(params)]
        m = [torch.zeros_like(t) for t in params]
        v = [torch.zeros_like(t) for t in params]
        steps = [torch.zeros((), device=device) for _ in params]
        for _ in range(2):
            backend.adam_(p, grads, m, v, [], steps, **dict(ADAM_DEFAULTS, weight_decay=0.1))
        results.append((p, m, v, steps))
        if backend is triton_backend:
            plan = tables.PLANS.get("adam", ("param_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs"),
                                    [p, m, v], steps)
            assert plan.fallback == [1]
            assert [i for i, _ in plan.buckets[0].grad_copies] == [2]
    for a, b, name in zip(results[0], results[1], ("param", "exp_avg", "exp_avg_sq", "step")):
        _assert_lists_close(a, b, torch.float32, name)


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_tensors_take_the_scalar_path(triton_backend, device):
    """Views at odd offsets into one buffer (as with flat parameter or gradient buckets): those
    tensors are marked not vector-aligned, the others keep vector access, numbers are right."""
    gen = torch.Generator().manual_seed(9)
    flat = _randn(400, torch.float32, device, gen)
    sizes = (100, 64, 33)
    results = []
    for backend in (triton_backend, REFERENCE):
        buffer = flat.clone()
        params = [buffer[1:101], _randn(64, torch.float32, device, torch.Generator().manual_seed(1)),
                  buffer[203:236]]
        grads = [torch.ones_like(p) * 0.1 for p in params]
        m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), device=device) for _ in params]
        for _ in range(2):
            backend.adam_(params, grads, m, v, [], steps, **ADAM_DEFAULTS)
        results.append((params, m, v))
        if backend is triton_backend:
            plan = tables.PLANS.get("adam", ("param_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs"),
                                    [params, m, v], steps)
            assert plan.buckets[0].vector_ok.tolist() == [0, 1, int(params[2].data_ptr() % 16 == 0)]
    assert [p.numel() for p in results[0][0]] == list(sizes)
    for a, b, name in zip(results[0], results[1], ("param", "exp_avg", "exp_avg_sq")):
        _assert_lists_close(a, b, torch.float32, name)


# ---- the optimizer front end against torch.optim ---------------------------------------------
FRONT_END_CASES = {
    "SGD-nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "SGD-dampening": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2)),
    "Adam-amsgrad": ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    "AdamW-maximize": ("AdamW", dict(lr=1e-2, weight_decay=0.05, maximize=True)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(FRONT_END_CASES))
def test_optimizer_front_end_matches_torch_optim(device, case):
    name, kwargs = FRONT_END_CASES[case]
    gen = torch.Generator().manual_seed(11)
    shapes = [(3, 70), (70,), (1,), (2, 3, 5)]
    init = [torch.randn(s, generator=gen).to(device) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(10)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = getattr(fusedopt.optim, name)(ours, backend="triton", **kwargs)
    ref = getattr(torch.optim, name)(theirs, foreach=False, **kwargs)
    for step in range(10):
        for p, q, g in zip(ours, theirs, grads[step]):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, value in ref.state[q].items():
            torch.testing.assert_close(opt.state[p][key].cpu().to(value.dtype), value.cpu(), rtol=1e-5,
                                       atol=1e-6, msg=lambda m: f"state {key}: {m}")


# ---- torch.compile ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_has_no_graph_break(triton_backend, device):
    from fusedopt.backends.triton import compile_ops
    if not compile_ops.AVAILABLE:
        pytest.skip("torch.library.custom_op is unavailable in this torch")
    case = AdamCase((10, 70), torch.float32, device)
    eager, compiled = case.copy(), case.copy()
    hyper = dict(ADAM_DEFAULTS, weight_decay=0.1, decoupled_weight_decay=True)
    grads = case.grad_steps[0]

    fixed = {k: v for k, v in hyper.items() if k != "lr"}  # torch 2.5's dynamo cannot trace dict(d, lr=...)

    def step(params, state, lr):
        triton_backend.adam_(params, grads, state["exp_avgs"], state["exp_avg_sqs"], [],
                             state["state_steps"], lr=lr, **fixed)

    torch._dynamo.reset()
    lr = torch.tensor(1e-2, device=device)
    fn = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    for _ in range(2):
        fn(compiled[0], compiled[1], lr)
        step(eager[0], eager[1], lr)
    for a, b in zip(eager[0] + eager[1]["exp_avgs"] + eager[1]["state_steps"],
                    compiled[0] + compiled[1]["exp_avgs"] + compiled[1]["state_steps"]):
        assert torch.equal(a, b)


@needs_traceable_step
@pytest.mark.parametrize("device", DEVICES)
@DEVICE_STEP_CASES
def test_compiled_optimizer_step_with_clipping_is_one_graph(triton_backend, device, name, flags):
    """``opt.step()`` of a fusedopt optimizer on this backend, clipping included (the Triton norm
    is a custom op too), in one ``fullgraph=True`` graph per step."""
    check_compiled_step(name, flags, "triton", steps=5, device=device, shapes=[(5, 3), (0,), (70,)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@DEVICE_STEP_CASES
def test_step_captured_in_a_cuda_graph_matches_eager(name, flags):
    check_graphed_step(name, flags, "triton")


# ---- the compiled (GPU) kernels build, checked without a GPU ---------------------------------
_COMPILE_CHECK = textwrap.dedent("""
    import inspect
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusedopt.backends.triton.adam_kernel import adam_kernel
    from fusedopt.backends.triton.norm import norm_finish_kernel, norm_partials_kernel
    from fusedopt.backends.triton.sgd_kernel import sgd_kernel

    def signature(kernel, constants):
        types = {"arrivals": "*i32", "lr": "fp32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
                 "found_inf_ptr": "*fp32", "partials": "*fp32", "prescale": "*fp32", "out": "*fp32",
                 "slot0": "i32", "n": "i32"}
        return {n: "constexpr" if n in constants else types.get(n, "*i64" if not n.endswith(
            ("beta1", "beta2", "eps", "decay", "momentum", "dampening")) else "fp32")
            for n in kernel.arg_names}

    on = dict(DTYPE=tl.bfloat16, BLOCK=1024, TILES=4, MAXIMIZE=True,
              HAS_WEIGHT_DECAY=True, LR_ON_DEVICE=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True)
    off = dict(DTYPE=tl.float32, BLOCK=512, TILES=8, MAXIMIZE=False,
               HAS_WEIGHT_DECAY=False, LR_ON_DEVICE=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False)
    # triton >= 3.3 (ASTSource takes constexprs): every argument in the signature, constexprs
    # keyed by (index,); triton 3.1 / 3.2: the signature has the other arguments only, by name,
    # and constants are keyed by name.
    NEW_API = "constexprs" in inspect.signature(ASTSource).parameters

    def source_of(kernel, constants):
        types = signature(kernel, constants)
        if NEW_API:
            return ASTSource(fn=kernel, signature=types,
                             constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})
        return ASTSource(fn=kernel, signature={n: t for n, t in types.items() if t != "constexpr"},
                         constants=dict(constants))

    for kernel, constants in (
            (adam_kernel, dict(on, STEP_DTYPE=tl.float32, AMSGRAD=True, DECOUPLED=True)),
            (adam_kernel, dict(off, STEP_DTYPE=tl.float64, AMSGRAD=False, DECOUPLED=False)),
            (sgd_kernel, dict(on, HAS_MOMENTUM=True, NESTEROV=True, FIRST_STEP=False)),
            (sgd_kernel, dict(off, HAS_MOMENTUM=False, NESTEROV=False, FIRST_STEP=True))):
        source = source_of(kernel, constants)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        assert "ld.global.v4" in ptx, kernel  # 128-bit vector loads on the aligned path
        print(kernel.__name__, "ok")
    for kernel, constants in (  # the clipping norm's kernels (masked loads: no vector check)
            (norm_partials_kernel, dict(DTYPE=tl.bfloat16, BLOCK=1024, TILES=4, ALIGNED=True, KIND=0,
                                        PRESCALE=True)),
            (norm_partials_kernel, dict(DTYPE=tl.float32, BLOCK=512, TILES=8, ALIGNED=False, KIND=2,
                                        PRESCALE=False)),
            (norm_finish_kernel, dict(KIND=0, BLOCK=1024)),
            (norm_finish_kernel, dict(KIND=2, BLOCK=1024))):
        triton.compile(source_of(kernel, constants), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
        print(kernel.__name__, "ok")
""")


def test_kernels_compile_for_a_gpu_target():
    """Compile both kernels (and the norm's two) for sm_90 in a fresh process (no interpreter):
    catches code that the interpreter accepts but the compiler rejects (e.g. triton 3.1's
    pointer_type refusing a constexpr dtype), and checks the aligned path vectorises."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(fusedopt.__file__)),
                                                      env.get("PYTHONPATH")]))
    start = time.time()
    result = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0 and ("GPUTarget" in result.stderr and "ImportError" in result.stderr):
        pytest.skip("this triton cannot compile for a CUDA target here")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 8, (result.stdout, time.time() - start)
