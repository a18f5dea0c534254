"""torchrun / DistributedDataParallel plumbing: set up from the environment, tear down cleanly."""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device_name: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def any_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is True on any (e.g. a SIGTERM that reached only some ranks)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def teardown(info: DistInfo) -> None:
    """End a worker cleanly: barrier, destroy the process group, flush. (gloo on CPU otherwise aborts now and then
    at interpreter exit, after all work is done.)"""
    if info.enabled and dist.is_initialized():
        try:
            barrier(info)
        finally:
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def finish(info: DistInfo, code: int = 0) -> int:
    """The exit status ``code`` of a CLI; a distributed worker (after ``teardown``) leaves at once with
    ``os._exit``, skipping the interpreter teardown where gloo on CPU now and then aborts."""
    if info.enabled:
        os._exit(code)
    return code


@contextlib.contextmanager
def cpu_threads(n: Optional[int]):
    """torch's intra-op thread count set to ``n`` (None or 0: unchanged) for the block, then restored."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(old)
