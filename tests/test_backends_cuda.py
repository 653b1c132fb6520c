"""The ``cuda`` backend (csrc/cuda, fusedopt/backends/cuda.py).

Without a GPU: whenever ``fusedopt._C.build_info()`` says CUDA was built, the CUDA kernels must be
registered for every op (the clipping ops total_norm / scale_ / clamp_ included), otherwise the
backend must say why it is unavailable; and the kernels themselves (adam_kernel.cuh,
sgd_kernel.cuh, norm_kernel.cuh) run on the CPU through a small emulator (csrc/cuda/emu, built
with g++ when the CUDA headers are found) against the reference backend, torch and the CPU
clipping ops, with several block orders, so their logic is tested without a GPU. With a GPU:
parity with the reference backend and torch.optim on every flag and dtype, odd sizes and
chunk-straddling sizes, 1000 tiny tensors, a >2^31-element tensor (slow), found_inf /
grad_scale / lr tensor, per-tensor steps, non-contiguous and empty tensors, mixed dtypes,
exactly one kernel launch per dtype per step, and reuse of the device work tables; the clipping
ops against the CPU ops (every norm order and dtype, NaN/inf, layouts), their launch counts,
determinism and absence of host syncs.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fusedopt
from fusedopt import _norm_ops, _ops, backends
from fusedopt.backends import cuda as cuda_backend
from fusedopt.clip import _clip, _norm

from conftest import needs_traceable_step, no_host_sync
from test_optim import DEVICE_STEP_CASES, check_compiled_step, check_graphed_step

CUDA = cuda_backend.BACKEND
REASON = CUDA.unavailable_reason()
_skip_without_gpu = pytest.mark.skipif(REASON is not None, reason=f"cuda backend unavailable: {REASON}")


def needs_gpu(test):
    """Marks a test that runs the CUDA kernels: ``gpu`` marker, skipped when the backend is unavailable."""
    return pytest.mark.gpu(_skip_without_gpu(test))

CHUNK = 16384  # kChunkElems in csrc/cuda/launch.h
ODD_SIZES = [(1,), (3,), (17,), (4099,), (CHUNK,), (CHUNK + 1,), (3 * CHUNK + 5,), (7, 13), (0,), ()]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]
# Tolerances vs the reference backend (which computes with torch ops on the same device): the
# two differ only by FMA contraction and operation order, i.e. an ulp of the math type per
# operation, plus one storage ulp after rounding for half types.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-13),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

ADAM_FLAGS = [dict(amsgrad=a, maximize=m, weight_decay=w, decoupled_weight_decay=d)
              for a, m, w, d in itertools.product([False, True], [False, True], [0.0, 0.1],
                                                  [False, True])
              if not (d and w == 0.0)]
SGD_FLAGS = [dict(momentum=mo, dampening=da, nesterov=n, weight_decay=w, maximize=mx)
             for mo, da, n, w, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True],
                                                       [0.0, 0.1], [False, True])
             if not (n and (mo == 0 or da != 0))]


# ---- without a GPU ---------------------------------------------------------------------------

@pytest.mark.skipif(not _ops.available(), reason=f"fusedopt._C not built: {_ops.LOAD_ERROR}")
def test_cuda_kernels_registered_whenever_built():
    info = _ops.build_info()
    if info.get("with_cuda"):
        assert cuda_backend.kernels_registered(), "build_info says CUDA but no CUDA kernels"
        missing = [op for op in _norm_ops.OP_NAMES if not _norm_ops.has_kernel(op, "cuda")]
        assert not missing, f"no CUDA kernels for the clipping ops {missing}"
        for name in ("_cuda_table_stats", "_cuda_clear_table_cache"):
            assert hasattr(torch.ops.fusedopt, name)
        assert info.get("cuda_arch_list"), info
    else:
        assert not cuda_backend.kernels_registered()
        assert "built without CUDA" in (REASON or "")


def test_unavailable_reason_says_why():
    if REASON is None:
        assert torch.cuda.is_available() and cuda_backend.kernels_registered()
        return
    assert any(why in REASON for why in ("built without CUDA", "no CUDA device", "not built",
                                         "not registered")), REASON
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        backends.select("cuda", torch.device("cuda"), torch.float32)


def test_supports_cuda_float_tensors_only():
    assert CUDA.supports(torch.device("cuda"), torch.float32) is None
    assert CUDA.supports(torch.device("cuda:0"), torch.bfloat16) is None
    assert CUDA.supports(torch.device("cuda"), torch.float64) is None
    assert "CUDA tensors" in CUDA.supports(torch.device("cpu"), torch.float32)
    assert "not supported" in CUDA.supports(torch.device("cuda"), torch.int32)


# ---- helpers ---------------------------------------------------------------------------------

def randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).cuda()


def adam_lists(shapes, dtype, amsgrad, seed=0):
    """params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps with nonzero state."""
    params = [randn(s, dtype, seed + i) for i, s in enumerate(shapes)]
    grads = [randn(s, dtype, 1000 + seed + i) for i, s in enumerate(shapes)]
    exp_avgs = [0.1 * randn(s, dtype, 2000 + seed + i) for i, s in enumerate(shapes)]
    exp_avg_sqs = [0.01 * randn(s, dtype, 3000 + seed + i).abs() for i, s in enumerate(shapes)]
    maxes = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(i % 4), device="cuda") for i in range(len(shapes))]
    return [params, grads, exp_avgs, exp_avg_sqs, maxes, steps]


def sgd_lists(shapes, dtype, momentum, seed=0):
    params = [randn(s, dtype, seed + i) for i, s in enumerate(shapes)]
    grads = [randn(s, dtype, 1000 + seed + i) for i, s in enumerate(shapes)]
    bufs = [randn(s, dtype, 2000 + seed + i) for i, s in enumerate(shapes)] if momentum else []
    return [params, grads, bufs]


def clone_lists(lists):
    return [[t.clone() for t in lst] for lst in lists]


def assert_lists_close(ours, theirs, dtype, skip=()):
    """Every tensor of every list but those in `skip` (grads too: both must leave them as they were)."""
    for index, (a_list, b_list) in enumerate(zip(ours, theirs)):
        if index in skip:
            continue
        for a, b in zip(a_list, b_list):
            torch.testing.assert_close(a, b, **TOL.get(a.dtype, TOL[dtype]))


def bits(t):
    """Raw bits of a tensor, so that equality also covers NaN payloads and -0.0."""
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return t.detach().contiguous().view(view).cpu().clone()  # a copy, also for CPU tensors


def adam_call(backend, lists, steps_count=3, **kw):
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
                 maximize=False, decoupled_weight_decay=False)
    hyper.update(kw)
    for _ in range(steps_count):
        backend.adam_(*lists, **hyper)


def sgd_call(backend, lists, steps_count=3, **kw):
    hyper = dict(lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, is_first_step=False)
    hyper.update(kw)
    for _ in range(steps_count):
        backend.sgd_(*lists, **hyper)


REFERENCE = backends.get("reference")


# ---- parity with the reference backend: every flag x dtype, odd sizes ------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=str)
def test_adam_matches_reference(flags, dtype):
    ours = adam_lists(ODD_SIZES, dtype, flags["amsgrad"])
    theirs = clone_lists(ours)
    adam_call(CUDA, ours, **flags)
    adam_call(REFERENCE, theirs, **flags)
    assert_lists_close(ours, theirs, dtype)
    for a, b in zip(ours[5], theirs[5]):
        assert a.item() == b.item()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("flags", SGD_FLAGS, ids=str)
@pytest.mark.parametrize("first", [False, True], ids=["run", "first"])
def test_sgd_matches_reference(first, flags, dtype):
    ours = sgd_lists(ODD_SIZES, dtype, flags["momentum"])
    theirs = clone_lists(ours)
    sgd_call(CUDA, ours, steps_count=1, is_first_step=first, **flags)
    sgd_call(REFERENCE, theirs, steps_count=1, is_first_step=first, **flags)
    sgd_call(CUDA, ours, steps_count=2, **flags)
    sgd_call(REFERENCE, theirs, steps_count=2, **flags)
    assert_lists_close(ours, theirs, dtype)


# ---- parity with torch.optim through the optimizers ------------------------------------------

def _train(opt_cls, params, steps, **kw):
    opt = opt_cls(params, **kw)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype).cuda()
        opt.step()
    return opt


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,flags", [("Adam", f) for f in
                                        [dict(amsgrad=a, maximize=m, weight_decay=w)
                                         for a, m, w in itertools.product([False, True],
                                                                          [False, True], [0.0, 0.1])]]
                         + [("AdamW", dict(amsgrad=True)), ("AdamW", dict(maximize=True))]
                         + [("SGD", f) for f in SGD_FLAGS], ids=str)
def test_optimizer_matches_torch_optim(name, flags, dtype):
    ours_cls, torch_cls = getattr(fusedopt.optim, name), getattr(torch.optim, name)
    shapes = [(5, 3), (17,), (CHUNK + 3,), (0,), ()]
    ours = [randn(s, dtype, i).requires_grad_() for i, s in enumerate(shapes)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opt_a = _train(ours_cls, ours, 10, lr=1e-2, backend="cuda", **flags)
    opt_b = _train(torch_cls, theirs, 10, lr=1e-2, foreach=False, **flags)
    tol = TOL[dtype]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), **tol)
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert set(sa) == set(sb)
        for key in sb:
            if key == "step":
                assert float(sa[key]) == float(sb[key])
            else:
                torch.testing.assert_close(sa[key], sb[key], **tol)


@needs_gpu
def test_auto_prefers_cuda_for_cuda_tensors():
    assert backends.select("auto", torch.device("cuda"), torch.float32) is CUDA
    assert backends.select("auto", torch.device("cuda"), torch.bfloat16) is CUDA


# ---- many tensors, big tensors, odd layouts --------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_thousand_tiny_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(int(n),) for n in torch.randint(0, 300, (1000,), generator=g)]
    ours = adam_lists(shapes, dtype, amsgrad=True)
    theirs = clone_lists(ours)
    adam_call(CUDA, ours, amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True)
    adam_call(REFERENCE, theirs, amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True)
    assert_lists_close(ours, theirs, dtype)
    ours = sgd_lists(shapes, dtype, 0.9)
    theirs = clone_lists(ours)
    sgd_call(CUDA, ours, momentum=0.9, nesterov=True)
    sgd_call(REFERENCE, theirs, momentum=0.9, nesterov=True)
    assert_lists_close(ours, theirs, dtype)


@needs_gpu
def test_per_tensor_steps_and_multi_chunk_step_increment():
    shapes = [(7 * CHUNK + 3,), (5,), (2 * CHUNK,), (0,)]
    ours = adam_lists(shapes, torch.float32, amsgrad=False)
    for i, s in enumerate(ours[5]):
        s.fill_(float(10 * i))  # different step per tensor: different bias corrections
    theirs = clone_lists(ours)
    adam_call(CUDA, ours, steps_count=4)
    adam_call(REFERENCE, theirs, steps_count=4)
    assert [s.item() for s in ours[5]] == [4.0, 14.0, 24.0, 34.0]
    assert_lists_close(ours, theirs, torch.float32)


@needs_gpu
def test_mixed_dtypes_in_one_call():
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float64]
    params = [randn((100 + i,), d, i) for i, d in enumerate(dtypes)]
    grads = [randn((100 + i,), d, 50 + i) for i, d in enumerate(dtypes)]
    ours = [params, grads, [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], [], [torch.zeros((), device="cuda") for _ in params]]
    theirs = clone_lists(ours)
    torch.ops.fusedopt.adam_(*ours, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                             amsgrad=False, maximize=False, decoupled_weight_decay=False)
    for i in range(len(dtypes)):  # the reference takes one dtype per call
        REFERENCE.adam_(*[[lst[i]] if lst else [] for lst in theirs], lr=1e-2, beta1=0.9,
                        beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                        decoupled_weight_decay=False)
    for a, b in zip(ours[0], theirs[0]):
        torch.testing.assert_close(a, b, **TOL[a.dtype])


@needs_gpu
def test_non_contiguous_and_mismatched_layouts():
    base = randn((64, 40), torch.float32, 0)
    strided = base[:, ::2]                                  # not dense: working copy + copy back
    channels_last = randn((2, 3, 5, 7), torch.float32, 1).to(memory_format=torch.channels_last)
    transposed = randn((33, 65), torch.float32, 2).t()      # dense, permuted: walked in place
    params = [strided, channels_last, transposed]
    grads = [randn(p.shape, torch.float32, 10 + i) for i, p in enumerate(params)]  # contiguous
    bufs = [torch.zeros_like(p) for p in params]
    untouched = base[:, 1::2].clone()
    ours = [params, grads, bufs]
    theirs = [[t.clone() for t in params], [g.clone() for g in grads], [b.clone() for b in bufs]]
    sgd_call(CUDA, ours, momentum=0.9, weight_decay=0.1, is_first_step=True, steps_count=1)
    sgd_call(REFERENCE, theirs, momentum=0.9, weight_decay=0.1, is_first_step=True, steps_count=1)
    sgd_call(CUDA, ours, momentum=0.9, weight_decay=0.1)
    sgd_call(REFERENCE, theirs, momentum=0.9, weight_decay=0.1)
    assert_lists_close(ours, theirs, torch.float32)
    assert torch.equal(base[:, 1::2], untouched)


@needs_gpu
def test_empty_and_zero_dim_tensors():
    ours = adam_lists([(0,), (), (0, 5)], torch.float32, amsgrad=True)
    theirs = clone_lists(ours)
    adam_call(CUDA, ours, amsgrad=True)
    adam_call(REFERENCE, theirs, amsgrad=True)
    assert_lists_close(ours, theirs, torch.float32)
    assert [s.item() for s in ours[5]] == [s.item() for s in theirs[5]]


@needs_gpu
@pytest.mark.slow
def test_tensor_over_2_31_elements():
    n = 2**31 + 1001  # odd: vector body and scalar tail both beyond 2^31
    need = 4 * 2 * n + (1 << 30)  # bf16 param, grad, exp_avg, exp_avg_sq + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free on the GPU, {free / 2**30:.1f} available")
    dtype = torch.bfloat16
    p = torch.randn(n, device="cuda", dtype=dtype)
    g = torch.randn(n, device="cuda", dtype=dtype)
    m = torch.zeros(n, device="cuda", dtype=dtype)
    v = torch.zeros(n, device="cuda", dtype=dtype)
    step = torch.zeros((), device="cuda")
    probes = [0, CHUNK - 1, 2**31 - 3, 2**31, 2**31 + 1, n - 2, n - 1]
    windows = [slice(max(0, i - 8), min(n, i + 8)) for i in probes]
    expect = [[t[w].clone() for t in (p, g, m, v)] + [step.clone()] for w in windows]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False,
              maximize=False, decoupled_weight_decay=True)
    CUDA.adam_([p], [g], [m], [v], [], [step], **kw)
    for w, (ep, eg, em, ev, es) in zip(windows, expect):
        REFERENCE.adam_([ep], [eg], [em], [ev], [], [es], **kw)
        torch.testing.assert_close(p[w], ep, **TOL[dtype])
        torch.testing.assert_close(m[w], em, **TOL[dtype])
        torch.testing.assert_close(v[w], ev, **TOL[dtype])
    assert step.item() == 1.0
    del p, g, m, v
    torch.cuda.empty_cache()


# ---- GradScaler inputs and lr tensors --------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("algo", ["adam", "sgd"])
def test_found_inf_changes_nothing_bit_for_bit(algo):
    if algo == "adam":
        lists = adam_lists(ODD_SIZES, torch.bfloat16, amsgrad=True)
        lists[0][0][0] = float("nan")
        call = lambda **kw: adam_call(CUDA, lists, steps_count=1, amsgrad=True, **kw)  # noqa: E731
    else:
        lists = sgd_lists(ODD_SIZES, torch.float32, momentum=0.9)
        call = lambda **kw: sgd_call(CUDA, lists, steps_count=1, momentum=0.9, **kw)  # noqa: E731
    before = [[bits(t) for t in lst] for lst in lists]
    for flag in (torch.ones((), device="cuda"), torch.tensor([float("inf")], device="cuda"),
                 torch.ones((), dtype=torch.float64, device="cuda"), torch.ones(())):
        call(found_inf=flag, grad_scale=torch.full((), 4.0, device="cuda"))
        torch.cuda.synchronize()
        after = [[bits(t) for t in lst] for lst in lists]
        assert all(torch.equal(a, b) for la, lb in zip(before, after) for a, b in zip(la, lb))
    call(found_inf=torch.zeros((), device="cuda"))  # a clear flag steps normally
    assert not torch.equal(bits(lists[0][3]), before[0][3])


@needs_gpu
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_step_bumps_version_counters_like_torch(name):
    """The CUDA ops bump the version counters of every tensor they write (params and state), so a
    param saved for a backward that runs after the step raises autograd's in-place error."""
    w = torch.nn.Parameter(torch.randn(5, device="cuda"))
    x = torch.randn(5, device="cuda", requires_grad=True)
    y = (w * x).sum()
    w.grad = torch.ones_like(w)
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    opt = getattr(fusedopt.optim, name)([w], backend="cuda", **kwargs)
    opt.step()
    state = opt.state[w]
    versions = {k: v._version for k, v in state.items() if torch.is_tensor(v)}
    opt.step()
    assert all(state[k]._version > v for k, v in versions.items()), versions
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_grad_scale_divides_on_the_fly(dtype):
    scale = 1024.0
    ours = adam_lists(ODD_SIZES, dtype, amsgrad=False)
    theirs = clone_lists(ours)
    scaled = [(g.float() * scale).to(dtype) for g in ours[1]]
    ours[1] = scaled
    scaled_bits = [bits(g) for g in scaled]
    adam_call(CUDA, ours, grad_scale=torch.full((), scale, device="cuda"))
    adam_call(REFERENCE, theirs)
    assert_lists_close(ours, theirs, dtype, skip=(1,))  # grads: scaled on one side
    assert all(torch.equal(bits(g), b) for g, b in zip(ours[1], scaled_bits))  # grads untouched
    sg = sgd_lists(ODD_SIZES, dtype, 0.9)
    sg_ref = clone_lists(sg)
    sg[1] = [(g.float() * scale).to(dtype) for g in sg[1]]
    sgd_call(CUDA, sg, momentum=0.9, grad_scale=torch.full((), scale, device="cuda"))
    sgd_call(REFERENCE, sg_ref, momentum=0.9)
    assert_lists_close(sg, sg_ref, dtype, skip=(1,))


