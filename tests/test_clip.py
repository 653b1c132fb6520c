"""fusedopt.clip against torch.nn.utils, clipping inside the optimizer step, GradScaler loops,
non-finite skipping, and the absence of host syncs.

Norm implementations tested on CPU tensors: ``cpu`` (the native op, when built) and ``reference``
(torch's foreach method); on CUDA tensors, when a GPU is present: ``cuda`` (the native op's CUDA
kernels, csrc/cuda/norm.cu). The Triton kernels have their own file (test_clip_triton.py).
"""
from __future__ import annotations

import contextlib
import copy
import math
import textwrap

import pytest
import torch

import fusedopt
from fusedopt import _norm_ops, backends
from fusedopt.clip import _norm

from conftest import no_host_sync
from torch_oracles import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from test_optim import assert_state_equal, clone_params, make_params, set_grads

INF = float("inf")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16"]
NORMS = [2.0, INF, 1.0, 3.5]


def _cuda_param(why_not):
    """The ``cuda`` parameter: GPU tests (marker ``gpu``), skipped saying ``why_not`` when set."""
    marks = [pytest.mark.gpu] + ([pytest.mark.skip(reason=why_not)] if why_not else [])
    return pytest.param("cuda", id="cuda", marks=marks)


def _cuda_clip_unavailable():
    if not torch.cuda.is_available():
        return "needs a GPU"
    if not _norm_ops.has_kernel("total_norm", "cuda"):
        return "fusedopt._C has no CUDA total_norm kernel"
    return None


def norm_impls():
    native = _norm_ops.has_kernel("total_norm", "cpu")
    return [pytest.param("reference", id="reference"),
            pytest.param("cpu", id="cpu", marks=[] if native else [
                pytest.mark.skip(reason="fusedopt._C has no CPU total_norm kernel")]),
            _cuda_param(_cuda_clip_unavailable())]


def opt_backends(cuda=False):
    """Optimizer backends; ``cuda=True`` adds ``cuda`` (tests then put their params on dev())."""
    reasons = backends.available()
    out = [pytest.param("reference", id="reference")]
    cpu_ok = reasons.get("cpu") is None and _norm_ops.has_kernel("total_norm", "cpu")
    out.append(pytest.param("cpu", id="cpu", marks=[] if cpu_ok else [
        pytest.mark.skip(reason=f"cpu backend or its norm op unavailable: {reasons.get('cpu')}")]))
    if cuda:
        out.append(_cuda_param(reasons.get("cuda") or _cuda_clip_unavailable()))
    return out


def dev(impl):
    """The device of a test's tensors: CUDA for the ``cuda`` implementation, else the CPU."""
    return "cuda" if impl == "cuda" else "cpu"


def on(impl, params):
    """Leaf params on dev(impl)."""
    return [p.detach().to(dev(impl)).requires_grad_() for p in params]


def rtol_of(dtype):
    """A few roundings of the storage dtype (fp32 for fp32, the 16-bit eps for 16-bit)."""
    return {torch.float32: 2e-6, torch.float64: 1e-12, torch.bfloat16: 2 * 2.0 ** -8,
            torch.float16: 2 * 2.0 ** -11}[dtype]


def grads_for(shapes, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype) for s in shapes]


CASES = {
    "one": [(1031,)],
    "mixed": [(5, 3), (17,), (40000,), (0,), (2, 3, 4), ()],   # 40000 spans several chunks
    "tiny1000": [(1 + i % 7,) for i in range(1000)],
}


# ---- get_total_norm ---------------------------------------------------------------------------

@pytest.mark.parametrize("impl", norm_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm_type", NORMS, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_total_norm_matches_torch(case, norm_type, dtype, impl):
    shapes = CASES[case]
    if math.isinf(norm_type):  # torch cannot take the inf-norm of an empty tensor
        shapes = [s for s in shapes if s != (0,)]
    tensors = [t.to(dev(impl)) for t in grads_for(shapes, dtype)]
    ours = fusedopt.get_total_norm(tensors, norm_type, backend=impl)
    theirs = get_total_norm(tensors, norm_type)
    exact = get_total_norm([t.double() for t in tensors], norm_type)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape == ()
    # ours accumulates in fp32 and rounds once: a rounding of the dtype from the exact value
    torch.testing.assert_close(ours.double(), exact, rtol=rtol_of(dtype), atol=0)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=2 * rtol_of(dtype) + 1e-5, atol=0)


@pytest.mark.parametrize("impl", norm_impls())
@pytest.mark.parametrize("norm_type", [0.0, -INF, 2.0])
def test_total_norm_other_orders_and_mixed_dtypes(impl, norm_type):
    tensors = grads_for([(7,), (300,)], torch.float32) + grads_for([(9,)], torch.float64, seed=1)
    tensors += grads_for([(33,)], torch.bfloat16, seed=2) + [torch.zeros(5)]
    tensors = [t.to(dev(impl)) for t in tensors]
    ours = fusedopt.get_total_norm(tensors, norm_type, backend=impl)
    theirs = get_total_norm(tensors, norm_type)
    exact = get_total_norm([t.double() for t in tensors], norm_type)
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=0)
    # torch rounds the bf16 tensor's own norm to bf16 before combining
    torch.testing.assert_close(ours, theirs, rtol=2.0 ** -7, atol=0)


@pytest.mark.parametrize("impl", norm_impls())
def test_total_norm_empty_and_scalar_inputs(impl):
    assert torch.equal(fusedopt.get_total_norm([], backend=impl), get_total_norm([]))
    t = torch.tensor([3.0, 4.0], device=dev(impl))
    assert fusedopt.get_total_norm(t, backend=impl).item() == pytest.approx(5.0)
    assert fusedopt.get_total_norm([torch.empty(0, device=dev(impl))], backend=impl).item() == 0.0


@pytest.mark.parametrize("impl", norm_impls())
def test_total_norm_fp16_squares_overflow_but_norm_does_not(impl):
    """300^2 overflows fp16; the norm (~950) does not: accumulation must be fp32."""
    g = torch.full((10,), 300.0, dtype=torch.float16, device=dev(impl))
    ours = fusedopt.get_total_norm([g], backend=impl)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours.float().cpu(), torch.tensor(300.0 * math.sqrt(10)), rtol=1e-3, atol=0)
    torch.testing.assert_close(ours, get_total_norm([g]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0])
def test_cpu_norm_of_elements_whose_terms_overflow_float32(dtype, norm_type):
    """One element of 1e20 squares to inf in float32, its norm does not: the cpu backend sums a
    chunk whose float32 sum overflowed again in double (clipping zeroed such a gradient before).
    torch's CPU norm gets it right for a 1-element tensor and gives inf for this one; we give
    the exact norm's rounding for both. An inf element still gives inf."""
    g = torch.zeros(5000, dtype=dtype)
    g[1234] = 1e20 if norm_type != 3.0 else 1e13
    ours = fusedopt.get_total_norm([g], norm_type, backend="cpu")
    exact = get_total_norm([g.double()], norm_type).to(ours.dtype)
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=0)
    one = fusedopt.get_total_norm([g[1234:1235]], norm_type, backend="cpu")
    torch.testing.assert_close(one, get_total_norm([g[1234:1235]], norm_type), rtol=1e-6, atol=0)
    p = torch.zeros_like(g, requires_grad=True)
    p.grad = g.clone()
    fusedopt.clip_grad_norm_([p], max_norm=1.0, backend="cpu")
    assert float(p.grad[1234]) == pytest.approx(1.0, rel=1e-2)
    g[7] = INF
    assert torch.isinf(fusedopt.get_total_norm([g], norm_type, backend="cpu"))


def test_cpu_scale_refuses_unsupported_dtypes_even_when_it_has_nothing_to_do():
    """scale_ by exactly 1 writes nothing, but a dtype it cannot scale is refused all the same
    (clip_grads_with_norm_ on float8 grads failed or passed depending on the norm)."""
    for value in (1.0, 0.5):
        with pytest.raises(RuntimeError, match="has dtype Int, which is not supported"):
            torch.ops.fusedopt.scale_([torch.ones(3, dtype=torch.int32)], torch.tensor(value))


@pytest.mark.parametrize("impl", norm_impls())
def test_clip_fp16_norm_beyond_fp16_range_still_clips(impl):
    """A norm of ~9.5e5 is inf in fp16: torch then zeroes the gradients; fusedopt clips them."""
    p = torch.zeros(1000, dtype=torch.float16, device=dev(impl), requires_grad=True)
    p.grad = torch.full((1000,), 30000.0, dtype=torch.float16, device=dev(impl))
    norm = fusedopt.clip_grad_norm_([p], max_norm=1.0, backend=impl)
    assert norm.dtype == torch.float16 and torch.isinf(norm)  # the returned value is torch's dtype
    expected = 30000.0 / (30000.0 * math.sqrt(1000))
    torch.testing.assert_close(p.grad.float().cpu(), torch.full((1000,), expected), rtol=2e-3, atol=0)


