"""fusedopt.functional: lists in, one dispatch point out; same numbers as the optimizers."""
from __future__ import annotations

import re

import pytest
import torch

import fusedopt
from fusedopt import functional

from conftest import backend_params


@pytest.mark.parametrize("backend", backend_params())
def test_functional_adam_equals_optimizer(backend):
    torch.manual_seed(0)
    params = [torch.randn(4, 5), torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.complex64)]
    grads = [torch.randn_like(p) for p in params]
    opt_params = [p.clone().requires_grad_() for p in params]
    opt = fusedopt.optim.AdamW(opt_params, lr=1e-2, amsgrad=True, backend=backend)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    for _ in range(3):
        for p, g in zip(opt_params, grads):
            p.grad = g.clone()
        opt.step()
        functional.adam_(params, grads, m, v, vmax, steps, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                         weight_decay=1e-2, amsgrad=True, decoupled_weight_decay=True, backend=backend)
    for p, q in zip(params, opt_params):
        torch.testing.assert_close(p, q.detach(), rtol=0, atol=0)
    assert [float(s) for s in steps] == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("backend", backend_params())
def test_functional_sgd_first_step_and_found_inf(backend):
    p = torch.ones(5)
    g = torch.full((5,), 2.0)
    buf = torch.empty(5)
    functional.sgd_([p], [g], [buf], lr=0.5, momentum=0.9, is_first_step=True, backend=backend)
    torch.testing.assert_close(buf, g)
    torch.testing.assert_close(p, torch.zeros(5))
    before = (p.clone(), buf.clone())
    functional.sgd_([p], [g], [buf], lr=0.5, momentum=0.9, found_inf=torch.tensor(1.0), backend=backend)
    assert torch.equal(p, before[0]) and torch.equal(buf, before[1])
    functional.sgd_([p], [g], [buf], lr=0.5, momentum=0.9, grad_scale=torch.tensor(2.0), backend=backend)
    torch.testing.assert_close(buf, torch.full((5,), 0.9 * 2.0 + 1.0))


def test_functional_rejects_sparse_and_bad_backend():
    p = torch.zeros(3)
    sparse = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        functional.sgd_([p], [sparse], [], lr=0.1)
    with pytest.raises(ValueError, match="Invalid backend"):
        functional.sgd_([p], [torch.zeros(3)], [], lr=0.1, backend="nope")


ADAM_HYPER = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


def _adam(backend="reference", n=1, **hyper):
    params = [torch.ones(4) for _ in range(n)]
    functional.adam_(params, [torch.ones(4) for _ in range(n)], [torch.zeros(4) for _ in range(n)],
                     [torch.zeros(4) for _ in range(n)], [], [torch.tensor(0.0) for _ in range(n)],
                     backend=backend, **{**ADAM_HYPER, **hyper})
    return params


@pytest.mark.parametrize("name,value,message", [
    ("beta1", 1.0, "Invalid beta parameter at index 0: 1.0"),  # silently NaN params before
    ("beta1", -0.5, "Invalid beta parameter at index 0: -0.5"),  # triton's ln(beta) is -inf
    ("beta2", 1.5, "Invalid beta parameter at index 1: 1.5"),
    ("beta2", float("nan"), "Invalid beta parameter at index 1: nan"),
    ("eps", -1e-8, "Invalid epsilon value: -1e-08"),
    ("lr", -0.1, "Invalid learning rate: -0.1"),
    ("weight_decay", -0.01, "Invalid weight_decay value: -0.01"),
])
@pytest.mark.parametrize("backend", backend_params())
def test_functional_adam_checks_hyperparameters_like_torch(backend, name, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _adam(backend, **{name: value})
    # the same values are what torch.optim.Adam refuses, with the same words
    betas = (value if name == "beta1" else 0.9, value if name == "beta2" else 0.999)
    kwargs = {"betas": betas} if name.startswith("beta") else {name: value}
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], **kwargs)


