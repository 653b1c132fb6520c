"""Tests of the training harness ``fusedopt.train`` (CPU only, 2 gloo ranks where distributed).

Every run uses a tiny model so the file stays fast on a 2-core machine.  Runs in
this process use one CPU thread; 2-rank runs are spawned (torch.multiprocessing)
or launched with torchrun in a subprocess.
"""

from __future__ import annotations

import json
import os
import math
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fusedopt import backends

from fusedopt.train import checkpoint as ckpt
from fusedopt.train.config import (ConfigError, TrainConfig, build_parser, config_from_mapping,
                                   parse_config)
from fusedopt.train.data import VOCAB_SIZE, ShardedBatchSampler, embedded_text_files, load_corpus
from fusedopt.train.distributed import DistContext
from fusedopt.train.loop import Trainer, train
from fusedopt.train.metrics import read_jsonl
from fusedopt.train.model import CharTransformer, build_model, param_groups
from fusedopt.train.optimizers import build_scheduler
from torch_oracles import TORCH_VERSION

REPO = Path(__file__).resolve().parents[1]
CPU_BACKEND_MISSING = backends.available()["cpu"]
METRIC_KEYS = ("loss", "lr", "grad_norm", "eval_loss")


def tiny_cfg(out_dir, **overrides) -> TrainConfig:
    """A config that trains in milliseconds per step on one CPU thread."""
    base = dict(data="synthetic", seq_len=16, n_layer=1, n_head=2, d_model=32, batch_size=8,
                max_steps=6, lr=1e-2, warmup_steps=1, log_every=1, eval_every=3, eval_sequences=32,
                save_every=0, progress=False, num_threads=1, device="cpu", out_dir=str(out_dir),
                optimizer_lib="fusedopt", backend="reference")
    base.update(overrides)
    return config_from_mapping(base)


def curve(out_dir):
    """Per-step metric records (no events, no timings) of a run's metrics.jsonl."""
    records = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    return [{k: r[k] for k in ("step",) + METRIC_KEYS if k in r} for r in records if "event" not in r]


def final_model(out_dir):
    latest = ckpt.latest_checkpoint(os.path.join(out_dir, "checkpoints"))
    return ckpt.load_full_checkpoint(latest)["model"]


def assert_curves_close(a, b, rtol=1e-5, atol=1e-6):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=rtol, abs=atol), (ra, rb)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", backends.ENV_VAR):
        env.pop(var, None)
    return env


def cli_args(cfg: TrainConfig):
    """Command-line flags reproducing ``cfg``."""
    args = []
    for key, value in cfg.to_dict().items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


# --------------------------------------------------------------- spawned workers
def _count_allreduce_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state["calls"] += 1
    return allreduce_hook(None, bucket)


def _ddp_worker(rank, world_size, port, cfg_dicts, result_path):
    """Train each config on 2 gloo ranks, counting DDP gradient all-reduces."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fusedopt.train.distributed import init_distributed

    ctx = init_distributed("cpu")
    counts = []
    for cfg_dict in cfg_dicts:
        trainer = Trainer(config_from_mapping(cfg_dict), ctx)
        state = {"calls": 0}
        trainer.model.register_comm_hook(state, _count_allreduce_hook)
        trainer.fit()
        counts.append(state["calls"])
    if rank == 0:
        Path(result_path).write_text(json.dumps(counts))
    # No destroy_process_group here. The counting hook chains a Python lambda on each all-reduce
    # future (torch's allreduce_hook does), and on torch 2.5 a gloo worker thread that is still
    # dropping such a callback needs the GIL while the main thread, holding it, joins that thread
    # in ~ProcessGroupGloo: a deadlock, seen once in CI (the test hung at 98% of the suite).
    # Once both ranks pass the barrier no collective is left; the process then ends without
    # running the destructors. (_train_worker, without Python hooks, does call cleanup().)
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_worker(rank, world_size, port, cfg_dicts):
    """Train each config, in order, on ``world_size`` gloo ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fusedopt.train.distributed import cleanup, init_distributed

    ctx = init_distributed("cpu")
    for cfg_dict in cfg_dicts:
        Trainer(config_from_mapping(cfg_dict), ctx).fit()
    cleanup(ctx)


#: FSDP2 trains correctly on CPU (gloo) from torch 2.9 (fusedopt/train/sharding.py): 2.5 needs CUDA
#: streams, 2.6's CPU streams lack record_event, 2.7 and 2.8 sum the gradients over the ranks
#: instead of averaging them (pytorch/pytorch#162338). There the harness refuses --parallel fsdp2
#: on CPU: test_fsdp2_on_cpu_is_refused_before_joining_where_torch_cannot_train_it.
FSDP2_TRAINS_ON_CPU = TORCH_VERSION >= (2, 9)
needs_fsdp2_on_cpu = pytest.mark.skipif(
    not FSDP2_TRAINS_ON_CPU,
    reason=f"FSDP2 trains correctly on CPU from torch 2.9, this is {torch.__version__} (the harness "
           "refuses it here: test_fsdp2_on_cpu_is_refused_before_joining_where_torch_cannot_train_it)")


