"""Op-level tests of the cpu backend (torch.ops.fusedopt.adam_ / sgd_ on CPU tensors).

Reference: torch.optim's for-loop path (foreach=False) on params AND every state buffer AND the
step counter after many steps. Low-precision (bf16/fp16) params are checked step by step against
"fp32 math on upcast copies, rounded once on store": the documented semantics of the kernels.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from fusedopt import _ops

import torch_oracles

pytestmark = pytest.mark.skipif(not _ops.available(), reason=f"fusedopt._C not built: {_ops.LOAD_ERROR}")

if _ops.available():
    from fusedopt import _C
    from fusedopt.backends.cpu import BACKEND

LOW_PRECISION = (torch.bfloat16, torch.float16)
TOL = {  # (rtol, atol) for comparisons against torch after many steps
    torch.float32: (2e-5, 2e-6),
    torch.float64: (1e-11, 1e-13),
    # one ulp of the storage type; atol for results of cancellation near 0 (and fp16 subnormals)
    torch.bfloat16: (2 ** -7, 1e-6),
    torch.float16: (2 ** -9, 2 ** -23),
}

ADAM_DEFAULTS = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def available_isas():
    best = _C.build_info()["cpu_isa_best"] if _ops.available() else "scalar"
    order = ["scalar", "avx2", "avx512", "avx512bf16"]
    return order[: order.index(best) + 1]


@pytest.fixture(params=available_isas() if _ops.available() else ["scalar"])
def isa(request):
    """Runs a test with each CPU kernel variant this machine supports."""
    previous = _C._set_cpu_isa(request.param)
    yield request.param
    _C._set_cpu_isa(previous)


@pytest.fixture(params=[1, 2], ids=lambda n: f"streams{n}")
def streams(request):
    """Runs a test with each stream count of the CPU kernels (csrc/cpu/kernels_impl.h,
    for_each_index: 1 or 2 sub-ranges walked side by side; the default is the machine's)."""
    previous = _C._set_cpu_streams(request.param)
    yield request.param
    _C._set_cpu_streams(previous)


def assert_close(actual, expected, dtype, what, scale=1.0):
    """``scale``: the magnitude of the quantity (gradient size for exp_avg, its square for
    exp_avg_sq), so that atol covers the rounding of an element that cancels to near zero."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol,
                               atol=atol * max(1.0, scale), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def make_grads(shapes, steps, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for s in shapes]
            for _ in range(steps)]


def make_params(shapes, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


# ------------------------------------------------------------------------------------------------
# State holders driving our op
# ------------------------------------------------------------------------------------------------

class OurAdam:
    def __init__(self, params, amsgrad, step_dtype=torch.float32):
        self.params = params
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.max_exp_avg_sqs = [torch.zeros_like(p) for p in params] if amsgrad else []
        self.steps = [torch.tensor(0.0, dtype=step_dtype) for _ in params]
        self.amsgrad = amsgrad

    def step(self, grads, lr, weight_decay, maximize, decoupled, grad_scale=None, found_inf=None,
             **betas):
        hp = {**ADAM_DEFAULTS, **betas}
        BACKEND.adam_(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                      self.steps, lr=lr, beta1=hp["beta1"], beta2=hp["beta2"], eps=hp["eps"],
                      weight_decay=weight_decay, amsgrad=self.amsgrad, maximize=maximize,
                      decoupled_weight_decay=decoupled, grad_scale=grad_scale,
                      found_inf=found_inf)

    def tensors(self):
        return {"params": self.params, "exp_avgs": self.exp_avgs, "exp_avg_sqs": self.exp_avg_sqs,
                "max_exp_avg_sqs": self.max_exp_avg_sqs, "steps": self.steps}


class OurSgd:
    def __init__(self, params, momentum):
        self.params = params
        self.buffers = [torch.zeros_like(p) for p in params] if momentum != 0 else []
        self.momentum = momentum
        self.count = 0

    def step(self, grads, lr, dampening, weight_decay, nesterov, maximize, grad_scale=None,
             found_inf=None):
        BACKEND.sgd_(self.params, grads, self.buffers, lr=lr, momentum=self.momentum,
                     dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                     maximize=maximize, is_first_step=self.count == 0, grad_scale=grad_scale,
                     found_inf=found_inf)
        self.count += 1


def torch_adam(params, lr, weight_decay, amsgrad, maximize, decoupled, **betas):
    hp = {**ADAM_DEFAULTS, **betas}
    return torch_oracles.torch_adam(params, lr=lr, betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                                    weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                                    foreach=False, decoupled_weight_decay=decoupled)


def check_adam_against_torch(ours: OurAdam, ref_params, opt, dtype, grad_scale=1.0):
    """``grad_scale``: the gradients' magnitude; the state's absolute tolerance scales with it
    (an exp_avg element of a ~100 gradient that cancels to ~0.05 keeps the rounding of ~100)."""
    for i, (p, r) in enumerate(zip(ours.params, ref_params)):
        st = opt.state[r]
        assert_close(p, r.detach(), dtype, f"params[{i}]")
        assert_close(ours.exp_avgs[i], st["exp_avg"], dtype, f"exp_avgs[{i}]", grad_scale)
        assert_close(ours.exp_avg_sqs[i], st["exp_avg_sq"], dtype, f"exp_avg_sqs[{i}]",
                     grad_scale ** 2)
        if ours.amsgrad:
            assert_close(ours.max_exp_avg_sqs[i], st["max_exp_avg_sq"], dtype,
                         f"max_exp_avg_sqs[{i}]", grad_scale ** 2)
        assert ours.steps[i].item() == st["step"].item()


# ------------------------------------------------------------------------------------------------
# Adam / AdamW parity: every flag combination, fp32 and fp64, many steps
# ------------------------------------------------------------------------------------------------

ADAM_FLAGS = list(itertools.product([False, True], [False, True], [False, True], [0.0, 0.1],
                                    [False, True]))


@pytest.mark.parametrize("amsgrad,maximize,decoupled,weight_decay,lr_tensor", ADAM_FLAGS,
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_adam_matches_torch(dtype, amsgrad, maximize, decoupled, weight_decay, lr_tensor):
    shapes = [(0,), (1,), (4097,), (33, 65), (3, 1, 7)]
    steps = 20
    params = make_params(shapes, dtype)
    ref_params = [p.clone().requires_grad_() for p in params]
    lr = torch.tensor(1e-2, dtype=torch.float64) if lr_tensor else 1e-2
    ours = OurAdam(params, amsgrad)
    opt = torch_adam(ref_params, lr, weight_decay, amsgrad, maximize, decoupled)
    for grads in make_grads(shapes, steps, dtype):
        ours.step(grads, lr, weight_decay, maximize, decoupled)
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        opt.step()
    check_adam_against_torch(ours, ref_params, opt, dtype)


@pytest.mark.parametrize("beta1", [0.3, 0.9])  # lerp weight above / below 0.5: both formulas
def test_adam_betas_and_float64_steps(beta1):
    shapes = [(257,), (5, 5)]
    params = make_params(shapes, torch.float32)
    ref_params = [p.clone().requires_grad_() for p in params]
    ours = OurAdam(params, amsgrad=True, step_dtype=torch.float64)
    opt = torch_adam(ref_params, 3e-3, 0.01, True, False, False, beta1=beta1, beta2=0.95, eps=1e-6)
    for grads in make_grads(shapes, 25, torch.float32):
        ours.step(grads, 3e-3, 0.01, False, False, beta1=beta1, beta2=0.95, eps=1e-6)
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        opt.step()
    check_adam_against_torch(ours, ref_params, opt, torch.float32)
    assert all(s.dtype == torch.float64 and s.item() == 25 for s in ours.steps)


def test_adam_every_isa(isa, streams):
    """Each kernel variant (AVX-512 / AVX2 / scalar) against torch, incl. odd tails, walking
    the tensors as one stream or as two sub-ranges."""
    for dtype in (torch.float32, torch.float64):
        shapes = [(1,), (15,), (17,), (4097,), (100, 3)]
        params = make_params(shapes, dtype)
        ref_params = [p.clone().requires_grad_() for p in params]
        ours = OurAdam(params, amsgrad=True)
        opt = torch_adam(ref_params, 1e-2, 0.1, True, False, True)
        for grads in make_grads(shapes, 20, dtype):
            ours.step(grads, 1e-2, 0.1, False, True)
            for r, g in zip(ref_params, grads):
                r.grad = g.clone()
            opt.step()
        check_adam_against_torch(ours, ref_params, opt, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
def test_stream_counts_give_the_same_bits(dtype):
    """Walking a range as one stream or two sub-ranges visits every element once with the
    same arithmetic: params and state agree bit for bit, on sizes around the block (16) and
    sub-range boundaries and on one big enough to split across threads."""
    import fusedopt
    shapes = [(1,), (15,), (16,), (17,), (31,), (32,), (33,), (63,), (65,), (4097,), (70_001,)]

    def run(n_streams, cls, **flags):
        previous = _C._set_cpu_streams(n_streams)
        try:
            gen = torch.Generator().manual_seed(3)
            params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
            opt = cls(params, backend="cpu", **flags)
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
                opt.step()
            return [p.detach() for p in params] + [
                t for st in opt.state.values() for t in st.values() if t.numel() > 1]
        finally:
            _C._set_cpu_streams(previous)

    for cls, flags in [(fusedopt.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
                       (fusedopt.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))]:
        one, two = run(1, cls, **flags), run(2, cls, **flags)
        assert len(one) == len(two) > len(shapes)
        for a, b in zip(one, two):
            assert torch.equal(a, b), (cls.__name__, a.shape)


# ------------------------------------------------------------------------------------------------
# SGD parity
# ------------------------------------------------------------------------------------------------

SGD_FLAGS = [
    (momentum, dampening, nesterov, weight_decay, maximize, lr_tensor)
    for momentum, dampening, nesterov, weight_decay, maximize, lr_tensor in itertools.product(
        [0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.05], [False, True], [False, True])
    if not (nesterov and (momentum == 0 or dampening != 0))  # torch rejects these
    and not (momentum == 0 and dampening != 0)  # dampening is meaningless without momentum
]


@pytest.mark.parametrize("momentum,dampening,nesterov,weight_decay,maximize,lr_tensor", SGD_FLAGS,
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sgd_matches_torch(dtype, momentum, dampening, nesterov, weight_decay, maximize, lr_tensor):
    shapes = [(0,), (1,), (4097,), (33, 65)]
    params = make_params(shapes, dtype)
    ref_params = [p.clone().requires_grad_() for p in params]
    lr = torch.tensor(0.05, dtype=torch.float64) if lr_tensor else 0.05
    ours = OurSgd(params, momentum)
    opt = torch.optim.SGD(ref_params, lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                          foreach=False)
    for grads in make_grads(shapes, 20, dtype):
        ours.step(grads, lr, dampening, weight_decay, nesterov, maximize)
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        opt.step()
    for i, (p, r) in enumerate(zip(ours.params, ref_params)):
        assert_close(p, r.detach(), dtype, f"params[{i}]")
        if momentum != 0:
            assert_close(ours.buffers[i], opt.state[r]["momentum_buffer"], dtype,
                         f"momentum_buffers[{i}]")


def _steps_of(cls, dtype, flags, backend=None, steps=4, n=40_000):
    """Params after ``steps`` steps of ``cls`` on one tensor of ``n`` elements and a few odd ones."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(n,), (1,), (31,), (17, 33)]
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]
    opt = cls(params, backend=backend, **flags) if backend else cls(params, **flags)
    for step_grads in grads:
        for param, grad in zip(params, step_grads):
            param.grad = grad.clone()
        opt.step()
    return [param.detach().flatten() for param in params]