def test_functional_adam_tensor_lr_is_not_read():
    """A tensor lr is checked by shape only (reading its value would wait for the device)."""
    assert torch.equal(_adam(lr=torch.tensor(-0.0))[0], _adam(lr=0.0)[0])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        _adam(lr=torch.tensor([0.1, 0.2]))
    params = _adam(lr=torch.tensor(0.1), beta1=0.0, beta2=0.0, eps=0.0)  # edges are allowed
    assert torch.isfinite(params[0]).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(momentum=-0.9), "Invalid momentum value: -0.9"),
    (dict(weight_decay=-1e-4), "Invalid weight_decay value: -0.0001"),
    (dict(momentum=0.0, nesterov=True), "Nesterov momentum requires a momentum and zero dampening"),
    (dict(momentum=0.9, dampening=0.1, nesterov=True),
     "Nesterov momentum requires a momentum and zero dampening"),
])
@pytest.mark.parametrize("backend", backend_params())
def test_functional_sgd_checks_hyperparameters_like_torch(backend, kwargs, message):
    p = torch.ones(4)
    with pytest.raises(ValueError, match=re.escape(message)):
        functional.sgd_([p], [torch.ones(4)], [torch.zeros(4)], **{"lr": 0.1, **kwargs},
                        backend=backend)
    assert torch.equal(p, torch.ones(4))
    with pytest.raises(ValueError, match=re.escape(message)):
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], **{"lr": 0.1, **kwargs})


@pytest.mark.parametrize("which", ["params", "grads", "exp_avgs", "state_steps", "max_exp_avg_sqs"])
def test_functional_adam_names_a_none_entry(which):
    lists = dict(params=[torch.ones(3), torch.ones(3)], grads=[torch.ones(3), torch.ones(3)],
                 exp_avgs=[torch.zeros(3), torch.zeros(3)], exp_avg_sqs=[torch.zeros(3), torch.zeros(3)],
                 max_exp_avg_sqs=[torch.zeros(3), torch.zeros(3)],
                 state_steps=[torch.tensor(0.0), torch.tensor(0.0)])
    lists[which][1] = None
    with pytest.raises(ValueError, match=re.escape(f"fusedopt.functional.adam_: {which}[1] is None")):
        functional.adam_(**lists, amsgrad=True, **ADAM_HYPER)
    assert all(float(s) == 0.0 for s in lists["state_steps"] if s is not None)


def test_functional_sgd_names_a_none_entry():
    p = torch.ones(3)
    with pytest.raises(ValueError, match=re.escape("fusedopt.functional.sgd_: grads[0] is None")):
        functional.sgd_([p], [None], [], lr=0.1)
    with pytest.raises(ValueError, match=re.escape("sgd_: momentum_buffers[0] is None")):
        functional.sgd_([p], [torch.ones(3)], [None], lr=0.1, momentum=0.9)
    functional.sgd_([p], [torch.ones(3)], [None], lr=0.1)  # (unused without momentum)
    torch.testing.assert_close(p, torch.full((3,), 0.9))


# ---- tensors that share memory ------------------------------------------------------------------

def _adam_lists(n=3, size=8):
    params = [torch.randn(size) for _ in range(n)]
    grads = [torch.randn(size) for _ in range(n)]
    exp_avgs = [torch.zeros(size) for _ in range(n)]
    exp_avg_sqs = [torch.zeros(size) for _ in range(n)]
    steps = [torch.zeros(()) for _ in range(n)]
    return params, grads, exp_avgs, exp_avg_sqs, steps


ADAM_ALIASES = {
    "param listed twice": lambda p, g, m, v, s: p.__setitem__(1, p[0]),
    "state is the param": lambda p, g, m, v, s: m.__setitem__(0, p[0]),
    "two state lists hold one tensor": lambda p, g, m, v, s: v.__setitem__(2, m[2]),
    "grad views a param": lambda p, g, m, v, s: g.__setitem__(0, p[1].view(8)),
    "step shared by two params": lambda p, g, m, v, s: s.__setitem__(1, s[0]),
}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("alias", list(ADAM_ALIASES))
def test_functional_adam_refuses_tensors_that_share_memory(backend, alias):
    """One parallel region would rewrite shared elements from several threads at once (numbers
    that depend on the ISA and the thread count): refused before anything is written."""
    lists = _adam_lists()
    ADAM_ALIASES[alias](*lists)
    params, grads, exp_avgs, exp_avg_sqs, steps = lists
    before = [t.clone() for t in params + exp_avgs + exp_avg_sqs + steps]
    with pytest.raises(ValueError, match="share memory"):
        functional.adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=0.1, beta1=0.9,
                         beta2=0.999, eps=1e-8, weight_decay=0.0, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, params + exp_avgs + exp_avg_sqs + steps))


@pytest.mark.parametrize("backend", backend_params())
def test_functional_sgd_refuses_overlap_but_grads_may_share(backend):
    buf = torch.zeros(9)
    with pytest.raises(ValueError, match="share memory"):
        functional.sgd_([buf[1:]], [buf[:-1]], [], lr=0.5, backend=backend)
    params = [torch.zeros(4), torch.zeros(4)]
    grad = torch.ones(4)
    functional.sgd_(params, [grad, grad], [], lr=0.5, backend=backend)  # one grad for two params
    assert all(torch.equal(p, torch.full((4,), -0.5)) for p in params)
    disjoint = torch.zeros(8)  # views of one buffer that do not overlap are fine
    functional.sgd_([disjoint[:4], disjoint[4:]], [grad, grad], [], lr=0.5, backend=backend)
    assert torch.equal(disjoint, torch.full((8,), -0.5))


