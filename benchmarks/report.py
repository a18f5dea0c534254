"""Run the benchmark and write ``<out>/<machine>-<date>.{md,json,png}``.

    python -m benchmarks.report --shapes small --device cpu            # CPU, about 7 minutes on 2 idle cores
    python -m benchmarks.report --shapes full --device cuda --e2e      # GPU: VOC, Cityscapes, ADE20K-like
    python -m benchmarks.report --device cpu --no-op-timing --memory --e2e-compile  # CPU peak RSS, compiled step
    python -m benchmarks.report --device cpu --ops upsampled --memory    # the loss path with upsampling, time + RSS
    python -m benchmarks.report --no-op-timing --call-overhead                    # what one loss call costs
    python -m benchmarks.report --no-op-timing --train-step --allocators --authors-loop   # training steps, allocators

Every ratio is measured within this one run (same process and inputs; ``--memory``, ``--allocators``: a fresh
process per row). benchmarks/README.md says what each column means; ``pytest benchmarks/ --benchmark-only`` times
the same per-op cases (:func:`plan`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
SHAPE_CHOICES = ("smoke", "small", "voc", "cityscapes", "ade", "full")
# fastadvseg.config.ALLOCATORS, spelled out: importing fastadvseg here would come before TRITON_INTERPRET is set
ALLOCATOR_CHOICES = ("auto", "steady", "jemalloc", "tcmalloc", "system")
COPY_OP = "generator_loss[labelled]"  # the op whose bytes the same-bytes copy moves


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--shapes", default="small", choices=SHAPE_CHOICES,
        help="shape set: small = smoke + VOC at N=2 (CPU); full = VOC, Cityscapes, ADE20K-like (GPU)")
    add("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    add("--ops", nargs="+", default=None, help="op rows, API names (their rows at the labels' resolution) or "
        "'upsampled' (the loss path with logits at 1/8 and D's map at 1/32 of the labels; default: all)")
    add("--dtypes", nargs="+", default=None, help="default: float32 bfloat16 (+ float16 on cuda)")
    add("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    add("--name", default=None, help="file stem (default: <machine>-<date>)")
    add("--threads", type=int, default=None, help="torch.set_num_threads for CPU (default: all cores)")
    add("--repeats", type=int, default=None, help="timed calls per impl and case (cap; default 30 CPU, 100 GPU)")
    add("--budget", type=float, default=None, help="seconds of timed calls per impl and case (default 1.5 CPU, 0.5 "
        "GPU); never fewer than 10 calls (or --repeats)")
    add("--no-compile", action="store_true", help="no torch.compile baselines, in the training steps neither")
    add("--backends", nargs="+", default=None, help="time only these fastadvseg backends (default: all available)")
    add("--include-triton-cpu", action="store_true", help="on CPU, time Triton under TRITON_INTERPRET=1 (tiny shapes)")
    add("--no-validate-labels", action="store_true", help="switch fastadvseg's label-range check off")
    add("--no-op-timing", action="store_true", help="skip the per-op tables (run only the extras asked for)")
    add("--no-plot", action="store_true")
    add("--allocator", default="auto", choices=ALLOCATOR_CHOICES, help="this process's memory allocator, every impl "
        "alike (fastadvseg/utils/allocator.py); auto: freed large buffers stay in the heap, so that no timed call "
        "pays page faults for what ran before it; system: the C library's defaults")
    add("--steady-malloc", action="store_true", help="the same as --allocator steady (older commands)")
    x = p.add_argument_group("extras (benchmarks/README.md)").add_argument
    x("--call-overhead", action="store_true", help="each loss's fwd+bwd at the smoke shape: eager vs fastadvseg's "
      "call vs its registered op alone")
    x("--memory", action="store_true", help="CPU: peak RSS of one fwd+bwd, a fresh process per op x impl x dtype")
    x("--memory-shape", default="voc-n2", help="shape for --memory: a shape name or NxCxHxW")
    x("--e2e", action="store_true", help="images/s of the pipeline's training step, fastadvseg vs eager losses")
    x("--e2e-compile", action="store_true", help="that step with the losses plain vs compiled; graph breaks")
    x("--train-step", action="store_true", help="the pipeline's step and the losses alone, fastadvseg / eager / "
      "compile, step times and page faults (VOC, Cityscapes shapes)")
    x("--allocators", action="store_true", help="CPU: the --train-step steps under each allocator, a process each")
    x("--preload", action="append", default=[], metavar="PATH",
      help="with --allocators: a jemalloc or tcmalloc library that is not installed system-wide")
    x("--authors-loop", action="store_true", help="a port of the authors' training iteration beside the pipeline's")
    x("--e2e-segmenter", default=None, help="fastadvseg.models segmenter of the training steps (default: "
      "deeplabv2_compact; deeplabv2_resnet101 for --e2e, --e2e-compile, --authors-loop on GPU)")
    x("--e2e-tiny", action="store_true", help="--e2e and every training part asked for at a tiny size (smoke tests)")
    args = p.parse_args(argv)
    if args.steady_malloc:
        if args.allocator not in ("auto", "steady"):
            p.error(f"--steady-malloc contradicts --allocator {args.allocator}")
        args.allocator = "steady"
    try:
        args.dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else None
    except KeyError as exc:
        p.error(f"unknown dtype {exc}; choose from {', '.join(DTYPES)}")
    return args


def device_and_dtypes(args):
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, args.dtypes or (["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else []))


def impls_for(args, device, shape) -> List[str]:
    from .cases import fused_backends

    return (["eager"] + ([] if args.no_compile else ["compile"])
            + fused_backends(device, shape, args.include_triton_cpu, args.backends))


def plan(args, device, dtypes) -> list:
    """The per-op cases the arguments ask for, in timing order: (shape, dtype name, case, impls)."""
    from .cases import select_cases
    from .shapes import shape_set

    return [(shape, dtype, case, impls_for(args, device, shape)) for shape in shape_set(args.shapes)
            for dtype in dtypes for case in select_cases(args.ops)]


def run_cases(args, device, planned, log, copy_gbps: Optional[float] = None) -> List[dict]:
    """Time every planned case x impl x direction; impls of one (case, shape, dtype, direction) are timed in turns."""
    import torch

    from . import cases as C
    from .env import status_text
    from .timing import peak_memory_bytes, summarize, time_interleaved

    rows: List[dict] = []
    repeats = args.repeats or (100 if device.type == "cuda" else 30)
    budget = args.budget or (0.5 if device.type == "cuda" else 1.5)
    for shape, dtype_name, case, impls in planned:
        dtype = getattr(torch, dtype_name)
        torch._dynamo.reset()  # compile once per case: no recompilation limit, no stale graphs
        sets = C.make_input_sets(case, shape, dtype, device)
        try:
            eager_out = case.eager(sets[0]).detach().float()
        except Exception:  # the eager row below records why
            eager_out = None
        forwards = {impl: C.impl_function(case, impl) for impl in impls}
        for direction in case.directions:
            group: Dict[str, dict] = {}
            fns = {}
            for impl in impls:
                fn = forwards[impl] if direction == "fwd" else C.forward_backward(case, forwards[impl])
                row = group[impl] = {
                    "op": case.name, "api": case.api, "shape": shape.name, "N": shape.n, "C": shape.c, "H": shape.h,
                    "W": shape.w, "dtype": dtype_name, "direction": direction, "impl": impl,
                    "bytes": case.bytes(shape, dtype, direction), "copies": len(sets), "status": "ok"}
                t0 = time.perf_counter()
                try:
                    out = fn(sets[0])  # first call: JIT / compile, and the check against eager
                    if direction == "fwd" and eager_out is not None:
                        row["diff_vs_eager"] = float((out.detach().float() - eager_out).abs().max())
                    del out
                except Exception as exc:  # unsupported dtype, backend bug: recorded, the run goes on
                    row["status"] = status_text(exc)
                    continue
                row["first_call_s"] = time.perf_counter() - t0
                fns[impl] = (lambda f, s=sets: lambda k: f(s[k % len(s)]))(fn)
            try:
                samples = time_interleaved(fns, device, repeats=repeats, budget_s=budget, min_repeats=min(10, repeats))
            except Exception as exc:  # a failure after a good first call: mark the group, go on
                samples = {}
                for impl in fns:
                    group[impl]["status"] = status_text(exc)
            for impl, times in samples.items():
                group[impl].update(summarize(times))
                group[impl]["peak_mem_bytes"] = peak_memory_bytes(lambda: fns[impl](0), device)
            for row in group.values():
                rows.append(row)
                log(_row_line(row))
        del sets, eager_out, forwards
    _add_ratios(rows, copy_gbps)
    return rows


def _row_line(row: dict) -> str:
    head = f"{row['shape']:>10} {row['dtype']:>8} {row['op']:<27} {row['direction']:<6} {row['impl']:<9}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    return f"{head} {row['median_ms']:9.3f} ms  (p10 {row['p10_ms']:.3f}, p90 {row['p90_ms']:.3f}, n={row['n']})"


def _add_ratios(rows: List[dict], copy_gbps: Optional[float]) -> None:
    """Speed-ups over eager and compile with their spreads, memory vs eager, GB/s and its share of the measured copy
    bandwidth: within this run, same case and direction."""
    from .targets import add_ratios

    add_ratios(rows)
    ok = {(r["op"], r["shape"], r["dtype"], r["direction"], r["impl"]): r for r in rows if r["status"] == "ok"}
    for key, r in ok.items():
        eager = ok.get(key[:4] + ("eager",))
        r["mem_vs_eager"] = (r["peak_mem_bytes"] / eager["peak_mem_bytes"] if r.get("peak_mem_bytes") is not None
                             and eager and eager.get("peak_mem_bytes") else None)
        r["GBps"] = r["bytes"] / (r["median_ms"] / 1e3) / 1e9
        r["bw_pct"] = 100 * r["GBps"] / copy_gbps if copy_gbps else None


def same_bytes_copies(args, rows: List[dict], device, log) -> List[dict]:
    """Per shape and dtype with a timed ``generator_loss[labelled]`` fwdbwd: a plain copy of the same bytes (its
    byte model), into a reused and into a fresh destination, timed in this run, beside that op's medians."""
    from .timing import copy_same_bytes

    out = []
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if (r["op"], r["direction"], r["status"]) == (COPY_OP, "fwdbwd", "ok"):
            groups.setdefault((r["shape"], r["dtype"]), {})[r["impl"]] = r
    for (shape, dtype), ops in groups.items():
        first = next(iter(ops.values()))
        nbytes = first["bytes"]
        copies = copy_same_bytes(nbytes, device, repeats=args.repeats or (100 if device.type == "cuda" else 30),
                                 budget_s=args.budget or (0.5 if device.type == "cuda" else 1.5), exp=True)
        row = {"shape": shape, "dtype": dtype, "op": COPY_OP, "direction": "fwdbwd", "bytes": nbytes,
               "copy": copies, "ops": {impl: {
                   "median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                   "pct_of_copy": {k: 100 * c["median_ms"] / r["median_ms"] for k, c in copies.items()}}
                   for impl, r in ops.items()}}
        for impl, o in row["ops"].items():
            if impl not in ("eager", "compile", "reference"):
                o["in_cache"] = in_cache_rate(impl, first["N"] * first["H"] * first["W"], first["C"], dtype, device,
                                              args)
        out.append(row)
        log(f"# copy of {nbytes / 1e6:.2f} MB ({COPY_OP} fwdbwd at {shape}, {dtype}): reused dst "
            f"{copies['reused']['median_ms']:.3f} ms ({copies['reused']['GBps']:.1f} GB/s), fresh dst "
            f"{copies['fresh']['median_ms']:.3f} ms ({copies['fresh']['GBps']:.1f} GB/s), exp of the same bytes "
            f"{copies['exp']['median_ms']:.3f} ms")
    return out


IN_CACHE_SIDES = (96, 192)  # N=1: at 192x192 and 21 classes, logits and gradient are 6 MiB, inside an L3


def in_cache_rate(impl: str, pixels: int, classes: int, dtype: str, device, args) -> Dict[str, float]:
    """What ``COPY_OP`` fwdbwd costs when memory is not the limit: timed on one input set that stays in the
    last-level cache, at two sizes (N=1, C as the row, :data:`IN_CACHE_SIDES` squared), in turns; the slope of
    time over pixels (the per-call cost cancels) is its arithmetic cost per pixel, scaled to the row's
    ``pixels`` as ``scaled_ms``: the row's time if it were bound by its arithmetic alone."""
    from .cases import forward_backward, impl_function, make_inputs, select_cases
    from .shapes import Shape
    from .timing import time_interleaved

    case = select_cases([COPY_OP])[0]
    fns, sizes = {}, {}
    for side in IN_CACHE_SIDES:
        shape = Shape(f"in-cache-{side}", 1, classes, side, side)
        inputs = make_inputs(case, shape, getattr(torch, dtype), device, 0)
        run = forward_backward(case, impl_function(case, impl))
        fns[shape.name] = (lambda run, inputs: lambda k: run(inputs))(run, inputs)
        sizes[shape.name] = shape.pixels
    samples = time_interleaved(fns, device, repeats=args.repeats or 30, budget_s=args.budget or 1.5)
    med = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in samples.items()}
    (a, pa), (b, pb) = ((med[n], sizes[n]) for n in fns)
    per_pixel_ms = (b - a) / (pb - pa)
    return {"ms": med, "pixels": sizes, "per_mpixel_ms": per_pixel_ms * 1e6, "scaled_ms": per_pixel_ms * pixels}


