"""Parity of fusedopt.optim.{SGD, Adam, AdamW} with torch.optim, on params AND every state buffer.

Every CPU backend built here (``reference`` always, ``cpu`` when the extension is built) is run
against ``torch.optim`` with ``foreach=False`` for fp32/fp64, and against the reference backend
(fp32 math) for bf16/fp16, over every flag combination.
"""
from __future__ import annotations

import collections
import copy
import io
import itertools
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedopt
from fusedopt import _compiling, backends

from conftest import backend_params, needs_traceable_step
from torch_oracles import ADAM_HAS_DECOUPLED_WEIGHT_DECAY, TORCH_VERSION, clip_grad_norm_

STEPS = 20
SHAPES = [(5, 3), (17,), (4097,), (0,), (2, 3, 4), ()]

ADAM_FLAGS = [dict(amsgrad=a, maximize=m, weight_decay=w)
              for a, m, w in itertools.product([False, True], [False, True], [0.0, 0.1])]
SGD_FLAGS = [dict(momentum=mo, dampening=d, nesterov=n, weight_decay=w, maximize=mx)
             for mo, d, n, w, mx in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.1],
                                                      [False, True])
             if not (n and (mo == 0 or d != 0))]

PAIRS = {
    "SGD": (fusedopt.optim.SGD, torch.optim.SGD),
    "Adam": (fusedopt.optim.Adam, torch.optim.Adam),
    "AdamW": (fusedopt.optim.AdamW, torch.optim.AdamW),
}


def make_params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(param_lists, step, seed=100):
    """Give every list the same gradients for this step (deterministic per step)."""
    g = torch.Generator().manual_seed(seed + step)
    for params in zip(*param_lists):
        grad = torch.randn(params[0].shape, generator=g, dtype=torch.float64)
        for p in params:
            p.grad = grad.to(device=p.device, dtype=p.dtype).clone()


def assert_low_precision_close(a, b, max_ulps=4, max_fraction=0.05):
    """bf16/fp16 results of two fp32-math implementations: the order of fp32 operations can flip
    the final rounding of a few elements by one ulp, and a flipped state element then moves the
    param by up to lr x (its ulp) per step. bf16 inputs make exact fp32 ties frequent (measured:
    0.25% of SGD buffer elements per step land on a tie, where FMA vs two roundings decide the
    side). So: at most ``max_fraction`` of the elements may
    differ, by at most ``max_ulps`` ulps of the tensor's largest magnitude. A wrong formula
    changes nearly every element and fails this."""
    a, b = a.detach(), b.detach()
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.numel() == 0:
        return
    diff = (a.double() - b.double()).abs()
    scale = max(a.double().abs().max().item(), b.double().abs().max().item(), 1e-30)
    ulp = torch.finfo(a.dtype).eps * scale
    mismatched = (diff > 0).sum().item()
    assert mismatched <= max(1, max_fraction * a.numel()), f"{mismatched}/{a.numel()} elements differ"
    assert diff.max().item() <= max_ulps * ulp, f"max diff {diff.max().item()} > {max_ulps} ulps ({ulp})"


def _assert_close(a, b, **tol):
    if a.dtype in (torch.bfloat16, torch.float16) and not tol:
        assert_low_precision_close(a, b)
    else:
        torch.testing.assert_close(a, b, **tol)


def assert_state_equal(opt_a, params_a, opt_b, params_b, **tol):
    for pa, pb in zip(params_a, params_b):
        _assert_close(pa.detach(), pb.detach(), **tol)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb), (set(sa), set(sb))
        for key in sb:
            va, vb = sa[key], sb[key]
            if key == "step":
                assert float(va) == float(vb)
            else:
                _assert_close(va, vb, **tol)


def step_pair(ours, params, ref, theirs, steps, edit_at=None, edit=None):
    """Step both optimizers with the same gradients for each step in ``steps``; before step
    ``edit_at``, ``edit(optimizer, its params)`` is applied to both."""
    for step in steps:
        if step == edit_at:
            edit(ours, params)
            edit(ref, theirs)
        set_grads([params, theirs], step)
        ours.step()
        ref.step()


def run_both(name, flags, backend, dtype=torch.float32, shapes=SHAPES, steps=STEPS, lr=1e-2):
    ours_cls, torch_cls = PAIRS[name]
    params = make_params(shapes, dtype)
    theirs = clone_params(params)
    ours = ours_cls(params, lr=lr, backend=backend, **flags)
    ref = torch_cls(theirs, lr=lr, foreach=False, **flags)
    step_pair(ours, params, ref, theirs, range(steps))
    return ours, params, ref, theirs


# ---- parity over flags x dtype x backend --------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_matches_torch(name, flags, dtype, backend):
    ours, params, ref, theirs = run_both(name, flags, backend, dtype)
    assert_state_equal(ours, params, ref, theirs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("flags", SGD_FLAGS, ids=str)
def test_sgd_matches_torch(flags, dtype, backend):
    ours, params, ref, theirs = run_both("SGD", flags, backend, dtype)
    assert_state_equal(ours, params, ref, theirs)


def _run_ours(name, flags, backend, dtype, steps=STEPS):
    params = make_params(SHAPES, dtype)
    opt = PAIRS[name][0](params, lr=1e-2, backend=backend, **flags)
    for step in range(steps):
        set_grads([params], step)
        opt.step()
    return opt, params


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,flags", [("Adam", f) for f in ADAM_FLAGS] + [("AdamW", ADAM_FLAGS[-1])]
                         + [("SGD", f) for f in SGD_FLAGS[::3]], ids=str)
def test_low_precision_matches_reference(name, flags, dtype, backend):
    """bf16/fp16 params compute in fp32 and round once; the reference backend is the oracle."""
    ours, params = _run_ours(name, flags, backend, dtype)
    ref, ref_params = _run_ours(name, flags, "reference", dtype)
    assert_state_equal(ours, params, ref, ref_params)


def _torch_fused_sgd_nesterov_error(dtype) -> float:
    """How far one step of torch's fused CPU SGD (momentum 0.9, Nesterov) on ``dtype`` params
    lands from torch's for-loop SGD on the same values in fp32 (a correct kernel: within a
    rounding of ``dtype``, < 0.008 here)."""
    gen = torch.Generator().manual_seed(0)
    start, grad = torch.randn(40, generator=gen), torch.randn(40, generator=gen)
    low = start.to(dtype).requires_grad_()
    exact = start.to(dtype).float().requires_grad_()
    low.grad, exact.grad = grad.to(dtype), grad.to(dtype).float()
    torch.optim.SGD([low], lr=1e-2, momentum=0.9, nesterov=True, fused=True).step()
    torch.optim.SGD([exact], lr=1e-2, momentum=0.9, nesterov=True, foreach=False).step()
    return float((low.detach().float() - exact.detach()).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,flags", [("AdamW", {"amsgrad": True}), ("Adam", {"weight_decay": 0.1}),
                                        ("SGD", {"momentum": 0.9, "nesterov": True})], ids=str)