def test_fsdp2_on_cpu_is_refused_before_joining_where_torch_cannot_train_it(tmp_path, monkeypatch):
    from fusedopt.train import sharding
    from fusedopt.train.__main__ import main

    cpu = torch.device("cpu")
    for parallel, world_size, device in (("ddp", 2, cpu), ("fsdp2", 1, cpu),
                                         ("fsdp2", 2, torch.device("cuda", 0))):
        sharding.check_supported(parallel, world_size, device)  # never refused: no FSDP2 on CPU
    cfg = tiny_cfg(tmp_path, parallel="fsdp2", max_steps=2)
    two_ranks = DistContext(rank=0, world_size=2, local_rank=0, device=cpu, backend="gloo")
    if FSDP2_TRAINS_ON_CPU:
        sharding.check_supported("fsdp2", 2, cpu)  # (the runs themselves: the tests below)
        return
    message = (r"--parallel fsdp2 on CPU needs torch >= 2\.9 \(this is torch 2\.\d"
               r".*pytorch/pytorch#162338.*--parallel ddp")
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, two_ranks)
    # the command line refuses before joining the process group: with no MASTER_ADDR, joining
    # would fail with another error
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SystemExit, match=message):
        main(cli_args(cfg))
    assert not torch.distributed.is_initialized()
    # one process trains the plain model: fsdp2 is not refused there
    monkeypatch.setenv("WORLD_SIZE", "1")
    train(cfg)
    assert [r["step"] for r in curve(tmp_path) if "loss" in r] == [1, 2]


# --------------------------------------------------------------- distributed equivalence
@needs_fsdp2_on_cpu
def test_fsdp2_matches_ddp_resumes_exactly_and_checkpoints_cross_modes(tmp_path):
    """--parallel fsdp2 on 2 ranks: the same run as ddp (rounding aside), with grad_accum; a run
    resumed from its own checkpoint equals the uninterrupted one bit for bit; its checkpoints
    resume under ddp and ddp's under fsdp2 (same format)."""
    sgd = dict(optimizer="sgd", lr=0.3, grad_accum=2, max_steps=4, n_layer=2)
    ddp = tiny_cfg(tmp_path / "ddp", parallel="ddp", save_every=2, **sgd)
    fsdp = tiny_cfg(tmp_path / "fsdp", parallel="fsdp2", save_every=2, **sgd)
    ddp_step2 = str(Path(ddp.checkpoint_dir) / "step_00000002.pt")
    fsdp_step2 = str(Path(fsdp.checkpoint_dir) / "step_00000002.pt")
    fsdp_from_ddp = tiny_cfg(tmp_path / "fsdp_from_ddp", parallel="fsdp2", resume=ddp_step2, **sgd)
    ddp_from_fsdp = tiny_cfg(tmp_path / "ddp_from_fsdp", parallel="ddp", resume=fsdp_step2, **sgd)
    adam = dict(optimizer="adamw", grad_accum=2, n_layer=2, parallel="fsdp2", save_every=2,
                scheduler="constant")  # (a schedule over max_steps would differ between halves)
    straight = tiny_cfg(tmp_path / "straight", max_steps=4, **adam)
    first_half = tiny_cfg(tmp_path / "halves", max_steps=2, **adam)
    second_half = tiny_cfg(tmp_path / "halves", max_steps=4, resume="auto", **adam)
    configs = [ddp, fsdp, fsdp_from_ddp, ddp_from_fsdp, straight, first_half, second_half]
    mp.spawn(_train_worker, args=(2, free_port(), [c.to_dict() for c in configs]), nprocs=2,
             join=True)

    assert_curves_close(curve(tmp_path / "fsdp"), curve(tmp_path / "ddp"))
    for resumed, reference in (("fsdp_from_ddp", "ddp"), ("ddp_from_fsdp", "fsdp")):
        assert_curves_close(curve(tmp_path / resumed), [r for r in curve(tmp_path / reference)
                                                        if r["step"] > 2])
    def train_records(run):  # (the first half also evaluated when it ended, at step 2)
        return [r for r in curve(tmp_path / run) if "loss" in r]
    assert train_records("halves") == train_records("straight")
    a, b = final_model(tmp_path / "halves"), final_model(tmp_path / "straight")
    model = build_model(straight, VOCAB_SIZE)
    assert set(a) == set(model.state_dict())
    for name in a:
        assert type(a[name]) is torch.Tensor and torch.equal(a[name], b[name]), name
    # a sharded run's checkpoint holds torch.optim's state dict layout, with full plain tensors
    state = ckpt.load_checkpoint(Path(straight.checkpoint_dir) / "step_00000004.pt")["optimizer"]
    assert all(isinstance(k, int) for k in state["state"])
    assert all(type(v) is torch.Tensor for s in state["state"].values() for v in s.values())
    reference = torch.optim.AdamW(param_groups(model, straight.weight_decay))
    reference.load_state_dict(state)