@pytest.mark.parametrize("impl", norm_impls())
@pytest.mark.parametrize("bad", [float("nan"), INF])
@pytest.mark.parametrize("norm_type", [2.0, INF])
def test_nonfinite_gradients(impl, bad, norm_type):
    params = on(impl, make_params([(5,), (40000,)]))
    theirs = clone_params(params)
    set_grads([params, theirs], 0)
    params[1].grad[123] = bad
    theirs[1].grad[123] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedopt.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True, backend=impl)
    with pytest.raises(RuntimeError, match="non-finite"):
        fusedopt.get_total_norm([p.grad for p in params], norm_type, error_if_nonfinite=True,
                                backend=impl)
    ours = fusedopt.clip_grad_norm_(params, 1.0, norm_type, backend=impl)
    ref = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


# ---- clip_grad_norm_, clip_grads_with_norm_, clip_grad_value_ -----------------------------------

@pytest.mark.parametrize("impl", norm_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm_type", NORMS, ids=str)
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
def test_clip_grad_norm_matches_torch(max_norm, norm_type, dtype, impl):
    params = on(impl, make_params([(5, 3), (17,), (40000,), (2, 3, 4)], dtype))
    theirs = clone_params(params)
    set_grads([params, theirs], 0)
    params[1].grad = None  # params without a gradient are skipped
    theirs[1].grad = None
    ours = fusedopt.clip_grad_norm_(params, max_norm, norm_type, backend=impl)
    ref = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert ours.dtype == ref.dtype
    tol = rtol_of(dtype) * 4 + (1e-5 if dtype == torch.float32 else 0)
    torch.testing.assert_close(ours, ref, rtol=tol, atol=0)
    for p, q in zip(params, theirs):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol * 1e-3)
    if max_norm == 1e6:  # a coefficient of exactly one changes no bit
        for p, q in zip(params, theirs):
            if q.grad is not None:
                assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("impl", norm_impls())
def test_clip_grads_with_norm_matches_torch(impl):
    params = on(impl, make_params([(7, 5), (300,)]))
    theirs = clone_params(params)
    set_grads([params, theirs], 0)
    norm = fusedopt.get_total_norm([p.grad for p in params], backend=impl)
    fusedopt.clip_grads_with_norm_(params, 0.3, norm, backend=impl)
    clip_grads_with_norm_(theirs, 0.3, get_total_norm([q.grad for q in theirs]))
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.parametrize("impl", norm_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_clip_grad_value_matches_torch(impl, dtype):
    params = on(impl, make_params([(5, 3), (40000,), (0,)], dtype))
    theirs = clone_params(params)
    set_grads([params, theirs], 0)
    for ps in (params, theirs):
        ps[0].grad[0, 0] = float("nan")
        ps[0].grad = ps[0].grad.t().contiguous().t()  # a transposed (non-contiguous) layout
        ps[1].grad = torch.zeros(80000, dtype=dtype, device=dev(impl))[::2].copy_(ps[1].grad)  # a strided one
    fusedopt.clip_grad_value_(params, 0.5, backend=impl)
    torch.nn.utils.clip_grad_value_(theirs, 0.5)
    for p, q in zip(params, theirs):
        assert torch.equal(p.grad.isnan(), q.grad.isnan())
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)


def _clip_calls(backend):
    """Every public clipping entry point, called with ``backend`` on one CPU grad."""
    def param():
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.full((3,), 2.0)
        return p
    return {
        "get_total_norm": lambda: fusedopt.get_total_norm([param().grad], backend=backend),
        "clip_grad_norm_": lambda: fusedopt.clip_grad_norm_([param()], 1.0, backend=backend),
        "clip_grads_with_norm_": lambda: fusedopt.clip_grads_with_norm_(
            [param()], 1.0, torch.tensor(4.0), backend=backend),
        "clip_grad_value_": lambda: fusedopt.clip_grad_value_([param()], 1.0, backend=backend),
        "PercentileClipper": lambda: fusedopt.PercentileClipper(backend=backend)([param()]),
    }


@pytest.mark.parametrize("call", list(_clip_calls("auto")))
def test_unknown_backend_is_refused_by_name(call):
    with pytest.raises(ValueError, match="Invalid backend: 'cpp'"):
        _clip_calls("cpp")[call]()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("call", list(_clip_calls("auto")))
def test_unavailable_backend_is_refused_saying_why(call):
    """An explicit backend that cannot run is an error, as for the optimizers (it used to fall
    back to the reference silently)."""
    # the reason: no GPU, or (a CPU-only build) no CUDA kernels at all
    with pytest.raises(backends.BackendUnavailableError,
                       match=r"backend 'cuda' is unavailable: (no CUDA device|fusedopt\._C was built without CUDA)"):
        _clip_calls("cuda")[call]()


def test_backend_for_another_device_is_refused():
    if not _norm_ops.has_kernel("total_norm", "cpu"):
        pytest.skip("fusedopt._C has no CPU total_norm kernel")
    with pytest.raises(backends.BackendUnavailableError,
                       match="backend 'cpu' cannot clip tensors on meta: cpu backend needs CPU"):
        fusedopt.get_total_norm([torch.empty(4, device="meta")], backend="cpu")


def test_fusedopt_backend_variable_is_checked_too(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "cuda" if not torch.cuda.is_available() else "nope")
    with pytest.raises((ValueError, backends.BackendUnavailableError)):
        fusedopt.clip_grad_norm_([torch.nn.Parameter(torch.ones(2))], 1.0)


@pytest.mark.parametrize("impl", norm_impls()[:2])
def test_scaling_and_clamping_follow_the_backend(impl, monkeypatch):
    """``backend="reference"``: torch's ops scale and clamp; ``"cpu"``: the native ops."""
    native = []
    monkeypatch.setattr(_norm_ops, "scale_", lambda *a: native.append("scale_"))
    monkeypatch.setattr(torch.ops.fusedopt, "clamp_", lambda *a: native.append("clamp_"),
                        raising=False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    fusedopt.clip_grads_with_norm_([p], 1.0, torch.tensor(4.0), backend=impl)
    fusedopt.clip_grad_value_([p], 0.1, backend=impl)
    if impl == "reference":
        assert native == [] and torch.equal(p.grad, torch.full((3,), 0.1))
    else:
        assert native == ["scale_", "clamp_"]


def _needs_cpu_ops():
    if not _norm_ops.has_kernel("total_norm", "cpu"):
        pytest.skip("fusedopt._C has no CPU clipping ops")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("norm_type", [1.0, 0.5, 2.0], ids=str)
def test_norm_beyond_the_float32_range_is_inf_like_torch(dtype, norm_type):
    """Partials are combined in double, so the total can pass float32's range while every partial
    stays finite: the result is inf, as torch's norm (the op used to refuse the double), and
    clip_grad_norm_ then zeroes the gradients, as torch's does."""
    _needs_cpu_ops()
    n = 2 ** 20 if norm_type == 1.0 else 40
    value = 1e33 if norm_type == 1.0 else 3e38
    if norm_type == 2.0:
        n, value = 2 ** 20, 1e17  # squares 1e34 and runs of them fit float32, the sum 1e40 not
    grads = [torch.full((n,), value).to(dtype)]
    want = get_total_norm(grads, norm_type)
    got = fusedopt.get_total_norm(grads, norm_type, backend="cpu")
    if norm_type == 2.0:  # the sum of squares is past float32, the norm (1.0e20) is not
        exact = float(grads[0][0].double()) * 2 ** 10
        assert got.item() == pytest.approx(exact, rel=1e-6)
        return
    assert math.isinf(want.item()) and math.isinf(got.item()) and got.dtype == want.dtype
    p = torch.zeros(n, dtype=dtype, requires_grad=True)
    p.grad = grads[0].clone()
    assert math.isinf(fusedopt.clip_grad_norm_([p], 1.0, norm_type).item())
    assert torch.equal(p.grad, torch.zeros_like(p.grad))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_strided_grads_are_scaled_like_dense_ones(dtype):
    """A gradient that is not one dense block is scaled through a contiguous copy by the same
    kernel: the coefficient stays in float32 (it was rounded to the gradient's dtype, so 1e-8
    became 0 in fp16) and the results equal the dense gradient's bit for bit."""
    _needs_cpu_ops()
    g = torch.Generator().manual_seed(3)
    values = ((torch.rand(2048, generator=g) + 0.5) * 1000).to(dtype)
    for coefficient in (1e-8, 0.3, 1.7e-3):
        dense = values.clone()
        strided = torch.zeros(4096, dtype=dtype)[::2]
        strided.copy_(values)
        torch.ops.fusedopt.scale_([dense, strided], torch.tensor(coefficient))
        assert torch.equal(dense, strided) and dense.abs().min() > 0
        # the product in float32 (torch's math type for 16-bit data), rounded once
        want = (values.float() * torch.tensor(coefficient, dtype=torch.float32)).to(dtype)
        assert torch.equal(dense, want)
    base = torch.zeros(4096, dtype=dtype)
    base[1::2] = 7.0
    torch.ops.fusedopt.scale_([base[::2]], torch.tensor(0.5))  # the copy went back into its slots only
    assert torch.equal(base[1::2], torch.full((2048,), 7.0, dtype=dtype))


@pytest.mark.parametrize("threads", [1, 2])
def test_tensors_sharing_memory_are_scaled_one_after_the_other(threads):
    """The same tensor twice, or overlapping views of one buffer: torch rewrites them one after
    the other (scaled twice); one parallel region over all of them let two threads rewrite the
    same elements at once (some scaled once)."""
    _needs_cpu_ops()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.linspace(1.0, 2.0, 2 ** 20 + 300)
        cases = [
            lambda b: [b, b],                                              # listed twice
            lambda b: [b[: 2 ** 20], b[300:]],                              # overlapping views
            lambda b: [b[::2], b[1::2], b[: 2 ** 19]],                      # interleaved + overlap
            lambda b: [b.view(-1, 4).t(), b[2 ** 19:]],                     # non-dense alias
        ]
        for make in cases:
            ours, theirs = buf.clone(), buf.clone()
            torch.ops.fusedopt.scale_(make(ours), torch.tensor(0.5))
            for t in make(theirs):
                t.mul_(0.5)
            assert torch.equal(ours, theirs)
            ours, theirs = buf.clone(), buf.clone()
            fusedopt.clip_grads_with_norm_([_holder(t) for t in make(ours)], 1.0, torch.tensor(4.0))
            clip_grads_with_norm_([_holder(t) for t in make(theirs)], 1.0, torch.tensor(4.0))
            assert torch.equal(ours, theirs)
        disjoint = buf.clone()
        parts = [disjoint[: 2 ** 19], disjoint[2 ** 19:]]  # one buffer, no overlap: one region
        torch.ops.fusedopt.scale_(parts, torch.tensor(0.5))
        assert torch.equal(disjoint, buf * 0.5)
    finally:
        torch.set_num_threads(before)


def _holder(grad):
    """A param whose .grad is ``grad`` (a view is fine: clipping only touches .grad)."""
    p = torch.zeros(1).expand(grad.shape).requires_grad_()
    p.grad = grad
    return p


def _embedding_model(device):
    """An Embedding(sparse=True) (sparse COO grads) feeding a Linear (dense grads)."""
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Embedding(50, 4, sparse=True),
                               torch.nn.Linear(4, 3)).to(device)