def test_reference_low_precision_matches_torch_fused(name, flags, dtype):
    """Sanity of the oracle itself: torch's fused CPU kernels also do fp32 math on bf16/fp16."""
    if name == "SGD":
        error = _torch_fused_sgd_nesterov_error(dtype)
        if error > 0.02:
            pytest.skip(f"torch {torch.__version__}'s fused CPU SGD (Nesterov, {dtype}) is wrong: one "
                        f"step is {error:.3f} off torch's own SGD in fp32 (torch 2.5-2.10 measured; "
                        "right in 2.14)")
    ours, params = _run_ours(name, flags, "reference", dtype)
    theirs = make_params(SHAPES, dtype)
    ref = PAIRS[name][1](theirs, lr=1e-2, fused=True, **flags)
    for step in range(STEPS):
        set_grads([theirs], step)
        ref.step()
    assert_state_equal(ours, params, ref, theirs)


# ---- hyperparameters as tensors, groups, closure, hooks ------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_tensor_lr_equals_float_lr(name, backend):
    flags = {"momentum": 0.9} if name == "SGD" else {}
    a_params, b_params = make_params(SHAPES), make_params(SHAPES)
    a = PAIRS[name][0](a_params, lr=torch.tensor(2.0 ** -6), backend=backend, **flags)
    b = PAIRS[name][0](b_params, lr=2.0 ** -6, backend=backend, **flags)  # exact in fp32
    for step in range(5):
        set_grads([a_params, b_params], step)
        a.step()
        b.step()
    assert_state_equal(a, a_params, b, b_params, rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_param_groups_with_own_hyperparameters(backend):
    p1, p2, p3 = make_params([(4, 4), (7,), (3,)])
    q1, q2, q3 = clone_params([p1, p2, p3])
    ours = fusedopt.optim.AdamW([{"params": [p1]}, {"params": [p2], "lr": 0.1, "weight_decay": 0.0}],
                                lr=1e-2, backend=backend)
    ref = torch.optim.AdamW([{"params": [q1]}, {"params": [q2], "lr": 0.1, "weight_decay": 0.0}],
                            lr=1e-2, foreach=False)
    for step in range(10):
        if step == 5:
            ours.add_param_group({"params": [p3], "betas": (0.8, 0.9), "amsgrad": True})
            ref.add_param_group({"params": [q3], "betas": (0.8, 0.9), "amsgrad": True})
        set_grads([[p1, p2, p3], [q1, q2, q3]], step)
        ours.step()
        ref.step()
    assert_state_equal(ours, [p1, p2, p3], ref, [q1, q2, q3])


def test_add_param_group_validates():
    opt = fusedopt.optim.Adam(make_params([(2,)]))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": make_params([(3,)]), "lr": -1.0})
    with pytest.raises(ValueError, match="backend"):
        opt.add_param_group({"params": make_params([(3,)]), "backend": "gpu"})


def test_step_closure_returns_loss_and_hooks_run():
    w = torch.zeros(3, requires_grad=True)
    opt = fusedopt.optim.SGD([w], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        opt.zero_grad()
        loss = ((w - 1.0) ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(3.0)
    assert calls == ["pre", "post"]
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.2))
    opt.zero_grad()
    assert w.grad is None


def test_params_without_grad_are_skipped_and_state_is_lazy():
    a, b = make_params([(3,), (4,)])
    b_before = b.detach().clone()
    opt = fusedopt.optim.Adam([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), b_before)
    assert len(opt.state[b]) == 0 and float(opt.state[a]["step"]) == 1.0
    b.grad = torch.ones(4)  # b starts stepping later: its own step counter starts at 1
    opt.step()
    assert float(opt.state[a]["step"]) == 2.0 and float(opt.state[b]["step"]) == 1.0


def test_group_with_no_grads_and_empty_tensors_step():
    p = torch.zeros(0, requires_grad=True)
    opt = fusedopt.optim.AdamW([p, torch.zeros(3, requires_grad=True)])
    opt.step()  # no grads at all: nothing to do
    p.grad = torch.zeros(0)
    opt.step()
    assert p.numel() == 0 and float(opt.state[p]["step"]) == 1.0


@pytest.mark.parametrize("backend", backend_params())
def test_mixed_dtypes_in_one_group(backend):
    shapes = [(3, 5), (8,)]
    params = make_params(shapes, torch.float32) + make_params(shapes, torch.float64)
    theirs = clone_params(params)
    ours = fusedopt.optim.AdamW(params, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(10):
        set_grads([params, theirs], step)
        ours.step()
        ref.step()
    assert_state_equal(ours, params, ref, theirs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_many_tiny_tensors(name, backend):
    flags = {"momentum": 0.9, "nesterov": True} if name == "SGD" else {"amsgrad": True}
    shapes = [(i % 7 + 1,) for i in range(1000)]
    ours, params, ref, theirs = run_both(name, flags, backend, shapes=shapes, steps=3)
    assert_state_equal(ours, params, ref, theirs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_non_contiguous_params(name, backend):
    flags = {"momentum": 0.9} if name == "SGD" else {}
    base = make_params([(6, 10)])[0].detach()
    params = [torch.nn.Parameter(base.t().contiguous().t()),     # transposed: dense, not contiguous
              torch.nn.Parameter(torch.randn(20, 12)[::2, ::3])]  # strided view: not dense
    assert not params[0].is_contiguous() and not params[1].is_contiguous()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = PAIRS[name][0](params, lr=1e-2, backend=backend, **flags)
    ref = PAIRS[name][1](theirs, lr=1e-2, foreach=False, **flags)
    for step in range(10):
        set_grads([params, theirs], step)
        ours.step()
        ref.step()
    assert_state_equal(ours, params, ref, theirs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_complex_params_match_torch(name, backend):
    flags = {"momentum": 0.9, "weight_decay": 0.1} if name == "SGD" else {"amsgrad": True, "weight_decay": 0.1}
    params = [torch.randn(5, 3, dtype=torch.complex64, requires_grad=True)]
    theirs = clone_params(params)
    ours = PAIRS[name][0](params, lr=1e-2, backend=backend, **flags)
    ref = PAIRS[name][1](theirs, lr=1e-2, foreach=False, **flags)
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        grad = torch.randn(5, 3, dtype=torch.complex64, generator=g)
        params[0].grad, theirs[0].grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    assert_state_equal(ours, params, ref, theirs, rtol=1e-5, atol=1e-5)
    assert all(v.is_complex() for k, v in ours.state[params[0]].items() if k != "step")


# ---- state_dict interchange and resume ------------------------------------------------------------

def _roundtrip(state_dict):
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,flags", [("AdamW", {"amsgrad": True}), ("Adam", {"weight_decay": 0.1}),
                                        ("SGD", {"momentum": 0.9, "nesterov": True})], ids=str)
@pytest.mark.parametrize("direction", ["torch_to_fusedopt", "fusedopt_to_torch"])
def test_state_dict_interchange_continues_training(direction, name, flags, backend):
    ours_cls, torch_cls = PAIRS[name]
    shapes = [(4, 3), (5,)]
    uninterrupted = make_params(shapes)
    opt_u = torch_cls(uninterrupted, lr=1e-2, foreach=False, **flags)
    first = clone_params(uninterrupted)
    if direction == "torch_to_fusedopt":
        opt_1 = torch_cls(first, lr=1e-2, foreach=False, **flags)
    else:
        opt_1 = ours_cls(first, lr=1e-2, backend=backend, **flags)
    for step in range(6):
        set_grads([uninterrupted, first], step)
        opt_u.step()
        opt_1.step()
    saved = _roundtrip(opt_1.state_dict())
    second = clone_params(first)
    if direction == "torch_to_fusedopt":
        opt_2 = ours_cls(second, lr=1e-2, backend=backend, **flags)
    else:
        opt_2 = torch_cls(second, lr=1e-2, foreach=False, **flags)
    opt_2.load_state_dict(saved)
    for step in range(6, 12):
        set_grads([uninterrupted, second], step)
        opt_u.step()
        opt_2.step()
    assert_state_equal(opt_2, second, opt_u, uninterrupted)


@pytest.mark.parametrize("backend", backend_params())
def test_resume_mid_run_is_bit_identical(backend):
    shapes = [(4, 3), (5,), (0,)]
    full = make_params(shapes)
    opt_full = fusedopt.optim.AdamW(full, lr=1e-2, amsgrad=True, backend=backend)
    part = clone_params(full)
    opt_part = fusedopt.optim.AdamW(part, lr=1e-2, amsgrad=True, backend=backend)
    for step in range(5):
        set_grads([full, part], step)
        opt_full.step()
        opt_part.step()
    saved = _roundtrip(opt_part.state_dict())
    resumed = clone_params(part)
    opt_resumed = fusedopt.optim.AdamW(resumed, lr=1e-2, amsgrad=True, backend=backend)
    opt_resumed.load_state_dict(saved)
    for step in range(5, 10):
        set_grads([full, resumed], step)
        opt_full.step()
        opt_resumed.step()
    assert_state_equal(opt_resumed, resumed, opt_full, full, rtol=0, atol=0)


# ---- edits between steps: torch.optim reads its state afresh every step; fusedopt caches it ------

def _replace_param(opt, params):
    """A re-initialised layer: a new tensor in place of the first param, same list object."""
    new = torch.linspace(-1, 1, params[0].numel()).reshape(params[0].shape).requires_grad_()
    opt.param_groups[0]["params"][0] = new
    params[0] = new


STATE_EDITS = {
    "state.clear()": lambda opt, params: opt.state.clear(),
    "del state[p]": lambda opt, params: opt.state.__delitem__(params[0]),
    "state[p] = {}": lambda opt, params: opt.state.__setitem__(params[1], {}),
    "state = defaultdict(dict)": lambda opt, params: setattr(opt, "state",
                                                              collections.defaultdict(dict)),
    "state[p].update(copy)": lambda opt, params: opt.state[params[0]].update(
        {k: v.clone() * 0.5 if v.dim() else v.clone() for k, v in opt.state[params[0]].items()}),
    "params[0] = new tensor": _replace_param,
    "in-place zero_()": lambda opt, params: [v.zero_() for v in opt.state[params[2]].values()
                                            if v.dim()],
}
ADAM_EDITS = {
    "state[p]['step'] = 0": lambda opt, params: opt.state[params[0]].__setitem__(
        "step", torch.tensor(0.0)),
    "state[p]['exp_avg'] = zeros": lambda opt, params: opt.state[params[1]].__setitem__(
        "exp_avg", torch.zeros_like(params[1])),
}
SGD_EDITS = {
    "state[p]['momentum_buffer'] = None": lambda opt, params: opt.state[params[0]].__setitem__(
        "momentum_buffer", None),
    "state[p].pop('momentum_buffer')": lambda opt, params: opt.state[params[1]].pop(
        "momentum_buffer"),
    "state[p]['momentum_buffer'] = zeros": lambda opt, params: opt.state[params[2]].__setitem__(
        "momentum_buffer", torch.zeros_like(params[2])),
}
EDIT_CASES = ([(name, edit) for name in ("SGD", "Adam") for edit in STATE_EDITS]
              + [("Adam", edit) for edit in ADAM_EDITS] + [("SGD", edit) for edit in SGD_EDITS])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,edit", EDIT_CASES, ids=[f"{n}-{e}" for n, e in EDIT_CASES])
def test_edits_of_state_and_params_between_steps_are_seen(name, edit, backend):
    """Reset a step, drop or replace state, swap a param in its group's list: the next steps
    equal torch.optim's, which reads everything afresh, and a checkpoint holds what they used."""
    apply_edit = {**STATE_EDITS, **ADAM_EDITS, **SGD_EDITS}[edit]
    ours_cls, torch_cls = PAIRS[name]
    kwargs = dict(lr=0.05, momentum=0.9, dampening=0.2) if name == "SGD" else dict(lr=0.05)
    params = make_params(SHAPES[:3])
    theirs = clone_params(params)
    ours, ref = ours_cls(params, backend=backend, **kwargs), torch_cls(theirs, foreach=False, **kwargs)
    step_pair(ours, params, ref, theirs, range(5), edit_at=2, edit=apply_edit)
    assert_state_equal(ours, params, ref, theirs, rtol=1e-5, atol=1e-6)
    if edit == "params[0] = new tensor":  # (torch's state_dict() raises: state of a param that
        return                            # is in no group any more)
    saved, wanted = _roundtrip(ours.state_dict()), ref.state_dict()
    assert all(type(s) is dict for s in ours.state_dict()["state"].values())
    assert saved["state"].keys() == wanted["state"].keys()
    for index, state in wanted["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(saved["state"][index][key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_complex_param_given_new_memory_keeps_training(name, backend):
    """``p.data = ...`` on a complex param: its cached real view is of the old memory."""
    ours_cls, torch_cls = PAIRS[name]
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    params = [torch.randn(6, dtype=torch.complex64, generator=torch.Generator().manual_seed(3))
              .requires_grad_()]
    theirs = clone_params(params)
    ours, ref = ours_cls(params, backend=backend, **kwargs), torch_cls(theirs, foreach=False, **kwargs)

    def new_memory(opt, ps):
        for p in ps:
            p.data = p.data.clone()

    step_pair(ours, params, ref, theirs, range(4), edit_at=2, edit=new_memory)
    assert_state_equal(ours, params, ref, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params())
def test_amsgrad_turned_on_after_the_first_steps(backend):
    """torch.optim raises KeyError (its state lacks max_exp_avg_sq); fusedopt creates it at zero,
    as for a checkpoint saved without amsgrad: the steps then equal amsgrad from a zero max."""
    params = make_params(SHAPES[:3])
    opt = fusedopt.optim.Adam(params, lr=0.05, backend=backend)
    for step in range(2):
        set_grads([params], step)
        opt.step()
    opt.param_groups[0]["amsgrad"] = True
    theirs = clone_params(params)
    ref = torch.optim.Adam(theirs, lr=0.05, amsgrad=True, foreach=False)
    ref.load_state_dict(_roundtrip(opt.state_dict()))  # (copies; max_exp_avg_sq missing)
    for p in theirs:
        ref.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)
    step_pair(opt, params, ref, theirs, range(2, 5))
    assert_state_equal(opt, params, ref, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params())
def test_copied_and_pickled_optimizers_track_their_own_state(backend):
    """deepcopy / pickle give an optimizer whose state edits are seen too, apart from the
    original's; state_dict() is plain dicts either way."""
    import copy
    import pickle

    params = make_params(SHAPES[:3])
    opt = fusedopt.optim.Adam(params, lr=0.05, backend=backend)
    set_grads([params], 0)
    opt.step()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        other_params = [p for g in other.param_groups for p in g["params"]]
        before = {k: v.clone() for k, v in opt.state[params[0]].items()}
        other.state[other_params[0]]["step"] = torch.tensor(0.0)
        set_grads([other_params], 1)
        other.step()
        assert float(other.state[other_params[0]]["step"]) == 1.0
        assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before.items())
        assert type(other.state_dict()["state"][0]) is dict


def test_state_dict_has_torch_keys():
    params = make_params([(3,)])
    ours = fusedopt.optim.AdamW(params, amsgrad=True)
    theirs = torch.optim.AdamW(clone_params(params), amsgrad=True)
    params[0].grad = torch.ones(3)
    ours.step()
    sd = ours.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    # torch >= 2.7 has "decoupled_weight_decay" in AdamW's groups; ours has it on every torch
    # (an older torch.optim.AdamW loading our state_dict keeps the key and never reads it)
    newer_keys = set() if ADAM_HAS_DECOUPLED_WEIGHT_DECAY else {"decoupled_weight_decay"}
    assert set(theirs.state_dict()["param_groups"][0]) | newer_keys == set(sd["param_groups"][0])
    assert "backend" in ours.param_groups[0] and "max_grad_norm" in ours.param_groups[0]
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].dim() == 0


@pytest.mark.parametrize("backend", backend_params())
def test_sgd_without_momentum_saves_no_state_entries(backend):
    """torch.optim.SGD never touches ``opt.state`` without momentum, so its state_dict has no
    entries; ours has none either (``opt.state`` keeps empty ones: torch.distributed.checkpoint
    runs a zero-grad step at every save of an optimizer with an empty state). With momentum
    the buffer appears at step 1."""
    for momentum in (0.0, 0.9):
        params = make_params([(3,), (2, 2)])
        ours = fusedopt.optim.SGD(params, lr=0.1, momentum=momentum, backend=backend)
        theirs = torch.optim.SGD(clone_params(params), lr=0.1, momentum=momentum)
        for opt in (ours, theirs):
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            opt.step()
        assert len(theirs.state) == (0 if momentum == 0 else 2)
        assert ours.state_dict()["state"].keys() == theirs.state_dict()["state"].keys()
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("backend", backend_params())
def test_group_params_may_be_a_tuple(backend):
    """torch.optim steps a group whose ``params`` the user replaced by a tuple; so do we (the
    cache check took lists only and raised TypeError at the second step)."""
    params = make_params([(3,)])
    ours = fusedopt.optim.Adam(params, lr=0.1, backend=backend)
    theirs = torch.optim.Adam(clone_params(params), lr=0.1)
    for opt in (ours, theirs):
        opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])
    for step in range(3):
        for opt in (ours, theirs):
            opt.param_groups[0]["params"][0].grad = torch.full((3,), float(step + 1))
            opt.step()
    torch.testing.assert_close(ours.param_groups[0]["params"][0], theirs.param_groups[0]["params"][0])


