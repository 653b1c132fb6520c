"""DTensor params and gradients (FSDP2, tensor parallel): fusedopt._dtensor and its users.

On one gloo rank (this process) a DTensor's local shard is the whole tensor, so a step on
DTensors must equal the same step on plain tensors bit for bit, and torch.optim's step on the same
DTensors within rounding. Two spawned gloo ranks check what needs real shards: norms reduced
over the mesh (uneven shards, several layouts, 2-D meshes, NaN on one rank only), clipping in the
step (eager and compiled), FSDP2 (``fully_shard``) and tensor-parallel training loops against
torch.optim's, GradScaler with FSDP2, and torch.distributed.checkpoint between torch.optim and
fusedopt; and, in the same spawn, ZeroRedundancyOptimizer with fusedopt as its optimizer class.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt
from conftest import backend_params, no_host_sync
from fusedopt import _compiling, _dtensor, backends
from torch_oracles import TORCH_VERSION, clip_grads_with_norm_, get_total_norm

pytestmark = pytest.mark.skipif(not dist.is_available() or _dtensor.DTensor is None,
                                reason="torch without distributed support")

if _dtensor.DTensor is not None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

CPU_MISSING = backends.available()["cpu"]
#: FSDP2 (fully_shard) runs on CPU from torch 2.7: torch 2.5's needs CUDA streams ("FSDP requires
#: CUDA for streams") and 2.6's CPU streams lack record_event (added in 2.7, pytorch/pytorch#145935).
#: (In 2.7 and 2.8 it sums the gradients over gloo ranks instead of averaging them,
#: pytorch/pytorch#162338; the checks here compare fusedopt with torch.optim on the same FSDP2
#: gradients, so they hold there too. fusedopt.train refuses those releases: tests/test_train.py.)
FSDP2_RUNS_ON_CPU = TORCH_VERSION >= (2, 7)
OPTIMIZERS = {
    "adamw": ("AdamW", dict(lr=0.05, weight_decay=0.1)),
    "adam-amsgrad": ("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.01)),
    "adamw-maximize": ("AdamW", dict(lr=0.05, maximize=True)),
    "sgd-nesterov": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd-dampening": ("SGD", dict(lr=0.1, momentum=0.5, dampening=0.3)),
    "sgd-plain": ("SGD", dict(lr=0.1)),
}


@pytest.fixture(scope="module")
def process_group():
    """A one-rank process group: gloo, plus nccl for CUDA tensors where there is a GPU."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def mesh(process_group):
    """The 1-D CPU mesh of the one-rank process group."""
    return init_device_mesh("cpu", (1,))


def dtensor_params(mesh, placements, dtype=torch.float32, seed=0, shapes=((7, 5), (4,), (3, 2, 3))):
    """DTensor params with DTensor grads, and plain clones of both."""
    g = torch.Generator().manual_seed(seed)
    dts, plains = [], []
    for shape in shapes:
        value = torch.randn(shape, generator=g).to(dtype)
        grad = torch.randn(shape, generator=g).to(dtype)
        p = torch.nn.Parameter(distribute_tensor(value.clone(), mesh, placements))
        p.grad = distribute_tensor(grad.clone(), mesh, placements)
        q = torch.nn.Parameter(value.clone())
        q.grad = grad.clone()
        dts.append(p)
        plains.append(q)
    return dts, plains


def new_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        value = torch.randn(p.shape, generator=g).to(p.dtype)
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(value, p.device_mesh, p.placements)
        else:
            p.grad = value


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def train_clipped_pair(ours, opt_ours, theirs, opt_theirs, batches, max_norm: float):
    """Train two copies of a model on the same ``(x, y)`` batches: ``opt_ours`` clips inside
    its step (``max_grad_norm``), ``opt_theirs`` after torch's ``clip_grad_norm_``. Returns the
    pre-clip norms of each step as (ours, torch's) pairs."""
    norms = []
    for x, y in batches:
        for net in (ours, theirs):
            torch.nn.functional.mse_loss(net(x), y).backward()
        theirs_norm = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), max_norm)
        opt_ours.step()
        opt_theirs.step()
        norms.append((opt_ours.last_grad_norm, full(theirs_norm)))
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
    return norms