@pytest.mark.parametrize("impl", norm_impls())
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, INF, -INF, 0.0], ids=str)
def test_sparse_gradients_are_normed_and_clipped_like_torch(impl, norm_type, monkeypatch):
    """nn.Embedding(sparse=True) grads: torch's norm of a sparse tensor is that of its values
    with repeated indices summed (the grads here are uncoalesced), and clipping scales them."""
    if impl == "reference":
        monkeypatch.setenv(backends.ENV_VAR, "reference")
    ours = _embedding_model(dev(impl))
    theirs = copy.deepcopy(ours)
    idx = torch.tensor([1, 2, 2, 7, 7, 7, 30], device=dev(impl))
    for model in (ours, theirs):
        model(idx).square().sum().backward()
    assert ours[0].weight.grad.is_sparse and not ours[0].weight.grad.is_coalesced()
    sparse_only = fusedopt.get_total_norm([ours[0].weight.grad], norm_type)
    torch.testing.assert_close(sparse_only, get_total_norm(
        [theirs[0].weight.grad], norm_type), rtol=2e-6, atol=0)
    got = fusedopt.clip_grad_norm_(ours.parameters(), 0.5, norm_type)
    want = clip_grad_norm_(theirs.parameters(), 0.5, norm_type)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert p.grad.layout == q.grad.layout
        torch.testing.assert_close(p.grad.to_dense(), q.grad.to_dense(), rtol=2e-6, atol=1e-7)


def test_clip_grad_value_refuses_sparse_gradients_and_follows_torch_on_negative_values():
    model = _embedding_model("cpu")
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="clip_grad_value_ does not support sparse gradients"):
        fusedopt.clip_grad_value_(model.parameters(), 0.1)
    # a negative clip value is an empty range: torch makes every element but NaN clip_value
    ours = [torch.zeros(5, requires_grad=True)]
    theirs = clone_params(ours)
    for ps in (ours, theirs):
        ps[0].grad = torch.tensor([-1.0, -0.1, 0.0, float("nan"), 1.0])
    fusedopt.clip_grad_value_(ours, -0.3)
    torch.nn.utils.clip_grad_value_(theirs, -0.3)
    torch.testing.assert_close(ours[0].grad, theirs[0].grad, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_clip_grad_value_nan_makes_everything_nan_like_torch(strided):
    """A NaN bound: torch's clamp makes every element NaN, whatever the layout (the native
    kernel's comparisons let every value through, and did for dense grads)."""
    grad = torch.tensor([-1.0, 0.5, 3.0, float("inf")])
    if strided:
        grad = torch.zeros(8)[::2].copy_(grad)
    p = torch.zeros(4, requires_grad=True)
    p.grad = grad
    fusedopt.clip_grad_value_([p], float("nan"))
    assert torch.isnan(p.grad).all()


def test_clip_accepts_a_tensor_and_a_generator():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.full((4,), 2.0)
    assert fusedopt.clip_grad_norm_(p, 1.0).item() == pytest.approx(4.0)
    torch.testing.assert_close(p.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)
    with pytest.warns(UserWarning, match="empty generator"):
        fusedopt.clip_grad_norm_((q for q in []), 1.0)


def test_clip_in_place_bumps_version_counter():
    p = torch.zeros(4, requires_grad=True)
    p.grad = torch.full((4,), 2.0)
    before = p.grad._version
    fusedopt.clip_grad_norm_([p], 1.0)
    assert p.grad._version > before


# ---- torch.compile ------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", norm_impls())
@pytest.mark.parametrize("norm_type", [2.0, INF, 3.5], ids=str)
def test_compiled_clipping_is_one_graph_and_matches_eager(impl, norm_type, monkeypatch):
    """Every clipping function inside one ``fullgraph=True`` graph (a graph break raises), on
    mixed dtypes, an empty grad and a param without one, gives eager's numbers."""
    from torch._dynamo.utils import counters
    if impl == "reference":
        monkeypatch.setenv(backends.ENV_VAR, "reference")
    params = on(impl, make_params([(5, 3), (17,), (0,), (300,)], torch.float32)) + \
        on(impl, make_params([(40,)], torch.bfloat16, seed=1))
    eager = clone_params(params)
    set_grads([params, eager], 0)
    params[1].grad = eager[1].grad = None

    def clip_all(ps):
        norm = fusedopt.clip_grad_norm_(ps, 0.5, norm_type, backend=impl)
        total = fusedopt.get_total_norm([p.grad for p in ps if p.grad is not None], norm_type,
                                        backend=impl)
        fusedopt.clip_grads_with_norm_(ps, 0.25, total)
        fusedopt.clip_grad_value_(ps, 0.01)
        return norm, total

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(clip_all, fullgraph=True, backend="aot_eager")(params)
    expected = clip_all(eager)
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(compiled, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    for p, q in zip(params, eager):
        assert (p.grad is None) == (q.grad is None)
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)


def test_compiled_percentile_clipper_matches_eager():
    """The clipper's device-side history (filled, then wrapping around, NaN norm skipped) traced
    into one graph per call, against an eager clipper fed the same gradients."""
    clippers = [fusedopt.PercentileClipper(percentile=50.0, history=4) for _ in range(2)]
    ps = [torch.zeros(3, requires_grad=True) for _ in range(2)]
    torch._dynamo.reset()
    compiled = torch.compile(lambda p: clippers[0]([p]), fullgraph=True, backend="aot_eager")
    for scale in [1.0, 4.0, 2.0, 8.0, float("nan"), 3.0, 0.5]:
        for p in ps:
            p.grad = torch.tensor([1.0, 2.0, 2.0]) * scale
        a, b = compiled(ps[0]), clippers[1]([ps[1]])
        torch.testing.assert_close(a, b, equal_nan=True)
        torch.testing.assert_close(ps[0].grad, ps[1].grad, equal_nan=True)
    states = [c.state_dict() for c in clippers]
    for key in ("history_norms", "count"):
        torch.testing.assert_close(states[0][key], states[1][key], equal_nan=True, msg=key)


# ---- adaptive clipping --------------------------------------------------------------------------

def test_nanquantile_probe_ignores_the_default_dtype_and_device_at_import():
    """The rank-precision probe runs at import: a float64 default dtype must not change its
    answer (it did: every rank became float64 and the probe said float32 on torch 2.14), and a
    meta default device must not break the import."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import torch
        torch.set_default_dtype(torch.float64)
        with torch.device("meta"):
            from fusedopt.clip import _adaptive
        torch.set_default_dtype(torch.float32)
        x = torch.tensor([0.0, 0.0, 0.0, 1.0])
        assert torch.equal(_adaptive.nanquantile(x, 0.9), torch.nanquantile(x, 0.9))
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_clipper_nanquantile_is_torchs_bit_for_bit(dtype):
    """The clipper's percentile is written out (torch 2.5 cannot trace torch.nanquantile); it
    must give torch.nanquantile's numbers: with NaNs, all-NaN, inf, one element, any q."""
    from fusedopt.clip._adaptive import nanquantile

    gen = torch.Generator().manual_seed(3)
    cases = [torch.full((4,), float("nan")), torch.tensor([0.0, 0.0, 0.0, 1.0]),
             torch.tensor([float("inf"), 1.0, float("nan")]), torch.tensor([2.5])]
    for n in (2, 3, 4, 5, 7, 16, 100, 1000):
        for _ in range(8):
            x = torch.randn(n, generator=gen) * 100
            x[torch.rand(n, generator=gen) < torch.rand((), generator=gen)] = float("nan")
            cases.append(x)
    for x in cases:
        x = x.to(dtype)
        for q in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.73, 0.9, 0.999, 1.0):
            got, want = nanquantile(x, q), torch.nanquantile(x, q)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got, want) or (got.isnan() and want.isnan()), (x, q, got, want)