def test_duplicate_params_in_a_group_are_refused():
    """torch.optim warns and steps the param twice (deprecated); a fused step would update it
    twice at once (a race between threads or blocks), so we refuse, at construction and when the
    group is edited later."""
    p, q = make_params([(3,), (3,)])
    with pytest.raises(ValueError, match="lists a parameter more than once"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fusedopt.optim.SGD([p, q, p], lr=0.1, momentum=0.9)
    opt = fusedopt.optim.SGD([p], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="lists a parameter more than once"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.add_param_group({"params": [q, q]})
    assert len(opt.param_groups) == 1  # the refused group is not left behind
    opt.param_groups[0]["params"].append(p)
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="lists a parameter more than once"):
        opt.step()
    assert torch.equal(before, p.detach())


@pytest.mark.parametrize("backend", backend_params())
def test_state_that_shares_memory_is_refused_when_the_cache_is_built(backend):
    """A state tensor the user assigned as (a view of) a param or another state tensor would
    be rewritten by two threads at once; checked once per cache (not per step), before any
    update."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = fusedopt.optim.AdamW([p], lr=0.1, backend=backend)
    p.grad = torch.ones(4)
    opt.step()
    opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg"]
    before = p.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(before, p.detach())
    opt.state[p]["exp_avg_sq"] = opt.state[p]["exp_avg"].clone()
    opt.step()


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_param_cast_after_its_state_exists(name):
    """``model.double()`` after a step: the fused backend names the state tensor and the dtypes
    (its kernels take state of the param's dtype); ``load_state_dict(state_dict())`` casts the
    state, and stepping goes on."""
    model = torch.nn.Linear(3, 2)
    cls = PAIRS[name][0]
    opt = cls(model.parameters(), lr=0.1, backend="cpu", **(dict(momentum=0.9) if name == "SGD" else {}))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
    model.double()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match=r"(momentum_buffers|exp_avgs)\[0\] has dtype Float but params\[0\] has dtype Double"):
        opt.step()
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert all(v.dtype == torch.float64 for k, v in opt.state[model.weight].items() if k != "step")


# ---- GradScaler ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backend_params())
def test_grad_scaler_fused_path_matches_torch_fused(backend):
    """GradScaler hands grad_scale/found_inf to the step; an inf grad skips it bit-identically."""
    torch.manual_seed(0)
    model_a = torch.nn.Linear(8, 4)
    model_b = torch.nn.Linear(8, 4)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = fusedopt.optim.AdamW(model_a.parameters(), lr=1e-2, backend=backend)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2, fused=True)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(16, 8)
    for step in range(6):
        for model, opt, scaler in ((model_a, opt_a, scaler_a), (model_b, opt_b, scaler_b)):
            opt.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            if step == 3:
                model.weight.grad[0, 0] = float("inf")
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if step == 3:
                assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler_a.get_scale() == scaler_b.get_scale()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb)
        assert float(opt_a.state[pa]["step"]) == float(opt_b.state[pb]["step"]) == 5.0


@pytest.mark.parametrize("backend", backend_params())
def test_grad_scaler_unscale_then_clip_does_not_unscale_twice(backend):
    torch.manual_seed(0)
    model_a, model_b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    model_b.load_state_dict(model_a.state_dict())
    opt_a = fusedopt.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9, backend=backend)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9, foreach=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(16, 8)
    for _ in range(3):
        opt_a.zero_grad()
        scaler.scale(model_a(x).square().mean()).backward()
        scaler.unscale_(opt_a)
        torch.nn.utils.clip_grad_norm_(model_a.parameters(), 0.5)
        scaler.step(opt_a)
        scaler.update()
        opt_b.zero_grad()
        model_b(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.5)
        opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb)


# ---- dispatch ---------------------------------------------------------------------------------------

def test_backend_choice_follows_env_var_after_steps(monkeypatch):
    """The bucket remembers its backend per request: setting FUSEDOPT_BACKEND between steps
    switches it, unsetting it switches back."""
    if backends.available()["cpu"] is not None:
        pytest.skip("cpu backend unavailable")
    params = make_params([(3,)])
    params[0].grad = torch.ones(3)
    opt = fusedopt.optim.AdamW(params, backend="cpu")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    opt.step()
    bucket = _bucket(opt, params)
    assert opt._select_backend(opt.param_groups[0], bucket).name == "cpu"
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    opt.step()
    assert bucket.backend.name == "reference"
    monkeypatch.delenv(backends.ENV_VAR)
    opt.step()
    assert bucket.backend.name == "cpu"


def test_env_var_overrides_backend(monkeypatch):
    params = make_params([(3,)])
    opt = fusedopt.optim.AdamW(params, backend="cpu")
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    backends.clear_cache()
    assert opt._select_backend(opt.param_groups[0], _bucket(opt, params)).name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    params[0].grad = torch.ones(3)
    with pytest.raises(ValueError, match="FUSEDOPT_BACKEND"):
        opt.step()


def _bucket(opt, params):
    params[0].grad = torch.ones_like(params[0])
    grads = [p.grad for p in opt.param_groups[0]["params"]]
    return opt._group_cache(0, opt.param_groups[0], grads).buckets[0]


def test_explicit_unavailable_backend_raises_with_reason():
    params = make_params([(3,)])
    params[0].grad = torch.ones(3)
    opt = fusedopt.optim.AdamW(params, backend="cuda")
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        opt.step()


# ---- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=-1.0)), ("Adam", dict(eps=-1e-8)), ("Adam", dict(betas=(1.0, 0.999))),
    ("Adam", dict(betas=(0.9, -0.1))), ("Adam", dict(weight_decay=-1.0)),
    ("Adam", dict(betas=(torch.tensor(0.9), 0.999))), ("Adam", dict(lr=torch.tensor([0.1, 0.2]))),
    ("AdamW", dict(lr=-0.5)), ("SGD", dict(lr=-1.0)), ("SGD", dict(momentum=-0.5)),
    ("SGD", dict(weight_decay=-1.0)), ("SGD", dict(nesterov=True)),
    ("SGD", dict(nesterov=True, momentum=0.9, dampening=0.1)),
], ids=str)
def test_invalid_hyperparameters_raise_like_torch(name, kwargs):
    ours_cls, torch_cls = PAIRS[name]
    with pytest.raises(ValueError) as ours:
        ours_cls(make_params([(2,)]), **kwargs)
    try:
        torch_cls(make_params([(2,)]), **kwargs)
    except ValueError as theirs:
        assert str(ours.value) == str(theirs)
    else:
        # torch 2.5 accepted a float beta beside a Tensor one (later releases refuse it); ours
        # refuses it on every torch, with the later releases' message.
        assert TORCH_VERSION < (2, 6) and name == "Adam" and isinstance(kwargs["betas"][0], torch.Tensor)
        assert str(ours.value) == "betas must be either both floats or both Tensors"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,key,value,message", [
    ("AdamW", "betas", (0.9, 2.0), "Invalid beta parameter at index 1: 2.0"),
    ("Adam", "betas", (1.5, 0.999), "Invalid beta parameter at index 0: 1.5"),
    ("AdamW", "eps", -1.0, "Invalid epsilon value: -1.0"),
    ("Adam", "weight_decay", float("nan"), "Invalid weight_decay value: nan"),
    ("AdamW", "max_grad_norm", -1.0, "Invalid max_grad_norm"),
    ("SGD", "momentum", -0.5, "Invalid momentum value: -0.5"),
    ("SGD", "weight_decay", "0.1", "weight_decay value must be a number, got '0.1'"),
    ("Adam", "differentiable", True, "differentiable=True is not supported"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_hyperparameters_set_after_construction_are_checked_before_any_update(backend, name, key, value,
                                                                              message):
    """torch.optim checks only at construction; a bad value set in param_groups later gives NaN
    or garbage there (beta1 = 1.5 silently). Here the step refuses it with the constructor's
    message naming the group, before touching any group."""
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=True) if name == "SGD" else dict(lr=0.1)
    first, second = make_params([(3,)]), make_params([(5,)])
    opt = PAIRS[name][0]([{"params": first}, {"params": second}], backend=backend, **kwargs)
    for p in first + second:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in first + second]
    opt.param_groups[1][key] = value
    with pytest.raises((ValueError, TypeError), match=r"param_groups\[1\]: " + message.replace("(", r"\(")):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, first + second))
    opt.param_groups[1][key] = opt.defaults.get(key)  # fixed: steps again
    opt.step()
    assert not torch.equal(before[0], first[0])


def test_valid_changes_of_watched_values_step_like_torch():
    """Schedulers (OneCycleLR's cycle_momentum) and hand edits change betas/momentum each step:
    fine, and the same numbers as torch.optim."""
    ours_params, ref_params = make_params([(4, 3)]), make_params([(4, 3)])
    ours = fusedopt.optim.AdamW(ours_params, lr=0.1)
    ref = torch.optim.AdamW(ref_params, lr=0.1, foreach=False)
    for step in range(4):
        for opt in (ours, ref):
            opt.param_groups[0]["betas"] = (0.85 + 0.03 * step, 0.99)
            opt.param_groups[0]["weight_decay"] = 0.01 * step
        set_grads([ours_params, ref_params], step)
        ours.step()
        ref.step()
    assert_state_equal(ours, ours_params, ref, ref_params)
    ours.param_groups[0]["eps"] = "tiny"
    with pytest.raises(TypeError, match=r"param_groups\[0\]: epsilon value must be a number, got 'tiny'"):
        ours.step()


def test_nesterov_group_whose_momentum_is_set_later_steps_like_torch():
    """The constructor's Nesterov rule is not applied at the step: torch steps such a group as
    written (a momentum warm-up from 0, a dampening set later)."""
    for momentum, dampening in ((0.0, 0.0), (0.9, 0.3)):
        ours_params, ref_params = make_params([(6, 5)]), make_params([(6, 5)])
        ours = fusedopt.optim.SGD(ours_params, lr=0.1, momentum=0.9, nesterov=True)
        ref = torch.optim.SGD(ref_params, lr=0.1, momentum=0.9, nesterov=True, foreach=False)
        for step in range(4):
            if step == 2:
                for opt in (ours, ref):
                    opt.param_groups[0].update(momentum=momentum, dampening=dampening)
            set_grads([ours_params, ref_params], step)
            ours.step()
            ref.step()
        assert_state_equal(ours, ours_params, ref, ref_params)


@needs_traceable_step
def test_compiled_step_checks_changed_hyperparameters_while_tracing():
    """The values are guarded constants of the compiled step: a changed one retraces, and the
    check runs in the trace (nothing of it in the graph)."""
    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    opt = fusedopt.optim.AdamW([p], lr=0.1)
    step = torch.compile(opt.step)
    step()
    step()
    before = p.detach().clone()
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid beta parameter at index 1: 1.5"):
        step()
    assert torch.equal(before, p.detach())


@needs_traceable_step
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_compiled_step_follows_a_momentum_schedule(name):
    """OneCycleLR's cycle_momentum writes new betas (Adam) or momentum (SGD) every step; the
    compiled ``fullgraph=True`` step keeps up (the checks built their error messages, with the
    repr of the then-symbolic betas, even when they passed: dynamo cannot trace that repr)."""
    from fusedopt.lr_scheduler import OneCycleLR
    torch._dynamo.reset()
    start = torch.randn(8)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    cls = PAIRS[name][0]
    flags = dict(momentum=0.9) if name == "SGD" else {}
    compiled_opt, eager_opt = (cls([p], lr=0.01, backend="cpu", **flags) for p in params)
    schedules = [OneCycleLR(opt, max_lr=0.1, total_steps=10) for opt in (compiled_opt, eager_opt)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def compiled_step():
        compiled_opt.step()

    for step in range(6):
        grad = torch.randn(8, generator=torch.Generator().manual_seed(step))
        for p in params:
            p.grad = grad.clone()
        compiled_step()
        eager_opt.step()
        for schedule in schedules:
            schedule.step()
    assert torch.equal(params[0].detach(), params[1].detach())
    assert not torch.equal(params[0].detach(), start)


def test_watched_values_edited_in_place_or_as_tensors():
    """A betas list edited in place is seen; tensors are compared by identity (never read: a
    new tensor each step makes no Tensor.__bool__ call), and only their size is checked."""
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = fusedopt.optim.AdamW([p], lr=0.1, betas=[0.9, 0.999])
    opt.step()
    opt.param_groups[0]["betas"][1] = 1.0
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1: 1.0"):
        opt.step()
    opt.param_groups[0]["betas"] = (torch.tensor(0.9), 0.999)
    with pytest.raises(ValueError, match="both floats or both Tensors"):
        opt.step()
    q = torch.nn.Parameter(torch.ones(4))
    q.grad = torch.ones(4)
    sgd = fusedopt.optim.SGD([q], lr=0.1, weight_decay=torch.tensor(0.1))
    sgd.step()
    reads = []
    real_bool = torch.Tensor.__bool__
    try:
        torch.Tensor.__bool__ = lambda self: reads.append(1) or real_bool(self)
        for _ in range(3):
            sgd.param_groups[0]["weight_decay"] = torch.tensor(0.1)
            sgd.step()
    finally:
        torch.Tensor.__bool__ = real_bool
    assert reads == []
    sgd.param_groups[0]["weight_decay"] = torch.tensor([0.1, 0.2])
    with pytest.raises(ValueError, match="Tensor weight_decay value must be 1-element"):
        sgd.step()


def test_bad_backend_name_and_unsupported_flags():
    with pytest.raises(ValueError, match="Invalid backend"):
        fusedopt.optim.SGD(make_params([(2,)]), lr=0.1, backend="gpu")
    with pytest.raises(ValueError, match="differentiable"):
        fusedopt.optim.Adam(make_params([(2,)]), differentiable=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        fusedopt.optim.AdamW([])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_sparse_grad_raises(name):
    """Like torch.optim.Adam(W) (SGD takes them: see below)."""
    p = torch.zeros(4, 3, requires_grad=True)
    opt = PAIRS[name][0]([p], lr=0.1)
    p.grad = torch.sparse_coo_tensor([[0, 2], [1, 1]], [1.0, 2.0], (4, 3), check_invariants=True)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_sparse_grad_after_first_step_raises_and_changes_nothing(name, backend):
    # The group cache is built on the first step; a later step with a sparse grad must still
    # be refused (by the optimizer or by the backend's own checks) before anything is written.
    params = make_params([(4, 3), (5,)])
    opt = PAIRS[name][0](params, lr=0.1, momentum=0.9, backend=backend) if name == "SGD" else \
        PAIRS[name][0](params, lr=0.1, backend=backend)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[1]].items() if torch.is_tensor(v)}
    params[1].grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    for key, value in state_before.items():
        assert torch.equal(opt.state[params[1]][key], value), key


def _sparse_embedding_model():
    """nn.Embedding(sparse=True) (sparse COO grads, uncoalesced) feeding a Linear (dense grads)."""
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Embedding(50, 4, sparse=True), torch.nn.Linear(4, 3))


def _train_sparse_pair(ours, opt_ours, theirs, opt_theirs, steps=5, before_step=None):
    for step in range(steps):
        idx = torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(idx).square().sum().backward()
        if before_step is not None:
            before_step(step)
        opt_ours.step()
        opt_theirs.step()


SPARSE_SGD_FLAGS = [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                    dict(momentum=0.9, dampening=0.3, maximize=True)]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("flags", SPARSE_SGD_FLAGS, ids=str)
def test_sgd_steps_sparse_embedding_grads_like_torch(flags, tensor_lr, backend):
    """torch.optim.SGD takes sparse grads (its single-tensor path; a sparse grad makes a sparse
    momentum buffer): so does fusedopt's, the dense params of the group going to the kernels."""
    ours = _sparse_embedding_model()
    theirs = copy.deepcopy(ours)
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    opt_ours = fusedopt.optim.SGD(ours.parameters(), lr=lr, backend=backend, **flags)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=lr, **flags)
    _train_sparse_pair(ours, opt_ours, theirs, opt_theirs)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        if flags.get("momentum"):
            a, b = opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"]
            assert a.layout == b.layout
            torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-5, atol=1e-6)
    buffer = opt_ours.state[ours[0].weight].get("momentum_buffer")
    assert (buffer is not None and buffer.is_sparse) == bool(flags.get("momentum"))


@pytest.mark.parametrize("backend", backend_params())
def test_sgd_sparse_grads_with_clipping_and_grad_scaler_like_torch(backend):
    """max_grad_norm: the global norm counts the sparse grads (torch's clip + step). GradScaler:
    an inf in the sparse grad skips the whole step, sparse params included."""
    ours = _sparse_embedding_model()
    theirs = copy.deepcopy(ours)
    opt_ours = fusedopt.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, backend=backend,
                                  max_grad_norm=0.5)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    _train_sparse_pair(ours, opt_ours, theirs, opt_theirs, before_step=lambda step:
                       clip_grad_norm_(theirs.parameters(), 0.5))
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    ours, theirs = _sparse_embedding_model(), _sparse_embedding_model()
    opt_ours = fusedopt.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, backend=backend)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=4.0) for _ in range(2)]
    for step in range(4):
        idx = torch.randint(0, 50, (7,), generator=torch.Generator().manual_seed(step))
        for model, opt, scaler in ((ours, opt_ours, scalers[0]), (theirs, opt_theirs, scalers[1])):
            opt.zero_grad()
            scaler.scale(model(idx).square().sum()).backward()
            if step == 2:  # an overflow in the embedding's (sparse) grad only
                model[0].weight.grad._values()[0, 0] = float("inf")
                before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if step == 2:
                assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0  # (halved by the skip)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_grad_scaler_skipping_the_first_sgd_step_leaves_no_momentum_buffer(dampening, backend):
    """torch's default SGD under GradScaler takes no step on an overflow, so the first real step
    starts the buffer from g; fusedopt's masked first step must end the same way with dampening
    (a zero buffer would give (1 - dampening) g). torch's fused SGD is no reference here: its
    CPU kernel gives ~1e13 weights in this very loop (torch 2.14)."""
    results = []
    for make in (lambda ps: fusedopt.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=dampening,
                                               backend=backend),
                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=dampening,
                                            foreach=False)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt, scaler = make(list(model.parameters())), torch.amp.GradScaler("cpu", init_scale=256.0)
        for step in range(3):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            scaler.scale(model(x).square().mean()).backward()
            if step == 0:
                model.bias.grad[0] = float("nan")
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        results.append((model, opt))
    (ours, opt_ours), (theirs, opt_theirs) = results
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt_ours.state[p]["momentum_buffer"],
                                   opt_theirs.state[q]["momentum_buffer"], rtol=1e-6, atol=1e-7)