@needs_gpu
@pytest.mark.parametrize("where", ["cuda", "cpu"])
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_lr_tensor_equals_float_lr(where, lr_dtype):
    lr = 2.0**-7  # exact in every dtype: float and tensor paths must agree bit for bit
    lr_t = torch.tensor(lr, dtype=lr_dtype, device=where)
    a = adam_lists(ODD_SIZES, torch.float32, amsgrad=False)
    b = clone_lists(a)
    adam_call(CUDA, a, lr=lr_t, weight_decay=0.1, decoupled_weight_decay=True)
    adam_call(CUDA, b, lr=lr, weight_decay=0.1, decoupled_weight_decay=True)
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a[0], b[0]))
    a = sgd_lists(ODD_SIZES, torch.float32, 0.9)
    b = clone_lists(a)
    sgd_call(CUDA, a, lr=lr_t, momentum=0.9)
    sgd_call(CUDA, b, lr=lr, momentum=0.9)
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(a[0], b[0]))


@needs_gpu
def test_lr_tensor_changed_on_device_is_picked_up():
    lr_t = torch.tensor(1e-2, device="cuda")
    a = sgd_lists([(1000,)], torch.float32, 0.0)
    b = clone_lists(a)
    sgd_call(CUDA, a, lr=lr_t, steps_count=1)
    lr_t.mul_(0.5)  # e.g. a scheduler updating the tensor in place
    sgd_call(CUDA, a, lr=lr_t, steps_count=1)
    sgd_call(REFERENCE, b, lr=1e-2, steps_count=1)
    sgd_call(REFERENCE, b, lr=5e-3, steps_count=1)
    assert_lists_close(a, b, torch.float32)