@needs_fsdp2_on_cpu
def test_sharded_checkpoints_are_written_by_every_rank_and_resume_under_any_world_size(tmp_path):
    """--checkpoint-format sharded with fsdp2 on 2 ranks: each rank writes its own half; a run
    resumed from one equals the uninterrupted one bit for bit (AdamW state in DTensors); the
    checkpoint resumes under ddp, and in one process (another world size), on the same path."""
    sharded = dict(checkpoint_format="sharded", save_every=2, keep_last=5, n_layer=2)
    sgd = dict(optimizer="sgd", lr=0.3, max_steps=4, **sharded)
    fsdp = tiny_cfg(tmp_path / "fsdp", parallel="fsdp2", **sgd)
    fsdp_step2 = Path(fsdp.checkpoint_dir) / ckpt.checkpoint_name(2, sharded=True)
    ddp_from_fsdp = tiny_cfg(tmp_path / "ddp_from_fsdp", parallel="ddp", resume=str(fsdp_step2), **sgd)
    adam = dict(optimizer="adamw", parallel="fsdp2", scheduler="constant", **sharded)
    straight = tiny_cfg(tmp_path / "straight", max_steps=4, **adam)
    first_half = tiny_cfg(tmp_path / "halves", max_steps=2, **adam)
    second_half = tiny_cfg(tmp_path / "halves", max_steps=4, resume="auto", **adam)
    configs = [fsdp, ddp_from_fsdp, straight, first_half, second_half]
    mp.spawn(_train_worker, args=(2, free_port(), [c.to_dict() for c in configs]), nprocs=2,
             join=True)
    with pytest.warns(UserWarning, match="written by 2 ranks, now 1"):
        train(tiny_cfg(tmp_path / "one_from_fsdp", resume=str(fsdp_step2), **sgd))

    # every rank wrote the shards it holds: two files of about half the state each
    files = {p.name: p.stat().st_size for p in fsdp_step2.iterdir()}
    assert set(files) == {".metadata", "__0_0.distcp", "__1_0.distcp", ckpt.META_NAME}
    assert 0.35 < files["__0_0.distcp"] / (files["__0_0.distcp"] + files["__1_0.distcp"]) < 0.65
    assert ckpt.load_checkpoint(fsdp_step2)["world_size"] == 2

    later = [r for r in curve(tmp_path / "fsdp") if r["step"] > 2]
    assert_curves_close(curve(tmp_path / "ddp_from_fsdp"), later)
    assert_curves_close(curve(tmp_path / "one_from_fsdp"), later)
    def train_records(run):  # (the first half also evaluated when it ended, at step 2)
        return [r for r in curve(tmp_path / run) if "loss" in r]
    assert train_records("halves") == train_records("straight")
    a, b = final_model(tmp_path / "halves"), final_model(tmp_path / "straight")
    assert set(a) == set(build_model(straight, VOCAB_SIZE).state_dict())
    for name in a:
        assert type(a[name]) is torch.Tensor and torch.equal(a[name], b[name]), name
    # consolidated, it is a full checkpoint in torch.optim's layout
    full = ckpt.load_full_checkpoint(ckpt.latest_checkpoint(straight.checkpoint_dir))
    reference = torch.optim.AdamW(param_groups(build_model(straight, VOCAB_SIZE),
                                               straight.weight_decay))
    reference.load_state_dict(full["optimizer"])
    assert len(reference.state) == len(a) and full["step"] == 4


def test_ddp_two_ranks_match_one_process_and_accumulation_uses_no_sync(tmp_path):
    """2 ranks x b equals 1 process x 2b; with grad_accum the DDP all-reduce runs once per step."""
    # SGD: its update is linear in the gradient, so fp32 rounding differences stay
    # rounding-sized (Adam would blow up the exactly-zero key-bias gradients' noise).
    steps, sgd = 4, dict(optimizer="sgd", lr=0.3)
    plain = tiny_cfg(tmp_path / "ddp_plain", batch_size=8, max_steps=steps, **sgd)
    accum = tiny_cfg(tmp_path / "ddp_accum", batch_size=8, grad_accum=3, max_steps=steps, **sgd)
    result = tmp_path / "counts.json"
    mp.spawn(_ddp_worker, args=(2, free_port(), [plain.to_dict(), accum.to_dict()], str(result)),
             nprocs=2, join=True)
    plain_calls, accum_calls = json.loads(result.read_text())

    # One process, same global batches: batch 8 for the plain run; one 24-sequence
    # batch per step equals 3 accumulated micro-batches of 8 (same sequences).
    train(tiny_cfg(tmp_path / "one_plain", batch_size=8, max_steps=steps, **sgd))
    train(tiny_cfg(tmp_path / "one_big", batch_size=24, grad_accum=1, max_steps=steps, **sgd))

    assert_curves_close(curve(tmp_path / "ddp_plain"), curve(tmp_path / "one_plain"))
    assert_curves_close(curve(tmp_path / "ddp_accum"), curve(tmp_path / "one_big"))
    for ddp_dir, one_dir in (("ddp_plain", "one_plain"), ("ddp_accum", "one_big")):
        a, b = final_model(tmp_path / ddp_dir), final_model(tmp_path / one_dir)
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)

    # Without no_sync around forward+backward of the first 2 micro-batches the
    # accumulating run would all-reduce 3x as often as the plain one.
    assert plain_calls > 0
    assert accum_calls == plain_calls


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    sgd = dict(optimizer="sgd", lr=0.3)
    train(tiny_cfg(tmp_path / "acc", batch_size=4, grad_accum=4, max_steps=5, **sgd))
    train(tiny_cfg(tmp_path / "big", batch_size=16, grad_accum=1, max_steps=5, **sgd))
    assert_curves_close(curve(tmp_path / "acc"), curve(tmp_path / "big"))
    a, b = final_model(tmp_path / "acc"), final_model(tmp_path / "big")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------- resume / fault tolerance