def test_percentile_clipper_matches_its_definition():
    clipper = fusedopt.PercentileClipper(percentile=50.0, history=4)
    p = torch.zeros(3, requires_grad=True)
    history = []
    for step, scale in enumerate([1.0, 4.0, 2.0, 8.0, float("nan"), 3.0, 0.5]):
        g = torch.tensor([1.0, 2.0, 2.0]) * scale  # norm 3 * scale
        p.grad = g.clone()
        norm = clipper([p])
        if math.isfinite(scale):
            history = (history + [3.0 * scale])[-4:]
            tau = torch.tensor(history).nanquantile(0.5).item()
            coef = min(1.0, tau / (3.0 * scale + 1e-6))
            torch.testing.assert_close(p.grad, g * coef)
            assert norm.item() == pytest.approx(3.0 * scale)
        else:  # a non-finite norm takes a slot as NaN, which the percentile ignores
            history = (history + [float("nan")])[-4:]
            assert torch.isnan(norm)
    state = clipper.state_dict()
    other = fusedopt.PercentileClipper()
    other.load_state_dict(copy.deepcopy(state))
    assert int(other.count) == 7 and other.history == 4


def test_percentile_clipper_loads_a_copy_of_the_state():
    """load_state_dict copies (as torch.optim does): a clipper loaded from a live one, or from a
    state dict kept in memory, must not write its norms into them."""
    first = fusedopt.PercentileClipper(percentile=50.0, history=4)
    p = torch.zeros(3, requires_grad=True)
    for scale in (1.0, 2.0):
        p.grad = torch.full((3,), scale)
        first([p])
    state = first.state_dict()
    snapshot = copy.deepcopy(state)
    second = fusedopt.PercentileClipper()
    second.load_state_dict(state)
    p.grad = torch.full((3,), 100.0)
    second([p])
    assert int(first.count) == 2 and int(second.count) == 3
    torch.testing.assert_close(first.history_norms, snapshot["history_norms"], equal_nan=True)
    torch.testing.assert_close(state["history_norms"], snapshot["history_norms"], equal_nan=True)
    bad = dict(snapshot, history=5)
    with pytest.raises(ValueError, match=r"history_norms has shape \(4,\), expected \(5,\)"):
        fusedopt.PercentileClipper().load_state_dict(bad)


# ---- no host sync -------------------------------------------------------------------------------

@contextlib.contextmanager
def no_host_reads():
    """Fail on any Python-level read of a tensor value (item, bool, float, int, tolist)."""
    def boom(*args, **kwargs):
        raise AssertionError("host sync: a tensor value was read on the host")
    mp = pytest.MonkeyPatch()
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "__index__"):
        mp.setattr(torch.Tensor, name, boom)
    try:
        yield
    finally:
        mp.undo()


class RecordingBackend:
    """Stands in for a real backend: records what the front end passes, reads nothing."""
    name = "recording"

    def __init__(self):
        self.calls = []

    def adam_(self, params, grads, *args, grad_scale=None, found_inf=None, **kwargs):
        self.calls.append((grad_scale, found_inf))

    def sgd_(self, params, grads, *args, grad_scale=None, found_inf=None, **kwargs):
        self.calls.append((grad_scale, found_inf))


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_step_front_end_does_not_sync(name, monkeypatch):
    stub = RecordingBackend()
    monkeypatch.setattr(backends, "select", lambda *a, **k: stub)
    params = make_params([(5, 3), (40000,)])
    cls = getattr(fusedopt.optim, name)
    opt = cls(params, lr=0.1, max_grad_norm=1.0, skip_nonfinite=True)
    set_grads([params], 0)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    with no_host_reads():
        opt.step()
        fusedopt.clip_grad_norm_(params, 1.0)
        fusedopt.clip_grad_value_(params, 1.0)
        fusedopt.get_total_norm([p.grad for p in params], INF)
    grad_scale, found_inf = stub.calls[-1]
    assert isinstance(grad_scale, torch.Tensor) and isinstance(found_inf, torch.Tensor)
    assert isinstance(opt.last_grad_norm, torch.Tensor) and isinstance(opt.skipped_steps, torch.Tensor)


@pytest.mark.parametrize("backend", opt_backends()[1:])
def test_cpu_step_with_clipping_does_not_read_on_host(backend):
    params = make_params([(5, 3), (40000,)])
    opt = fusedopt.optim.AdamW(params, max_grad_norm=1.0, skip_nonfinite=True, backend=backend)
    set_grads([params], 0)
    with no_host_reads():
        opt.step()
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_step_with_clipping_does_not_sync():
    params = [p.cuda().detach().requires_grad_() for p in make_params([(5, 3), (40000,)])]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fusedopt.optim.AdamW(params, max_grad_norm=1.0, skip_nonfinite=True)
    opt.step()  # first step builds tables (host-to-device copies)
    torch.cuda.synchronize()
    with no_host_sync():
        opt.step()
        fusedopt.clip_grad_norm_(params, 1.0)


# ---- clipping inside the optimizer step ---------------------------------------------------------

PAIRS = {"SGD": (fusedopt.optim.SGD, torch.optim.SGD, dict(momentum=0.9)),
         "Adam": (fusedopt.optim.Adam, torch.optim.Adam, dict(weight_decay=0.1)),
         "AdamW": (fusedopt.optim.AdamW, torch.optim.AdamW, dict(amsgrad=True))}
SHAPES = [(5, 3), (17,), (4097,), (0,), (2, 3, 4), ()]


def _groups(params, lrs=(1e-2, 3e-2)):
    half = len(params) // 2
    return [{"params": params[:half], "lr": lrs[0]}, {"params": params[half:], "lr": lrs[1]}]