# ---- launches and the table cache ------------------------------------------------------------

def _kernels_in(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if not n.lower().startswith(("memcpy", "memset"))]


@needs_gpu
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_one_kernel_per_dtype_per_step(name):
    params = ([torch.randn(4096, device="cuda", requires_grad=True) for _ in range(1000)]
              + [torch.randn(3000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                 for _ in range(200)] + [torch.randn(5 * CHUNK + 1, device="cuda", requires_grad=True)])
    opt = getattr(fusedopt.optim, name)([{"params": params}], lr=1e-3, backend="cuda",
                                        **({"momentum": 0.9} if name == "SGD" else {}))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # first step creates the state (SGD: a separate first-step call)
    opt.step()
    kernels = _kernels_in(opt.step)
    assert len(kernels) == 2, kernels  # fp32 and bf16: one launch each, whatever the count
    assert all(("adam_kernel" if name == "Adam" else "sgd_kernel") in k for k in kernels), kernels


@needs_gpu
def test_table_cache_reused_and_refreshed():
    cuda_backend.clear_table_cache()
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (10, CHUNK + 7, 300)]
    opt = fusedopt.optim.AdamW(params, lr=1e-3, backend="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    start = cuda_backend.table_stats()
    opt.step()
    s1 = cuda_backend.table_stats()
    assert s1["full_uploads"] == start["full_uploads"] + 1
    opt.step()  # same tensors: nothing uploaded
    s2 = cuda_backend.table_stats()
    assert (s2["full_uploads"], s2["grad_uploads"], s2["hits"]) == (
        s1["full_uploads"], s1["grad_uploads"], s1["hits"] + 1)
    old_grads = [p.grad for p in params]  # kept alive: the new grads get new addresses
    for p in params:  # as after zero_grad(set_to_none=True) + backward
        p.grad = torch.randn_like(p)
    opt.step()
    s3 = cuda_backend.table_stats()
    assert (s3["full_uploads"], s3["grad_uploads"], s3["hits"]) == (
        s2["full_uploads"], s2["grad_uploads"] + 1, s2["hits"])
    del old_grads
    extra = torch.randn(50, device="cuda", requires_grad=True)
    extra.grad = torch.randn_like(extra)
    opt.add_param_group({"params": [extra]})
    opt.step()  # a new group: one new table, the first group's table reused
    s4 = cuda_backend.table_stats()
    assert (s4["full_uploads"], s4["hits"]) == (s3["full_uploads"] + 1, s3["hits"] + 1)


@needs_gpu
def test_step_does_not_synchronize():
    params = [torch.randn(1 << 16, device="cuda", requires_grad=True) for _ in range(4)]
    opt = fusedopt.optim.Adam(params, lr=torch.tensor(1e-3, device="cuda"), backend="cuda")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    old_grads = [p.grad for p in params]
    for p in params:  # new gradient addresses: the step uploads them (pinned, async)
        p.grad = torch.randn_like(p)
    with no_host_sync():
        opt.step()
        opt.step()
    torch.cuda.synchronize()
    del old_grads


# ---- bad input -------------------------------------------------------------------------------

@needs_gpu
def test_bad_input_raises_clear_errors():
    p = [torch.zeros(4, device="cuda")]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
              maximize=False, decoupled_weight_decay=False)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fusedopt.adam_(p, [torch.zeros(4, device="cuda", dtype=torch.float16)],
                                 [torch.zeros(4, device="cuda")], [torch.zeros(4, device="cuda")],
                                 [], [torch.zeros((), device="cuda")], **kw)
    with pytest.raises(RuntimeError, match="state_steps"):
        torch.ops.fusedopt.adam_(p, [torch.zeros(4, device="cuda")], [torch.zeros(4, device="cuda")],
                                 [torch.zeros(4, device="cuda")], [], [torch.zeros(())], **kw)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.fusedopt.sgd_(p, [torch.zeros(5, device="cuda")], [], lr=1e-3, momentum=0.0,
                                dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                                is_first_step=False)
    with pytest.raises(RuntimeError, match="int"):
        torch.ops.fusedopt.sgd_([torch.zeros(4, device="cuda", dtype=torch.int32)],
                                [torch.zeros(4, device="cuda", dtype=torch.int32)], [], lr=1e-3,
                                momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                maximize=False, is_first_step=False)


# ---- the clipping ops on the GPU (total_norm, scale_, clamp_; norm.cu) ------------------------

CLIP_NORMS = [2.0, 1.0, float("inf"), float("-inf"), 0.0, 3.5]


def _clip_norm_rtol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_clip_ops_match_cpu_op(dtype):
    tensors = [randn(s, dtype, i) for i, s in enumerate(ODD_SIZES)] + [torch.zeros(40, device="cuda", dtype=dtype)]
    tensors[5][3] = float("nan")
    clean = tensors[:5] + tensors[6:]
    for norm_type in CLIP_NORMS:
        for case in (tensors, clean):
            ours = torch.ops.fusedopt.total_norm(case, norm_type)
            cpu = torch.ops.fusedopt.total_norm([t.cpu() for t in case], norm_type)
            assert ours.device == case[0].device and ours.dtype == cpu.dtype and ours.shape == ()
            torch.testing.assert_close(ours.cpu(), cpu, rtol=_clip_norm_rtol(dtype), atol=0, equal_nan=True)
    for scale in (torch.tensor(0.37, device="cuda"), torch.tensor(0.37, dtype=torch.float64, device="cuda"),
                  torch.tensor(0.37), torch.tensor(0.37, device="cuda", dtype=torch.bfloat16)):
        ours = [t.clone() for t in tensors]
        theirs = [t.cpu() for t in tensors]
        torch.ops.fusedopt.scale_(ours, scale)
        torch.ops.fusedopt.scale_(theirs, scale.cpu())
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)
    ours = [t.clone() for t in tensors]
    theirs = [t.cpu() for t in tensors]
    torch.ops.fusedopt.clamp_(ours, -0.5, 0.25)
    torch.ops.fusedopt.clamp_(theirs, -0.5, 0.25)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0, equal_nan=True)