def test_memory_shared_cpp_and_python_agree():
    """The C++ pass and the Python fallback of fusedopt._lists.memory_shared give one verdict."""
    from fusedopt import _lists
    if _lists._memory_shared is None:
        pytest.skip("no extension")
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(256)
    for _ in range(300):
        def views(k):
            out = []
            for _ in range(k):
                start = int(torch.randint(0, 250, (1,), generator=gen))
                length = int(torch.randint(1, 6, (1,), generator=gen))
                step = int(torch.randint(1, 3, (1,), generator=gen))
                out.append(base[start:start + length * step:step])
            return out
        written, read = [views(3), views(2)], [views(3)]
        assert _lists._memory_shared(written, read) == _lists._spans_meet(written, read)
        exact = _lists.memory_shared(written, read)
        saved, _lists._memory_shared = _lists._memory_shared, None
        try:
            assert _lists.memory_shared(written, read) == exact, (written, read)
        finally:
            _lists._memory_shared = saved
        # the exact verdict: an element of a written view is an element of another view
        elements = [set(range(v.storage_offset(), v.storage_offset() + v.numel() * v.stride(0),
                              v.stride(0))) for v in written[0] + written[1]]
        reads = [set(range(v.storage_offset(), v.storage_offset() + v.numel() * v.stride(0),
                           v.stride(0))) for v in read[0]]
        truth = any(elements[i] & elements[j] for i in range(5) for j in range(i + 1, 5)) or \
            any(w & r for w in elements for r in reads)
        assert exact == truth, (written, read)


def test_memory_check_compares_storages_not_addresses():
    """Fake and meta tensors have no data: spans are compared within a storage by offsets, so
    views of two different fake buffers are accepted (no data_ptr read, no warning) and views
    that overlap in one are refused."""
    import warnings
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fusedopt import _lists
    with FakeTensorMode():
        a, b = torch.empty(100), torch.empty(100)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not _lists.memory_shared([[a[10:20], b[12:22]]])
            assert _lists.memory_shared([[a[10:20], a[12:22]]])
    meta = torch.empty(100, device="meta")
    assert not _lists.memory_shared([[meta[10:20], torch.empty(100, device="meta")[12:22]]])
    assert _lists.memory_shared([[meta[10:20]], [meta[15:25]]])
    if _lists._memory_shared is not None:  # the Python fallback agrees
        saved, _lists._memory_shared = _lists._memory_shared, None
        try:
            assert not _lists.memory_shared([[meta[10:20], torch.empty(100, device="meta")[12:22]]])
            assert _lists.memory_shared([[meta[10:20]], [meta[15:25]]])
            sparse = torch.eye(3).to_sparse()
            assert not _lists.memory_shared([[torch.zeros(3)]], [[sparse]])
        finally:
            _lists._memory_shared = saved


@pytest.mark.parametrize("backend", backend_params())
def test_interleaved_views_that_share_no_element_are_accepted(backend):
    """Column blocks of one matrix, or a complex buffer's real and imaginary parts, have
    interleaving element spans but no common element: they step as torch steps them."""
    w = torch.zeros(4, 6)
    params = [w[:, :3], w[:, 3:]]
    functional.sgd_(params, [torch.ones(4, 3), torch.ones(4, 3)], [], lr=0.5, backend=backend)
    assert torch.equal(w, torch.full((4, 6), -0.5))
    parts = torch.zeros(8, 2)
    functional.sgd_([parts[:, 0], parts[:, 1]], [torch.ones(8), torch.ones(8)], [], lr=0.5,
                    backend=backend)
    assert torch.equal(parts, torch.full((8, 2), -0.5))
    with pytest.raises(ValueError, match="share memory"):
        functional.sgd_([w[:, :4], w[:, 3:]], [torch.ones(4, 4), torch.ones(4, 3)], [], lr=0.5,
                        backend=backend)
    base = torch.zeros(4, 6)
    leaves = [torch.nn.Parameter(base[:, :3]), torch.nn.Parameter(base[:, 3:])]
    opt = fusedopt.optim.Adam(leaves, lr=0.1, backend=backend)
    for p in leaves:
        p.grad = torch.ones(4, 3)
    opt.step()