SGD_ROUNDING_FLAGS = [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01),
                      dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True, weight_decay=0.01)]
ADAM_ROUNDING_FLAGS = [("AdamW", dict(lr=1e-3, weight_decay=0.01)),
                       ("Adam", dict(lr=1e-3, weight_decay=0.01, amsgrad=True)),
                       ("Adam", dict(lr=1e-3, betas=(0.3, 0.99)))]  # lerp weight above 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_fp32_and_fp64_steps_round_as_torchs_for_loop(isa, streams, dtype):
    """rules.h does torch's roundings in torch's order, with an FMA exactly where ATen's
    vectorised op has one, and the kernels are built with -ffp-contract=off: SGD then equals
    torch.optim.SGD(foreach=False) bit for bit, and Adam/AdamW differ from torch's for-loop in
    no more elements than torch's own fused=True step does (the elements ATen computes with
    its scalar code). Before, with the compiler free to fuse, half of AdamW's elements moved."""
    import fusedopt

    for flags in SGD_ROUNDING_FLAGS:
        ours = _steps_of(fusedopt.optim.SGD, dtype, flags, backend="cpu")
        loop = _steps_of(torch.optim.SGD, dtype, dict(flags, foreach=False))
        for a, b in zip(ours, loop):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"SGD {flags}: {m}")
    for name, flags in ADAM_ROUNDING_FLAGS:
        ours = torch.cat(_steps_of(getattr(fusedopt.optim, name), dtype, flags, backend="cpu"))
        loop = torch.cat(_steps_of(getattr(torch.optim, name), dtype, dict(flags, foreach=False)))
        fused = torch.cat(_steps_of(getattr(torch.optim, name), dtype, dict(flags, fused=True)))
        differ, fused_differ = int((ours != loop).sum()), int((fused != loop).sum())
        assert differ <= max(8, 2 * fused_differ), (name, flags, differ, fused_differ)
        ulp = torch.finfo(dtype).eps * float(loop.abs().max())
        torch.testing.assert_close(ours, loop, rtol=0, atol=4 * ulp)  # (one ulp a step at most)