@needs_gpu
def test_clip_ops_mixed_dtypes_and_non_contiguous():
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    base = randn((64, 40), torch.float32, 0)
    tensors = [randn((3 * CHUNK + 7 + i,), d, i) for i, d in enumerate(dtypes)]
    tensors += [base[:, ::2],                                             # not dense: a copy
                randn((33, 65), torch.bfloat16, 9).t(),                   # dense, permuted: in place
                randn((2, 3, 5, 7), torch.float32, 10).to(memory_format=torch.channels_last),
                randn((CHUNK + 5,), torch.float32, 11)[1:]]               # unaligned: scalar path
    for norm_type in CLIP_NORMS:
        ours = torch.ops.fusedopt.total_norm(tensors, norm_type)
        cpu = torch.ops.fusedopt.total_norm([t.cpu() for t in tensors], norm_type)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours.cpu(), cpu, rtol=1e-6, atol=0)
    gaps = base[:, 1::2].clone()
    theirs = [t.cpu() for t in tensors]
    torch.ops.fusedopt.scale_(tensors, torch.tensor(0.5, device="cuda"))
    torch.ops.fusedopt.clamp_(tensors, -0.3, 0.2)
    torch.ops.fusedopt.scale_(theirs, torch.tensor(0.5))
    torch.ops.fusedopt.clamp_(theirs, -0.3, 0.2)
    for a, b in zip(tensors, theirs):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
    assert torch.equal(base[:, 1::2], gaps)  # the copy of the strided view went back into it only


@needs_gpu
def test_clip_ops_thousand_tiny_tensors():
    g = torch.Generator().manual_seed(0)
    sizes = [int(n) for n in torch.randint(0, 300, (1000,), generator=g)]
    tensors = [randn((n,), torch.bfloat16 if i % 3 == 0 else torch.float32, i) for i, n in enumerate(sizes)]
    for norm_type in (2.0, float("inf"), 0.0):
        ours = torch.ops.fusedopt.total_norm(tensors, norm_type)
        cpu = torch.ops.fusedopt.total_norm([t.cpu() for t in tensors], norm_type)
        torch.testing.assert_close(ours.cpu(), cpu, rtol=1e-5, atol=0)
    theirs = [t.cpu() for t in tensors]
    torch.ops.fusedopt.scale_(tensors, torch.tensor(0.75, device="cuda"))
    torch.ops.fusedopt.clamp_(tensors, -1.0, 1.0)
    torch.ops.fusedopt.scale_(theirs, torch.tensor(0.75))
    torch.ops.fusedopt.clamp_(theirs, -1.0, 1.0)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(tensors, theirs))


@needs_gpu
def test_total_norm_prescale_on_the_device():
    """A CUDA prescale is read by the kernel (no host sync), a CPU one on the host; both give the
    CPU op's norm of the prescaled elements, in range where the scaled norm is not."""
    tensors = [randn(s, dtype, i) for i, (s, dtype) in
               enumerate(zip(ODD_SIZES, [torch.float32, torch.bfloat16] * len(ODD_SIZES)))]
    huge = [(t.double() * 2.0 ** 100).to(t.dtype) for t in tensors]
    for norm_type in CLIP_NORMS:
        want = torch.ops.fusedopt.total_norm([t.cpu() for t in huge], norm_type, torch.tensor(2.0 ** -100))
        for prescale in (torch.tensor(2.0 ** -100, device="cuda"), torch.tensor(2.0 ** -100),
                         torch.tensor(2.0 ** -100, device="cuda", dtype=torch.float64)):
            ours = torch.ops.fusedopt.total_norm(huge, norm_type, prescale)
            torch.testing.assert_close(ours.cpu(), want, rtol=1e-5, atol=0, equal_nan=True)


@needs_gpu
def test_clip_ops_tensors_sharing_memory_like_torch():
    """A tensor listed twice or overlapping views: rewritten one after the other (stream order),
    as torch's ops do, not by two blocks at once."""
    buf = torch.linspace(1.0, 2.0, 3 * CHUNK + 300, device="cuda")
    for make in (lambda b: [b, b], lambda b: [b[: 3 * CHUNK], b[300:]],
                 lambda b: [b[::2], b[1::2], b[: CHUNK]]):
        ours, theirs = buf.clone(), buf.clone()
        torch.ops.fusedopt.scale_(make(ours), torch.tensor(0.5, device="cuda"))
        for t in make(theirs):
            t.mul_(0.5)
        assert torch.equal(ours, theirs)


@needs_gpu
def test_clip_ops_empty_and_zero_dim_tensors():
    for norm_type in CLIP_NORMS:
        expected = torch.ops.fusedopt.total_norm([torch.empty(0)], norm_type)
        for case in ([torch.empty(0, device="cuda")], [torch.empty(0, 5, device="cuda", dtype=torch.bfloat16)] * 2):
            ours = torch.ops.fusedopt.total_norm(case, norm_type)
            assert ours.is_cuda and ours.item() == expected.item()
        zero_dim = [torch.tensor(-3.0, device="cuda"), torch.empty(0, device="cuda", dtype=torch.float64)]
        ours = torch.ops.fusedopt.total_norm(zero_dim, norm_type)
        assert ours.dtype == torch.float64
        assert ours.item() == pytest.approx(1.0 if norm_type == 0.0 else 3.0, rel=1e-6)
    t = [torch.tensor(2.0, device="cuda"), torch.empty(0, device="cuda")]
    torch.ops.fusedopt.scale_(t, torch.tensor(0.5, device="cuda"))
    torch.ops.fusedopt.clamp_(t, -0.25, 0.25)
    assert t[0].item() == 0.25


@needs_gpu
def test_clip_ops_nonfinite():
    t = [randn((3 * CHUNK + 5,), torch.float32, 0), randn((17,), torch.float32, 1)]
    t[0][2 * CHUNK + 7] = float("nan")
    for norm_type in CLIP_NORMS:
        ours = torch.ops.fusedopt.total_norm(t, norm_type)
        cpu = torch.ops.fusedopt.total_norm([x.cpu() for x in t], norm_type)
        torch.testing.assert_close(ours.cpu(), cpu, rtol=1e-5, atol=0, equal_nan=True)
        assert torch.isnan(ours).item() == (norm_type != 0.0)
    t[0][2 * CHUNK + 7] = float("inf")
    assert torch.isinf(torch.ops.fusedopt.total_norm(t, float("inf"))).item()
    assert torch.isinf(torch.ops.fusedopt.total_norm(t, 2.0)).item()


@needs_gpu
def test_clip_ops_launches_per_dtype():
    fp32 = [torch.randn(4096, device="cuda") for _ in range(500)] + [torch.randn(5 * CHUNK + 1, device="cuda")]
    bf16 = [torch.randn(3000, device="cuda", dtype=torch.bfloat16) for _ in range(100)]
    scale = torch.tensor(0.5, device="cuda")
    for tensors, dtypes in ((fp32, 1), (fp32 + bf16, 2)):
        torch.ops.fusedopt.total_norm(tensors, 2.0)  # first call: tables uploaded (copies only)
        kernels = _kernels_in(lambda: torch.ops.fusedopt.total_norm(tensors, 2.0))
        assert len(kernels) == dtypes + 1, kernels  # partials per dtype, one finish
        assert sum("norm_finish_kernel" in k for k in kernels) == 1, kernels
        kernels = _kernels_in(lambda: torch.ops.fusedopt.scale_(tensors, scale))
        assert len(kernels) == dtypes and all("scale_kernel" in k for k in kernels), kernels
        kernels = _kernels_in(lambda: torch.ops.fusedopt.clamp_(tensors, -1.0, 1.0))
        assert len(kernels) == dtypes and all("clamp_kernel" in k for k in kernels), kernels
    assert _kernels_in(lambda: torch.ops.fusedopt.scale_(fp32, torch.tensor(1.0))) == []  # CPU 1: no launch


