"""The Triton norm kernels (fusedopt/backends/triton/norm.py) against torch.

Without a GPU they run on CPU tensors in the Triton interpreter: like test_backends_triton.py,
this module sets ``TRITON_INTERPRET=1`` when it is imported, before the kernels are defined.
"""
from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import fusedopt  # noqa: E402
from fusedopt.backends.triton import compat  # noqa: E402
from fusedopt.backends.triton import config as triton_config  # noqa: E402
from fusedopt.backends.triton import interpreting  # noqa: E402
from torch_oracles import get_total_norm  # noqa: E402  (torch.nn.utils' on torch >= 2.6)

DEVICE = "cpu" if interpreting() else "cuda"
#: why this triton's interpreter cannot run the kernels with this numpy (compat.py), or None
INTERPRETER_PROBLEM = compat.interpreter_problem() if interpreting() else None
pytestmark = [pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                 reason="needs a GPU or TRITON_INTERPRET=1"),
              pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM))]
#: tiles of 32 elements, 2 per program: small tensors still span several programs
SMALL_CONFIG = "float32=32x2x4,bfloat16=32x2x4,float16=32x2x4"


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setenv(triton_config.ENV_VAR, SMALL_CONFIG)


def grads(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE) for s in shapes]


SHAPES = [(5, 3), (17,), (0,), (200,), (1,), (64, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")], ids=str)
def test_triton_norm_matches_torch(norm_type, dtype):
    from fusedopt.backends.triton import norm as triton_norm
    shapes = [s for s in SHAPES if not (math.isinf(norm_type) and s == (0,))]
    tensors = grads(shapes, dtype)
    before = sum(triton_norm.LAUNCHES.values())
    ours = fusedopt.get_total_norm(tensors, norm_type, backend="triton")
    assert sum(triton_norm.LAUNCHES.values()) - before == 2  # one dtype: partials + finish
    exact = get_total_norm([t.double() for t in tensors], norm_type)
    assert ours.dtype == dtype
    tol = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    torch.testing.assert_close(ours.double().cpu(), exact.cpu(), rtol=2 * tol, atol=0)


def test_triton_norm_mixed_dtypes_nan_and_strided():
    from fusedopt.backends.triton import norm as triton_norm
    tensors = grads([(7,), (100,)], torch.float32) + grads([(33,)], torch.bfloat16, seed=1)
    tensors.append(torch.randn(40, 2, device=DEVICE)[:, 0])  # not dense: torch handles it
    exact = get_total_norm([t.double() for t in tensors])
    ours = triton_norm.total_norm(tensors, 2.0)
    torch.testing.assert_close(ours.double().cpu(), exact.cpu(), rtol=1e-6, atol=0)
    tensors[1][50] = float("nan")
    for p in (2.0, float("inf")):
        assert torch.isnan(triton_norm.total_norm(tensors, p))
    tensors[1][50] = float("inf")
    assert torch.isinf(triton_norm.total_norm(tensors, float("inf")))


def test_optimizer_max_grad_norm_with_triton_backend():
    params = [t.requires_grad_() for t in grads([(5, 3), (200,)], torch.float32)]
    theirs = [p.detach().clone().requires_grad_() for p in params]
    ours = fusedopt.optim.AdamW(params, lr=1e-2, max_grad_norm=0.5, backend="triton")
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    for step in range(3):
        for p, q, g in zip(params, theirs, grads([(5, 3), (200,)], torch.float32, seed=10 + step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        ref.step()
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p, q, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_norm_prescale(dtype):
    """prescale multiplies every element before its term (the optimizers pass GradScaler's
    1 / scale): the norm of the unscaled values, also where the scaled ones overflow float32."""
    from fusedopt.backends.triton import norm as triton_norm
    tensors = grads([s for s in SHAPES if s != (0,)], torch.float64)
    huge = [(t * 2.0 ** 100).to(dtype) for t in tensors]
    for norm_type in (2.0, 1.0, float("inf")):
        ours = triton_norm.total_norm(huge, norm_type, torch.tensor(2.0 ** -100, device=DEVICE))
        want = get_total_norm([t.to(dtype).double() for t in tensors], norm_type)
        tol = 1e-6 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(ours.double().cpu(), want.cpu(), rtol=tol, atol=0)


def test_triton_norm_tables_follow_dtype_and_layout_at_one_address():
    """The cached tables are keyed on addresses: memory reused by a tensor of another dtype or
    layout with the same element count (a freed gradient's memory, often, on a GPU) must build
    new tables, not read the new tensor through the old ones."""
    # integers: exact in bf16, so each float32's low half is 0 and its high half is the
    # value in bf16; the bf16 view of the buffer is 0, 0, 0, 1, 0, 2, ... (a sane tensor)
    buf = torch.arange(64.0, device=DEVICE).reshape(8, 8)
    rows, cols = buf[:4], buf[:, :4]  # same address, 32 elements each; cols is not dense
    as_bf16 = buf.view(-1).view(torch.bfloat16)[:64]  # same address and numel as buf, bf16
    for tensors in ([buf], [as_bf16], [rows], [cols], [buf]):
        ours = fusedopt.get_total_norm(tensors, 2.0, backend="triton")
        want = torch.linalg.vector_norm(tensors[0].double())
        torch.testing.assert_close(ours.double().cpu(), want.cpu(), rtol=1e-2, atol=0)