def test_sgd_every_isa(isa, streams):
    shapes = [(1,), (15,), (17,), (4097,)]
    for dtype in (torch.float32, torch.float64):
        params = make_params(shapes, dtype)
        ref_params = [p.clone().requires_grad_() for p in params]
        ours = OurSgd(params, 0.9)
        opt = torch.optim.SGD(ref_params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                              foreach=False)
        for grads in make_grads(shapes, 20, dtype):
            ours.step(grads, 0.05, 0.0, 0.01, True, False)
            for r, g in zip(ref_params, grads):
                r.grad = g.clone()
            opt.step()
        for p, r in zip(ours.params, ref_params):
            assert_close(p, r.detach(), dtype, "params")


# ------------------------------------------------------------------------------------------------
# bf16 / fp16: fp32 math on upcast copies, rounded once on store, checked after every step
# ------------------------------------------------------------------------------------------------

def emulated_adam_step(ours: OurAdam, grads, step, lr, wd, maximize, decoupled):
    """One torch fp32 step on upcast copies of our current state, rounded to the storage dtype."""
    dtype = ours.params[0].dtype
    ref = [p.float().requires_grad_() for p in ours.params]
    opt = torch_adam(ref, lr, wd, ours.amsgrad, maximize, decoupled)
    for i, r in enumerate(ref):
        state = {"step": torch.tensor(float(step)), "exp_avg": ours.exp_avgs[i].float(),
                 "exp_avg_sq": ours.exp_avg_sqs[i].float()}
        if ours.amsgrad:
            state["max_exp_avg_sq"] = ours.max_exp_avg_sqs[i].float()
        opt.state[r] = state
        r.grad = grads[i].float()
    opt.step()
    out = {"params": [r.detach().to(dtype) for r in ref],
           "exp_avgs": [opt.state[r]["exp_avg"].to(dtype) for r in ref],
           "exp_avg_sqs": [opt.state[r]["exp_avg_sq"].to(dtype) for r in ref]}
    if ours.amsgrad:
        out["max_exp_avg_sqs"] = [opt.state[r]["max_exp_avg_sq"].to(dtype) for r in ref]
    return out