def step_both(first, first_params, second, second_params, steps: int) -> None:
    """``steps`` steps of two optimizers, both given the same new gradients after each."""
    for step in range(steps):
        first.step()
        second.step()
        new_grads(first_params, step)
        new_grads(second_params, step)


# ------------------------------------------------------------------------- one rank
@pytest.mark.parametrize("backend", backend_params())  # cpu (where built) and reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("placement", ["shard0", "replicate"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_on_dtensors_equals_step_on_plain_tensors(mesh, name, placement, dtype, backend):
    cls_name, kw = OPTIMIZERS[name]
    placements = [Shard(0)] if placement == "shard0" else [Replicate()]
    dts, plains = dtensor_params(mesh, placements, dtype)
    cls = getattr(fusedopt.optim, cls_name)
    on_dt = cls(dts, backend=backend, **kw)
    on_plain = cls(plains, backend=backend, **kw)
    step_both(on_dt, dts, on_plain, plains, 3)
    for p, q in zip(dts, plains):
        assert isinstance(p, DTensor) and p.placements == tuple(placements)
        torch.testing.assert_close(full(p), q, rtol=0, atol=0)
        for key, value in on_dt.state[p].items():
            expected = on_plain.state[q][key]
            if key == "step":
                assert not isinstance(value, DTensor)
            else:  # torch.optim's state layout: a DTensor like the param
                assert isinstance(value, DTensor) and value.placements == p.placements, key
            torch.testing.assert_close(full(value), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_on_dtensors_matches_torch_optim_and_checkpoints_interchange(mesh, name):
    cls_name, kw = OPTIMIZERS[name]
    ours_params, _ = dtensor_params(mesh, [Shard(0)])
    torch_params, _ = dtensor_params(mesh, [Shard(0)])
    ours = getattr(fusedopt.optim, cls_name)(ours_params, **kw)
    theirs = getattr(torch.optim, cls_name)(torch_params, **kw)
    step_both(ours, ours_params, theirs, torch_params, 2)
    for p, q in zip(ours_params, torch_params):
        torch.testing.assert_close(full(p), full(q), rtol=2e-6, atol=2e-6)
    # torch's DTensor state into fusedopt and fusedopt's back into torch, then one more step each
    resumed = getattr(fusedopt.optim, cls_name)(ours_params, **kw)
    resumed.load_state_dict(copy.deepcopy(theirs.state_dict()))
    back = getattr(torch.optim, cls_name)(torch_params, **kw)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    with torch.no_grad():
        for p, q in zip(ours_params, torch_params):
            p.copy_(q)
    resumed.step()
    back.step()
    for p, q in zip(ours_params, torch_params):
        torch.testing.assert_close(full(p), full(q), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.5, float("inf"), float("-inf")])
def test_clip_grad_norm_on_dtensors_matches_torch(mesh, norm_type):
    ours, _ = dtensor_params(mesh, [Shard(0)], seed=3)
    theirs, _ = dtensor_params(mesh, [Shard(0)], seed=3)
    got = fusedopt.clip_grad_norm_(ours, 0.5, norm_type)
    want = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type, foreach=True)
    assert isinstance(got, DTensor) and got.placements == (Replicate(),)
    torch.testing.assert_close(full(got), full(want), rtol=2e-6, atol=0)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(full(p.grad), full(q.grad), rtol=2e-6, atol=1e-7)
    total = fusedopt.get_total_norm([p.grad for p in ours], norm_type)
    assert isinstance(total, DTensor)
    # clip_grads_with_norm_ takes the DTensor norm torch's get_total_norm returns
    fusedopt.clip_grads_with_norm_(ours, 0.25, total)
    clip_grads_with_norm_(theirs, 0.25, get_total_norm([q.grad for q in theirs], norm_type))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(full(p.grad), full(q.grad), rtol=2e-6, atol=1e-7)