def main(argv: Optional[List[str]] = None, *, own_process: bool = False) -> int:
    """``own_process`` (``python -m benchmarks.report``): set the process's allocator as ``--allocator`` says
    (``jemalloc``/``tcmalloc`` restart the process); called as a function, only ``steady`` is applied (in-process)."""
    args = parse_args(argv)
    if args.include_triton_cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by fastadvseg's triton backend)
    from fastadvseg.utils import allocator

    alloc = allocator.configure(args.allocator, reexec=own_process)
    import torch

    import fastadvseg

    from . import cases as C
    from . import env, targets
    from . import train_step as T
    from .render import render_markdown, render_plot
    from .timing import copy_bandwidth

    device, dtypes = device_and_dtypes(args)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.no_validate_labels:
        fastadvseg.set_label_validation(False)
    cases = C.select_cases(args.ops)
    meta = env.collect(device, threads)
    meta.update(malloc=alloc.description, shape_set=args.shapes)
    meta["unavailable"] = {b: fastadvseg.unavailable_reason(b) or f"cannot run on {device.type} tensors"
                           for b in fastadvseg.BACKEND_NAMES if b not in meta.get("backends", [])}
    if device.type == "cpu" and "triton" in meta.get("backends", []) and not args.include_triton_cpu:
        meta["unavailable"]["triton"] = "excluded on CPU (interpreter); --include-triton-cpu times it on tiny shapes"
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | threads {threads} | "
        f"backends {meta.get('backends')} | load {meta['load_average_start']}")
    log(f"# {alloc.log_line()}")
    t_start = time.perf_counter()
    meta["copy_bandwidth"] = copy_bandwidth(device)
    log(f"# measured copy bandwidth: {meta['copy_bandwidth']['GBps']:.1f} GB/s")
    rows = [] if args.no_op_timing else run_cases(args, device, plan(args, device, dtypes), log,
                                                  meta["copy_bandwidth"]["GBps"])
    result = {"meta": meta, "rows": rows, "copy_rows": same_bytes_copies(args, rows, device, log)}
    if args.call_overhead:
        from .overhead import run_overhead
        from .shapes import SMOKE

        result["overhead"] = run_overhead(device, args.ops, C.fused_backends(device, SMOKE, args.include_triton_cpu,
                                                                             args.backends),
                                          repeats=args.repeats or 200, budget_s=args.budget or 0.5, log=log)
    for part in ("e2e", "e2e_compile", "train_step", "allocators", "authors_loop"):
        if part == "allocators" and args.allocators:
            result[part] = T.run_allocators(device, tiny=args.e2e_tiny, threads=threads, preload=args.preload, log=log)
        elif getattr(args, part) or (part == "e2e" and args.e2e_tiny):
            result[part] = T.run_part(part, device, tiny=args.e2e_tiny, segmenter=args.e2e_segmenter,
                                      no_compile=args.no_compile and part != "e2e_compile", log=log)
    if args.memory and device.type != "cpu":
        log("# --memory measures the CPU (RSS); on CUDA the per-op tables already have peak MiB")
    elif args.memory:
        from .memory import run_memory
        from .shapes import parse_shape

        mshape = parse_shape(args.memory_shape)
        result["memory"] = run_memory([c.name for c in cases], impls_for(args, device, mshape), dtypes, mshape,
                                      threads=threads, validate_labels=not args.no_validate_labels, log=log)
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    meta["load_average_end"] = env.load_average()
    result["targets"] = targets.evaluate(rows, device.type, result.get("e2e"), result.get("memory"))
    note = targets.missing_backend_note(device.type, meta.get("backends", []), meta["unavailable"])
    result.update(notes=[note] if note else [], byte_model={c.name: c.byte_model for c in cases})

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"{meta['machine']}-{meta['stamp']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(render_markdown(result))
    if not args.no_plot:
        render_plot(result, stem + ".png")
    log(f"# wrote {stem}.md, .json" + ("" if args.no_plot else ", .png") + f" in {meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(own_process=True))