@pytest.mark.parametrize("backend", opt_backends(cuda=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_max_grad_norm_equals_torch_clip_then_step(name, dtype, backend):
    ours_cls, torch_cls, flags = PAIRS[name]
    params = on(backend, make_params(SHAPES, dtype))
    theirs = clone_params(params)
    ours = ours_cls(_groups(params), lr=1e-2, max_grad_norm=1.5, backend=backend, **flags)
    ref = torch_cls(_groups(theirs), lr=1e-2, foreach=False, **flags)
    for step in range(10):
        set_grads([params, theirs], step)
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, 1.5, foreach=False)
        ref.step()
        torch.testing.assert_close(ours.last_grad_norm.to(norm.dtype), norm,
                                   rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    tol = dict(rtol=2e-5, atol=1e-6) if dtype == torch.float32 else {}
    assert_state_equal(ours, params, ref, theirs, **tol)


@pytest.mark.parametrize("backend", opt_backends(cuda=True))
def test_max_grad_norm_per_group_and_large_threshold(backend):
    """The norm is global; each group clips with its own threshold (None: no clipping)."""
    params = on(backend, make_params(SHAPES))
    theirs = clone_params(params)
    groups = _groups(params)
    groups[1]["max_grad_norm"] = None
    ours = fusedopt.optim.SGD(groups, lr=0.1, max_grad_norm=0.5, backend=backend)
    ref = torch.optim.SGD(_groups(theirs), lr=0.1, foreach=False)
    half = len(SHAPES) // 2
    set_grads([params, theirs], 0)
    total = get_total_norm([q.grad for q in theirs])
    clip_grads_with_norm_(theirs[:half], 0.5, total)
    ours.step()
    ref.step()
    assert_state_equal(ours, params, ref, theirs, rtol=2e-5, atol=1e-6)


def test_cpu_step_with_clipping_reads_the_grads_in_cpp(monkeypatch):
    """From the second step on (the group caches exist), a clipped CPU step computes the norm
    from the params' grads in C++ (backend.norm_of_grads) and steps each group through the
    grads-reading path; when that declines (a grad removed) the general path takes the step.
    Either way the numbers are torch's clip (global norm, per-group thresholds) then step."""
    from fusedopt.backends import cpu as cpu_backend
    if backends.available()["cpu"] is not None or not _norm_ops.has_kernel("total_norm", "cpu"):
        pytest.skip("cpu backend or its norm op unavailable")
    results = []
    original = cpu_backend.CpuBackend.norm_of_grads

    def spy(self, params, norm_type=2.0, prescale=None):
        out = original(self, params, norm_type, prescale)
        results.append(out is not None)
        return out

    monkeypatch.setattr(cpu_backend.CpuBackend, "norm_of_grads", spy)
    params = make_params(SHAPES)
    theirs = clone_params(params)
    groups = _groups(params)
    groups[1]["max_grad_norm"] = None
    ours = fusedopt.optim.Adam(groups, lr=1e-2, max_grad_norm=0.5, backend="cpu")
    ref = torch.optim.Adam(_groups(theirs), lr=1e-2, foreach=False)
    half = len(SHAPES) // 2
    for step in range(5):
        set_grads([params, theirs], step)
        if step == 2:  # a grad removed: the C++ read declines, the general path steps
            params[0].grad = theirs[0].grad = None
        grads = [q.grad for q in theirs if q.grad is not None]
        total = get_total_norm(grads)
        clip_grads_with_norm_([q for q in theirs[:half] if q.grad is not None],
                                             0.5, total)
        ours.step()
        ref.step()
        torch.testing.assert_close(ours.last_grad_norm, total, rtol=1e-6, atol=0)
        assert_state_equal(ours, params, ref, theirs, rtol=2e-5, atol=1e-6)
    # step 0: no caches yet (general path, no call); 1: C++ read; 2: declined (the general path
    # rebuilds the caches for the missing grad); 3: no call (those caches are not for the fast
    # path; rebuilt again with every grad present); 4: C++ read again
    assert results == [True, False, True]


def test_cpu_step_with_skip_nonfinite_reading_grads_skips_and_counts():
    if backends.available()["cpu"] is not None or not _norm_ops.has_kernel("total_norm", "cpu"):
        pytest.skip("cpu backend or its norm op unavailable")
    params = make_params(SHAPES)
    opt = fusedopt.optim.AdamW(_groups(params), lr=1e-2, max_grad_norm=1.0, skip_nonfinite=True,
                               backend="cpu")
    set_grads([params], 0)
    opt.step()
    opt.step()  # the caches exist: this and the next step read the grads in C++
    before = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict())
    params[2].grad[7] = float("inf")
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    after = opt.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(after["state"][key][name], tensor), (key, name)
    assert int(opt.skipped_steps) == 1 and not torch.isfinite(opt.last_grad_norm)


@pytest.mark.parametrize("backend", opt_backends())
def test_state_dict_interchange_with_torch(backend):
    params = make_params(SHAPES)
    ours = fusedopt.optim.AdamW(params, lr=1e-2, max_grad_norm=1.0, skip_nonfinite=True, backend=backend)
    set_grads([params], 0)
    ours.step()
    # fusedopt -> torch: the state dict has torch.optim's keys only
    theirs = clone_params(params)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    ref.load_state_dict(ours.state_dict())
    set_grads([theirs], 1)
    ref.step()
    # torch -> fusedopt: the constructor's clipping options survive
    pure_params = clone_params(params)
    pure = torch.optim.AdamW(pure_params, lr=1e-2)
    set_grads([pure_params], 1)
    pure.step()
    again = fusedopt.optim.AdamW(clone_params(params), lr=1e-2, max_grad_norm=2.0, backend=backend)
    again.load_state_dict(pure.state_dict())
    set_grads([list(again.param_groups[0]["params"])], 2)
    again.step()
    assert again.param_groups[0]["max_grad_norm"] == 2.0
    assert again.param_groups[0]["skip_nonfinite"] is False
    # fusedopt -> fusedopt: the options are the running optimizer's, not the checkpoint's
    assert "max_grad_norm" not in ours.state_dict()["param_groups"][0]
    third = fusedopt.optim.AdamW(clone_params(params), lr=1e-2, backend=backend)
    third.load_state_dict(ours.state_dict())
    assert third.param_groups[0]["max_grad_norm"] is None
    assert third.param_groups[0]["skip_nonfinite"] is False
    fourth = fusedopt.optim.AdamW(clone_params(params), lr=1e-2, max_grad_norm=3.0, backend=backend)
    old_format = ours.state_dict()  # checkpoints written before the keys were left out
    old_format["param_groups"][0].update(max_grad_norm=1.0, skip_nonfinite=True, backend="reference")
    fourth.load_state_dict(old_format)
    assert fourth.param_groups[0]["max_grad_norm"] == 3.0
    assert fourth.param_groups[0]["skip_nonfinite"] is False
    assert fourth.param_groups[0]["backend"] == backend


def test_clip_options_are_validated():
    with pytest.raises(ValueError, match="max_grad_norm"):
        fusedopt.optim.AdamW(make_params([(2,)]), max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="skip_nonfinite"):
        fusedopt.optim.SGD(make_params([(2,)]), skip_nonfinite="yes")
    opt = fusedopt.optim.Adam(make_params([(2,)]))
    with pytest.raises(ValueError, match="max_grad_norm"):
        opt.add_param_group({"params": make_params([(3,)]), "max_grad_norm": 0.0})


# ---- skipping non-finite steps ------------------------------------------------------------------

def snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} for p in params])


def assert_unchanged(before, opt, params):
    old_params, old_state = before
    for p, old in zip(params, old_params):
        assert torch.equal(p, old)
    for p, state in zip(params, old_state):
        for key, value in state.items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("backend", opt_backends(cuda=True))
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("bad", [float("nan"), INF])
def test_skip_nonfinite_makes_the_step_a_no_op(name, backend, bad):
    ours_cls, torch_cls, flags = PAIRS[name]
    params = on(backend, make_params(SHAPES))
    theirs = clone_params(params)
    ours = ours_cls(params, lr=1e-2, skip_nonfinite=True, max_grad_norm=2.0, backend=backend, **flags)
    ref = torch_cls(theirs, lr=1e-2, foreach=False, **flags)
    for step in range(6):
        set_grads([params, theirs], step)
        if step in (2, 4):
            params[2].grad[7] = bad
            before = snapshot(ours, params)
            ours.step()
            assert_unchanged(before, ours, params)
            assert not bool(torch.isfinite(ours.last_grad_norm))
            continue
        ours.step()
        torch.nn.utils.clip_grad_norm_(theirs, 2.0)
        ref.step()
    assert int(ours.skipped_steps) == 2
    assert_state_equal(ours, params, ref, theirs, rtol=2e-5, atol=1e-6)


# ---- GradScaler ----------------------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.a = torch.nn.Linear(8, 16).to(dtype)
        self.b = torch.nn.Linear(16, 4).to(dtype)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _loop(model, opt, scaler, dtype, steps, inject_at, clip=None, unscale=False):
    """A mixed-precision loop; returns the params/state snapshot taken before each skipped step."""
    g = torch.Generator().manual_seed(0)
    skipped = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=g).to(dtype)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        if step in inject_at:
            model.a.weight.grad[0, 0] = float("inf")
            skipped.append(snapshot(opt, list(model.parameters())))
        if unscale:
            scaler.unscale_(opt)
        if clip is not None:
            clip(model.parameters())
        scaler.step(opt)
        scaler.update()
        if step in inject_at:
            assert_unchanged(skipped[-1], opt, list(model.parameters()))
    return skipped


def _pair(dtype, seed=0):
    torch.manual_seed(seed)
    a = TinyNet(dtype)
    b = copy.deepcopy(a)
    return a, b


def _assert_models_match(model_a, opt_a, model_b, opt_b, **tol):
    params_a, params_b = list(model_a.parameters()), list(model_b.parameters())
    assert_state_equal(opt_a, params_a, opt_b, params_b, **tol)


# fp32 params + bf16 autocast; fp16 params (GradScaler's classic use); bf16 params.
# eps=1e-3: with fp16 state, tiny clipped gradients make exp_avg_sq underflow to 0, and with
# eps=1e-8 the update m / (sqrt(v) + eps) explodes (in torch too): nothing left to compare.
EPS = 1e-3
LOOP_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOOP_IDS = ["fp32-autocast-bf16", "fp16", "bf16"]