@pytest.mark.parametrize("checkpoint_format", ["full", "sharded"])
def test_killed_and_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, checkpoint_format):
    common = dict(max_steps=9, save_every=3, eval_every=4, grad_accum=2, dropout=0.1,
                  optimizer="adamw", resume="auto", checkpoint_format=checkpoint_format)
    train(tiny_cfg(tmp_path / "straight", **common))

    killed = tiny_cfg(tmp_path / "killed", fail_at_step=6, **common)
    cmd = [sys.executable, "-m", "fusedopt.train", *cli_args(killed)]
    first = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert (tmp_path / "killed" / "fail_at_step_6.marker").exists()
    assert ckpt.latest_checkpoint(str(tmp_path / "killed" / "checkpoints")).name == \
        ckpt.checkpoint_name(3, sharded=checkpoint_format == "sharded")
    second = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout + second.stderr

    # Exactly equal floats, step by step (the JSON floats round-trip exactly).
    assert curve(tmp_path / "killed") == curve(tmp_path / "straight")
    a, b = final_model(tmp_path / "killed"), final_model(tmp_path / "straight")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_from_a_saved_checkpoint_is_exact_with_fp16_grad_scaler(tmp_path):
    """In-process variant: continue from step 3's checkpoint in a fresh directory."""
    common = dict(amp="fp16", max_steps=6, save_every=3, keep_last=5, grad_accum=2)
    straight = tiny_cfg(tmp_path / "straight", **common)
    train(straight)
    third = Path(straight.checkpoint_dir) / "step_00000003.pt"
    assert ckpt.load_checkpoint(third)["scaler"]["scale"] > 0
    train(tiny_cfg(tmp_path / "resumed", resume=str(third), **common))
    assert curve(tmp_path / "resumed") == [r for r in curve(tmp_path / "straight") if r["step"] > 3]
    a, b = final_model(tmp_path / "resumed"), final_model(tmp_path / "straight")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_fp16_steps_skipped_by_grad_scaler_do_not_advance_the_schedule(tmp_path, monkeypatch):
    import functools

    # A loss scale of 2**24 overflows fp16 gradients: GradScaler skips steps and halves the
    # scale until the gradients fit.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24))
    summary = train(tiny_cfg(tmp_path, amp="fp16", max_steps=12, warmup_steps=4, scheduler="constant"))
    skipped = summary["amp_skipped_steps"]
    assert 0 < skipped < 12
    lrs = [r["lr"] for r in curve(tmp_path) if "lr" in r]
    # lr of step 1 repeats while steps are skipped, then the warmup proceeds.
    assert lrs[:skipped + 1] == [pytest.approx(0.25 * 1e-2)] * (skipped + 1)
    assert lrs[skipped + 1] == pytest.approx((0.25 + 0.75 / 4) * 1e-2)


def test_torchrun_restarts_a_killed_worker_and_finishes(tmp_path):
    out = tmp_path / "elastic"
    cfg = tiny_cfg(out, batch_size=8, max_steps=8, save_every=2, resume="auto", fail_at_step=5,
                   fail_rank=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2",
           "-m", "fusedopt.train", *cli_args(cfg)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "fail_at_step_5.marker").exists()

    events = [r for r in read_jsonl(str(out / "metrics.jsonl")) if "event" in r]
    starts = [e for e in events if e["event"] == "start"]
    assert [s["restart_count"] for s in starts] == [0, 1]
    assert starts[1]["resumed_from"].endswith("step_00000004.pt")
    assert "killed rank 1" in (out / "fail_at_step_5.marker").read_text()
    # Every step logged exactly once, and the resumed 2-rank run follows the
    # same trajectory as an uninterrupted single process with the global batch.
    train(tiny_cfg(tmp_path / "reference", batch_size=8, max_steps=8))
    assert_curves_close(curve(out), curve(tmp_path / "reference"))


def test_checkpoints_keep_last_k_and_writes_are_atomic(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=5, save_every=1, keep_last=2)
    train(cfg)
    names = [p.name for p in ckpt.list_checkpoints(cfg.checkpoint_dir)]
    assert names == ["step_00000004.pt", "step_00000005.pt"]
    state = ckpt.load_checkpoint(Path(cfg.checkpoint_dir) / names[-1])
    assert state["step"] == 5 and state["data"]["position"] == 5
    assert {"torch", "numpy", "python", "cuda"} <= set(state["rank_states"][0]["rng"])

    # A save that dies half-way (here: an unpicklable value) leaves the newest
    # checkpoint and the directory untouched.
    before = {p.name: p.read_bytes() for p in Path(cfg.checkpoint_dir).iterdir()}
    broken = dict(state, step=6, model={"w": torch.zeros(1000)}, bad=lambda: None)
    with pytest.raises(Exception):
        ckpt.save_checkpoint(broken, cfg.checkpoint_dir, keep_last=2)
    after = {p.name: p.read_bytes() for p in Path(cfg.checkpoint_dir).iterdir()}
    assert after == before
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(cfg.checkpoint_dir))["step"] == 5

    # What a save SIGKILLed before os.replace leaves behind: a partial temp file.
    # Resuming ignores it; the next save removes it.
    stale = Path(cfg.checkpoint_dir) / ".step_00000006.pt.tmp-4242"
    stale.write_bytes(before["step_00000005.pt"][:1000])
    assert ckpt.latest_checkpoint(cfg.checkpoint_dir).name == "step_00000005.pt"
    train(cfg.replace(resume="auto", max_steps=6))
    assert not stale.exists()
    assert [p.name for p in ckpt.list_checkpoints(cfg.checkpoint_dir)] == ["step_00000005.pt",
                                                                          "step_00000006.pt"]