@pytest.mark.parametrize("amsgrad,decoupled,maximize", [(False, True, False), (True, False, True)])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_adam_low_precision(isa, dtype, amsgrad, decoupled, maximize):
    shapes = [(1,), (31,), (1000,)]
    ours = OurAdam(make_params(shapes, dtype), amsgrad)
    for step, grads in enumerate(make_grads(shapes, 20, dtype), start=1):
        expected = emulated_adam_step(ours, grads, step - 1, 1e-2, 0.1, maximize, decoupled)
        ours.step(grads, 1e-2, 0.1, maximize, decoupled)
        for name, tensors in expected.items():
            for i, (a, e) in enumerate(zip(ours.tensors()[name], tensors)):
                assert a.dtype == dtype
                assert_close(a, e, dtype, f"step {step} {name}[{i}]")


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_sgd_low_precision(isa, dtype, nesterov):
    shapes = [(1,), (31,), (1000,)]
    ours = OurSgd(make_params(shapes, dtype), momentum=0.9)
    for grads in make_grads(shapes, 20, dtype):
        ref = [p.float().requires_grad_() for p in ours.params]
        opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov,
                              foreach=False)
        for i, r in enumerate(ref):
            r.grad = grads[i].float()
            if ours.count > 0:
                opt.state[r]["momentum_buffer"] = ours.buffers[i].float()
        opt.step()
        ours.step(grads, 0.05, 0.0, 0.01, nesterov, False)
        for i, r in enumerate(ref):
            assert_close(ours.params[i], r.detach().to(dtype), dtype, f"params[{i}]")
            assert_close(ours.buffers[i], opt.state[r]["momentum_buffer"].to(dtype), dtype,
                         f"momentum_buffers[{i}]")