def test_sgd_sparse_grads_with_weight_decay_raise_like_torch():
    """torch's step adds the dense param to the sparse grad, which torch refuses: same error."""
    for cls in (fusedopt.optim.SGD, torch.optim.SGD):
        model = _sparse_embedding_model()
        opt = cls(model.parameters(), lr=0.1, weight_decay=0.1)
        model(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError, match=r"add\(sparse, dense\) is not supported"):
            opt.step()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_param_saved_for_backward_then_stepped_raises_like_torch(name, backend):
    """Like torch.optim: the step bumps the params' version counters, so a backward through a
    param updated since the forward raises autograd's in-place error (no silently stale graph)."""
    w = torch.nn.Parameter(torch.randn(5))
    x = torch.randn(5, requires_grad=True)
    y = (w * x).sum()  # saves w to compute x's gradient
    w.grad = torch.ones_like(w)
    opt = PAIRS[name][0]([w], lr=0.1, backend=backend)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_functional_list_length_mismatch_raises():
    params = make_params([(3,), (4,)])
    grads = [torch.ones(3)]
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        fusedopt.functional.sgd_(params, grads, [], lr=0.1)


# ---- property-based ------------------------------------------------------------------------------------

shape_lists = st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shape_lists, lr=st.floats(1e-4, 0.5), beta1=st.floats(0.0, 0.99), beta2=st.floats(0.5, 0.9999),
       eps=st.floats(1e-10, 1e-3), weight_decay=st.floats(0.0, 0.5), amsgrad=st.booleans(),
       maximize=st.booleans(), decoupled=st.booleans(), backend=st.sampled_from(["reference", "cpu"]))
