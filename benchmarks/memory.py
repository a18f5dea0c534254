"""Peak memory of one forward+backward on the CPU: peak resident set size (RSS) of a fresh process above its baseline.

There is no allocator hook on the CPU that sees every buffer (PyTorch's CPU allocator calls malloc, and glibc
keeps freed chunks), so this measures what the operating system sees instead. For each (op, impl, dtype, shape)
a fresh Python process (``python -m benchmarks.memory '<json>'``):

1. builds the op's inputs, with ``MALLOC_MMAP_THRESHOLD_`` set (:data:`MMAP_THRESHOLD`; setting it also switches
   off glibc's dynamic threshold) so that every buffer at least that large gets its own mapping from glibc, which
   is unmapped (returned to the OS) as soon as it is freed: the RSS then follows the live tensors instead of the
   heap's history;
2. runs the op once (forward + ``torch.autograd.grad``) as a warm-up: ``torch.compile`` compiles here, thread
   pools start, code pages are read in; none of that is counted;
3. then, ``repeats`` times: resets the RSS high-water mark (writes ``5`` to ``/proc/self/clear_refs``), reads
   ``VmRSS`` (the baseline: inputs, libraries, everything that lives across calls), runs the op, reads ``VmHWM``
   while the outputs and gradients are still held, and frees them. The peak is ``VmHWM - VmRSS`` of that call.

Outputs, saved tensors and gradients count, as they do on CUDA (``torch.cuda.max_memory_allocated``); pages
never written (part of a buffer a kernel does not touch) do not. Buffers smaller than the threshold stay in the
heap and may reuse heap space, so shapes whose tensors are below it give numbers that say little; so do
differences of a few hundred KiB (a call that allocates nothing that large measured -0.06 to +0.03 MiB here). A
fresh process per case keeps one implementation's heap (or compiled code) from changing another's baseline. RSS
does not depend on what other processes run (as long as nothing is swapped out), so unlike times these numbers
hold on a loaded machine. Linux only (``/proc``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

MMAP_THRESHOLD = 65536  # bytes; glibc's default starts at 128 KiB and grows up to 32 MiB as buffers are freed
MEMORY_REPEATS = 7
MEMORY_TARGET_OPS = ("cross_entropy2d", "generator_loss[labelled]")  # fused peak <= 1/2 of eager's
MEMORY_TARGET = 0.5
MIB = 2 ** 20
TAG = "peak-rss-result: "
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_above_baseline(fn: Callable[[], object]) -> int:
    """Bytes of peak RSS during ``fn()`` above the RSS just before it, its result still held when read."""
    reset_peak_rss()
    base = _status_bytes("VmRSS")
    out = fn()
    peak = _status_bytes("VmHWM")
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
    shape = Shape("m", *spec["shape"])
    inputs = C.make_inputs(case, shape, getattr(torch, spec["dtype"]), torch.device("cpu"), 0)
    fn = C.impl_function(case, spec["impl"])
    if case.has_backward:
        fn = C.forward_backward(case, fn)
    fn(inputs)  # warm-up: compile, lazy initialisation; not measured
    samples = [peak_rss_above_baseline(lambda: fn(inputs)) for _ in range(spec["repeats"])]
    return {"samples_bytes": samples, "baseline_bytes": _status_bytes("VmRSS")}


def parse_shape(text: str):
    """A shape name from :mod:`benchmarks.shapes` (``voc-n2``) or ``NxCxHxW`` (``1x5x128x128``)."""
    from .shapes import SHAPE_SETS, Shape

    for shapes in SHAPE_SETS.values():
        for s in shapes:
            if s.name == text:
                return s
    try:
        n, c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"memory shape {text!r}: a shape name or NxCxHxW") from None
    return Shape(text, n, c, h, w)


def _run_child(spec: dict, env: Dict[str, str]) -> dict:
    row = {"op": spec["op"], "impl": spec["impl"], "dtype": spec["dtype"], "shape": spec["shape_name"], "status": "ok"}
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", json.dumps(spec)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
            raise RuntimeError(f"child exited {proc.returncode}: {lines[-1][:160]}")
        got = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)][-1][len(TAG):])
    except Exception as exc:  # recorded; the run goes on
        row["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return row
    from .timing import order_stats

    row["baseline_MiB"] = got["baseline_bytes"] / MIB
    row["samples_MiB"] = [b / MIB for b in got["samples_bytes"]]
    row.update(order_stats(row["samples_MiB"], "MiB"))
    return row


def run_memory(case_names: List[str], impls: List[str], dtypes: List[str], shape, *, threads: int,
               repeats: int = MEMORY_REPEATS, validate_labels: bool = True, jobs: Optional[int] = None,
               log: Callable[[str], None] = print) -> dict:
    """One fresh child per (op, impl, dtype) at ``shape``; medians, p10-p90 and ratios to eager.

    ``jobs`` children run at a time (default: the number of CPUs, at most 4): a process's RSS does not depend on
    what other processes do, so this only saves time (most of a child's time is importing torch, or compiling)."""
    from .timing import ratio_range, too_noisy

    from fastadvseg.utils.allocator import plain_env

    # glibc in the child, whatever allocator the report's own process runs with (a preloaded jemalloc is dropped)
    env = dict(plain_env(), MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               TORCHINDUCTOR_COMPILE_THREADS="1")  # compile in the child itself: no worker pool to start
    specs = [{"op": op, "impl": impl, "dtype": dtype, "shape": [shape.n, shape.c, shape.h, shape.w],
              "shape_name": shape.name, "threads": threads, "repeats": repeats, "validate_labels": validate_labels}
             for dtype in dtypes for op in case_names for impl in impls]
    with ThreadPoolExecutor(max_workers=jobs or min(4, os.cpu_count() or 1)) as pool:
        rows = []
        for row in pool.map(lambda spec: _run_child(spec, env), specs):
            rows.append(row)
            log(_line(row))
    eager = {(r["op"], r["dtype"]): r for r in rows if r["impl"] == "eager" and r["status"] == "ok"}
    for r in rows:
        base = eager.get((r["op"], r["dtype"]))
        if r["status"] != "ok" or base is None or r["impl"] == "eager" or base["median_MiB"] <= 0:
            continue
        r["mem_vs_eager"] = r["median_MiB"] / base["median_MiB"]
        r["mem_vs_eager_range"] = ratio_range(r, base, "MiB")
        threshold = MEMORY_TARGET if r["op"] in MEMORY_TARGET_OPS else 1.0
        r["too_noisy"] = too_noisy(r, base, threshold, "MiB")
    return {"shape": shape.name, "N": shape.n, "C": shape.c, "H": shape.h, "W": shape.w, "threads": threads,
            "repeats": repeats, "malloc": f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} in each child",
            "method": "peak RSS (VmHWM after clear_refs) above VmRSS before one fwd+bwd, in a fresh process per row, "
                      "after one warm-up call", "rows": rows}


def _line(r: dict) -> str:
    head = f"   memory {r['shape']:>10} {r['dtype']:>8} {r['op']:<27} {r['impl']:<9}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    return f"{head} {r['median_MiB']:8.2f} MiB  (p10 {r['p10_MiB']:.2f}, p90 {r['p90_MiB']:.2f}, n={r['n']})"


if __name__ == "__main__":  # the child: one JSON spec in, one tagged JSON line out (other output is ignored)
    print(TAG + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