@pytest.mark.parametrize("flush_denormal", [False, True], ids=["ieee", "flush-denormal"])
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "offset-3"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_conversions_exact(isa, dtype, offset, flush_denormal):
    """Every 16-bit value: load/store round trip and fp32 -> 16-bit rounding (RNE), with the
    software conversions (storage.h) and the block paths (convert_blocks.h: fp16's F16C,
    bf16's vcvtneps2bf16 with its denormal and NaN fixups in the avx512bf16 variant) alike, also
    with denormals flushed (torch.set_flush_denormal: MXCSR FTZ/DAZ), from a misaligned start
    and with a tail shorter than a block (offset 3)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)[offset:]
    finite = values[torch.isfinite(values)]
    if flush_denormal and dtype == torch.bfloat16:
        pytest.skip("bf16 subnormals are fp32 subnormals: flushing them is what the mode does "
                    "(torch's bf16 arithmetic too); fp16 subnormals are normal fp32 numbers")
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        # p - 0 * g: loads and stores p unchanged (round trip), including -0 and infinities;
        # the first momentum step stores g itself into the buffer (another round trip).
        p, buf = values.clone(), torch.empty_like(values)
        BACKEND.sgd_([p], [torch.zeros_like(p)], [], lr=0.0, momentum=0.0, dampening=0.0,
                     weight_decay=0.0, nesterov=False, maximize=False, is_first_step=True)
        BACKEND.sgd_([torch.zeros_like(p)], [values], [buf], lr=0.0, momentum=0.9,
                     dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                     is_first_step=True)
        for out in (p, buf):
            same = (out.view(torch.int16) == values.view(torch.int16)) | \
                (torch.isnan(out) & torch.isnan(values))
            assert bool(same.all())
            if dtype == torch.bfloat16:  # every path stores c10's canonical NaN, whatever the input's
                assert bool((out.view(torch.int16)[torch.isnan(values)] == 0x7fc0).all())
        # 0 - lr * g with lr = 1/3 rounds lr*g (an fp32 product) to the storage type once.
        p = torch.zeros_like(finite)
        BACKEND.sgd_([p], [finite], [], lr=1 / 3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False, is_first_step=True)
    finally:
        torch.set_flush_denormal(False)
    expected = (0.0 - torch.tensor(1 / 3, dtype=torch.float32) * finite.float()).to(dtype)
    assert torch.equal(p.view(torch.int16), expected.view(torch.int16))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_grad_scale_division_exact(isa, dtype):
    """g / grad_scale in the 16-bit kernels is the correctly rounded fp32 division, although the
    block paths compute it from the reciprocal with two FMAs (kernels_impl.h, divide_block):
    the first momentum step stores g / s, rounded to the storage type, for every 16-bit g and
    many s (powers of two, significands near 1 and 2, random, tiny, huge, 0, inf). An fp32
    quotient one ulp off changes the stored value where it sits next to a 16-bit rounding
    boundary; the test counts such places, so it can fail."""
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype)
    gen = torch.Generator().manual_seed(5)
    scales = [65536.0, 2.0 ** -20, 3.0, 0.7, 1 / 3, 5800.1, 1.0000001, 1.9999999, 1e-30, 1e30,
              1e-40, 0.0, float("inf")]
    scales += (torch.rand(48, generator=gen, dtype=torch.float64) * 8 - 4).exp2().mul(
        1 + torch.rand(48, generator=gen, dtype=torch.float64)).tolist()
    sensitive = 0
    for s in scales:
        scale = torch.tensor(s, dtype=torch.float32)
        buf = torch.empty_like(every)
        BACKEND.sgd_([torch.zeros_like(every)], [every], [buf], lr=0.0, momentum=0.9,
                     dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                     is_first_step=True, grad_scale=scale)
        q = every.float() / scale
        want = q.to(dtype)
        ok = (buf.view(torch.int16) == want.view(torch.int16)) | (buf.isnan() & want.isnan())
        assert bool(ok.all()), (s, every[~ok][:4], buf[~ok][:4], want[~ok][:4])
        finite = q.isfinite()
        for near in (q.nextafter(q.new_tensor(float("inf"))), q.nextafter(q.new_tensor(-float("inf")))):
            sensitive += int((finite & (near.to(dtype) != want)).sum())
    assert sensitive > 100


# ------------------------------------------------------------------------------------------------
# Layouts, many tensors, mixed dtypes, threads
# ------------------------------------------------------------------------------------------------

def test_many_tiny_tensors():
    gen = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(0, 40, (1000,), generator=gen)]
    params = make_params(shapes, torch.float32)
    ref_params = [p.clone().requires_grad_() for p in params]
    ours = OurAdam(params, amsgrad=False)
    opt = torch_adam(ref_params, 1e-2, 0.1, False, False, True)
    for grads in make_grads(shapes, 5, torch.float32):
        ours.step(grads, 1e-2, 0.1, False, True)
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        opt.step()
    check_adam_against_torch(ours, ref_params, opt, torch.float32)


def noncontiguous(t, kind):
    """A view of new memory with the values of t and an unusual layout."""
    if kind == "transposed":
        return t.t().contiguous().t()  # dense, column-major
    if kind == "strided":
        base = torch.zeros(t.shape[0], t.shape[1] * 2, dtype=t.dtype)
        view = base[:, ::2]  # not dense
        view.copy_(t)
        return view
    return t.clone()


@pytest.mark.parametrize("layouts", [
    ("transposed", "transposed", "transposed", "transposed"),  # same dense layout: direct
    ("strided", "contiguous", "contiguous", "contiguous"),
    ("contiguous", "strided", "contiguous", "contiguous"),
    ("transposed", "contiguous", "strided", "transposed"),
])
def test_adam_noncontiguous(layouts):
    shape = (37, 53)
    p0 = make_params([shape], torch.float32)[0]
    param = noncontiguous(p0, layouts[0])
    ours = OurAdam([param], amsgrad=True)
    ours.exp_avgs = [noncontiguous(torch.zeros(shape), layouts[2])]
    ours.exp_avg_sqs = [noncontiguous(torch.zeros(shape), layouts[3])]
    ref = p0.clone().requires_grad_()
    opt = torch_adam([ref], 1e-2, 0.1, True, False, True)
    for (g,) in make_grads([shape], 20, torch.float32):
        grad = noncontiguous(g, layouts[1])
        grad_before = grad.clone()
        ours.step([grad], 1e-2, 0.1, False, True)
        assert torch.equal(grad, grad_before)
        ref.grad = g.clone()
        opt.step()
    # ours.params[0] is still the caller's view: the update landed in its memory
    check_adam_against_torch(ours, [ref], opt, torch.float32)


def test_sgd_noncontiguous_buffer_and_param():
    shape = (20, 9)
    p0 = make_params([shape], torch.float64)[0]
    param = noncontiguous(p0, "strided")
    ours = OurSgd([param], 0.9)
    ours.buffers = [noncontiguous(torch.zeros(shape, dtype=torch.float64), "transposed")]
    ref = p0.clone().requires_grad_()
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, dampening=0.1, foreach=False)
    for (g,) in make_grads([shape], 20, torch.float64):
        ours.step([noncontiguous(g, "transposed")], 0.1, 0.1, 0.0, False, False)
        ref.grad = g.clone()
        opt.step()
    assert_close(param, ref.detach(), torch.float64, "param")
    assert_close(ours.buffers[0], opt.state[ref]["momentum_buffer"], torch.float64, "buffer")


def test_mixed_dtypes_equal_separate_calls():
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32]
    shapes = [(100,), (1000,), (7, 3), (513,), (70000,)]
    mixed = [make_params([s], d, seed=i)[0] for i, (s, d) in enumerate(zip(shapes, dtypes))]
    separate = [p.clone() for p in mixed]
    ours_mixed = OurAdam(mixed, amsgrad=True)
    ours_sep = [OurAdam([p], amsgrad=True) for p in separate]
    for step in range(5):
        grads = [make_grads([s], 1, d, seed=10 * step + i)[0][0]
                 for i, (s, d) in enumerate(zip(shapes, dtypes))]
        ours_mixed.step(grads, 1e-2, 0.1, False, True)
        for o, g in zip(ours_sep, grads):
            o.step([g], 1e-2, 0.1, False, True)
    for i, o in enumerate(ours_sep):
        for name, tensors in o.tensors().items():
            assert torch.equal(ours_mixed.tensors()[name][i], tensors[0]), (name, i)


def test_results_independent_of_thread_count():
    """Work is split by bytes across threads; element-wise math must not depend on the split."""
    shapes = [(100_003,), (1,), (65_537,), (3, 4099)]
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            ours = OurAdam(make_params(shapes, torch.float32), amsgrad=False)
            for grads in make_grads(shapes, 3, torch.float32):
                ours.step(grads, 1e-2, 0.1, False, True)
            results.append(ours.params)
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# found_inf, grad_scale, lr tensor, version counters
# ------------------------------------------------------------------------------------------------

def snapshot(tensors):
    return {k: [t.clone() for t in v] for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_found_inf_changes_nothing(dtype):
    shapes = [(10,), (4097,)]
    ours = OurAdam(make_params(shapes, dtype), amsgrad=True)
    grads = make_grads(shapes, 2, dtype)
    ours.step(grads[0], 1e-2, 0.1, False, True)
    before = snapshot(ours.tensors())
    ours.step(grads[1], 1e-2, 0.1, False, True, found_inf=torch.tensor(1.0))
    for name, tensors in before.items():
        for a, b in zip(ours.tensors()[name], tensors):
            assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), name
    ours.step(grads[1], 1e-2, 0.1, False, True, found_inf=torch.tensor(0.0))
    assert ours.steps[0].item() == 2 and not torch.equal(ours.params[1], before["params"][1])

    sgd = OurSgd(make_params(shapes, dtype), 0.9)
    sgd.step(grads[0], 0.1, 0.0, 0.0, False, False)
    p_before, b_before = [p.clone() for p in sgd.params], [b.clone() for b in sgd.buffers]
    sgd.step(grads[1], 0.1, 0.0, 0.0, False, False, found_inf=torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(sgd.params + sgd.buffers, p_before + b_before))


@pytest.mark.parametrize("scale", [1024.0, 3.0])
def test_grad_scale(scale):
    """grads * scale with grad_scale=scale equals unscaled grads; grads are never written."""
    shapes = [(33,), (4097,)]
    params = make_params(shapes, torch.float32)
    ref_params = [p.clone().requires_grad_() for p in params]
    ours = OurAdam(params, amsgrad=False)
    opt = torch_adam(ref_params, 1e-2, 0.0, False, True, False)
    sgd_params = [p.clone() for p in params]
    sgd_ref = [p.clone().requires_grad_() for p in params]
    sgd = OurSgd(sgd_params, 0.9)
    sgd_opt = torch.optim.SGD(sgd_ref, lr=0.05, momentum=0.9, maximize=True, foreach=False)
    for grads in make_grads(shapes, 20, torch.float32):
        scaled = [g * scale for g in grads]
        copies = [g.clone() for g in scaled]
        ours.step(scaled, 1e-2, 0.0, True, False, grad_scale=torch.tensor(scale))
        sgd.step(scaled, 0.05, 0.0, 0.0, False, True, grad_scale=torch.tensor(scale))
        assert all(torch.equal(a, b) for a, b in zip(scaled, copies))
        for r, rs, g in zip(ref_params, sgd_ref, grads):
            r.grad, rs.grad = g.clone(), g.clone()
        opt.step()
        sgd_opt.step()
    check_adam_against_torch(ours, ref_params, opt, torch.float32)
    for p, r in zip(sgd_params, sgd_ref):
        assert_close(p, r.detach(), torch.float32, "sgd params")


def test_lr_tensor_overrides_float_lr():
    shapes = [(50,)]
    a = OurAdam(make_params(shapes, torch.float32), amsgrad=False)
    b = OurAdam(make_params(shapes, torch.float32), amsgrad=False)
    grads = make_grads(shapes, 1, torch.float32)[0]
    a.step(grads, 1e-3, 0.0, False, True)
    torch.ops.fusedopt.adam_(b.params, grads, b.exp_avgs, b.exp_avg_sqs, [], b.steps, lr=123.0,
                             weight_decay=0.0, amsgrad=False, maximize=False,
                             decoupled_weight_decay=True, lr_tensor=torch.tensor(1e-3),
                             **{k: v for k, v in ADAM_DEFAULTS.items() if k != "lr"})
    assert torch.equal(a.params[0], b.params[0])


def test_version_counters_bumped():
    p = torch.randn(8, requires_grad=True)
    ours = OurAdam([p], amsgrad=False)
    before = (p._version, ours.exp_avgs[0]._version, ours.steps[0]._version)
    with torch.no_grad():
        ours.step([torch.randn(8)], 1e-3, 0.0, False, True)
    after = (p._version, ours.exp_avgs[0]._version, ours.steps[0]._version)
    assert all(x > y for x, y in zip(after, before))


@pytest.mark.parametrize("amsgrad,weight_decay", [(False, 0.0), (True, 0.1)])
def test_nan_and_inf_propagate_like_torch(amsgrad, weight_decay):
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, 3e38])
    shapes = [(7,), (7,)]
    params = [special.clone(), torch.randn(7)]
    ref_params = [p.clone().requires_grad_() for p in params]
    ours = OurAdam(params, amsgrad)
    opt = torch_adam(ref_params, 1e-2, weight_decay, amsgrad, False, True)
    sgd_params = [p.clone() for p in params]
    sgd_ref = [p.clone().requires_grad_() for p in params]
    sgd = OurSgd(sgd_params, 0.9)
    sgd_opt = torch.optim.SGD(sgd_ref, lr=0.1, momentum=0.9, weight_decay=weight_decay,
                              foreach=False)
    for step in range(3):
        grads = [torch.randn(7), special.roll(step)]
        ours.step(grads, 1e-2, weight_decay, False, True)
        sgd.step(grads, 0.1, 0.0, weight_decay, False, False)
        for r, rs, g in zip(ref_params, sgd_ref, grads):
            r.grad, rs.grad = g.clone(), g.clone()
        opt.step()
        sgd_opt.step()
    check_adam_against_torch(ours, ref_params, opt, torch.float32)
    for p, r in zip(sgd_params, sgd_ref):
        assert_close(p, r.detach(), torch.float32, "sgd params")


def test_empty_lists_and_empty_tensors():
    BACKEND.adam_([], [], [], [], [], [], lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=True)
    ours = OurAdam([torch.empty(0), torch.empty(3, 0)], amsgrad=True)
    ours.step([torch.empty(0), torch.empty(3, 0)], 1e-3, 0.1, False, True)
    assert [s.item() for s in ours.steps] == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors, and nothing is modified
# ------------------------------------------------------------------------------------------------

def adam_args(n=2, dtype=torch.float32, shape=(4,)):
    p = [torch.randn(shape, dtype=dtype) for _ in range(n)]
    return dict(params=p, grads=[torch.randn_like(x) for x in p],
                exp_avgs=[torch.zeros_like(x) for x in p],
                exp_avg_sqs=[torch.zeros_like(x) for x in p], max_exp_avg_sqs=[],
                state_steps=[torch.tensor(0.0) for _ in p])


def call_adam(args, amsgrad=False, route="dispatcher"):
    if route == "direct":  # the eager fast path used by BACKEND (python_direct.cpp)
        assert _C._adam_cpu(*args.values(), 1e-3, 0.9, 0.999, 1e-8, 0.0, amsgrad, False, True,
                            None, None, None)
        return
    torch.ops.fusedopt.adam_(*args.values(), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                             weight_decay=0.0, amsgrad=amsgrad, maximize=False,
                             decoupled_weight_decay=True)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda a: a["grads"].pop(), "grads has 1 tensors but params has 2"),
    (lambda a: a["state_steps"].pop(), "state_steps has 1 tensors"),
    (lambda a: a["grads"].__setitem__(1, torch.randn(5)), r"grads\[1\] has shape \[5\] but params\[1\] has shape \[4\]"),
    (lambda a: a["exp_avgs"].__setitem__(0, torch.zeros(4, dtype=torch.float64)), r"exp_avgs\[0\] has dtype Double but params\[0\] has dtype Float"),
    (lambda a: a["params"].__setitem__(0, torch.zeros(4, dtype=torch.int32)), r"params\[0\] has dtype Int, which is not supported"),
    (lambda a: a["grads"].__setitem__(0, torch.randn(4).to_sparse()), r"grads\[0\] is .*sparse"),
    (lambda a: a["exp_avg_sqs"].__setitem__(1, torch.zeros(4, device="meta")), r"exp_avg_sqs\[1\] is on meta"),
    (lambda a: a["params"].__setitem__(1, torch.randn(1).expand(4)), r"params\[1\] has elements that share memory"),
    (lambda a: a["state_steps"].__setitem__(0, torch.tensor(0)), r"state_steps\[0\] has dtype Long; expected float32 or float64"),
    (lambda a: a["state_steps"].__setitem__(0, torch.zeros(2)), r"state_steps\[0\] must have one element"),
])
@pytest.mark.parametrize("route", ["dispatcher", "direct"])
def test_adam_bad_inputs(mutate, pattern, route):
    args = adam_args()
    mutate(args)
    before = [p.clone() for p in args["params"]]
    steps_before = [s.clone() for s in args["state_steps"]]
    with pytest.raises(RuntimeError, match=pattern):
        call_adam(args, route=route)
    assert all(torch.equal(a, b) for a, b in zip(args["params"], before) if a.dtype.is_floating_point
               and a.device.type == "cpu" and a.shape == b.shape)
    assert all(torch.equal(a, b) for a, b in zip(args["state_steps"], steps_before))


def test_amsgrad_needs_max_buffers():
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs \(amsgrad=True\) has 0 tensors"):
        call_adam(adam_args(), amsgrad=True)


def test_sgd_bad_inputs():
    p = [torch.randn(3), torch.randn(3)]
    with pytest.raises(RuntimeError, match=r"momentum_buffers \(momentum != 0\) has 0 tensors"):
        torch.ops.fusedopt.sgd_(p, [torch.randn(3)] * 2, [], lr=0.1, momentum=0.9, dampening=0.0,
                                weight_decay=0.0, nesterov=False, maximize=False,
                                is_first_step=True)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has dtype Half but params\[1\] has dtype Float"):
        torch.ops.fusedopt.sgd_(p, [torch.randn(3), torch.randn(3).half()], [], lr=0.1,
                                momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                                maximize=False, is_first_step=True)
    with pytest.raises(RuntimeError, match="grad_scale must be a tensor with one element"):
        torch.ops.fusedopt.sgd_(p, [torch.randn(3)] * 2, [], lr=0.1, momentum=0.0, dampening=0.0,
                                weight_decay=0.0, nesterov=False, maximize=False,
                                is_first_step=True, grad_scale=torch.ones(2))


def test_direct_path_matches_dispatcher():
    a, b = adam_args(n=3, shape=(33, 7)), None
    b = {k: [t.clone() for t in v] for k, v in a.items()}
    for _ in range(3):
        call_adam(a, route="direct")
        call_adam(b, route="dispatcher")
    for k in a:
        assert all(torch.equal(x, y) for x, y in zip(a[k], b[k])), k


class _TensorSubclass(torch.Tensor):
    pass


def test_direct_path_declines_what_needs_the_dispatcher():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    args = adam_args()
    args["params"][0] = args["params"][0].as_subclass(_TensorSubclass)
    before = args["params"][1].clone()
    assert not _C._adam_cpu(*args.values(), 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, True,
                            None, None, None)
    assert torch.equal(args["params"][1], before)  # declined: nothing done
    args = adam_args()
    with Counting():
        assert not _C._adam_cpu(*args.values(), 1e-3, 0.9, 0.999, 1e-8, 0.0, False, False, True,
                                None, None, None)
        OurAdam(args["params"], amsgrad=False).step(args["grads"], 1e-3, 0.0, False, True)
    assert Counting.calls >= 1  # the backend fell back to torch.ops under the mode


def test_backend_protocol():
    assert BACKEND.name == "cpu"
    assert BACKEND.unavailable_reason() is None
    assert BACKEND.supports(torch.device("cpu"), torch.bfloat16) is None
    assert "needs CPU tensors, got cuda:0" in BACKEND.supports(torch.device("cuda:0"), torch.float32)
    assert "torch.int32 not supported" in BACKEND.supports(torch.device("cpu"), torch.int32)


# ------------------------------------------------------------------------------------------------
# Property tests: random shapes, values and hyperparameters (modest example counts)
# ------------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

shape_st = st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple)
shapes_st = st.lists(shape_st, min_size=1, max_size=4)
float_dtype_st = st.sampled_from([torch.float32, torch.float64])
hypothesis_settings = settings(max_examples=30, deadline=None,
                               suppress_health_check=[HealthCheck.too_slow])


@hypothesis_settings
@given(shapes=shapes_st, dtype=float_dtype_st, lr=st.floats(1e-4, 0.1),
       beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999), eps=st.floats(1e-8, 1e-3),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.3]), amsgrad=st.booleans(),
       maximize=st.booleans(), decoupled=st.booleans(), grad_magnitude=st.floats(1e-3, 1e3),
       seed=st.integers(0, 2 ** 16))
def test_adam_property(shapes, dtype, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                       decoupled, grad_magnitude, seed):
    betas = dict(beta1=beta1, beta2=beta2, eps=eps)
    params = make_params(shapes, dtype, seed=seed)
    ref_params = [p.clone().requires_grad_() for p in params]
    ours = OurAdam(params, amsgrad)
    opt = torch_adam(ref_params, lr, weight_decay, amsgrad, maximize, decoupled, **betas)
    for grads in make_grads(shapes, 6, dtype, seed=seed + 1, scale=grad_magnitude):
        ours.step(grads, lr, weight_decay, maximize, decoupled, **betas)
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        opt.step()
    # L2 decay adds weight_decay x param (params ~1) to the gradient
    check_adam_against_torch(ours, ref_params, opt, dtype, grad_scale=grad_magnitude + weight_decay)


@hypothesis_settings
@given(shapes=shapes_st, dtype=float_dtype_st, lr=st.floats(1e-4, 0.5),
       momentum=st.sampled_from([0.0, 0.5, 0.99]), dampening=st.sampled_from([0.0, 0.1]),
       nesterov=st.booleans(), weight_decay=st.sampled_from([0.0, 1e-2]),
       maximize=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_sgd_property(shapes, dtype, lr, momentum, dampening, nesterov, weight_decay, maximize,
                      seed):
    nesterov = nesterov and momentum != 0 and dampening == 0
    dampening = dampening if momentum != 0 else 0.0
    params = make_params(shapes, dtype, seed=seed)
    ref_params = [p.clone().requires_grad_() for p in params]
    ours = OurSgd(params, momentum)
    opt = torch.optim.SGD(ref_params, lr=lr, momentum=momentum, dampening=dampening,
                          weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                          foreach=False)
    for grads in make_grads(shapes, 6, dtype, seed=seed + 1):
        ours.step(grads, lr, dampening, weight_decay, nesterov, maximize)
        for r, g in zip(ref_params, grads):
            r.grad = g.clone()
        opt.step()
    for i, (p, r) in enumerate(zip(ours.params, ref_params)):
        assert_close(p, r.detach(), dtype, f"params[{i}]")
        if momentum != 0:
            assert_close(ours.buffers[i], opt.state[r]["momentum_buffer"], dtype,
                         f"momentum_buffers[{i}]")
