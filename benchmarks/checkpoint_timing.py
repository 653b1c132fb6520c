"""Save and load time of the training harness's two checkpoint formats, on 2 FSDP2 gloo ranks.

    python benchmarks/checkpoint_timing.py [--d-model 384 --n-layer 4] [--repeats 3] [--out F.json]

Each format is measured twice, alternated (full, sharded, full, sharded): a Trainer takes 2
steps (so the optimizer has state), then ``Trainer.save()`` is timed ``--repeats`` times and
``Trainer.load()`` of the newest checkpoint twice; the minimum of each is printed. Checkpoints go
to a temporary directory that is removed at the end. CPU only (gloo), one thread per rank; FSDP2
on CPU needs torch >= 2.9 (fusedopt.train.sharding.FSDP2_CPU_MIN_TORCH; older torch is refused).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, port: int, out: str, args: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fusedopt.train import checkpoint as ckpt
    from fusedopt.train.config import config_from_mapping
    from fusedopt.train.distributed import cleanup, init_distributed
    from fusedopt.train.loop import Trainer

    ctx = init_distributed("cpu")
    results: dict = {}
    for attempt, fmt in enumerate(("full", "sharded", "full", "sharded")):
        cfg = config_from_mapping(dict(
            data="synthetic", seq_len=32, n_layer=args["n_layer"], n_head=6, d_model=args["d_model"],
            batch_size=8, max_steps=2, warmup_steps=0, save_every=0, progress=False,
            num_threads=1, device="cpu", out_dir=os.path.join(out, f"{fmt}-{attempt}"),
            parallel="fsdp2", checkpoint_format=fmt, keep_last=2))
        trainer = Trainer(cfg, ctx)
        trainer.fit()
        saves = []
        for _ in range(args["repeats"]):
            trainer.step += 1  # a new step number: a new checkpoint each time
            start = time.perf_counter()
            trainer.save()
            saves.append(time.perf_counter() - start)
        loads = []
        for _ in range(2):
            path = ckpt.latest_checkpoint(cfg.checkpoint_dir)
            start = time.perf_counter()
            trainer.load(path)
            loads.append(time.perf_counter() - start)
        params = sum(p.numel() for p in trainer.raw_model.parameters())  # (DTensors: global)
        results.setdefault(fmt, []).append({"save_s": min(saves), "load_s": min(loads)})
    if rank == 0:
        record = {"world_size": world_size, "params": params, "d_model": args["d_model"],
                  "n_layer": args["n_layer"], "torch": torch.__version__, **results}
        print(json.dumps(record, indent=1))
        if args["out"]:
            with open(args["out"], "w") as fh:
                json.dump(record, fh, indent=1)
    cleanup(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="", help="also write the JSON record to this file")
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="fusedopt-ckpt-timing-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        mp.spawn(_worker, args=(2, port, out, {"d_model": args.d_model, "n_layer": args.n_layer,
                                               "repeats": args.repeats, "out": args.out}),
                 nprocs=2, join=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