def test_clip_grad_value_and_percentile_clipper_on_dtensors(mesh):
    ours, plain = dtensor_params(mesh, [Shard(0)], seed=4)
    fusedopt.clip_grad_value_(ours, 0.3)
    fusedopt.clip_grad_value_(plain, 0.3)
    for p, q in zip(ours, plain):
        torch.testing.assert_close(full(p.grad), q.grad, rtol=0, atol=0)
    on_dt, on_plain = fusedopt.PercentileClipper(percentile=50), fusedopt.PercentileClipper(percentile=50)
    for step in range(3):
        new_grads(ours, step)
        new_grads(plain, step)
        torch.testing.assert_close(on_dt(ours), on_plain(plain))
    for p, q in zip(ours, plain):
        torch.testing.assert_close(full(p.grad), q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_max_grad_norm_in_the_step_on_dtensors(mesh, skip_nonfinite):
    ours, plain = dtensor_params(mesh, [Shard(0)], seed=5)
    on_dt = fusedopt.optim.AdamW(ours, lr=0.05, max_grad_norm=0.5, skip_nonfinite=skip_nonfinite)
    on_plain = fusedopt.optim.AdamW(plain, lr=0.05, max_grad_norm=0.5, skip_nonfinite=skip_nonfinite)
    on_dt.step()
    on_plain.step()
    torch.testing.assert_close(on_dt.last_grad_norm, on_plain.last_grad_norm, rtol=1e-6, atol=0)
    for p, q in zip(ours, plain):
        torch.testing.assert_close(full(p), q, rtol=1e-6, atol=1e-7)
    if skip_nonfinite:
        before = [full(p).clone() for p in ours]
        new_grads(ours, 9)
        ours[0].grad.to_local()[1, 2] = float("inf")
        on_dt.step()
        assert int(on_dt.skipped_steps) == 1
        for p, b in zip(ours, before):
            torch.testing.assert_close(full(p), b, rtol=0, atol=0)


def test_gradient_with_another_placement_is_redistributed(mesh):
    ours, plain = dtensor_params(mesh, [Shard(0)], seed=6)
    for p in ours:  # a Replicate gradient for a Shard(0) param
        p.grad = p.grad.redistribute(mesh, [Replicate()])
    on_dt = fusedopt.optim.SGD(ours, lr=0.1, momentum=0.9)
    on_plain = fusedopt.optim.SGD(plain, lr=0.1, momentum=0.9)
    on_dt.step()
    on_plain.step()
    for p, q in zip(ours, plain):
        torch.testing.assert_close(full(p), q, rtol=0, atol=0)


def test_a_param_given_a_new_local_tensor_is_stepped_there(mesh):
    """FSDP2 may replace a sharded param's local tensor (reset_sharded_param, e.g. to pin CPU
    memory): the next step must update the new one, not a cached view of the old one."""
    ours, plain = dtensor_params(mesh, [Shard(0)], seed=10)
    on_dt = fusedopt.optim.AdamW(ours, lr=0.05)
    on_plain = fusedopt.optim.AdamW(plain, lr=0.05)
    on_dt.step()
    on_plain.step()
    old = ours[0]._local_tensor
    ours[0]._local_tensor = old.clone()
    on_dt.step()
    on_plain.step()
    torch.testing.assert_close(ours[0].to_local(), plain[0].detach(), rtol=0, atol=0)
    assert not torch.equal(old, ours[0]._local_tensor)


def compile_step(step):
    """``torch.compile(step)``: in one graph (fullgraph=True) where this torch's dynamo traces
    ``optimizer.step()`` (fusedopt._compiling.STEP_TRACEABLE, torch >= 2.10); on older torch the
    compiled region breaks its graph around the step, which runs eagerly outside it (the same
    numbers; fullgraph=True refuses there, by design: tests/test_optim.py checks both)."""
    return torch.compile(step, fullgraph=_compiling.STEP_TRACEABLE, backend="aot_eager")


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_compiled_step_on_dtensors(mesh, max_grad_norm):
    """torch.compile of a step over DTensor params (one graph where torch can trace it, see
    compile_step): eager's numbers on plain ones."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ours, plain = dtensor_params(mesh, [Shard(0)], seed=11)
    on_dt = fusedopt.optim.AdamW(ours, lr=0.05, max_grad_norm=max_grad_norm)
    on_plain = fusedopt.optim.AdamW(plain, lr=0.05, max_grad_norm=max_grad_norm)
    step = compile_step(on_dt.step)
    for _ in range(3):
        step()
        on_plain.step()
    for p, q in zip(ours, plain):
        torch.testing.assert_close(full(p), q, rtol=0, atol=0)
    if not _compiling.STEP_TRACEABLE:  # the step ran outside the graph
        assert sum(counters["graph_break"].values()) >= 1, dict(counters["graph_break"])


def test_functional_step_on_dtensors(mesh):
    ours, plain = dtensor_params(mesh, [Shard(0)], seed=7)
    def state(params):
        return ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],
                [torch.zeros(()) for _ in params])
    for params in (ours, plain):
        m, v, steps = state(params)
        fusedopt.functional.adam_(params, [p.grad for p in params], m, v, [], steps, lr=0.1,
                                  beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    for p, q in zip(ours, plain):
        torch.testing.assert_close(full(p), q, rtol=0, atol=0)
    m, v, steps = state(plain)  # plain state for DTensor params: refused
    with pytest.raises(ValueError, match="a state tensor is a plain tensor, but its parameter is a DTensor"):
        fusedopt.functional.adam_(ours, [p.grad for p in ours], m, v, [], steps, lr=0.1,
                                  beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)
    m, v, steps = state(ours)  # a state that is the DTensor param itself: its shard is shared
    m[0] = ours[0]
    with pytest.raises(ValueError, match="share memory"):
        fusedopt.functional.adam_(ours, [p.grad for p in ours], m, v, [], steps, lr=0.1,
                                  beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0)


def test_errors_name_the_problem(mesh):
    ours, plain = dtensor_params(mesh, [Shard(0)], seed=8)
    with pytest.raises(ValueError, match="DTensors and plain tensors together"):
        fusedopt.clip_grad_norm_(ours + plain, 1.0)
    with pytest.raises(ValueError, match="norm_type=0"):
        fusedopt.get_total_norm([p.grad for p in ours], 0.0)
    mixed = fusedopt.optim.AdamW(ours + plain, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="need every parameter to be a DTensor"):
        mixed.step()
    fusedopt.optim.AdamW(ours + plain).step()  # without a global norm, mixing is fine
    opt = fusedopt.optim.AdamW(ours)
    opt.step()
    opt.state[ours[0]]["exp_avg"] = torch.zeros(ours[0].shape)  # e.g. a full-tensor checkpoint
    opt._invalidate()
    with pytest.raises(ValueError, match="state 'exp_avg' is a plain tensor, but its parameter is a DTensor"):
        opt.step()


# ------------------------------------------------------------------------- two ranks
def _two_rank_worker(rank: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        _check_sharded_norms(rank)
        _check_step_with_clipping(rank)
        _check_compiled_step_with_clipping()
        if FSDP2_RUNS_ON_CPU:
            _check_fsdp2_training(rank)
            _check_distributed_checkpoints(rank, os.path.dirname(store_path))
            _check_grad_scaler_with_fsdp2(rank)
        _check_tensor_parallel_training(rank)
        _check_zero_redundancy_optimizer(rank)
    finally:
        dist.destroy_process_group()


def _same_on_every_rank(value: torch.Tensor) -> None:
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value.contiguous())
    for other in gathered:
        torch.testing.assert_close(other, gathered[0], rtol=0, atol=0, equal_nan=True)


def _check_sharded_norms(rank: int) -> None:
    mesh = init_device_mesh("cpu", (2,))
    mesh2d = init_device_mesh("cpu", (2, 1))
    g = torch.Generator().manual_seed(11)  # the same full tensors on both ranks
    values = [torch.randn(7, 3, generator=g), torch.randn(3, 5, generator=g),
              torch.randn(6, generator=g), torch.randn(1, 4, generator=g),
              torch.randn(5, 2, generator=g).to(torch.bfloat16)]
    layouts = [(mesh, [Shard(0)]), (mesh, [Shard(1)]), (mesh, [Replicate()]), (mesh, [Shard(0)]),
               (mesh2d, [Shard(0), Replicate()])]  # (1, 4) over 2 ranks: one shard is empty
    dts = [distribute_tensor(v, m, pl) for v, (m, pl) in zip(values, layouts)]
    collectives = []
    reduce = fusedopt._dtensor.reduce_over_shards

    def counted(value, mesh_, dims, op):
        collectives.append((mesh_, tuple(dims)))
        return reduce(value, mesh_, dims, op)

    fusedopt._dtensor.reduce_over_shards = counted
    try:
        for norm_type in (2.0, 1.0, 3.0, float("inf"), float("-inf")):
            collectives.clear()
            got = fusedopt.get_total_norm(dts, norm_type)
            want = get_total_norm([v.double() for v in values], norm_type)
            torch.testing.assert_close(full(got), want.float(), rtol=1e-6, atol=0)
            _same_on_every_rank(full(got))
            # one collective per (mesh, sharded dims): Shard(0) and Shard(1) share one
            assert sorted(collectives, key=str) == sorted([(mesh, (0,)), (mesh2d, (0,))], key=str)
    finally:
        fusedopt._dtensor.reduce_over_shards = reduce
    # huge values: each shard's sum of squares fits float32, their sum does not, the norm does
    huge = [distribute_tensor(torch.full((2, 1), 1.5e19), mesh, [Shard(0)])]
    want = get_total_norm([torch.full((2, 1), 1.5e19, dtype=torch.float64)], 2.0)
    torch.testing.assert_close(full(fusedopt.get_total_norm(huge, 2.0)), want.float(), rtol=1e-6,
                               atol=0)
    # NaN in one rank's shard only: every norm is NaN on both ranks
    poisoned = [distribute_tensor(v, mesh, [Shard(0)]) for v in values[:2]]
    if rank == 1:
        poisoned[0].to_local()[0, 0] = float("nan")
    for norm_type in (2.0, float("inf"), float("-inf")):
        got = full(fusedopt.get_total_norm(poisoned, norm_type))
        assert torch.isnan(got), (norm_type, got)


def _check_step_with_clipping(rank: int) -> None:
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(12)
    values = [torch.randn(7, 3, generator=g), torch.randn(9, generator=g), torch.randn(2, 6, generator=g)]
    grads = [[torch.randn(v.shape, generator=g) for v in values] for _ in range(3)]
    placements = [[Shard(0)], [Shard(0)], [Shard(1)]]
    dts = [torch.nn.Parameter(distribute_tensor(v, mesh, pl)) for v, pl in zip(values, placements)]
    plain = [torch.nn.Parameter(v.clone()) for v in values]  # the whole model on this rank
    on_dt = fusedopt.optim.AdamW(dts, lr=0.05, max_grad_norm=0.8, skip_nonfinite=True)
    on_plain = fusedopt.optim.AdamW(plain, lr=0.05, max_grad_norm=0.8, skip_nonfinite=True)
    for step_grads in grads:
        for p, q, grad, pl in zip(dts, plain, step_grads, placements):
            p.grad = distribute_tensor(grad, mesh, pl)
            q.grad = grad.clone()
        on_dt.step()
        on_plain.step()
        torch.testing.assert_close(on_dt.last_grad_norm, on_plain.last_grad_norm, rtol=1e-6, atol=0)
    for p, q in zip(dts, plain):
        torch.testing.assert_close(full(p), q, rtol=1e-6, atol=1e-7)
    # an inf on rank 0 only: the step is skipped on both ranks
    before = [full(p).clone() for p in dts]
    for p, grad, pl in zip(dts, grads[0], placements):
        p.grad = distribute_tensor(grad, mesh, pl)
    if rank == 0:
        dts[0].grad.to_local()[0, 0] = float("inf")
    on_dt.step()
    assert int(on_dt.skipped_steps) == 1
    for p, b in zip(dts, before):
        torch.testing.assert_close(full(p), b, rtol=0, atol=0)


def _check_compiled_step_with_clipping() -> None:
    """torch.compile of a step whose norm is reduced over 2 ranks (compile_step): eager's numbers."""
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(14)
    values = [torch.randn(7, 3, generator=g), torch.randn(9, generator=g)]
    grads = [[torch.randn(v.shape, generator=g) for v in values] for _ in range(3)]
    result = {}
    for mode in ("eager", "compiled"):
        params = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for v in values]
        opt = fusedopt.optim.AdamW(params, lr=0.05, max_grad_norm=0.5, skip_nonfinite=True)
        step = opt.step if mode == "eager" else compile_step(opt.step)
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = distribute_tensor(grad, mesh, [Shard(0)])
            step()
        result[mode] = [full(p) for p in params] + [opt.last_grad_norm]
    for compiled, eager in zip(result["compiled"], result["eager"]):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def _fsdp2_model():
    from fusedopt.train.sharding import fully_shard_fn

    fully_shard = fully_shard_fn()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    for layer in (net[0], net[2]):
        fully_shard(layer)
    fully_shard(net)
    return net


