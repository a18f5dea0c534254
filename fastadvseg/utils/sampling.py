"""Deterministic, resumable batches: step ``s`` of a run always gets the same images with the same augmentation.

Nothing depends on iterator state. The batch of step ``s`` of a stream (e.g. "labelled", "unlabelled") is the
slice ``[s*B, (s+1)*B)`` of an endless sequence of epochs, each epoch a permutation drawn from
``(seed, stream, epoch)``; every item's augmentation is drawn from torch's RNG seeded by
``(seed, stream, step, slot)`` (the data transforms use torch's global RNG, which is forked so the caller's RNG
is untouched), with one CPU thread. Resuming at step ``k`` therefore replays exactly what an uninterrupted run would have seen, with any
number of DataLoader workers. Under DDP each rank takes its contiguous share of the global batch.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from .distributed import cpu_threads


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, stream: str, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(derive_seed(seed, stream, "epoch", epoch))
    return torch.randperm(n, generator=gen)


def step_indices(n: int, batch_size: int, seed: int, stream: str, step: int) -> List[int]:
    """Dataset indices of the global batch of ``step``."""
    out = []
    cache = {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        if epoch not in cache:
            cache[epoch] = epoch_permutation(n, seed, stream, epoch)
        out.append(int(cache[epoch][k]))
    return out


def rank_slice(batch_size: int, rank: int, world_size: int) -> Tuple[int, int]:
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world_size} processes")
    per = batch_size // world_size
    return rank * per, (rank + 1) * per


class StepBatches(Dataset):
    """Map-style dataset whose item ``s`` is this rank's (images, labels, names) batch of training step ``s``."""

    def __init__(self, dataset, batch_size: int, seed: int, stream: str, rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise ValueError(f"the {stream} set is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.stream = stream
        self.lo, self.hi = rank_slice(batch_size, rank, world_size)

    def __len__(self) -> int:  # effectively endless
        return 1 << 62

    def __getitem__(self, step: int):
        indices = step_indices(len(self.dataset), self.batch_size, self.seed, self.stream, step)
        images, labels, names = [], [], []
        # One thread, in the main process as in a worker: CPU bilinear resizing rounds differently with other thread
        # counts (measured: 5e-7), and the batch of a step must not depend on where it is made.
        with cpu_threads(1):
            for slot in range(self.lo, self.hi):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(self.seed, self.stream, "aug", step, slot))
                    image, label, name = self.dataset[indices[slot]]
                images.append(image)
                labels.append(label)
                names.append(name)
        return torch.stack(images), torch.stack(labels), names


class _Steps(torch.utils.data.Sampler):
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def step_loader(batches: StepBatches, start: int, stop: int, num_workers: int = 0, pin_memory: bool = False):
    """Iterate the batches of steps ``start .. stop-1`` (workers prefetch; the order is fixed)."""
    return DataLoader(batches, batch_size=None, sampler=_Steps(start, stop), num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=2 if num_workers > 0 else None)
