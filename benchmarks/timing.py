"""Timers, peak memory and the copy-bandwidth ceiling.

Warm up first (JIT, compile, allocator), then time many calls one by one and report order statistics (median,
p10/p90, quartiles), never a mean. On CUDA each call sits between two CUDA events read after a synchronize; on CPU
a ``perf_counter`` pair brackets each call. Calls rotate over several input sets (together larger than the
last-level cache, :func:`num_copies`) so that no call finds its inputs in cache because the previous one touched them.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

DEFAULT_LLC_BYTES = 32 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", DEFAULT_LLC_BYTES))
    for index in (3, 2):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        return int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return DEFAULT_LLC_BYTES


def num_copies(bytes_per_set: int, device: torch.device, lo: int = 2, hi: int = 8) -> int:
    """How many input sets to rotate over: together at least twice the last-level cache, 2 to 8 of them."""
    return max(lo, min(hi, math.ceil(2 * last_level_cache_bytes(device) / max(bytes_per_set, 1))))


def order_stats(values: List[float], unit: str = "") -> Dict[str, float]:
    """Median, p10/p90, quartiles, min and count of ``values`` (keys suffixed with ``_<unit>`` when given)."""
    v = sorted(values)

    def q(p: float) -> float:  # linear interpolation between order statistics
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return v[lo] + (v[hi] - v[lo]) * (k - lo)

    sfx = f"_{unit}" if unit else ""
    return {f"median{sfx}": statistics.median(v), f"p10{sfx}": q(0.10), f"p90{sfx}": q(0.90), f"q1{sfx}": q(0.25),
            f"q3{sfx}": q(0.75), f"min{sfx}": v[0], "n": len(v)}


def summarize(samples_s: List[float]) -> Dict[str, float]:
    """Order statistics of per-call times, in milliseconds."""
    return order_stats([s * 1e3 for s in samples_s], "ms")


def ratio_range(a: Dict[str, float], b: Dict[str, float], unit: str = "ms") -> tuple:
    """The widest a/b can plausibly be given each side's p10-p90 spread: (a.p10 / b.p90, a.p90 / b.p10).
    A b at or below 0 (a memory delta within the noise) counts as 1e-12: the range then covers any threshold."""
    return (a[f"p10_{unit}"] / max(b[f"p90_{unit}"], 1e-12), a[f"p90_{unit}"] / max(b[f"p10_{unit}"], 1e-12))


def too_noisy(a: Dict[str, float], b: Dict[str, float], threshold: float, unit: str = "ms") -> bool:
    """True when the spreads cannot tell whether a/b is above or below ``threshold`` (:func:`ratio_range` contains
    it): a median ratio on its own is then not a finding."""
    lo, hi = ratio_range(a, b, unit)
    return lo <= threshold <= hi


def warm_up(fn: Callable[[int], object], device: torch.device, min_calls: int = 3, min_s: float = 0.1,
            max_calls: int = 1000) -> float:
    """Call ``fn(k)`` at least ``min_calls`` times and for at least ``min_s`` seconds (the first calls after a
    switch of op pay for thread-pool wake-up, allocator growth and lazy initialisation); returns the seconds per
    call of the second half of the warm-up."""
    start = time.perf_counter()
    stamps = [start]
    k = 0
    while k < max_calls and (k < min_calls or stamps[-1] - start < min_s):
        fn(k)
        sync(device)
        stamps.append(time.perf_counter())
        k += 1
    half = len(stamps) // 2
    return (stamps[-1] - stamps[half]) / max(1, len(stamps) - 1 - half)


def time_interleaved(fns: Dict[str, Callable[[int], object]], device: torch.device, *, warmup: int = 3,
                     repeats: int = 50, min_repeats: int = 5,
                     budget_s: Optional[float] = None) -> Dict[str, List[float]]:
    """Per-call seconds of each ``fns[name](k)``, k = 0, 1, 2, ... (each fn picks its input set from k), timed in
    turns -- round r calls every fn once, the first one rotating -- so that a change in machine load hits all of
    them alike. Each is warmed up first. ``budget_s`` caps the timed calls at about that many seconds per fn
    (estimated from the warm-up), never fewer than ``min_repeats`` rounds."""
    names = list(fns)
    per_call = {name: warm_up(fns[name], device, min_calls=warmup) for name in names}
    if budget_s is not None:
        repeats = max(min_repeats, min(repeats, int(budget_s * len(names) / max(sum(per_call.values()), 1e-7))))
    samples: Dict[str, List[float]] = {name: [] for name in names}
    events = []
    for k in range(repeats):
        for name in names[k % len(names):] + names[:k % len(names)]:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name](k)
                end.record()
                events.append((name, start, end))
            else:
                t0 = time.perf_counter()
                fns[name](k)
                samples[name].append(time.perf_counter() - t0)
    if events:
        torch.cuda.synchronize(device)
        for name, start, end in events:
            samples[name].append(start.elapsed_time(end) / 1e3)
    return samples


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak device memory one call allocates above what was allocated before it, outputs and gradients included
    (CUDA); None elsewhere (``--memory`` measures the CPU's resident set)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return int(torch.cuda.max_memory_allocated(device) - before)


def copy_same_bytes(nbytes: int, device: torch.device, *, repeats: int = 30, budget_s: Optional[float] = None,
                    fresh: bool = True, exp: bool = False) -> Dict[str, Dict[str, float]]:
    """A plain copy moving ``nbytes`` (half read, half written, as an op's byte model), timed in turns: into a
    destination allocated once (``reused``) and, with ``fresh``, into one allocated per call, as an op writing a new
    gradient does; with ``exp``, ``torch.exp`` of the same bytes into the reused destination (``exp``: the same
    memory traffic plus one exponential per float32, the least arithmetic a softmax-based loss does per logit). The
    sources rotate as the per-op inputs do. Order statistics of each, with ``GBps``."""
    numel = max(1, nbytes // 2 // 4)
    copies = num_copies(numel * 4, device)
    srcs = [torch.randn(numel, device=device) for _ in range(copies)]
    dst = torch.empty_like(srcs[0])
    fns = {"reused": lambda k: dst.copy_(srcs[k % copies])}
    if fresh:
        fns["fresh"] = lambda k: torch.empty_like(srcs[k % copies]).copy_(srcs[k % copies])
    if exp:
        fns["exp"] = lambda k: torch.exp(srcs[k % copies], out=dst)
    samples = time_interleaved(fns, device, repeats=repeats, budget_s=budget_s, min_repeats=min(10, repeats))
    return {name: dict(summarize(times), bytes=2 * numel * 4,
                       GBps=2 * numel * 4 / (statistics.median(times)) / 1e9) for name, times in samples.items()}


def copy_bandwidth(device: torch.device) -> Dict[str, float]:
    """Measured memory bandwidth of a large device-to-device copy (bytes read + bytes written per second): 1 GiB on
    CUDA (far beyond L2), 256 MiB on CPU (beyond any last-level cache here)."""
    nbytes = 2 << 30 if device.type == "cuda" else 512 << 20
    return copy_same_bytes(nbytes, device, repeats=20 if device.type == "cuda" else 10, fresh=False)["reused"]
