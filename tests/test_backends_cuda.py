"""The ``cuda`` backend (csrc/cuda, fusedopt/backends/cuda.py).

Without a GPU: whenever ``fusedopt._C.build_info()`` says CUDA was built, the CUDA kernels must be
registered for every op, otherwise the backend must say why it is unavailable; and the kernels
themselves (adam_kernel.cuh, sgd_kernel.cuh) run on the CPU through a small emulator
(csrc/cuda/emu, built with g++ when the CUDA headers are found) against the reference backend,
with several block orders, so their logic is tested without a GPU. With a GPU: parity with the reference backend and torch.optim on every flag and
dtype, odd sizes and chunk-straddling sizes, 1000 tiny tensors, a >2^31-element tensor (slow),
found_inf / grad_scale / lr tensor, per-tensor steps, non-contiguous and empty tensors, mixed
dtypes, exactly one kernel launch per dtype per step, and reuse of the device work tables.
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
from fusedopt import _ops, backends
from fusedopt.backends import cuda as cuda_backend

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
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
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
