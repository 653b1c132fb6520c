"""fusedopt.functional: lists in, one dispatch point out; same numbers as the optimizers."""
from __future__ import annotations

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