def test_adam_property(shapes, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, backend):
    if backends.available()[backend] is not None:
        backend = "reference"
    name = "AdamW" if decoupled else "Adam"
    flags = dict(betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
    ours, params, ref, theirs = run_both(name, flags, backend, shapes=shapes, steps=5, lr=lr)
    assert_state_equal(ours, params, ref, theirs, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=shape_lists, lr=st.floats(1e-4, 0.5), momentum=st.floats(0.0, 0.99),
       dampening=st.floats(0.0, 0.9), weight_decay=st.floats(0.0, 0.5), nesterov=st.booleans(),
       maximize=st.booleans(), backend=st.sampled_from(["reference", "cpu"]))
def test_sgd_property(shapes, lr, momentum, dampening, weight_decay, nesterov, maximize, backend):
    if backends.available()[backend] is not None:
        backend = "reference"
    if nesterov:
        dampening = 0.0
        momentum = max(momentum, 0.1)
    flags = dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize)
    ours, params, ref, theirs = run_both("SGD", flags, backend, shapes=shapes, steps=5, lr=lr)
    assert_state_equal(ours, params, ref, theirs, rtol=1e-5, atol=1e-5)


# ---- the fast path that lets the backend read each param's .grad --------------------------------

class _Subclass(torch.Tensor):
    pass