@needs_gpu
def test_clip_ops_share_one_cached_table():
    grads = [torch.randn(s, device="cuda") for s in (10, CHUNK + 7, 300)]
    torch.ops.fusedopt.total_norm(grads, 2.0)
    s1 = cuda_backend.table_stats()
    torch.ops.fusedopt.scale_(grads, torch.tensor(0.5, device="cuda"))  # same single-list table
    torch.ops.fusedopt.clamp_(grads, -1.0, 1.0)
    torch.ops.fusedopt.total_norm(grads, 1.0)
    s2 = cuda_backend.table_stats()
    assert (s2["full_uploads"], s2["hits"]) == (s1["full_uploads"], s1["hits"] + 3)


@needs_gpu
def test_clip_ops_deterministic_without_sync():
    params = [torch.randn(s, device="cuda", requires_grad=True) for s in (7 * CHUNK + 3, 5, 40000)]
    for p in params:
        p.grad = torch.randn_like(p) * 10
    first = bits(torch.ops.fusedopt.total_norm([p.grad for p in params], 2.0))
    one = torch.tensor(1.0, device="cuda")  # made before: a copy from pageable memory syncs
    torch.cuda.synchronize()
    with no_host_sync():
        again = [torch.ops.fusedopt.total_norm([p.grad for p in params], 2.0) for _ in range(5)]
        norm = fusedopt.clip_grad_norm_(params, 1.0, backend="cuda")
        fusedopt.clip_grad_value_(params, 0.01)
        torch.ops.fusedopt.scale_([p.grad for p in params], one)
    assert all(torch.equal(bits(n), first) for n in again)
    assert torch.equal(bits(norm), first)
    assert all(p.grad.abs().max().item() <= 0.01 for p in params)


@needs_gpu
def test_clip_ops_scale_one_on_device_changes_nothing():
    t = [randn((CHUNK + 3,), torch.bfloat16, 0), randn((5,), torch.float32, 1)]
    t[0][0] = float("nan")
    before = [bits(x) for x in t]
    for one in (torch.tensor(1.0, device="cuda"), torch.tensor([1.0], dtype=torch.float64, device="cuda")):
        torch.ops.fusedopt.scale_(t, one)
    assert all(torch.equal(bits(x), b) for x, b in zip(t, before))


@needs_gpu
def test_clip_ops_pick_the_cuda_kernels():
    for op in _norm_ops.OP_NAMES:
        assert _norm_ops.has_kernel(op, "cuda"), op
    t = [torch.zeros(3, device="cuda")]
    for backend in ("auto", "cuda"):
        assert _norm.choose(backend, torch.device("cuda"), t, 2.0) == "native"
        assert _norm.choose(backend, torch.device("cuda"), t, 0.5) == "native"  # not a triton order
        assert _clip._native(torch.device("cuda"), t, "scale_", backend)
    assert _clip._native(torch.device("cuda"), t, "clamp_")


@needs_gpu
def test_clip_ops_bad_input_raises_clear_errors():
    x = torch.zeros(4, device="cuda")
    with pytest.raises(RuntimeError, match=r"tensors\[1\] is on cpu"):
        torch.ops.fusedopt.total_norm([x, torch.zeros(3)], 2.0)
    with pytest.raises(RuntimeError, match=r"tensors\[0\] has dtype Int"):
        torch.ops.fusedopt.total_norm([torch.zeros(3, device="cuda", dtype=torch.int32)], 2.0)
    sparse = torch.sparse_coo_tensor([[0]], [1.0], (3,), device="cuda")
    with pytest.raises(RuntimeError, match="sparse tensors are not supported"):
        torch.ops.fusedopt.total_norm([x, sparse], 2.0)
    with pytest.raises(RuntimeError, match="sparse tensors are not supported"):
        torch.ops.fusedopt.clamp_([sparse], -1.0, 1.0)
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.fusedopt.clamp_([torch.zeros(1, device="cuda").expand(4)], -1.0, 1.0)
    with pytest.raises(RuntimeError, match="one element"):
        torch.ops.fusedopt.scale_([x], torch.ones(2, device="cuda"))
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="one device"):
            torch.ops.fusedopt.total_norm([x, torch.zeros(3, device="cuda:1")], 2.0)


# ---- the kernels on the CPU emulator (no GPU needed) -----------------------------------------

REPO = Path(__file__).resolve().parents[1]
DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
# Flag bits of csrc/cuda/emu/emulator.cpp.
MAXIMIZE, HAS_GRAD_SCALE, LR_DOUBLE, GRAD_SCALE_DOUBLE, FOUND_INF_DOUBLE, NESTEROV, FIRST = (
    1, 2, 4, 8, 16, 32, 64)


def _cuda_include_dir():
    """The CUDA toolkit's include dir (cuda_fp16.h), or None."""
    candidates = [os.environ.get("CUDA_HOME", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", "/dev/null"],
                                 capture_output=True, text=True, timeout=60)
            match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
            if match:
                candidates.append(match.group(1).strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_fp16.h")):
            return os.path.join(home, "include")
    return None


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """csrc/cuda/emu/emulator.cpp built into a shared library (a few seconds of g++)."""
    include = _cuda_include_dir()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is None or cxx is None:
        pytest.skip("CPU emulator of the CUDA kernels needs the CUDA headers (cuda_fp16.h) and g++")
    out = tmp_path_factory.mktemp("cuda_emu") / "libfusedopt_cuda_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
           "-DFUSEDOPT_CUDA_EMU", f"-I{REPO / 'csrc' / 'include'}", f"-I{REPO / 'csrc' / 'cuda'}",
           "-isystem", include, str(REPO / "csrc" / "cuda" / "emu" / "emulator.cpp"), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, "the CUDA kernels do not compile for the emulator:\n" + result.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    p, i64, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fusedopt_emu_adam.argtypes = [d, d, i64, p, p, p, p, p, p, d, d, d, d, d]
    lib.fusedopt_emu_sgd.argtypes = [d, i64, p, p, p, p, p, p, d, d, d, d]
    return lib


def _addr_array(tensors, ctype=ctypes.c_void_p, values=None):
    values = [t.data_ptr() for t in tensors] if values is None else values
    return ctypes.cast((ctype * max(1, len(values)))(*values), ctypes.c_void_p)


def _scalar(t, double_bit):
    """(pointer, flag bit) of an optional one-element CPU tensor the kernel reads itself."""
    if t is None:
        return None, 0
    return t.data_ptr(), (double_bit if t.dtype == torch.float64 else 0)


def emu_adam(lib, lists, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
             decoupled_weight_decay, grad_scale=None, found_inf=None, grid=3, block=32, order=0):
    params, grads, exp_avgs, exp_avg_sqs, maxes, steps = lists
    kernel_lists = [params, grads, exp_avgs, exp_avg_sqs, steps] + ([maxes] if amsgrad else [])
    lr_t = lr if isinstance(lr, torch.Tensor) else None
    lr_ptr, lr_bit = _scalar(lr_t, LR_DOUBLE)
    gs_ptr, gs_bit = _scalar(grad_scale, GRAD_SCALE_DOUBLE)
    fi_ptr, fi_bit = _scalar(found_inf, FOUND_INF_DOUBLE)
    flags = (MAXIMIZE if maximize else 0) | (HAS_GRAD_SCALE if grad_scale is not None else 0)
    flags |= lr_bit | gs_bit | fi_bit
    wd_mode = 0 if weight_decay == 0 else (2 if decoupled_weight_decay else 1)
    scalars = [0.0 if lr_t is not None else lr, beta1, beta2, eps, weight_decay, 0.0]
    rc = lib.fusedopt_emu_adam(
        DTYPE_CODE[params[0].dtype], int(amsgrad), len(params),
        _addr_array([t for lst in kernel_lists for t in lst]),
        _addr_array(None, ctypes.c_int64, [p.numel() for p in params]),
        _addr_array(None, ctypes.c_double, scalars), lr_ptr, gs_ptr, fi_ptr, flags, wd_mode,
        grid, block, order)
    assert rc == 0, f"emulated adam launch failed ({rc}: -2 = step counters not reset)"


def emu_sgd(lib, lists, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
            is_first_step, grad_scale=None, found_inf=None, grid=3, block=32, order=0):
    params, grads, bufs = lists
    kernel_lists = [params, grads] + ([bufs] if momentum != 0 else [])
    lr_t = lr if isinstance(lr, torch.Tensor) else None
    lr_ptr, lr_bit = _scalar(lr_t, LR_DOUBLE)
    gs_ptr, gs_bit = _scalar(grad_scale, GRAD_SCALE_DOUBLE)
    fi_ptr, fi_bit = _scalar(found_inf, FOUND_INF_DOUBLE)
    flags = (MAXIMIZE if maximize else 0) | (HAS_GRAD_SCALE if grad_scale is not None else 0)
    flags |= (NESTEROV if nesterov else 0) | (FIRST if is_first_step else 0) | lr_bit | gs_bit | fi_bit
    scalars = [0.0 if lr_t is not None else lr, momentum, dampening, weight_decay, 0.0]
    rc = lib.fusedopt_emu_sgd(
        DTYPE_CODE[params[0].dtype], len(params),
        _addr_array([t for lst in kernel_lists for t in lst]),
        _addr_array(None, ctypes.c_int64, [p.numel() for p in params]),
        _addr_array(None, ctypes.c_double, scalars), lr_ptr, gs_ptr, fi_ptr, flags, grid, block,
        order)
    assert rc == 0, f"emulated sgd launch failed ({rc})"


class EmuBackend:
    """The emulator behind the backend protocol's adam_/sgd_ (CPU tensors, one dtype)."""

    def __init__(self, lib, **launch):
        self.lib, self.launch = lib, launch

    def adam_(self, *lists, **kw):
        emu_adam(self.lib, list(lists), **kw, **self.launch)

    def sgd_(self, *lists, **kw):
        emu_sgd(self.lib, list(lists), **kw, **self.launch)


def cpu_lists(lists):
    """The same tensors on the CPU (contiguous): what the emulator walks."""
    return [[t.detach().cpu().contiguous() for t in lst] for lst in lists]


def cpu_randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def cpu_adam_lists(shapes, dtype, amsgrad, seed=0):
    params = [cpu_randn(s, dtype, seed + i) for i, s in enumerate(shapes)]
    grads = [cpu_randn(s, dtype, 1000 + seed + i) for i, s in enumerate(shapes)]
    exp_avgs = [0.1 * cpu_randn(s, dtype, 2000 + seed + i) for i, s in enumerate(shapes)]
    exp_avg_sqs = [0.01 * cpu_randn(s, dtype, 3000 + seed + i).abs() for i, s in enumerate(shapes)]
    maxes = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(i % 4)) for i in range(len(shapes))]
    return [params, grads, exp_avgs, exp_avg_sqs, maxes, steps]