@pytest.mark.parametrize("backend", opt_backends())
@pytest.mark.parametrize("dtype", LOOP_DTYPES, ids=LOOP_IDS)
def test_grad_scaler_loop_matches_torch_fused(dtype, backend):
    model_a, model_b = _pair(dtype)
    opt_a = fusedopt.optim.AdamW(model_a.parameters(), lr=1e-2, eps=EPS, backend=backend)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, eps=EPS, fused=True)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    _loop(model_a, opt_a, scaler_a, dtype, 8, inject_at=(3, 5))
    _loop(model_b, opt_b, scaler_b, dtype, 8, inject_at=(3, 5))
    assert scaler_a.get_scale() == scaler_b.get_scale()
    assert int(opt_a.skipped_steps) == 2
    _assert_models_match(model_a, opt_a, model_b, opt_b)
    assert float(opt_a.state[model_a.a.weight]["step"]) == 6.0


@pytest.mark.parametrize("backend", opt_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-autocast-bf16", "bf16"])
def test_grad_scaler_unscale_then_fusedopt_clip(dtype, backend):
    """unscale_ + clip_grad_norm_ + step: the step must not divide by the scale again."""
    model_a, model_b = _pair(dtype)
    opt_a = fusedopt.optim.AdamW(model_a.parameters(), lr=1e-2, eps=EPS, backend=backend)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, eps=EPS, fused=True)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    impl = "reference" if backend == "reference" else "auto"
    _loop(model_a, opt_a, scaler_a, dtype, 6, inject_at=(2,), unscale=True,
          clip=lambda ps: fusedopt.clip_grad_norm_(ps, 0.05, backend=impl))
    _loop(model_b, opt_b, scaler_b, dtype, 6, inject_at=(2,), unscale=True,
          clip=lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.05))
    low = dtype != torch.float32
    _assert_models_match(model_a, opt_a, model_b, opt_b,
                         **(dict(rtol=2e-2, atol=2e-3) if low else dict(rtol=1e-4, atol=1e-5)))


@pytest.mark.parametrize("backend", opt_backends())
@pytest.mark.parametrize("dtype", LOOP_DTYPES, ids=LOOP_IDS)
def test_grad_scaler_with_max_grad_norm(dtype, backend):
    """max_grad_norm with GradScaler clips the unscaled gradients: the same as clipping the
    scaled gradients to max_norm * scale before torch's step (unscale_ refuses fp16 grads)."""
    model_a, model_b = _pair(dtype)
    opt_a = fusedopt.optim.AdamW(model_a.parameters(), lr=1e-2, eps=EPS, max_grad_norm=0.05, backend=backend)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, eps=EPS, fused=True)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    _loop(model_a, opt_a, scaler_a, dtype, 6, inject_at=(2,))

    def clip_scaled(ps):  # the norm in fp32: an fp16 norm of scaled grads overflows
        ps = list(ps)
        norm = get_total_norm([p.grad.float() for p in ps])
        clip_grads_with_norm_(ps, 0.05 * scaler_b.get_scale(), norm)

    _loop(model_b, opt_b, scaler_b, dtype, 6, inject_at=(2,), clip=clip_scaled)
    low = dtype != torch.float32
    _assert_models_match(model_a, opt_a, model_b, opt_b,
                         **(dict(rtol=2e-2, atol=2e-3) if low else dict(rtol=1e-4, atol=1e-5)))
    assert float(opt_a.state[model_a.a.weight]["step"]) == 5.0
    assert scaler_a.get_scale() == scaler_b.get_scale()