def _cpu_backend_or_skip():
    reason = backends.available()["cpu"]
    if reason is not None:
        pytest.skip(f"cpu backend unavailable: {reason}")
    return backends.get("cpu")


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_step_reading_grads_is_taken_and_matches_torch(name, monkeypatch):
    """After the first step (which builds the cache), steps go through the backend's
    *_reading_grads entry point, and the numbers stay torch's as grads change every step."""
    cpu = type(_cpu_backend_or_skip())
    method = "sgd_reading_grads" if name == "SGD" else "adam_reading_grads"
    calls = []
    original = getattr(cpu, method)
    monkeypatch.setattr(cpu, method, lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    ours = make_params(SHAPES)
    ref = clone_params(ours)
    kwargs = dict(lr=0.05, momentum=0.9, nesterov=True) if name == "SGD" else dict(lr=0.05)
    opt = PAIRS[name][0](ours, backend="cpu", **kwargs)
    topt = PAIRS[name][1](ref, foreach=False, **kwargs)
    for step in range(6):
        set_grads([ours, ref], step)  # new grad tensors every step, as zero_grad(set_to_none) does
        opt.step()
        topt.step()
    assert len(calls) == 5  # every step after the first
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert_state_equal(opt, ours, topt, ref)


@pytest.mark.parametrize("change", ["grad_removed", "subclass_grad", "non_contiguous_grad"])
def test_step_reading_grads_declines_and_general_path_handles_it(change):
    """A grad that goes missing, becomes a tensor subclass or a non-contiguous view after the
    cache was built: the fast path declines (changing nothing) and the step equals torch's."""
    _cpu_backend_or_skip()
    ours = make_params([(4, 6), (5,), (3, 3)])
    ref = clone_params(ours)
    opt = fusedopt.optim.AdamW(ours, lr=0.1, backend="cpu")
    topt = torch.optim.AdamW(ref, lr=0.1, foreach=False)
    for step in range(3):
        set_grads([ours, ref], step)
        if step == 2:
            if change == "grad_removed":
                ours[1].grad = ref[1].grad = None
            elif change == "subclass_grad":
                ours[0].grad = ours[0].grad.clone().as_subclass(_Subclass)
            else:
                g = torch.randn(6, 4)
                ours[0].grad, ref[0].grad = g.t(), g.t().clone()
        opt.step()
        topt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert_state_equal(opt, ours, topt, ref)


# ---- torch.compile ------------------------------------------------------------------------------

COMPILE_CASES = [
    ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("Adam", dict(amsgrad=True, maximize=True)),
    ("AdamW", dict(weight_decay=0.1, max_grad_norm=0.5)),
    ("SGD", dict(momentum=0.9, skip_nonfinite=True)),
]


#: compiled against eager, per backend (6 steps of fp32)
COMPILED_TOL = {"cpu": dict(rtol=0, atol=0), "reference": dict(rtol=1e-5, atol=1e-7)}


def assert_step_stats_equal(opt_a, opt_b, rtol=0.0, atol=0.0):
    """``last_grad_norm`` and ``skipped_steps`` of two optimizers agree (both None, or close)."""
    for attr in ("last_grad_norm", "skipped_steps"):
        a, b = getattr(opt_a, attr), getattr(opt_b, attr)
        assert (a is None) == (b is None), attr
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=attr)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def run_compiled_and_eager(name, flags, backend, tensor_lr, steps=6, compile_backend="aot_eager",
                           device="cpu", fullgraph=True, shapes=SHAPES):
    """``opt.step()`` compiled (``fullgraph=True``: a graph break raises) against eager, on the
    same gradients; a tensor lr changes value mid-run (read by the graph, no recompile); with
    ``skip_nonfinite`` one step gets an inf gradient. Returns both optimizers and params."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    params = [p.detach().to(device).requires_grad_() for p in make_params(shapes)]
    eager_params = clone_params(params)
    lrs = [torch.tensor(1e-2, device=device), torch.tensor(1e-2, device=device)] if tensor_lr \
        else [1e-2, 1e-2]
    cls = PAIRS[name][0]
    compiled_opt = cls(params, lr=lrs[0], backend=backend, **flags)
    eager_opt = cls(eager_params, lr=lrs[1], backend=backend, **flags)

    @torch.compile(fullgraph=fullgraph, backend=compile_backend)
    def compiled_step():
        compiled_opt.step()

    for step in range(steps):
        set_grads([params, eager_params], step)
        if flags.get("skip_nonfinite") and step == 3:
            for p in (params[0], eager_params[0]):
                p.grad.view(-1)[0] = float("inf")
        if tensor_lr and step == 4:
            for lr in lrs:
                lr.fill_(3e-3)
        compiled_step()
        eager_opt.step()
    return compiled_opt, params, eager_opt, eager_params


def run_graphed_and_eager(name, flags, backend, warmup=3, replays=5):
    """``opt.step()`` captured in a CUDA graph (after ``warmup`` eager steps on a side stream, as
    torch's CUDA-graph docs prescribe) and replayed, against eager steps on the same gradients.
    The graph reads static gradient tensors, refilled before every replay; the tensor lr changes
    value between replays; with ``skip_nonfinite`` one replay sees an inf gradient. Returns both
    optimizers and their params (for the GPU test files)."""
    params = [p.detach().cuda().requires_grad_() for p in make_params(SHAPES)]
    eager_params = clone_params(params)
    lrs = [torch.tensor(1e-2, device="cuda"), torch.tensor(1e-2, device="cuda")]
    cls = PAIRS[name][0]
    graphed_opt = cls(params, lr=lrs[0], backend=backend, **flags)
    eager_opt = cls(eager_params, lr=lrs[1], backend=backend, **flags)
    for p in params:
        p.grad = torch.zeros_like(p)

    def next_grads(step):
        set_grads([eager_params], step)
        if flags.get("skip_nonfinite") and step == warmup + 2:
            eager_params[0].grad.view(-1)[0] = float("inf")
        for p, q in zip(params, eager_params):
            p.grad.copy_(q.grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(warmup):
            next_grads(step)
            graphed_opt.step()
            eager_opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_opt.step()
    for step in range(warmup, warmup + replays):
        next_grads(step)
        if step == warmup + 3:
            for lr in lrs:
                lr.fill_(3e-3)
        graph.replay()
        eager_opt.step()
    torch.cuda.synchronize()
    return graphed_opt, params, eager_opt, eager_params


#: the cases of the compiled / CUDA-graph step tests of the device backends
#: (test_backends_cuda.py, test_backends_triton.py), which call the two checks below
DEVICE_STEP_CASES = pytest.mark.parametrize(
    "name,flags", [("AdamW", dict(weight_decay=0.1, max_grad_norm=0.5)),
                   ("SGD", dict(momentum=0.9, skip_nonfinite=True)), ("Adam", dict(amsgrad=True))],
    ids=["AdamW-max_grad_norm", "SGD-skip_nonfinite", "Adam-amsgrad"])


def check_compiled_step(name, flags, backend, **kwargs):
    """A device backend's ops are opaque to the compiler: eager's numbers bit for bit, one graph
    per step after the first (``kwargs``: of :func:`run_compiled_and_eager`)."""
    compiled_opt, params, eager_opt, eager_params = run_compiled_and_eager(
        name, flags, backend, tensor_lr=True, **kwargs)
    assert_state_equal(compiled_opt, params, eager_opt, eager_params, rtol=0, atol=0)
    assert compiled_graphs() <= 2
    assert_step_stats_equal(compiled_opt, eager_opt)


def check_graphed_step(name, flags, backend):
    """A captured step replayed with new gradients and a new lr: eager's params, state, step
    counters, norm and skip count (the skip counter keeps counting across replays)."""
    graphed_opt, params, eager_opt, eager_params = run_graphed_and_eager(name, flags, backend)
    assert_state_equal(graphed_opt, params, eager_opt, eager_params, rtol=0, atol=0)
    assert_step_stats_equal(graphed_opt, eager_opt)
    if flags.get("skip_nonfinite"):
        assert int(graphed_opt.skipped_steps) == 1


@needs_traceable_step
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("name,flags", COMPILE_CASES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_compiled_step_is_one_graph_and_matches_eager(name, flags, tensor_lr, backend):
    """The native ops are opaque to the compiler, so the cpu backend's numbers are eager's bit for
    bit; the reference backend's torch ops are decomposed (e.g. lerp) and may round apart."""
    # The reference backend (the oracle: plain torch code) reads found_inf on the host to skip a
    # step, which breaks the graph there; the fused backends decide on the device.
    host_skip = backend == "reference" and flags.get("skip_nonfinite", False)
    compiled_opt, params, eager_opt, eager_params = run_compiled_and_eager(
        name, flags, backend, tensor_lr, fullgraph=not host_skip)
    tol = COMPILED_TOL[backend]
    assert_state_equal(compiled_opt, params, eager_opt, eager_params, **tol)
    # the first step creates the state (its own graph); every later step runs one graph
    if not host_skip:
        assert compiled_graphs() <= 2
    assert_step_stats_equal(compiled_opt, eager_opt, **tol)
    if flags.get("skip_nonfinite"):
        assert int(compiled_opt.skipped_steps) == 1


@pytest.mark.skipif(_compiling.STEP_TRACEABLE, reason="this torch traces the step into the graph")
@pytest.mark.parametrize("backend", backend_params())
def test_compiled_step_runs_eagerly_where_torch_cannot_trace_it(backend):
    """torch < 2.10: a compiled region that calls step() breaks its graph there and runs the step
    eagerly, with eager's numbers bit for bit; fullgraph=True refuses, naming the eager step."""
    from torch._dynamo.utils import counters

    for name, flags in COMPILE_CASES:
        compiled_opt, params, eager_opt, eager_params = run_compiled_and_eager(
            name, flags, backend, tensor_lr=False, fullgraph=False)
        assert_state_equal(compiled_opt, params, eager_opt, eager_params, rtol=0, atol=0)
        assert_step_stats_equal(compiled_opt, eager_opt)
        assert sum(counters["graph_break"].values()) >= 1, (name, dict(counters["graph_break"]))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = fusedopt.optim.AdamW([p], lr=0.1, backend=backend)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="_step_outside_the_graph"):
        torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")()
    assert torch.equal(p.detach(), torch.ones(3))


