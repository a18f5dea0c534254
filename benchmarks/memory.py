"""``--memory``: peak resident set size (RSS) of one forward+backward on the CPU, above the baseline of a fresh
process: no allocator hook on the CPU sees every buffer, so this measures what the operating system sees.

Per (op, impl, dtype) a child (``python -m benchmarks.memory '<json>'``, every buffer of 64 KiB or more in its own
mapping, given back to the OS when freed, so that the RSS follows the live tensors rather than the heap's history)
builds the inputs, runs the op once (compilation, thread pools, code pages: not counted), then per call resets the
high-water mark (``/proc/self/clear_refs``), reads ``VmRSS``, runs the op and reads ``VmHWM`` with the outputs and
gradients still held. Differences of a few hundred KiB say little. RSS does not depend on other load. Linux only.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional

MMAP_THRESHOLD = 65536  # bytes; glibc's default starts at 128 KiB and grows up to 32 MiB as buffers are freed
MEMORY_REPEATS = 7
# fused peak over eager's, at most: the upsampling rows never hold the full-resolution logits or their gradient
MEMORY_TARGETS = {"cross_entropy2d": 0.5, "generator_loss[labelled]": 0.5, "cross_entropy2d[upsampled]": 0.25,
                  "generator_path[labelled,upsampled]": 0.5}
MIB = 2 ** 20


def status_bytes(field: str) -> int:
    """A byte count of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); OSError off Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"no {field} in /proc/self/status")


def peak_rss_above_baseline(fn: Callable[[], object]) -> int:
    """Bytes of peak RSS during ``fn()`` above the RSS just before it, its result still held when read."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS (Linux >= 4.0)
    base = status_bytes("VmRSS")
    out = fn()
    peak = status_bytes("VmHWM")
    del out
    return peak - base


def measure(spec: dict) -> dict:
    """Runs in the fresh child: warm-up, then ``repeats`` measured calls of one case (see the module docstring)."""
    import torch

    from . import cases as C
    from .shapes import Shape

    torch.set_num_threads(spec["threads"])
    if spec["impl"] not in ("eager", "compile") and not spec.get("validate_labels", True):
        import fastadvseg  # imported only where it runs: eager and compile children never load it

        fastadvseg.set_label_validation(False)
    case = C.select_cases([spec["op"]])[0]
    inputs = C.make_inputs(case, Shape("m", *spec["shape"]), getattr(torch, spec["dtype"]), torch.device("cpu"), 0)
    fn = C.impl_function(case, spec["impl"])
    if case.has_backward:
        fn = C.forward_backward(case, fn)
    fn(inputs)  # warm-up: compile, lazy initialisation; not measured
    samples = [peak_rss_above_baseline(lambda: fn(inputs)) for _ in range(spec["repeats"])]
    return {"samples_bytes": samples, "baseline_bytes": status_bytes("VmRSS")}


def run_memory(case_names: List[str], impls: List[str], dtypes: List[str], shape, *, threads: int,
               repeats: int = MEMORY_REPEATS, validate_labels: bool = True, jobs: Optional[int] = None,
               log: Callable[[str], None] = print) -> dict:
    """One fresh child per (op, impl, dtype) at ``shape``; medians, p10-p90 and ratios to eager. ``jobs`` children
    at a time (default: the CPUs, at most 4): a process's RSS does not depend on what others do."""
    from fastadvseg.utils.allocator import plain_env

    from .env import run_child, status_text
    from .timing import order_stats, ratio_range, too_noisy

    # glibc in the child, whatever allocator the report's own process runs with (a preloaded jemalloc is dropped)
    env = dict(plain_env(), MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               TORCHINDUCTOR_COMPILE_THREADS="1")  # compile in the child itself: no worker pool to start

    def row_of(spec: dict) -> dict:
        row = {"op": spec["op"], "impl": spec["impl"], "dtype": spec["dtype"], "shape": shape.name, "status": "ok"}
        try:
            got = run_child("benchmarks.memory", spec, env, timeout=900)
        except Exception as exc:  # recorded; the run goes on
            return dict(row, status=status_text(exc))
        row.update(baseline_MiB=got["baseline_bytes"] / MIB, samples_MiB=[b / MIB for b in got["samples_bytes"]])
        return dict(row, **order_stats(row["samples_MiB"], "MiB"))

    specs = [{"op": op, "impl": impl, "dtype": dtype, "shape": [shape.n, shape.c, shape.h, shape.w],
              "threads": threads, "repeats": repeats, "validate_labels": validate_labels}
             for dtype in dtypes for op in case_names for impl in impls]
    rows = []
    with ThreadPoolExecutor(max_workers=jobs or min(4, os.cpu_count() or 1)) as pool:
        for r in pool.map(row_of, specs):
            rows.append(r)
            log(f"   memory {r['shape']:>10} {r['dtype']:>8} {r['op']:<27} {r['impl']:<9} " + (
                f"{r['median_MiB']:8.2f} MiB  (p10 {r['p10_MiB']:.2f}, p90 {r['p90_MiB']:.2f}, n={r['n']})"
                if r["status"] == "ok" else r["status"]))
    eager = {(r["op"], r["dtype"]): r for r in rows if r["impl"] == "eager" and r["status"] == "ok"}
    for r in rows:
        base = eager.get((r["op"], r["dtype"]))
        if r["status"] != "ok" or base is None or r["impl"] == "eager" or base["median_MiB"] <= 0:
            continue
        r["mem_vs_eager"] = r["median_MiB"] / base["median_MiB"]
        r["mem_vs_eager_range"] = ratio_range(r, base, "MiB")
        r["too_noisy"] = too_noisy(r, base, MEMORY_TARGETS.get(r["op"], 1.0), "MiB")
    return {"shape": shape.name, "N": shape.n, "C": shape.c, "H": shape.h, "W": shape.w, "threads": threads,
            "repeats": repeats, "malloc": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in each child",
            "method": "peak RSS (VmHWM after clear_refs) above VmRSS before one fwd+bwd, in a fresh process per row, "
                      "after one warm-up call", "rows": rows}


if __name__ == "__main__":
    from .env import child_main

    child_main(measure)