def test_sharded_checkpoints_keep_last_k_are_atomic_and_consolidate_to_a_full_one(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path / "sharded", max_steps=4, save_every=1, keep_last=2,
                   checkpoint_format="sharded", optimizer="adamw", scheduler="constant")
    train(cfg)  # (constant: a schedule over max_steps would change when a run is extended)
    ckpt_dir = Path(cfg.checkpoint_dir)
    assert [p.name for p in ckpt.list_checkpoints(str(ckpt_dir))] == ["step_00000003", "step_00000004"]

    # What a save killed before its rename leaves: a temp directory of shards without meta.pt.
    # Resuming ignores it (and a step directory without meta.pt); the next save removes it.
    stale = ckpt_dir / ".step_00000005.tmp"
    shutil.copytree(ckpt_dir / "step_00000004", stale)
    (stale / ckpt.META_NAME).unlink()
    incomplete = ckpt_dir / "step_00000009"
    incomplete.mkdir()
    assert ckpt.latest_checkpoint(str(ckpt_dir)).name == "step_00000004"
    with pytest.raises(ckpt.CheckpointError, match="step_00000009.*without meta.pt"):
        train(cfg.replace(resume=str(incomplete)))
    incomplete.rmdir()
    train(cfg.replace(resume="auto", max_steps=5))
    assert not stale.exists()
    assert [p.name for p in ckpt.list_checkpoints(str(ckpt_dir))] == ["step_00000004", "step_00000005"]

    # Consolidated, it is the file a --checkpoint-format full run writes at the same step.
    from fusedopt.train.checkpoint import main

    out = tmp_path / "consolidated.pt"
    assert main(["consolidate", str(ckpt_dir / "step_00000005"), str(out)]) == 0
    assert "step 5" in capsys.readouterr().out
    full_cfg = tiny_cfg(tmp_path / "full", max_steps=5, save_every=5, optimizer="adamw",
                        scheduler="constant")
    train(full_cfg)
    a = torch.load(out, weights_only=True)
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(full_cfg.checkpoint_dir))
    assert set(a) == set(b) and a["step"] == b["step"] == 5
    for key in ("model", "scheduler", "data", "last_train_loss"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    torch.testing.assert_close(a["optimizer"]["state"], b["optimizer"]["state"], rtol=0, atol=0)
    # ... which the harness resumes from, bit for bit.
    train(full_cfg.replace(out_dir=str(tmp_path / "from_consolidated"), max_steps=7, resume=str(out)))
    train(full_cfg.replace(max_steps=7, resume="auto"))
    assert curve(tmp_path / "from_consolidated") == [r for r in curve(tmp_path / "full")
                                                     if r["step"] > 5]

    # Damaged shards are a clear error, when resuming and when consolidating.
    shard = ckpt_dir / "step_00000005" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="step_00000005.*could not be restored"):
        train(cfg.replace(resume="auto", max_steps=6))
    with pytest.raises(SystemExit, match="step_00000005.*corrupt or unreadable"):
        main(["consolidate", str(ckpt_dir / "step_00000005"), str(tmp_path / "x.pt")])
    assert not (tmp_path / "x.pt").exists()


def test_resuming_a_finished_run_trains_nothing_and_reports_no_timings(tmp_path):
    import math

    cfg = tiny_cfg(tmp_path, max_steps=3)
    train(cfg)
    again = train(cfg.replace(resume="auto"))
    assert again["steps"] == 3 and again["final_train_loss"] == [r["loss"] for r in curve(tmp_path) if "loss" in r][-1]
    for key in ("mean_step_ms", "mean_optimizer_ms", "optimizer_share", "tokens_per_s"):
        assert math.isnan(again[key]), key


# --------------------------------------------------------------- the embedded default
def test_embedded_default_runs_and_loss_falls(tmp_path, capsys):
    assert embedded_text_files(), "the package ships text files to train on"
    data, desc = load_corpus("embedded", 10**7)
    assert data == load_corpus("embedded", 10**7)[0]  # deterministic order

    # The default model, data, batch, optimizer and schedule shape; only shorter (30 of 300 steps).
    cfg = config_from_mapping(dict(
        out_dir=str(tmp_path), max_steps=30, warmup_steps=5, log_every=5, eval_every=15, save_every=15,
        progress=True, num_threads=1, device="cpu"))
    defaults = TrainConfig()
    for name in ("data", "seq_len", "n_layer", "n_head", "d_model", "batch_size", "grad_accum", "optimizer",
                 "optimizer_lib", "backend", "lr", "scheduler", "clip_grad_norm", "amp"):
        assert getattr(cfg, name) == getattr(defaults, name), name
    assert cfg.data == "embedded" and cfg.optimizer_lib == "fusedopt" and cfg.backend == "auto"
    summary = train(cfg)
    losses = [r["loss"] for r in curve(tmp_path) if "loss" in r]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0, losses
    assert summary["final_eval_loss"] < 4.0
    for key in ("tokens_per_s", "mean_step_ms", "optimizer_share", "peak_mem_mb"):
        assert summary[key] > 0, key
    assert 0 < summary["optimizer_share"] < 1
    records = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
    for key in ("lr", "grad_norm", "tokens_per_s", "step_ms", "opt_share", "peak_mem_mb"):
        assert records[-1][key] > 0, key
    out = capsys.readouterr()
    assert "fusedopt.train summary" in out.out and "optimizer_share" in out.out
    assert "train:" in out.err  # tqdm bar