@pytest.mark.parametrize("backend", opt_backends())
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_grad_scaler_step_of_an_optimizer_without_grads(backend, clip):
    """Two optimizers, one GradScaler, no grad for the second one's params this iteration (a
    frozen part): the scaler hands it found_inf as the int 0 (a sum of no flags), torch's
    optimizers take that as a no-op step, and so must fusedopt's."""
    used, unused = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    opt_used = fusedopt.optim.AdamW(used.parameters(), max_grad_norm=clip, backend=backend)
    opt_unused = fusedopt.optim.AdamW(unused.parameters(), max_grad_norm=clip, backend=backend)
    before = [q.detach().clone() for q in unused.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(used(torch.randn(4, 3)).square().sum()).backward()
    scaler.step(opt_used)
    scaler.step(opt_unused)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 8
    assert all(torch.equal(q, b) for q, b in zip(unused.parameters(), before))
    assert not opt_unused.state and len(opt_used.state) == 2


@pytest.mark.parametrize("impl", norm_impls()[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_total_norm_prescale(impl, dtype):
    """total_norm(..., prescale=s): the norm of s * x, each element multiplied (in float32,
    float64 for float64, not rounded back to 16 bits) before its term is taken: the native op
    and the reference alike."""
    tensors = grads_for(CASES["mixed"], dtype, seed=4)
    for norm_type in (2.0, 1.0, INF, -INF, 0.0, 3.5):
        if math.isinf(norm_type):
            tensors = [t for t in tensors if t.numel()]
        for s in (2.0 ** -10, 0.37):
            prescale = torch.tensor(s)
            ours = _norm.total_norm(tensors, norm_type, impl, prescale=prescale)
            exact = [t.double() * float(torch.tensor(s, dtype=torch.float32)) for t in tensors]
            want = get_total_norm(exact, norm_type) if norm_type else \
                torch.tensor(float(sum(bool(t.count_nonzero()) for t in exact)), dtype=torch.float64)
            assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            torch.testing.assert_close(ours.double(), want, rtol=max(rtol_of(dtype), 1e-5), atol=0)


@pytest.mark.parametrize("backend", opt_backends(cuda=True))
@pytest.mark.parametrize("scale", [2.0 ** 16, 2.0 ** 70, 2.0 ** -100, 2.0 ** 127],
                         ids=["2^16", "2^70", "2^-100", "2^127"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_max_grad_norm_under_any_grad_scale(backend, scale, dtype):
    """With GradScaler's grad_scale, the step clips the *unscaled* gradients whatever the scale:
    the norm takes each element times 1/s before squaring. Taking the norm of the scaled
    gradients and dividing afterwards gave inf at large scales (GradScaler keeps doubling while
    nothing overflows, e.g. under bf16 autocast: no clipping, and skip_nonfinite skipped every
    step from then on) and 0 at tiny ones. At GradScaler's float32 ceiling (2^127) the folded
    divisor s / c passes float32's range: the kernels divide by it in two exact steps instead of
    by inf (which zeroed every gradient: a step of decay alone)."""
    torch.manual_seed(0)
    ours = on(backend, [torch.randn(s, dtype=dtype) for s in [(40, 30), (30,), (7,)]])
    theirs = clone_params(ours)
    # |g| < 0.45: finite at 2^127 too; norm ~5, so c ~ 0.2 and s / c passes float32's range
    true_grads = [(torch.rand_like(p) - 0.5) * 0.9 for p in ours]
    opt = fusedopt.optim.AdamW(ours, lr=1e-2, max_grad_norm=1.0, skip_nonfinite=True, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, fused=True)
    for step in range(3):
        for p, q, g in zip(ours, theirs, true_grads):
            p.grad = (g.double() * scale).to(dtype)  # what backward under GradScaler leaves
            q.grad = (p.grad.float() * (1.0 / scale)).to(dtype)  # what unscale_ makes of it
        opt.grad_scale = torch.tensor(scale, dtype=torch.float32, device=dev(backend))
        opt.found_inf = torch.tensor(0.0, device=dev(backend))
        opt.step()
        want = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm, want.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
        assert int(opt.skipped_steps) == 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **tol)


@pytest.mark.parametrize("norm_type", [INF, -INF, -2.0, 2.0, 0.0, 0.5], ids=str)
def test_empty_tensors_give_the_same_norm_on_every_backend(norm_type):
    """torch refuses the inf / -inf / negative-p norms of an empty tensor; fusedopt's empty
    tensors contribute no element, on every backend alike (an empty max is 0, an empty min or
    a negative p over nothing +inf), alone or beside non-empty ones."""
    _needs_cpu_ops()
    for tensors in ([torch.empty(0, 3)], [torch.empty(0), torch.tensor([3.0, -4.0]), torch.empty(2, 0)]):
        got = {impl: fusedopt.get_total_norm(tensors, norm_type, backend=impl)
               for impl in ("cpu", "reference")}
        torch.testing.assert_close(got["cpu"], got["reference"], rtol=1e-6, atol=0)
        if len(tensors) > 1 and norm_type != 0.0:
            want = get_total_norm([tensors[1]], norm_type)
            torch.testing.assert_close(got["cpu"], want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", opt_backends())
@pytest.mark.parametrize("scale", [2.0 ** 16, 2.0 ** 127], ids=["2^16", "2^127"])
def test_sparse_sgd_clipped_under_any_grad_scale(backend, scale):
    """SGD steps params with sparse grads apart (torch's ops). With a clip folded into the grad
    scale, s / c passes float32's range at GradScaler's ceiling: the factor must not become
    1 / inf = 0 (or lose its bits as a subnormal float32)."""
    true = torch.tensor([[0.3, -0.2, 0.1, 0.25], [0.05, 0.4, -0.35, 0.15]])
    for max_norm in (1e-2, 1e-6):
        w = torch.nn.Parameter(torch.zeros(10, 4))
        opt = fusedopt.optim.SGD([w], lr=1.0, max_grad_norm=max_norm, backend=backend)
        w.grad = torch.sparse_coo_tensor([[1, 3]], (true.double() * scale).float(), (10, 4)).coalesce()
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        v = torch.nn.Parameter(torch.zeros(10, 4))
        v.grad = torch.sparse_coo_tensor([[1, 3]], true, (10, 4)).coalesce()
        clip_grad_norm_([v], max_norm)
        torch.optim.SGD([v], lr=1.0).step()
        torch.testing.assert_close(w, v, rtol=1e-6, atol=0)


def test_norm_dispatch_choices():
    t = [torch.zeros(3)]
    assert _norm.choose("reference", torch.device("cpu"), t, 2.0) == "reference"
    expected = "native" if _norm_ops.has_kernel("total_norm", "cpu") else "reference"
    assert _norm.choose("auto", torch.device("cpu"), t, 2.0) == expected
    assert _norm.choose("auto", torch.device("cpu"), [torch.zeros(2, dtype=torch.complex64)], 2.0) == "reference"


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_native_ops_refuse_sparse_tensors_clearly():
    """Sparse tensors reach the native ops (registered for the sparse dispatch keys too) and are
    refused with a message saying so, not with the dispatcher's 'Could not run ...'."""
    if not _norm_ops.has_kernel("total_norm", "cpu"):
        pytest.skip("fusedopt._C has no CPU total_norm kernel")
    sparse = torch.eye(3).to_sparse()
    for call in (lambda: torch.ops.fusedopt.total_norm([torch.ones(2), sparse], 2.0),
                 lambda: torch.ops.fusedopt.scale_([sparse], torch.tensor(0.5)),
                 lambda: torch.ops.fusedopt.clamp_([sparse], -1.0, 1.0),
                 lambda: torch.ops.fusedopt.total_norm([torch.eye(3).to_sparse_csr()], 2.0)):
        with pytest.raises(RuntimeError, match="sparse tensors are not supported"):
            call()


@pytest.fixture(params=["scalar", "avx2", "avx512", "avx512bf16"])
def cpu_isa(request):
    """Runs the test with the CPU kernels of one ISA (the clipping kernels are compiled per ISA,
    like the optimizer kernels); skips where this machine or build lacks it."""
    if not _norm_ops.has_kernel("total_norm", "cpu"):
        pytest.skip("fusedopt._C has no CPU total_norm kernel")
    from fusedopt import _ops
    try:
        previous = _ops._C._set_cpu_isa(request.param)
    except RuntimeError as exc:
        pytest.skip(f"{request.param} not available here: {exc}")
    yield request.param
    _ops._C._set_cpu_isa(previous)


def test_every_cpu_kernel_variant(cpu_isa):
    for dtype in DTYPES:
        tensors = grads_for([(5, 3), (40000,), (33,)], dtype)
        tensors[1][77] = float("nan") if dtype == torch.float32 else tensors[1][77]
        for norm_type in NORMS + [0.0, -INF]:
            ours = fusedopt.get_total_norm(tensors, norm_type, backend="cpu")
            exact = get_total_norm([t.double() for t in tensors], norm_type)
            torch.testing.assert_close(ours.double(), exact, rtol=rtol_of(dtype), atol=0,
                                       equal_nan=True)
        grads = [t.clone() for t in tensors]
        torch.ops.fusedopt.scale_(grads, torch.tensor(0.75))
        torch.ops.fusedopt.clamp_(grads, -0.5, 0.5)
        for g, t in zip(grads, tensors):
            torch.testing.assert_close(g, (t * torch.tensor(0.75)).clamp(-0.5, 0.5),
                                       rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cpu_kernels_convert_every_16_bit_value(cpu_isa, dtype):
    """Every 16-bit pattern (subnormals, infs, NaNs) through the clipping kernels: the block
    conversions (fp16's F16C on AVX2/AVX-512, bf16's vcvtneps2bf16 with its fixups on
    avx512bf16) and the portable ones (other variants, tails) alike.
    scale_ rounds x * c once to nearest even, as torch does; clamp_ keeps NaN; the norms see
    exact values. The misaligned view puts the block boundaries elsewhere and leaves a tail."""
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    for x in (every, every[3:]):
        for c in (0.75, 3.0, 1e-3):  # 3.0 overflows the largest fp16 values to inf
            got = x.clone()
            torch.ops.fusedopt.scale_([got], torch.tensor(c))
            want = (x.float() * c).to(dtype)
            assert torch.equal(got.view(torch.int16)[~want.isnan()], want.view(torch.int16)[~want.isnan()])
            assert torch.equal(got.isnan(), want.isnan())
        got = x.clone()
        torch.ops.fusedopt.clamp_([got], -0.5, 0.5)
        torch.testing.assert_close(got, x.clamp(-0.5, 0.5), rtol=0, atol=0, equal_nan=True)
        finite = x[x.float().abs() < 1e15].clone()  # bf16's largest squares overflow fp32
        for norm_type in (2.0, 1.0, INF):
            ours = torch.ops.fusedopt.total_norm([finite], norm_type)  # fp32, not rounded to dtype
            exact = torch.linalg.vector_norm(finite.double(), norm_type)
            torch.testing.assert_close(ours.double(), exact, rtol=2e-6, atol=0)
        assert math.isnan(torch.ops.fusedopt.total_norm([x], 2.0).item())


@pytest.mark.parametrize("n", [1, 127, 129, 1000, 16384 + 1000])
def test_cpu_kernels_see_every_element_of_every_stream(cpu_isa, n):
    """The CPU clipping kernels walk a chunk (16384 elements) as 8 sub-ranges side by side plus
    a tail (norm_kernels_impl.h): a maximum or a NaN at the start, middle or end of any of them
    is found, and scale_/clamp_ rewrite every element exactly once."""
    positions = sorted({min(n - 1, max(0, k)) for frac in range(17)
                        for k in (n * frac // 16 - 1, n * frac // 16)})
    for dtype in DTYPES:
        base = grads_for([(n,)], dtype)[0].clamp(-1, 1)
        for pos in positions:
            x = base.clone()
            x[pos] = -100.0
            assert fusedopt.get_total_norm([x], INF, backend="cpu").item() == 100.0, (dtype, pos)
            x[pos] = float("nan")
            for norm_type in (2.0, INF, 1.0):
                assert math.isnan(fusedopt.get_total_norm([x], norm_type, backend="cpu").item())
        x = base.clone()
        torch.ops.fusedopt.scale_([x], torch.tensor(0.5))
        torch.testing.assert_close(x, base * 0.5, rtol=0, atol=0)
        torch.ops.fusedopt.clamp_([x], -0.25, 0.25)
        torch.testing.assert_close(x, (base * 0.5).clamp(-0.25, 0.25), rtol=0, atol=0)


# ----------------------------------------------------------------------------- one-pass metadata


def test_summary_reads_devices_dtypes_and_layouts():
    tensors = [torch.zeros(2), torch.zeros(3, dtype=torch.float16), torch.zeros(1, dtype=torch.complex64)]
    s = _norm.Summary(tensors)
    assert s.devices == [torch.device("cpu")]
    assert s.dtypes == {torch.float32, torch.float16, torch.complex64}
    assert s.any_complex and not s.any_sparse
    assert s.result_dtype() == torch.float32 and s.accumulate_dtype() == torch.float32
    assert _norm.Summary([torch.zeros(2, dtype=torch.float64), torch.zeros(2)]).accumulate_dtype() == torch.float64
    assert _norm.Summary([torch.eye(2).to_sparse()]).any_sparse
    # several devices keep their order of first appearance
    s = _norm.Summary([torch.zeros(1, device="meta"), torch.zeros(1), torch.zeros(1, device="meta")])
    assert s.devices == [torch.device("meta"), torch.device("cpu")]
    assert list(_norm.by_device([torch.zeros(1, device="meta"), torch.zeros(1)], s)) == s.devices
    parts = _norm.Summary.from_parts([torch.device("cpu")] * 3, [torch.bfloat16, torch.float32])
    assert parts.devices == [torch.device("cpu")] and parts.result_dtype() == torch.float32
    assert not parts.any_complex and not parts.any_sparse


class _Subclass(torch.Tensor):
    pass


def _python_summary(tensors):
    """Summary's Python pass (the C++ pass disabled)."""
    from fusedopt import _ops
    saved = _ops._C
    try:
        _ops._C = None
        return _norm.Summary(tensors)
    finally:
        _ops._C = saved


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_summary_native_pass_equals_the_python_pass():
    from fusedopt import _ops
    if getattr(_ops._C, "_summarize", None) is None:
        pytest.skip("fusedopt._C has no _summarize")
    lists = [
        [],
        [torch.zeros(2), torch.zeros(3, dtype=torch.float16), torch.nn.Parameter(torch.zeros(1))],
        [torch.zeros(1, device="meta"), torch.zeros(1), torch.zeros(1, device="meta", dtype=torch.float64)],
        [torch.eye(2).to_sparse(), torch.zeros(2, dtype=torch.complex64)],
        [torch.eye(2).to_sparse_csr()],
    ]
    for tensors in lists:
        native = _ops._C._summarize(tensors)
        assert native is not None
        ours, theirs = _norm.Summary(tensors), _python_summary(tensors)
        for name in _norm.Summary.__slots__:
            assert getattr(ours, name) == getattr(theirs, name), (name, tensors)
        assert isinstance(ours.dtypes, set) and isinstance(ours.devices, list)
    # a subclass may answer .device / .dtype itself: the C++ pass declines, Python reads it
    sub = torch.zeros(2).as_subclass(_Subclass)
    assert _ops._C._summarize([torch.zeros(1), sub]) is None
    assert _norm.Summary([torch.zeros(1), sub]).dtypes == {torch.float32}
    assert _norm.Summary(t for t in [torch.zeros(1), sub]).devices == [torch.device("cpu")]


def test_direct_clipping_ops_match_the_dispatcher_and_decline_what_they_cannot_take():
    from fusedopt import _ops
    if getattr(_ops._C, "_total_norm_cpu", None) is None:
        pytest.skip("fusedopt._C has no direct clipping entry points")
    tensors = grads_for([(5, 3), (40000,), (0,), ()], torch.float32) + grads_for([(7,)], torch.float64)
    for norm_type in NORMS + [0.0]:
        direct = _ops._C._total_norm_cpu(tensors, norm_type)
        assert torch.equal(direct, torch.ops.fusedopt.total_norm(tensors, norm_type))
    a, b = [t.clone() for t in tensors], [t.clone() for t in tensors]
    versions = [t._version for t in a]
    assert _ops._C._scale_cpu(a, torch.tensor(0.75)) is True
    torch.ops.fusedopt.scale_(b, torch.tensor(0.75))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(t._version > v for t, v in zip(a, versions) if t.numel())
    # declined, nothing done: a subclass, another device, an active dispatch mode
    sub = [tensors[0].clone().as_subclass(_Subclass)]
    meta = [torch.zeros(3, device="meta")]
    for bad in (sub, meta, tensors[:1] + meta):
        assert _ops._C._total_norm_cpu(bad, 2.0) is None
        assert _ops._C._scale_cpu(bad, torch.tensor(0.5)) is False
    before = sub[0].clone()
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert _ops._C._total_norm_cpu(tensors, 2.0) is None
        assert _ops._C._scale_cpu(a, torch.tensor(0.5)) is False
    assert torch.equal(sub[0].as_subclass(torch.Tensor), before.as_subclass(torch.Tensor))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # errors of the op itself still name the problem
    with pytest.raises(RuntimeError, match="sparse tensors are not supported"):
        _ops._C._total_norm_cpu([torch.eye(2).to_sparse()], 2.0)
    # and the public functions give torch's numbers through it, or through the fallback
    for ts in (tensors, sub + tensors[1:]):
        torch.testing.assert_close(fusedopt.get_total_norm(ts).double(),
                                   get_total_norm([t.double() for t in ts]),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_step_with_clipping_refuses_a_sparse_grad_given_after_the_first_step(backend):
    if backends.available()[backend] is not None:
        pytest.skip(f"{backend} backend unavailable")
    params = make_params([(4, 3), (5,)])
    opt = fusedopt.optim.AdamW(params, lr=0.1, max_grad_norm=1.0, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    params[1].grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(float(opt.state[p]["step"]) == 1.0 for p in params)


# ---- property-based: any shapes, magnitudes, norm types and thresholds ------------------------

from hypothesis import HealthCheck, assume, given, settings, strategies as st  # noqa: E402

_property_settings = settings(max_examples=60, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
_shapes = st.lists(st.lists(st.integers(0, 40), max_size=3).map(tuple), min_size=1, max_size=10)
_cpu_impls = ["reference"] + (["cpu"] if _norm_ops.has_kernel("total_norm", "cpu") else [])


def _grads_at(shapes, dtype, seed, log_scale):
    """randn x 10^log_scale, a tensor a shape; drawn in float64, rounded once to ``dtype``."""
    return [t * 10.0 ** log_scale for t in grads_for(shapes, torch.float64, seed)]


@_property_settings
@given(shapes=_shapes, dtype=st.sampled_from(DTYPES), norm_type=st.sampled_from([2.0, INF, 1.0, 3.5, 0.5]),
       log_scale=st.floats(-5, 4), max_norm=st.floats(1e-3, 1e4), seed=st.integers(0, 2 ** 16),
       impl=st.sampled_from(_cpu_impls))
def test_clip_grad_norm_matches_torch_on_any_input(shapes, dtype, norm_type, log_scale, max_norm,
                                                   seed, impl):
    """clip_grad_norm_ against torch's on drawn inputs: the returned norm within a few roundings
    of the dtype, the clipped gradients within that of torch's, and not one bit changed when the
    norm is clearly under the threshold."""
    if math.isinf(norm_type):  # torch cannot take the inf-norm of an empty tensor
        assume(all(math.prod(s) > 0 for s in shapes))
    grads = [g.to(dtype) for g in _grads_at(shapes, dtype, seed, log_scale)]
    exact = float(get_total_norm([g.double() for g in grads], norm_type))
    finfo = torch.finfo(dtype)
    # (torch rounds each tensor's norm to the dtype: past its range, torch's clip zeroes the
    # gradients where ours clips them, a difference of design, test_clip_fp16_norm_beyond_...)
    assume(exact < finfo.max / 4)
    ours = [torch.zeros_like(g, requires_grad=True) for g in grads]
    theirs = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for o, t, g in zip(ours, theirs, grads):
        o.grad, t.grad = g.clone(), g.clone()
    got = fusedopt.clip_grad_norm_(ours, max_norm, norm_type, backend=impl)
    want = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type, foreach=False)
    assert got.dtype == want.dtype and got.shape == want.shape == ()
    tol = rtol_of(dtype) * 4 + (1e-5 if dtype == torch.float32 else 0)
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=finfo.tiny)
    for o, t in zip(ours, theirs):
        peak = float(t.grad.double().abs().max()) if t.grad.numel() else 0.0
        torch.testing.assert_close(o.grad.double(), t.grad.double(), rtol=tol,
                                   atol=tol * peak + finfo.tiny)
    if exact < max_norm * (1 - 1e-2):  # no clipping: a coefficient of one changes no bit
        for o, g in zip(ours, grads):
            assert torch.equal(o.grad, g)


@_property_settings
@given(shapes=_shapes, name=st.sampled_from(list(PAIRS)), log_scale=st.floats(-3, 3),
       max_norm=st.floats(1e-2, 1e3), seed=st.integers(0, 2 ** 16),
       backend=st.sampled_from(["reference"] + (["cpu"] if backends.available()["cpu"] is None
                                                and _norm_ops.has_kernel("total_norm", "cpu")
                                                else [])))
def test_max_grad_norm_equals_torch_clip_then_step_on_any_input(shapes, name, log_scale, max_norm,
                                                                seed, backend):
    """``max_grad_norm=`` folded into the step against torch's clip_grad_norm_ then step, fp32,
    three steps on drawn shapes and gradient magnitudes (clipping or not, by the draw)."""
    ours_cls, torch_cls, flags = PAIRS[name]
    params = make_params(shapes, torch.float32, seed=seed)
    theirs = clone_params(params)
    ours = ours_cls(params, lr=1e-2, max_grad_norm=max_norm, backend=backend, **flags)
    ref = torch_cls(theirs, lr=1e-2, foreach=False, **flags)
    for step in range(3):
        for p, t, g in zip(params, theirs, _grads_at(shapes, torch.float32, seed + step, log_scale)):
            p.grad, t.grad = g.float(), g.float()
        ours.step()
        norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, foreach=False)
        ref.step()
        torch.testing.assert_close(ours.last_grad_norm.to(norm.dtype), norm, rtol=1e-5,
                                   atol=1e-30)
    # The two coefficients (ours from the norm accumulated in fp32, applied as a division by
    # its inverse; torch's from its own sum, multiplied) agree to ~1e-6 relative, so the
    # updates do: atol in units of each tensor's magnitude (an element that cancels to near
    # zero keeps the absolute error of the update, not a relative one).
    for pa, pb in zip(params, theirs):
        pairs = [(pa, pb)] + [(ours.state[pa][k], ref.state[pb][k]) for k in ref.state[pb]
                              if k != "step"]
        assert set(ours.state[pa]) == set(ref.state[pb])
        if "step" in ref.state[pb]:  # (SGD keeps none)
            assert float(ours.state[pa]["step"]) == float(ref.state[pb]["step"]) == 3
        for a, b in pairs:
            peak = float(b.detach().abs().max()) if b.numel() else 0.0
            torch.testing.assert_close(a.detach(), b.detach(), rtol=2e-5, atol=2e-6 * peak + 1e-7)
