"""Timers, peak memory and the copy-bandwidth ceiling.

Discipline: warm up first (JIT, compile, allocator), then time many calls one by one and report order statistics
(median, p10/p90, quartiles), never a mean. On CUDA each call sits between two CUDA events and the time is read
after a synchronize; on CPU a ``perf_counter`` pair brackets each call. Calls rotate over several input sets
(together larger than the last-level cache, see :func:`num_copies`) so that no call finds its inputs in cache
because the previous call just touched them.
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
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    return DEFAULT_LLC_BYTES


def num_copies(bytes_per_set: int, device: torch.device, lo: int = 2, hi: int = 8) -> int:
    """How many input sets to rotate over: together at least twice the last-level cache, 2 to 8 of them."""
    need = math.ceil(2 * last_level_cache_bytes(device) / max(bytes_per_set, 1))
    return max(lo, min(hi, need))


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
    """True when the spread of the measurements cannot tell whether a/b is above or below ``threshold``:
    the range of :func:`ratio_range` contains it. A median ratio on its own is then not a finding."""
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
    """Per-call seconds of each ``fns[name](k)``, k = 0, 1, 2, ... (each fn picks its input set from k).

    The implementations are timed in turns -- round r calls every fn once, the first one rotating -- so that a
    change in machine load (other jobs on a shared CPU, GPU clocks) hits all of them alike and their ratios stay
    fair. Each is warmed up first (:func:`warm_up`). ``budget_s`` caps the timed calls at about that many seconds
    per fn (estimated from the warm-up), never fewer than ``min_repeats`` rounds.
    """
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


def time_calls(fn: Callable[[int], object], device: torch.device, **kw) -> List[float]:
    """:func:`time_interleaved` of one function."""
    return time_interleaved({"fn": fn}, device, **kw)["fn"]


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak device memory one call allocates above what was allocated before it (CUDA); None elsewhere.

    Whatever the call returns (outputs, gradients) is counted, as it is in a training step. There is no honest
    equivalent on the CPU without an allocator hook, so the CPU reports n/a.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 20) -> Dict[str, float]:
    """Measured memory bandwidth of a large device-to-device copy (bytes read + bytes written per second).

    The buffer is 1 GiB on CUDA (far beyond L2) and 256 MiB on CPU (beyond any last-level cache here).
    """
    if device.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
        repeats = min(repeats, 10)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    samples = time_calls(lambda k: dst.copy_(src), device, warmup=3, repeats=repeats)
    stats = summarize(samples)
    return {"bytes": 2 * nbytes, "median_ms": stats["median_ms"],
            "GBps": 2 * nbytes / (stats["median_ms"] / 1e3) / 1e9}


def copy_same_bytes(nbytes: int, device: torch.device, *, repeats: int = 30, budget_s: Optional[float] = None,
                    copies: Optional[int] = None) -> Dict[str, Dict[str, float]]:
    """What a plain copy moving ``nbytes`` (read ``nbytes / 2``, write ``nbytes / 2``: an op's byte model) takes:
    ``dst.copy_(src)`` into a destination allocated once (``reused``) and into one allocated for each call
    (``fresh``: ``torch.empty_like(src).copy_(src)``, whatever the allocator then does with that memory, as an op
    that writes a new gradient has to). The sources rotate over copies that together exceed twice the last-level
    cache, as the per-op timings' inputs do; the two are timed in turns. Returns the order statistics of each with
    ``GBps`` (``nbytes`` over the median)."""
    numel = max(1, nbytes // 2 // 4)
    copies = copies or num_copies(numel * 4, device)
    srcs = [torch.randn(numel, device=device) for _ in range(copies)]
    dst = torch.empty_like(srcs[0])
    fns = {"reused": lambda k: dst.copy_(srcs[k % copies]),
           "fresh": lambda k: torch.empty_like(srcs[k % copies]).copy_(srcs[k % copies])}
    samples = time_interleaved(fns, device, repeats=repeats, budget_s=budget_s, min_repeats=min(10, repeats))
    out = {}
    for name, times in samples.items():
        stats = summarize(times)
        stats["GBps"] = 2 * numel * 4 / (stats["median_ms"] / 1e3) / 1e9
        out[name] = stats
    return out