def test_embedded_corpus_falls_back_to_generated_text(monkeypatch):
    import fusedopt.train.data as data_mod

    monkeypatch.setattr(data_mod, "embedded_text_files", lambda: [])
    data, desc = load_corpus("embedded", 10**7)
    assert "fallback" in desc and data == load_corpus("synthetic", 10**7)[0]


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_grad_norm_is_computed_by_fusedopt_with_the_runs_backend(tmp_path, monkeypatch, capsys, clip):
    """The norm (and clip coefficient) is part of the run's numbers: it is computed with the
    run's --backend, like the optimizer step, and the start line says by what."""
    import fusedopt

    name = "clip_grad_norm_" if clip else "get_total_norm"
    real, calls = getattr(fusedopt, name), []

    def spy(*args, **kwargs):
        calls.append((args[1] if clip else None, kwargs.get("backend")))
        return real(*args, **kwargs)

    monkeypatch.setattr(fusedopt, name, spy)
    train(tiny_cfg(tmp_path, max_steps=3, clip_grad_norm=clip))
    assert calls == [(clip or None, "reference")] * 3
    start = capsys.readouterr().out.splitlines()[0]
    assert f"fusedopt.{name}(backend=reference -> reference)" in start
    assert ("clipping fusedopt" if clip else "clipping off, grad norm fusedopt") in start


def test_killed_run_resumed_in_processes_without_the_native_extension_is_bit_for_bit(tmp_path):
    """The processes of one run differ in what they have: here the killed one and its restart
    cannot load fusedopt._C (as when the extension fails to load). With --backend reference
    their norms are the reference's, as in the uninterrupted run that has the extension. (Until
    the norm followed --backend, it was 'auto' there: the native kernel in the straight run and
    the reference in the others, which differ in the last bits; torch 2.5.1: grad_norm
    1.591905117034912 vs 1.5919049978256226 at step 1.)"""
    common = dict(max_steps=9, save_every=3, eval_every=4, grad_accum=2, dropout=0.1,
                  optimizer="adamw", resume="auto")
    train(tiny_cfg(tmp_path / "straight", **common))
    killed = tiny_cfg(tmp_path / "killed", fail_at_step=6, **common)
    without_extension = ("import runpy, sys; sys.modules['fusedopt._C'] = None; "
                         "runpy.run_module('fusedopt.train', run_name='__main__', alter_sys=True)")
    cmd = [sys.executable, "-c", without_extension, *cli_args(killed)]
    first = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == -signal.SIGKILL, first.stderr
    second = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "not bit for bit" not in second.stderr
    assert curve(tmp_path / "killed") == curve(tmp_path / "straight")
    a, b = final_model(tmp_path / "killed"), final_model(tmp_path / "straight")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.skipif(CPU_BACKEND_MISSING is not None, reason=f"cpu backend unavailable: {CPU_BACKEND_MISSING}")
def test_resuming_with_another_backend_warns_that_it_is_not_bit_for_bit(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=2, resume="auto")
    train(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg.replace(max_steps=3, save_every=3))  # the same backend: no such warning
    assert not [w for w in caught if "not bit for bit" in str(w.message)]
    with pytest.warns(UserWarning, match="computed with .*backend=reference -> reference.*"
                                         "backend=cpu -> cpu.*not bit for bit"):
        train(cfg.replace(max_steps=4, backend="cpu"))


@pytest.mark.parametrize("overrides", [
    dict(optimizer="sgd", optimizer_lib="fusedopt", nesterov=True, scheduler="wsd"),
    pytest.param(dict(optimizer="adamw", optimizer_lib="fusedopt", backend="cpu", scheduler="linear"),
                 marks=pytest.mark.skipif(CPU_BACKEND_MISSING is not None,
                                          reason=f"cpu backend unavailable: {CPU_BACKEND_MISSING}")),
    dict(optimizer="adam", optimizer_lib="torch", backend="auto", scheduler="constant"),
    dict(optimizer="adamw", amp="bf16", clip_grad_norm=0.0),
])
def test_optimizer_scheduler_and_amp_choices_train(tmp_path, overrides):
    train(tiny_cfg(tmp_path, max_steps=8, **overrides))
    losses = [r["loss"] for r in curve(tmp_path) if "loss" in r]
    assert all(map(lambda x: x == x, losses))  # finite, no NaN
    assert losses[-1] < losses[0]


def lrs(cfg, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(cfg, opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_warm_up_then_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, max_steps=14, scheduler="cosine", min_lr_ratio=0.1)
    cosine = lrs(cfg, 15)
    assert cosine[0] == pytest.approx(0.25) and cosine[4] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(cosine[:4], cosine[1:5]))  # warmup rises
    assert all(a > b for a, b in zip(cosine[4:14], cosine[5:15]))  # then decays
    assert cosine[14] == pytest.approx(0.1)
    linear = lrs(cfg.replace(scheduler="linear"), 15)
    assert linear[9] == pytest.approx(1.0 - 0.9 * 5 / 10) and linear[14] == pytest.approx(0.1)
    wsd = lrs(cfg.replace(scheduler="wsd", wsd_decay_fraction=0.5), 15)
    assert wsd[4:8] == [pytest.approx(1.0)] * 4 and wsd[10] < 1.0 and wsd[14] == pytest.approx(0.1)
    constant = lrs(cfg.replace(scheduler="constant"), 15)
    assert constant[4:] == [pytest.approx(1.0)] * 11