def cpu_sgd_lists(shapes, dtype, momentum, seed=0):
    params = [cpu_randn(s, dtype, seed + i) for i, s in enumerate(shapes)]
    grads = [cpu_randn(s, dtype, 1000 + seed + i) for i, s in enumerate(shapes)]
    bufs = [cpu_randn(s, dtype, 2000 + seed + i) for i, s in enumerate(shapes)] if momentum else []
    return [params, grads, bufs]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=str)
def test_emulated_adam_kernel_matches_reference(emu, flags, dtype):
    ours = cpu_adam_lists(ODD_SIZES, dtype, flags["amsgrad"])
    theirs = clone_lists(ours)
    adam_call(EmuBackend(emu), ours, **flags)
    adam_call(REFERENCE, theirs, **flags)
    assert_lists_close(ours, theirs, dtype)
    assert [s.item() for s in ours[5]] == [s.item() for s in theirs[5]]


# Every flag combination in fp32 and bf16; fp64 / fp16 storage with the two extreme ones.
EMU_SGD_CASES = ([(f, d) for f in SGD_FLAGS for d in (torch.float32, torch.bfloat16)]
                 + [(f, d) for f in (SGD_FLAGS[0], SGD_FLAGS[-1]) for d in (torch.float64, torch.float16)])


@pytest.mark.parametrize("flags,dtype", EMU_SGD_CASES, ids=str)
def test_emulated_sgd_kernel_matches_reference(emu, flags, dtype):
    ours = cpu_sgd_lists(ODD_SIZES, dtype, flags["momentum"])
    theirs = clone_lists(ours)
    for first in (True, False):
        sgd_call(EmuBackend(emu), ours, steps_count=1, is_first_step=first, **flags)
        sgd_call(REFERENCE, theirs, steps_count=1, is_first_step=first, **flags)
    assert_lists_close(ours, theirs, dtype)