@needs_traceable_step
def test_compiled_first_step_loads_its_backend_inside_the_trace():
    """In a fresh process no backend is imported before the first, compiled, step: the traced
    step imports the one it picks (import statements, which dynamo follows) with no graph break.
    (In this test process conftest has imported every backend already.)"""
    script = textwrap.dedent("""
        import torch, fusedopt
        from fusedopt import backends
        assert not backends._loaded, backends._loaded
        p = torch.nn.Parameter(torch.ones(5))
        p.grad = torch.full((5,), 2.0)
        opt = fusedopt.optim.AdamW([p], lr=torch.tensor(0.1), max_grad_norm=1.0)
        torch.compile(lambda: opt.step(), fullgraph=True, backend="aot_eager")()
        assert set(backends._loaded) >= {"cpu" if backends.available()["cpu"] is None else "reference"}
        assert float(opt.state[p]["step"]) == 1.0 and torch.all(p < 1)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@needs_traceable_step
@pytest.mark.parametrize("backend", backend_params())
def test_compiled_step_with_inductor(backend):
    """The default compiler, Inductor (which fuses the reference backend's torch ops)."""
    compiled_opt, params, eager_opt, eager_params = run_compiled_and_eager(
        "AdamW", dict(weight_decay=0.1, max_grad_norm=0.5), backend, tensor_lr=True,
        compile_backend="inductor")
    assert_state_equal(compiled_opt, params, eager_opt, eager_params, **COMPILED_TOL[backend])
