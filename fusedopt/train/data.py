"""Byte-level text corpus, fixed-length sequences, and a deterministic sharded batch sampler.

Tokens are UTF-8 bytes (vocabulary 256), so no tokenizer files are needed and the
model's shape does not depend on the text.  The corpus is split once
into a training head and a held-out tail; each split is cut into non-overlapping
``seq_len + 1`` windows (inputs plus next-byte targets).

``ShardedBatchSampler`` replaces ``DistributedSampler``: per epoch it draws one
seeded permutation (``set_epoch``), cuts it into GLOBAL batches of
``batch_size`` sequences (dropping the incomplete tail batch) and hands rank
``r`` the slice ``[r*b, (r+1)*b)`` of every global batch, ``b = batch_size /
world_size``.  So the sequences consumed by one optimizer step do not depend on
the number of ranks (2 ranks x b equals 1 rank x 2b), and the data position is
one integer (global micro-batches consumed), which checkpoints store.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, List, Tuple

import torch

VOCAB_SIZE = 256
EMBEDDED_SUFFIXES = (".py", ".md", ".txt", ".toml", ".yaml", ".yml", ".cu", ".cpp", ".h", ".cuh")
# Below this many bytes the package sources are too small to train on and the
# generated corpus is used instead.
MIN_EMBEDDED_BYTES = 20_000


def package_root() -> Path:
    """Directory of the installed ``fusedopt`` package (found from this file)."""
    return Path(__file__).resolve().parents[1]


def embedded_text_files() -> List[Path]:
    """The project's own text files, in a deterministic (sorted path) order.

    The package directory is always searched; in a source checkout the sibling
    ``docs/`` folder and ``README.md`` are added too.
    """
    pkg = package_root()
    roots = [pkg]
    checkout = pkg.parent
    if (checkout / "pyproject.toml").is_file():
        roots += [checkout / "docs", checkout / "README.md"]
    files: List[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files += [p for p in root.rglob("*") if p.is_file() and p.suffix in EMBEDDED_SUFFIXES
                      and "__pycache__" not in p.parts]
    return sorted(set(files), key=lambda p: p.relative_to(checkout).as_posix())


def generated_text(n_bytes: int = 400_000, seed: int = 1234) -> str:
    """Deterministic English-like text from a tiny grammar (learnable, offline)."""
    rng = random.Random(seed)
    subjects = ["the optimizer", "a kernel", "the model", "each rank", "the scheduler",
                "a fused step", "the gradient", "every tensor", "the checkpoint", "our loss"]
    verbs = ["updates", "reads", "writes", "scales", "clips", "averages", "loads", "saves",
             "reduces", "computes"]
    objects = ["the weights", "its moments", "the learning rate", "a bucket of grads",
               "the state dict", "one batch", "all parameters", "the norm", "a shard",
               "the step count"]
    tails = ["quickly", "in place", "on every step", "without a copy", "per group",
             "after warmup", "in fp32", "at the end", "once", "twice"]
    out: List[str] = []
    size = 0
    while size < n_bytes:
        sentence = (f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} "
                    f"{rng.choice(tails)}.")
        sentence = sentence[0].upper() + sentence[1:]
        sep = "\n" if rng.random() < 0.2 else " "
        out.append(sentence + sep)
        size += len(sentence) + 1
    return "".join(out)


def load_corpus(source: str, max_bytes: int) -> Tuple[bytes, str]:
    """Return ``(corpus bytes, description)`` for ``--data``."""
    if source == "synthetic":
        data = generated_text().encode()
        desc = "synthetic (generated grammar text)"
    elif source == "embedded":
        files = embedded_text_files()
        parts = []
        for path in files:
            text = path.read_bytes()
            rel = path.relative_to(package_root().parent).as_posix()
            parts.append(b"# ==== " + rel.encode() + b" ====\n" + text + b"\n")
        data = b"".join(parts)
        desc = f"embedded ({len(files)} fusedopt source files)"
        if len(data) < MIN_EMBEDDED_BYTES:
            data = generated_text().encode()
            desc = (f"embedded fallback: only {len(files)} small source files found, "
                    "using generated grammar text")
    else:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            data = b"\n".join(p.read_bytes() for p in files)
            desc = f"{len(files)} files under {source}"
        elif path.is_file():
            data = path.read_bytes()
            desc = str(source)
        else:
            raise ValueError(
                f"--data {source!r} is neither 'embedded', 'synthetic', a file nor a directory"
            )
    data = data[:max_bytes]
    return data, f"{desc}, {len(data):,} bytes"


class TokenDataset:
    """Non-overlapping ``seq_len + 1`` byte windows of one corpus split, on ``device``."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.num_sequences = (tokens.numel() - 1) // seq_len
        self._offsets = torch.arange(seq_len + 1, device=tokens.device)

    def __len__(self) -> int:
        return self.num_sequences

    def batch(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each ``(len(indices), seq_len)`` int64."""
        starts = indices.to(self.tokens.device) * self.seq_len
        windows = self.tokens[starts[:, None] + self._offsets]
        return windows[:, :-1], windows[:, 1:]


def make_splits(data: bytes, seq_len: int, val_fraction: float,
                device: torch.device) -> Tuple[TokenDataset, TokenDataset]:
    """Split the corpus into (train head, validation tail) datasets."""
    if len(data) == 0:
        raise ValueError("the corpus is empty (an empty file or directory, or --max-corpus-bytes 0)")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)
    n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
    train_tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    train = TokenDataset(train_tokens.to(device), seq_len)
    val = TokenDataset(val_tokens.to(device), seq_len)
    if len(train) < 1:
        raise ValueError(f"corpus of {len(tokens)} bytes is too small for seq_len={seq_len}")
    return train, val


class ShardedBatchSampler:
    """Deterministic per-epoch shuffled global batches, sliced per rank; resumable.

    ``position`` counts global micro-batches already consumed since the start of
    training; ``epoch`` and the offset in it follow from it, so restoring
    ``position`` restores the exact data order.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True):
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is not divisible by world size {world_size}")
        if num_samples < batch_size:
            raise ValueError(
                f"the training split has {num_samples} sequences, fewer than one global batch "
                f"of batch_size={batch_size}; use a larger corpus or smaller batch/seq_len"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.batches_per_epoch = num_samples // batch_size
        self.position = 0
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def epoch(self) -> int:
        """The epoch of the next micro-batch."""
        return self.position // self.batches_per_epoch

    @property
    def last_epoch(self) -> int:
        """The epoch of the last micro-batch taken (0 before any): what a step just trained on."""
        return max(self.position - 1, 0) // self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Draw the permutation of ``epoch`` (a pure function of seed and epoch)."""
        if epoch == self._epoch:
            return
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.num_samples, generator=gen)
        else:
            self._order = torch.arange(self.num_samples)
        self._epoch = epoch

    def next_indices(self) -> torch.Tensor:
        """Sample indices of this rank's share of the next global micro-batch."""
        self.set_epoch(self.epoch)
        start = (self.position % self.batches_per_epoch) * self.batch_size
        start += self.rank * self.local_batch
        self.position += 1
        return self._order[start:start + self.local_batch]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict:
        return {"position": self.position, "batches_per_epoch": self.batches_per_epoch,
                "batch_size": self.batch_size, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        mismatched = [k for k in ("batch_size", "num_samples", "seed") if state[k] != getattr(self, k)]
        if mismatched:
            details = ", ".join(f"{k}: checkpoint {state[k]} vs now {getattr(self, k)}" for k in mismatched)
            raise ValueError(
                f"cannot restore the data position: the data/batch setup changed ({details})"
            )
        self.position = int(state["position"])