def _train(net, opt, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + dist.get_rank())  # each rank its own batches
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        opt.zero_grad()


def _check_distributed_checkpoints(rank: int, directory: str) -> None:
    """torch.distributed.checkpoint's state-dict APIs (sharded and full) and dcp.save / load move
    optimizer state between torch.optim and fusedopt: loading into fusedopt gives what loading
    into torch.optim gives (both then take the same steps)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    classes = {"torch": torch.optim.AdamW, "fusedopt": fusedopt.optim.AdamW}
    sharded = (StateDictOptions(), StateDictOptions())
    gathered = (StateDictOptions(full_state_dict=True, cpu_offload=True),
                StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for source in classes:
        src_net = _fsdp2_model()
        src_opt = classes[source](src_net.parameters(), lr=0.01)
        _train(src_net, src_opt, 3, 0)
        for get_options, set_options in (sharded, gathered):
            saved = get_optimizer_state_dict(src_net, src_opt, options=get_options)
            results = {}
            for dest in classes:
                net = _fsdp2_model()
                net.load_state_dict(src_net.state_dict())
                opt = classes[dest](net.parameters(), lr=0.01)
                set_optimizer_state_dict(net, opt, copy.deepcopy(saved), options=set_options)
                _train(net, opt, 2, 10)
                results[dest] = [full(p) for p in net.parameters()]
            for ours, theirs in zip(results["fusedopt"], results["torch"]):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        # dcp.save of this optimizer's state, dcp.load into each kind
        checkpoint = os.path.join(directory, f"dcp-{source}")
        dcp.save({"optim": get_optimizer_state_dict(src_net, src_opt)}, checkpoint_id=checkpoint)
        results = {}
        for dest in classes:
            net = _fsdp2_model()
            net.load_state_dict(src_net.state_dict())
            opt = classes[dest](net.parameters(), lr=0.01)
            target = {"optim": get_optimizer_state_dict(net, opt)}
            dcp.load(target, checkpoint_id=checkpoint)
            set_optimizer_state_dict(net, opt, target["optim"])
            _train(net, opt, 2, 10)
            results[dest] = [full(p) for p in net.parameters()]
        for ours, theirs in zip(results["fusedopt"], results["torch"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _check_grad_scaler_with_fsdp2(rank: int) -> None:
    """GradScaler with FSDP2: fusedopt's steps equal torch.optim's, and an inf in one rank's
    shard skips the step on both ranks (params, state and step counters unchanged)."""
    nets = {"torch": _fsdp2_model(), "fusedopt": _fsdp2_model()}
    opts = {"torch": torch.optim.AdamW(nets["torch"].parameters(), lr=0.01),
            "fusedopt": fusedopt.optim.AdamW(nets["fusedopt"].parameters(), lr=0.01)}
    scalers = {name: torch.amp.GradScaler("cpu", init_scale=2.0 ** 4) for name in nets}
    g = torch.Generator().manual_seed(200 + rank)
    for step in range(4):
        x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
        for name, net in nets.items():
            scalers[name].scale(torch.nn.functional.mse_loss(net(x), y)).backward()
            if step == 2 and rank == 1:
                next(net.parameters()).grad.to_local()[0, 0] = float("inf")
            before = [full(p).clone() for p in net.parameters()]
            scalers[name].step(opts[name])
            scalers[name].update()
            opts[name].zero_grad()
            if step == 2:
                for p, b in zip(net.parameters(), before):
                    torch.testing.assert_close(full(p), b, rtol=0, atol=0)
    assert scalers["fusedopt"].get_scale() == scalers["torch"].get_scale()
    for p, q in zip(nets["fusedopt"].parameters(), nets["torch"].parameters()):
        torch.testing.assert_close(full(p), full(q), rtol=1e-5, atol=1e-6)
    first = next(nets["fusedopt"].parameters())
    assert float(opts["fusedopt"].state[first]["step"]) == 3  # the skipped step was not counted


def _check_tensor_parallel_training(rank: int) -> None:
    """Tensor parallelism (colwise then rowwise Linear: Shard(0), Shard(1) and Replicate params
    in one optimizer): AdamW with max_grad_norm equals torch's clip_grad_norm_ + AdamW."""
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    mesh = init_device_mesh("cpu", (2,))

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        return parallelize_module(net, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})

    ours, theirs = model(), model()
    assert {tuple(p.placements) for p in ours.parameters()} == {
        (Shard(0),), (Shard(1),), (Replicate(),)}
    opt_ours = fusedopt.optim.AdamW(ours.parameters(), lr=0.01, max_grad_norm=0.3)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(5)  # the same batches on both ranks
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)) for _ in range(4)]
    for our_norm, torch_norm in train_clipped_pair(ours, opt_ours, theirs, opt_theirs, batches, 0.3):
        torch.testing.assert_close(our_norm, torch_norm, rtol=1e-6, atol=0)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(full(p), full(q), rtol=1e-5, atol=1e-6)