# --------------------------------------------------------------- building blocks
def test_param_groups_exclude_biases_and_norm_weights_from_decay():
    model = CharTransformer(256, 16, 32, 2, 2)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert all(n.endswith("bias") or ".ln" in n or n.startswith("ln_f") for n in no_decay_names)
    assert "blocks.0.ln1.weight" in no_decay_names and "blocks.0.attn.qkv.bias" in no_decay_names
    assert "blocks.0.attn.qkv.weight" in decay_names and "tok_emb.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))


def test_sharded_sampler_splits_global_batches_and_is_deterministic():
    one = ShardedBatchSampler(40, 8, rank=0, world_size=1, seed=3)
    two = [ShardedBatchSampler(40, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(12):  # crosses epoch boundaries (5 batches per epoch)
        whole = one.next_indices()
        halves = torch.cat([s.next_indices() for s in two])
        assert torch.equal(whole, halves)
    assert one.epoch == 2
    epoch0 = ShardedBatchSampler(40, 8, 0, 1, seed=3)
    first = torch.cat([epoch0.next_indices() for _ in range(5)])
    assert sorted(first.tolist()) == list(range(40))  # a permutation per epoch
    assert not torch.equal(first, torch.cat([epoch0.next_indices() for _ in range(5)]))

    resumed = ShardedBatchSampler(40, 8, 0, 1, seed=3)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(resumed.next_indices(), one.next_indices())


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    """torch, numpy and python RNG streams continue exactly after save + weights_only load."""
    import random

    import numpy as np

    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    torch.save({"rng": ckpt.capture_rng_state()}, path)

    def draws():
        return (torch.rand(3).tolist(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30),
                [random.random() for _ in range(3)])

    expected = draws()
    draws()  # move every stream on
    ckpt.restore_rng_state(torch.load(path, weights_only=True)["rng"])
    assert draws() == expected


# --------------------------------------------------------------- configuration
def test_config_precedence_defaults_file_cli(tmp_path):
    assert parse_config([]) == TrainConfig()
    js = tmp_path / "c.json"
    # The file alone is inconsistent (warmup 20 >= 7 steps); the flags fix it.
    js.write_text(json.dumps({"lr": 0.5, "max_steps": 7, "optimizer": "sgd"}))
    cfg = parse_config(["--config", str(js), "--max-steps", "90", "--no-progress"])
    assert (cfg.lr, cfg.max_steps, cfg.optimizer, cfg.progress) == (0.5, 90, "sgd", False)
    with pytest.raises(ConfigError, match="warmup_steps=20 must be < max_steps=7"):
        parse_config(["--config", str(js)])
    ym = tmp_path / "c.yaml"
    ym.write_text("batch-size: 12\namp: bf16\nprogress: false\n")
    cfg = parse_config(["--config", str(ym), "--batch-size", "4"])
    assert (cfg.batch_size, cfg.amp, cfg.progress) == (4, "bf16", False)
    # PyYAML reads 3e-4 (no dot) as the string '3e-4'; float options accept it
    ym.write_text("lr: 3e-4\neps: 1e-10\nmin_lr_ratio: 1\n")
    cfg = parse_config(["--config", str(ym)])
    assert (cfg.lr, cfg.eps, cfg.min_lr_ratio) == (3e-4, 1e-10, 1.0)


def test_help_documents_every_option():
    text = " ".join(build_parser().format_help().split())  # undo line wrapping
    for name, field in TrainConfig.__dataclass_fields__.items():
        flag = "--" + name.replace("_", "-")
        assert flag in text, name
        assert f"(default: {field.default!r})" in text, name
    assert "--config FILE" in text


# --------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "lamb"], "invalid choice: 'lamb'"),
    (["--backend", "opencl"], "invalid choice: 'opencl'"),
    (["--batch-size", "many"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_cli_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"optimizer": "lamb"}, "unknown optimizer 'lamb'"),
    ({"backend": "opencl"}, "unknown backend 'opencl'"),
    ({"optimizer_lib": "torch", "backend": "triton"}, "--backend triton only applies"),
    ({"lr": "fast"}, "option 'lr' in config must be float"),
    ({"lerning_rate": 1.0}, "unknown option 'lerning_rate'"),
    ({"d_model": 30, "n_head": 4}, "not divisible by n_head"),
    ({"warmup_steps": 50, "max_steps": 50}, "warmup_steps=50 must be < max_steps=50"),
    ({"max_corpus_bytes": 0}, "max_corpus_bytes must be >= 1"),
    ({"max_corpus_bytes": -1000}, "max_corpus_bytes must be >= 1"),
    ({"seed": 10 ** 14}, "seed must be in"),
    ({"num_threads": 10 ** 6}, "num_threads=1000000 is more than"),
])
def test_config_file_values_are_validated(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(values)


@pytest.mark.parametrize("name, text, message", [
    ("broken.json", "{\"lr\": ", "broken.json' could not be parsed"),
    ("broken.yaml", "lr: [1, 2", "broken.yaml' could not be parsed"),
    ("list.yaml", "- 1\n- 2\n", "must contain a mapping"),
])
def test_unreadable_config_files_are_clear_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_world_size_must_divide_batch(tmp_path):
    cfg = tiny_cfg(tmp_path, batch_size=9)
    with pytest.raises(ConfigError, match="batch_size=9 is not divisible by the world size 2"):
        Trainer(cfg, DistContext(rank=0, world_size=2, local_rank=0,
                                 device=torch.device("cpu"), backend="gloo"))


def test_unavailable_backend_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--backend cuda"):
        Trainer(tiny_cfg(tmp_path, backend="cuda"))


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ckpt.CheckpointError, match="nope.pt.*does not exist"):
        train(tiny_cfg(tmp_path / "a", resume=str(missing)))
    with pytest.raises(ckpt.CheckpointError, match="holds no step_"):
        train(tiny_cfg(tmp_path / "a", resume=str(tmp_path)))

    cfg = tiny_cfg(tmp_path / "b", max_steps=2, save_every=2)
    train(cfg)
    latest = ckpt.latest_checkpoint(cfg.checkpoint_dir)
    latest.write_bytes(latest.read_bytes()[:200])  # truncated file
    with pytest.raises(ckpt.CheckpointError, match="step_00000002.pt.*corrupt"):
        train(cfg.replace(resume="auto", max_steps=4))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match="garbage.pt.*corrupt"):
        train(cfg.replace(resume=str(garbage)))

    # Starting fresh over another run's checkpoints is refused.
    with pytest.raises(ckpt.CheckpointError, match="already holds checkpoints.*--resume auto"):
        train(cfg.replace(max_steps=4))

    # A valid checkpoint of a different model is refused with the reason.
    train(tiny_cfg(tmp_path / "c", max_steps=1, save_every=1, warmup_steps=0))
    with pytest.raises(ckpt.CheckpointError, match="d_model=32 \\(now 64\\)"):
        train(tiny_cfg(tmp_path / "c", max_steps=2, d_model=64, resume="auto"))
    # So is one whose optimizer and schedule were built from other hyperparameters: loading their
    # states would keep the saved values (lr, betas) or graft a cosine state onto a wsd schedule.
    with pytest.raises(ckpt.CheckpointError, match="lr=0.01 \\(now 0.1\\).*scheduler='cosine' \\(now 'wsd'\\)"):
        train(tiny_cfg(tmp_path / "c", max_steps=2, warmup_steps=0, lr=0.1, scheduler="wsd",
                       resume="auto"))
    # --max-steps and the per-step options may change.
    train(tiny_cfg(tmp_path / "c", max_steps=2, warmup_steps=0, clip_grad_norm=0.5, resume="auto"))