@pytest.mark.parametrize("order", [0, 1, 2], ids=["forward", "reverse", "odd_first"])
@pytest.mark.parametrize("grid,block", [(1, 32), (5, 32), (64, 32), (2, 256)])
def test_emulated_step_counters_any_block_order(emu, grid, block, order):
    """Tensors spread over several blocks: each step counter goes up by exactly one per launch,
    whichever block finishes last, and the bias corrections use the old step + 1 everywhere."""
    shapes = [(7 * CHUNK + 3,), (5,), (2 * CHUNK,), (0,), (CHUNK + 1,)]
    ours = cpu_adam_lists(shapes, torch.float32, amsgrad=True)
    for i, s in enumerate(ours[5]):
        s.fill_(float(10 * i))
    theirs = clone_lists(ours)
    adam_call(EmuBackend(emu, grid=grid, block=block, order=order), ours, steps_count=2, amsgrad=True)
    adam_call(REFERENCE, theirs, steps_count=2, amsgrad=True)
    assert [s.item() for s in ours[5]] == [2.0, 12.0, 22.0, 32.0, 42.0]
    assert_lists_close(ours, theirs, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_unaligned_tensors_take_the_scalar_path(emu, dtype):
    base = [cpu_randn((CHUNK + 37,), dtype, i) for i in range(4)]
    ours = [[b[1:] for b in base[:1]], [b[1:] for b in base[1:2]], [torch.zeros(CHUNK + 36, dtype=dtype)],
            [torch.zeros(CHUNK + 36, dtype=dtype)], [], [torch.zeros(())]]
    assert ours[0][0].data_ptr() % 16 != 0
    theirs = clone_lists(ours)
    adam_call(EmuBackend(emu), ours, weight_decay=0.1)
    adam_call(REFERENCE, theirs, weight_decay=0.1)
    assert_lists_close(ours, theirs, dtype)
    assert torch.equal(base[0][:1], cpu_randn((CHUNK + 37,), dtype, 0)[:1])  # element before: untouched


@pytest.mark.parametrize("algo", ["adam", "sgd"])
def test_emulated_found_inf_changes_nothing(emu, algo):
    if algo == "adam":
        lists = cpu_adam_lists(ODD_SIZES, torch.bfloat16, amsgrad=True)
        call = lambda **kw: adam_call(EmuBackend(emu), lists, steps_count=1, amsgrad=True, **kw)  # noqa: E731
    else:
        lists = cpu_sgd_lists(ODD_SIZES, torch.float32, momentum=0.9)
        call = lambda **kw: sgd_call(EmuBackend(emu), lists, steps_count=1, momentum=0.9, **kw)  # noqa: E731
    before = [[bits(t) for t in lst] for lst in lists]
    for flag in (torch.ones(()), torch.tensor(float("inf"), dtype=torch.float64)):
        call(found_inf=flag, grad_scale=torch.full((), 4.0))
        after = [[bits(t) for t in lst] for lst in lists]
        assert all(torch.equal(a, b) for la, lb in zip(before, after) for a, b in zip(la, lb))
    call(found_inf=torch.zeros(()))
    assert not torch.equal(bits(lists[0][3]), before[0][3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_emulated_grad_scale_beyond_float32(emu, dtype):
    """A float64 grad_scale beyond float32's range (GradScaler's scale at its ceiling divided by
    a clip coefficient) divides in two exact steps, not by inf: the reference's numbers."""
    scale = torch.tensor(2.0 ** 125 * 37.0, dtype=torch.float64)  # > FLT_MAX
    ours = cpu_adam_lists(ODD_SIZES, dtype, amsgrad=False)
    theirs = clone_lists(ours)
    ours[1] = [(g.double() * 2.0 ** 125).to(dtype) for g in ours[1]]  # grads of a 2^125 scale
    theirs[1] = [(g.double() / 37.0).to(dtype) for g in theirs[1]]    # unscaled, clipped by 1/37
    adam_call(EmuBackend(emu), ours, lr=1e-2, grad_scale=scale, weight_decay=0.1)
    adam_call(REFERENCE, theirs, lr=1e-2, weight_decay=0.1)
    assert_lists_close(ours, theirs, dtype, skip=(1,))
    sg = cpu_sgd_lists(ODD_SIZES, dtype, 0.9)
    sg_ref = clone_lists(sg)
    sg[1] = [(g.double() * 2.0 ** 125).to(dtype) for g in sg[1]]
    sg_ref[1] = [(g.double() / 37.0).to(dtype) for g in sg_ref[1]]
    sgd_call(EmuBackend(emu), sg, lr=0.5, momentum=0.9, nesterov=True, grad_scale=scale)
    sgd_call(REFERENCE, sg_ref, lr=0.5, momentum=0.9, nesterov=True)
    assert_lists_close(sg, sg_ref, dtype, skip=(1,))
    assert all(torch.isfinite(p).all() and p.abs().max() > 0 for p in sg[0] if p.numel())


@pytest.mark.parametrize("gs_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_emulated_grad_scale_and_lr_tensor(emu, gs_dtype):
    scale = torch.full((), 512.0, dtype=gs_dtype)
    lr = torch.tensor(2.0**-7, dtype=gs_dtype)
    ours = cpu_adam_lists(ODD_SIZES, torch.float16, amsgrad=False)
    theirs = clone_lists(ours)
    ours[1] = [(g.float() * 512.0).to(torch.float16) for g in ours[1]]
    scaled = [bits(g) for g in ours[1]]
    adam_call(EmuBackend(emu), ours, lr=lr, grad_scale=scale, weight_decay=0.1)
    adam_call(REFERENCE, theirs, lr=2.0**-7, weight_decay=0.1)
    assert_lists_close(ours, theirs, torch.float16, skip=(1,))
    assert all(torch.equal(bits(g), b) for g, b in zip(ours[1], scaled))
    sg = cpu_sgd_lists(ODD_SIZES, torch.float32, 0.9)
    sg_ref = clone_lists(sg)
    sg[1] = [g * 512.0 for g in sg[1]]
    sgd_call(EmuBackend(emu), sg, lr=lr, momentum=0.9, nesterov=True, grad_scale=scale)
    sgd_call(REFERENCE, sg_ref, lr=2.0**-7, momentum=0.9, nesterov=True)
    assert_lists_close(sg, sg_ref, torch.float32, skip=(1,))


def test_emulated_thousand_tiny_tensors(emu):
    g = torch.Generator().manual_seed(0)
    shapes = [(int(n),) for n in torch.randint(0, 300, (1000,), generator=g)]
    ours = cpu_adam_lists(shapes, torch.bfloat16, amsgrad=False)
    theirs = clone_lists(ours)
    adam_call(EmuBackend(emu, grid=7, block=32), ours, steps_count=2, weight_decay=0.1,
              decoupled_weight_decay=True)
    adam_call(REFERENCE, theirs, steps_count=2, weight_decay=0.1, decoupled_weight_decay=True)
    assert_lists_close(ours, theirs, torch.bfloat16)


# ---- the clipping ops' kernels on the emulator (norm_kernel.cuh) -----------------------------

INF = float("inf")
NORM_TYPES = [2.0, 1.0, INF, -INF, 0.0, 3.5]
# Relative distance to the exact norm: fp32 accumulation over a thread's elements, double after.
NORM_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def _clip_lib(lib):
    if not getattr(lib, "_clip_argtypes", False):
        p, i64, d, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        lib.fusedopt_emu_total_norm.argtypes = [i64, p, p, p, dbl, p, d, dbl, p, d, d, d, d]
        lib.fusedopt_emu_scale.argtypes = [i64, p, p, p, p, d, dbl, d, d, d]
        lib.fusedopt_emu_clamp.argtypes = [i64, p, p, p, dbl, dbl, d, d, d]
        lib._clip_argtypes = True
    return lib


def _clip_args(tensors):
    """(n, dtypes, ptrs, numels) of a clipping-op call; the tensors must be dense (the host op
    hands the kernels contiguous copies of the others)."""
    assert all(t.numel() == 0 or t.is_contiguous() for t in tensors)
    return (len(tensors), _addr_array(None, ctypes.c_int, [DTYPE_CODE[t.dtype] for t in tensors]),
            _addr_array(tensors), _addr_array(None, ctypes.c_int64, [t.numel() for t in tensors]))


def emu_total_norm(lib, tensors, norm_type, grid=3, block=32, order=0, prescale=1.0):
    """The CUDA op's launches (partials per dtype, then finish) on the emulator; the result has
    the op's dtype (float64 if any tensor is float64, else float32). prescale: a float (passed
    by value) or a one-element float32/float64 tensor (read by the kernel)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    out = torch.full((), -7.0, dtype=dtype)
    if isinstance(prescale, torch.Tensor):
        pre = (prescale.data_ptr(), int(prescale.dtype == torch.float64), 0.0)
    else:
        pre = (None, 0, float(prescale))
    rc = _clip_lib(lib).fusedopt_emu_total_norm(*_clip_args(tensors), float(norm_type), *pre,
                                                out.data_ptr(), int(dtype == torch.float64), grid,
                                                block, order)
    assert rc == 0, f"emulated total_norm failed ({rc}: -2 = a partial slot was not written)"
    return out


def emu_scale(lib, tensors, scale, grid=3, block=32, order=0):
    """scale: a float (read on the host) or a one-element float32/float64 tensor (read by the kernel)."""
    if isinstance(scale, torch.Tensor):
        ptr, is_double, value = scale.data_ptr(), int(scale.dtype == torch.float64), 0.0
    else:
        ptr, is_double, value = None, 0, float(scale)
    assert _clip_lib(lib).fusedopt_emu_scale(*_clip_args(tensors), ptr, is_double, value, grid,
                                             block, order) == 0


def emu_clamp(lib, tensors, lo, hi, grid=3, block=32, order=0):
    assert _clip_lib(lib).fusedopt_emu_clamp(*_clip_args(tensors), float(lo), float(hi), grid,
                                             block, order) == 0


def exact_norm(tensors, norm_type):
    """torch's value in float64: the norm of all elements (p = 0: the tensors with a nonzero)."""
    if norm_type == 0.0:
        return torch.tensor(float(sum(bool(t.count_nonzero()) for t in tensors)), dtype=torch.float64)
    flat = [t.double().flatten() for t in tensors if t.numel()]
    return torch.linalg.vector_norm(torch.cat(flat), norm_type)


def cpu_op_norm(tensors, norm_type):
    return torch.ops.fusedopt.total_norm([t.cpu() for t in tensors], norm_type)


_needs_cpu_op = pytest.mark.skipif(not _norm_ops.has_kernel("total_norm", "cpu"),
                                   reason="fusedopt._C has no CPU clipping ops to compare with")


@_needs_cpu_op
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_emulated_total_norm_matches_torch_and_cpu_op(emu, norm_type, dtype):
    tensors = [cpu_randn(s, dtype, i) for i, s in enumerate(ODD_SIZES)]  # chunk-straddling, empty, 0-dim
    tensors.append(torch.zeros(40, dtype=dtype))  # p = 0: a tensor without a nonzero does not count
    ours = emu_total_norm(emu, tensors, norm_type)
    cpu = cpu_op_norm(tensors, norm_type)
    assert ours.dtype == cpu.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ours.double(), exact_norm(tensors, norm_type), rtol=NORM_RTOL[dtype], atol=0)
    torch.testing.assert_close(ours, cpu, rtol=NORM_RTOL[dtype], atol=0)
    if norm_type in (INF, -INF, 0.0):  # no rounding at all: max/min are elements, p = 0 a count
        assert ours.item() == cpu.item()


@_needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_emulated_total_norm_prescale(emu, dtype):
    """prescale multiplies every element before its term: the CPU op's value, whether passed by
    value or read from (emulated) device memory, and in range where the unscaled norm is."""
    tensors = [cpu_randn(s, dtype, i) for i, s in enumerate(ODD_SIZES)]
    huge = [(t.double() * 2.0 ** 100).to(dtype) for t in tensors]  # squares overflow float32
    for norm_type in (2.0, 1.0, INF, 3.5, 0.0):
        cpu = torch.ops.fusedopt.total_norm(huge, norm_type, torch.tensor(2.0 ** -100))
        for prescale in (2.0 ** -100, torch.tensor(2.0 ** -100), torch.tensor(2.0 ** -100, dtype=torch.float64)):
            ours = emu_total_norm(emu, huge, norm_type, prescale=prescale)
            torch.testing.assert_close(ours, cpu, rtol=NORM_RTOL[dtype], atol=0)
            torch.testing.assert_close(ours.double(), exact_norm(tensors, norm_type), rtol=NORM_RTOL[dtype], atol=0)


@pytest.mark.parametrize("block", [32, 64])
def test_emulated_total_norm_is_deterministic(emu, block):
    """A chunk's partial depends only on its elements and the block size: any grid and any block
    order give the same bits."""
    tensors = [cpu_randn((7 * CHUNK + 3,), torch.float32, 0), cpu_randn((5,), torch.bfloat16, 1),
               cpu_randn((2 * CHUNK,), torch.float32, 2), cpu_randn((CHUNK + 1,), torch.float16, 3)]
    for norm_type in (2.0, 3.5, 0.0, -INF):
        results = {(grid, order): bits(emu_total_norm(emu, tensors, norm_type, grid, block, order))
                   for grid in (1, 3, 64) for order in (0, 1, 2)}
        first = next(iter(results.values()))
        assert all(torch.equal(b, first) for b in results.values()), norm_type


@_needs_cpu_op
def test_emulated_total_norm_mixed_dtypes_and_empty_lists(emu):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32, torch.bfloat16]
    tensors = [cpu_randn((100 + 37 * i,), d, i) for i, d in enumerate(dtypes)]
    tensors.insert(2, torch.empty(0, dtype=torch.float16))
    for norm_type in NORM_TYPES:
        ours = emu_total_norm(emu, tensors, norm_type)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, cpu_op_norm(tensors, norm_type), rtol=1e-6, atol=0)
        torch.testing.assert_close(ours, exact_norm(tensors, norm_type), rtol=1e-6, atol=0)
        # no tensor, or only empty ones: the identity's norm (0; +inf for -inf), as the CPU op
        empty = cpu_op_norm([torch.empty(0)], norm_type)
        for case in ([], [torch.empty(0), torch.empty(0, 3, dtype=torch.bfloat16)]):
            assert emu_total_norm(emu, case, norm_type).item() == empty.item()
        assert emu_total_norm(emu, [torch.empty(0, dtype=torch.float64)], norm_type).dtype == torch.float64


@_needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("bad", [float("nan"), INF, -INF], ids=["nan", "inf", "-inf"])
def test_emulated_total_norm_nonfinite(emu, bad, dtype):
    """A NaN makes every norm NaN (p = 0: it counts as nonzero), also a max/min over several chunks
    and blocks; an inf makes the sums and the max inf."""
    tensors = [cpu_randn((3 * CHUNK + 5,), dtype, 0), cpu_randn((17,), dtype, 1), torch.zeros(9, dtype=dtype)]
    tensors[0][2 * CHUNK + 7] = bad
    for norm_type in NORM_TYPES:
        ours = emu_total_norm(emu, tensors, norm_type, grid=2)
        torch.testing.assert_close(ours, cpu_op_norm(tensors, norm_type), rtol=NORM_RTOL[dtype],
                                   atol=0, equal_nan=True)
        with torch.no_grad():
            theirs = torch.linalg.vector_norm(torch.cat([t.double() for t in tensors]), norm_type)
        if norm_type != 0.0:
            assert ours.isnan().item() == theirs.isnan().item()
            assert ours.isinf().item() == theirs.isinf().item()
    nan_only = [torch.full((4,), float("nan"), dtype=dtype)]
    assert emu_total_norm(emu, nan_only, 0.0).item() == 1.0
    assert emu_total_norm(emu, nan_only, -INF).isnan()


@_needs_cpu_op
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_emulated_scale_and_clamp_match_cpu_op(emu, dtype):
    tensors = [cpu_randn(s, dtype, i) for i, s in enumerate(ODD_SIZES)]
    tensors[5][3] = float("nan")  # NaN stays NaN through both
    for scale in (0.37, torch.tensor(0.37), torch.tensor(0.37, dtype=torch.float64)):
        ours = [t.clone() for t in tensors]
        theirs = [t.clone() for t in tensors]
        emu_scale(emu, ours, scale)
        torch.ops.fusedopt.scale_(theirs, scale if isinstance(scale, torch.Tensor) else torch.tensor(scale, dtype=torch.float64))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    ours = [t.clone() for t in tensors]
    for one in (torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)):  # read by the kernel
        emu_scale(emu, ours, one)
        assert all(torch.equal(bits(a), bits(b)) for a, b in zip(ours, tensors))
    theirs = [t.clone() for t in tensors]
    emu_clamp(emu, ours, -0.5, 0.25)
    torch.ops.fusedopt.clamp_(theirs, -0.5, 0.25)
    for a, b, t in zip(ours, theirs, tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(a, t.clamp(-0.5, 0.25), rtol=0, atol=0, equal_nan=True)


@_needs_cpu_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_emulated_clip_ops_unaligned_views(emu, dtype):
    """Views that start off a 16-byte boundary take the scalar path; elements around them stay."""
    base = cpu_randn((2 * CHUNK + 40,), dtype, 0)
    views = [base[1:CHUNK + 30], base[CHUNK + 33:]]
    assert all(v.data_ptr() % 16 != 0 for v in views)
    for norm_type in (2.0, INF, 1.0, 0.0):
        torch.testing.assert_close(emu_total_norm(emu, views, norm_type), cpu_op_norm(views, norm_type),
                                   rtol=1e-5, atol=0)
    before = base.clone()
    theirs = [v.clone() for v in views]
    emu_scale(emu, views, 0.5)
    emu_clamp(emu, views, -0.3, 0.3)
    torch.ops.fusedopt.scale_(theirs, torch.tensor(0.5))
    torch.ops.fusedopt.clamp_(theirs, -0.3, 0.3)
    for a, b in zip(views, theirs):
        assert torch.equal(a, b)
    for i in (0, CHUNK + 30, CHUNK + 31, CHUNK + 32):  # between and before the views
        assert torch.equal(bits(base[i]), bits(before[i]))


@_needs_cpu_op
def test_emulated_clip_ops_thousand_tiny_tensors(emu):
    g = torch.Generator().manual_seed(0)
    sizes = [int(n) for n in torch.randint(0, 300, (1000,), generator=g)]
    tensors = [cpu_randn((n,), torch.bfloat16 if i % 3 == 0 else torch.float32, i) for i, n in enumerate(sizes)]
    for t in tensors[::7]:
        t.zero_()
    for norm_type in (2.0, INF, 0.0, 3.5):
        ours = emu_total_norm(emu, tensors, norm_type, grid=7)
        torch.testing.assert_close(ours, cpu_op_norm(tensors, norm_type), rtol=1e-5, atol=0)
        torch.testing.assert_close(ours.double(), exact_norm(tensors, norm_type), rtol=1e-5, atol=0)
    ours = [t.clone() for t in tensors]
    theirs = [t.clone() for t in tensors]
    emu_scale(emu, ours, torch.tensor(0.75), grid=7)
    emu_clamp(emu, ours, -1.0, 1.0, grid=7, order=1)
    torch.ops.fusedopt.scale_(theirs, torch.tensor(0.75))
    torch.ops.fusedopt.clamp_(theirs, -1.0, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


# ---- torch.compile and CUDA graphs (the checks live in test_optim.py) -------------------------


@needs_traceable_step
@needs_gpu
@DEVICE_STEP_CASES
def test_compiled_optimizer_step_is_one_graph(name, flags):
    """``opt.step()`` compiled with ``fullgraph=True`` (``aot_eager``: no code generation, so
    the GPU check stays short)."""
    check_compiled_step(name, flags, "cuda", device="cuda")


@needs_gpu
@DEVICE_STEP_CASES
def test_step_captured_in_a_cuda_graph_matches_eager(name, flags):
    check_graphed_step(name, flags, "cuda")


# ---- eager entry points without the dispatcher -----------------------------------------------

def test_direct_entry_points_exist_exactly_in_cuda_builds():
    if not _ops.available():
        pytest.skip(f"fusedopt._C not built: {_ops.LOAD_ERROR}")
    built = bool(_ops.build_info().get("with_cuda"))
    for name in (CUDA.DIRECT_ADAM, CUDA.DIRECT_SGD):
        assert hasattr(_ops._C, name) == built, name


@needs_gpu
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_steps_skip_the_dispatcher_and_match_torch(name, monkeypatch):
    """Eager steps on the CUDA backend go through _C._adam_cuda / _sgd_cuda (the first builds
    the optimizer's cache with the grads list, later ones read each param's .grad in C++), never
    through torch.ops.fusedopt.*, and give torch's numbers as new grads arrive every step."""
    from test_optim import PAIRS, SHAPES, assert_state_equal, clone_params, make_params, set_grads

    def refuse(*args, **kwargs):
        raise AssertionError("the dispatcher path was taken")

    monkeypatch.setattr(torch.ops.fusedopt, "adam_", refuse)
    monkeypatch.setattr(torch.ops.fusedopt, "sgd_", refuse)
    ours = [p.detach().cuda().requires_grad_() for p in make_params(SHAPES)]
    ref = clone_params(ours)
    kwargs = dict(lr=0.05, momentum=0.9, nesterov=True) if name == "SGD" else dict(lr=0.05)
    opt = PAIRS[name][0](ours, backend="cuda", **kwargs)
    topt = PAIRS[name][1](ref, foreach=False, **kwargs)
    for step in range(6):
        set_grads([ours, ref], step)
        opt.step()
        topt.step()
    assert_state_equal(opt, ours, topt, ref, rtol=1e-5, atol=1e-6)