def _check_zero_redundancy_optimizer(rank: int) -> None:
    """Not DTensors, but the same two ranks: ZeRO-1 (torch's ZeroRedundancyOptimizer over DDP)
    with fusedopt.optim.AdamW as its optimizer_class trains like it does with torch's."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    result = {}
    for name, cls in (("torch", torch.optim.AdamW), ("fusedopt", fusedopt.optim.AdamW)):
        torch.manual_seed(0)
        net = DistributedDataParallel(torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)))
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=cls, lr=0.01)
        _train(net, opt, 4, 300)
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            assert len(opt.state_dict()["state"]) == 4
        result[name] = [p.detach().clone() for p in net.parameters()]
    for ours, theirs in zip(result["fusedopt"], result["torch"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _check_fsdp2_training(rank: int) -> None:
    ours, theirs = _fsdp2_model(), _fsdp2_model()
    opt_ours = fusedopt.optim.AdamW(ours.parameters(), lr=0.01, max_grad_norm=0.5)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(4)]
    train_clipped_pair(ours, opt_ours, theirs, opt_theirs, batches, 0.5)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert isinstance(p, DTensor)
        torch.testing.assert_close(full(p), full(q), rtol=1e-5, atol=1e-6)
        _same_on_every_rank(full(p))
    for key in ("exp_avg", "exp_avg_sq"):
        value = opt_ours.state[next(ours.parameters())][key]
        assert isinstance(value, DTensor) and value.placements == (Shard(0),)


def test_two_ranks_sharded_norms_clipped_steps_and_fsdp2_training(tmp_path):
    """Everything of _two_rank_worker; the FSDP2 checks where FSDP2 runs on CPU (torch >= 2.7,
    FSDP2_RUNS_ON_CPU)."""
    os.environ.pop("FUSEDOPT_BACKEND", None)
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)


# ------------------------------------------------------------------------- GPU (one rank)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_step_on_dtensors_equals_plain_and_does_not_sync(process_group, backend):
    reason = backends.available().get(backend)
    if reason:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    cuda_mesh = init_device_mesh("cuda", (1,))
    ours, plain = [], []
    g = torch.Generator().manual_seed(13)
    for shape in [(33, 7), (4097,), (2, 3, 5)]:
        value, grad = torch.randn(shape, generator=g).cuda(), torch.randn(shape, generator=g).cuda()
        p = torch.nn.Parameter(distribute_tensor(value.clone(), cuda_mesh, [Shard(0)]))
        p.grad = distribute_tensor(grad.clone(), cuda_mesh, [Shard(0)])
        q = torch.nn.Parameter(value.clone())
        q.grad = grad.clone()
        ours.append(p)
        plain.append(q)
    kw = dict(lr=0.05, max_grad_norm=0.5, skip_nonfinite=True, backend=backend)
    on_dt, on_plain = fusedopt.optim.AdamW(ours, **kw), fusedopt.optim.AdamW(plain, **kw)
    on_dt.step()  # the first step creates state and tables
    on_plain.step()
    torch.cuda.synchronize()
    with no_host_sync():
        on_dt.step()
        fusedopt.clip_grad_norm_(ours, 1.0)
    on_plain.step()
    fusedopt.clip_grad_norm_(plain, 1.0)
    for p, q in zip(ours, plain):
        torch.testing.assert_close(full(p), q, rtol=0, atol=0)
        torch.testing.assert_close(full(p.grad), q.grad, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_fsdp2_training_matches_torch_optim(process_group):
    """FSDP2 on one GPU: fusedopt.optim.AdamW (the backend auto picks for CUDA) with
    max_grad_norm equals torch's clip_grad_norm_ + AdamW(fused=True)."""
    from fusedopt.train.sharding import fully_shard_fn

    fully_shard = fully_shard_fn()
    mesh = init_device_mesh("cuda", (1,))

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        net = net.cuda()
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh)
        return fully_shard(net, mesh=mesh)

    ours, theirs = model(), model()
    opt_ours = fusedopt.optim.AdamW(ours.parameters(), lr=0.01, max_grad_norm=0.5)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=0.01, fused=True)
    g = torch.Generator(device="cuda").manual_seed(7)
    batches = [(torch.randn(16, 32, device="cuda", generator=g),
                torch.randn(16, 8, device="cuda", generator=g)) for _ in range(4)]
    train_clipped_pair(ours, opt_ours, theirs, opt_theirs, batches, 0.5)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert isinstance(p, DTensor) and p.device.type == "cuda"
        torch.testing.assert_close(full(p), full(q), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.skipif(CPU_MISSING is not None, reason=f"cpu backend: {CPU_MISSING}")
def test_gpu_fsdp2_cpu_offload_steps_the_shards_on_the_cpu(process_group):
    """FSDP2 with CPUOffloadPolicy (params, grads and state on the CPU, compute on the GPU):
    fusedopt's CPU kernels step the shards (what DeepSpeed's CPUAdam does for ZeRO-Offload),
    with max_grad_norm, and match torch's clip_grad_norm_ + AdamW on the same setup."""
    from fusedopt.train.sharding import fully_shard_fn

    try:
        from torch.distributed.fsdp import CPUOffloadPolicy
    except ImportError:  # torch 2.5
        from torch.distributed._composable.fsdp import CPUOffloadPolicy
    fully_shard = fully_shard_fn()
    mesh = init_device_mesh("cuda", (1,))

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh, offload_policy=CPUOffloadPolicy())
        return fully_shard(net, mesh=mesh, offload_policy=CPUOffloadPolicy())

    ours, theirs = model(), model()
    opt_ours = fusedopt.optim.AdamW(ours.parameters(), lr=0.01, max_grad_norm=0.5, backend="cpu")
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=0.01)
    g = torch.Generator(device="cuda").manual_seed(8)
    batches = [(torch.randn(16, 32, device="cuda", generator=g),
                torch.randn(16, 8, device="cuda", generator=g)) for _ in range(4)]
    norms = train_clipped_pair(ours, opt_ours, theirs, opt_theirs, batches, 0.5)
    for ours_norm, theirs_norm in norms:
        torch.testing.assert_close(full(ours_norm).cpu(), theirs_norm.cpu(), rtol=1e-5, atol=0)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert isinstance(p, DTensor) and p.to_local().device.type == "cpu"
        assert opt_ours.state[p]["exp_avg"].to_local().device.type == "cpu"
        torch.testing.assert_close(full(p), full(q), rtol=1e-5, atol=1e-6)