def test_unusable_corpus_and_directories_are_refused_before_training(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="the corpus is empty"):
        train(tiny_cfg(tmp_path / "a", data=str(empty)))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="--out-dir .*a_file/out' cannot be created"):
        train(tiny_cfg(a_file / "out"))
    out = tmp_path / "b"
    with pytest.raises(ValueError, match="--ckpt-dir .*a_file/ck' cannot be created"):
        train(tiny_cfg(out, ckpt_dir=str(a_file / "ck"), save_every=3))
    assert not (out / "metrics.jsonl").exists()  # refused before the first step, not at the save


def test_eval_set_is_the_same_for_any_world_size():
    """The first eval_sequences positions, each counted once over the ranks, and the same
    number of forwards on every rank (FSDP2's collectives); 3 sequences on 2 ranks counted 4."""
    from fusedopt.train.loop import eval_chunks
    for eval_sequences in (1, 3, 7, 128):
        for world in (1, 2, 3, 4):
            counted, forwards = [], set()
            for rank in range(world):
                chunks = list(eval_chunks(eval_sequences, world, rank, chunk=2))
                forwards.add(len(chunks))
                for positions, mask in chunks:
                    counted += positions[mask].tolist()
            assert sorted(counted) == list(range(eval_sequences)), (eval_sequences, world)
            assert len(forwards) == 1, (eval_sequences, world)


def test_log_window_grad_norm_leaves_out_steps_grad_scaler_skipped(tmp_path, monkeypatch):
    """One skipped fp16 step (inf norm) no longer makes its whole window's grad_norm null."""
    import functools
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24))
    summary = train(tiny_cfg(tmp_path, amp="fp16", max_steps=12, warmup_steps=4, log_every=12))
    assert 0 < summary["amp_skipped_steps"] < 12
    (line,) = [r for r in curve(tmp_path) if "grad_norm" in r]
    assert line["grad_norm"] is not None and math.isfinite(line["grad_norm"]) and line["grad_norm"] > 0


def test_logged_epoch_is_the_epoch_of_the_last_batch():
    from fusedopt.train.data import ShardedBatchSampler
    sampler = ShardedBatchSampler(num_samples=16, batch_size=4, rank=0, world_size=1, seed=0)
    assert sampler.last_epoch == 0
    for taken in range(1, 9):
        sampler.next_indices()
        assert sampler.last_epoch == (taken - 1) // 4
    assert sampler.epoch == 2 and sampler.last_epoch == 1


def test_cli_reports_errors_as_systemexit_naming_the_problem(tmp_path):
    from fusedopt.train.__main__ import main

    with pytest.raises(SystemExit, match="nope.pt.*does not exist"):
        main(["--data", "synthetic", "--out-dir", str(tmp_path), "--resume", str(tmp_path / "nope.pt")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: lamb\n")
    with pytest.raises(SystemExit, match="unknown optimizer 'lamb'"):
        main(["--config", str(bad)])
