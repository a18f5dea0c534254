"""Run the benchmark and write ``<out>/<machine>-<date>.{md,json,png}``.

    python -m benchmarks.report --shapes small --device cpu            # CPU, about 5 minutes on 2 idle cores
    python -m benchmarks.report --shapes full --device cuda --e2e      # GPU: VOC, Cityscapes, ADE20K-like
    python -m benchmarks.report --device cpu --no-op-timing --memory --e2e-compile  # CPU peak RSS, compiled step
    python -m benchmarks.report --no-op-timing --call-overhead                    # what one loss call costs
    python -m benchmarks.report --no-op-timing --train-step --allocators --authors-loop   # training steps, allocators

Every ratio in the output is measured within this one run (same process, same inputs; ``--memory``: a fresh
process per row, see benchmarks/memory.py); absolute times from different runs are never compared. See
benchmarks/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
SHAPE_CHOICES = ("smoke", "small", "voc", "cityscapes", "ade", "full")
# fastadvseg.config.ALLOCATORS, spelled out: importing fastadvseg here would come before TRITON_INTERPRET is set
ALLOCATOR_CHOICES = ("auto", "steady", "jemalloc", "tcmalloc", "system")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="small", choices=SHAPE_CHOICES,
                   help="shape set: small = smoke + VOC at N=2 (CPU); full = VOC, Cityscapes, ADE20K-like (GPU)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--ops", nargs="+", default=None, help="op rows or API names (default: all)")
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="default: float32 bfloat16 (+ float16 on cuda)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default=None, help="file stem (default: <machine>-<date>)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU (default: all cores)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per impl and case (cap; default 30 CPU, 100 GPU)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per impl and case (default 1.5 CPU, 0.5 GPU); "
                        "never fewer than 10 calls (or --repeats)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile baselines, in --train-step and --authors-loop too (smoke tests)")
    p.add_argument("--backends", nargs="+", default=None,
                   help="time only these fastadvseg backends (default: every one available_backends lists)")
    p.add_argument("--include-triton-cpu", action="store_true",
                   help="on CPU, also time the Triton backend under TRITON_INTERPRET=1, tiny shapes only")
    p.add_argument("--no-validate-labels", action="store_true",
                   help="switch fastadvseg's label-range check off (default: on, as users get it)")
    p.add_argument("--e2e", action="store_true", help="also time one training iteration, fused vs reference losses")
    p.add_argument("--e2e-tiny", action="store_true",
                   help="--e2e at a tiny size, 2 timed steps, and the other end-to-end parts asked for (--e2e-compile, "
                        "--train-step, --allocators, --authors-loop) at tiny sizes too (smoke tests)")
    p.add_argument("--e2e-compile", action="store_true",
                   help="also time one training iteration with fastadvseg's losses, eager vs torch.compile of the "
                        "loss functions, and count the graph breaks (torch._dynamo.explain)")
    p.add_argument("--call-overhead", action="store_true",
                   help="also time each loss's forward+backward at the smoke shape (kernels cost microseconds there): "
                        "eager composition vs fastadvseg's call vs the same call through torch.ops (the dispatcher)")
    p.add_argument("--memory", action="store_true",
                   help="CPU: peak RSS of one fwd+bwd above baseline, a fresh process per op x impl x dtype "
                        "(several minutes at voc-n2 on 2 cores, most of it starting Python and torch.compile)")
    p.add_argument("--memory-shape", default="voc-n2",
                   help="shape for --memory: a shape name (default voc-n2, the CPU target shape) or NxCxHxW")
    p.add_argument("--no-op-timing", action="store_true",
                   help="skip the per-op timing tables (run only --call-overhead / --memory / --e2e / --e2e-compile)")
    p.add_argument("--e2e-segmenter", default=None,
                   help="fastadvseg.models.build_segmenter name for the e2e G and --authors-loop (default: "
                        "deeplabv2_compact on CPU, deeplabv2_resnet101 on GPU); 'stand-in' (or no fastadvseg.models): "
                        "a small labelled stand-in (--e2e, --e2e-compile only)")
    p.add_argument("--train-step", action="store_true",
                   help="also time the training step as python -m fastadvseg.train runs it (its train_step, its "
                        "default compact G and D) and the losses-only step, fastadvseg vs eager vs torch.compile, with "
                        "p10/p50/p90 and minor page faults per step (VOC, Cityscapes shapes; benchmarks/train_step.py)")
    p.add_argument("--allocators", action="store_true",
                   help="CPU: also time the fastadvseg and eager steps of --train-step under each memory allocator "
                        "(the C library's defaults, steady, jemalloc and tcmalloc where installed), a process each")
    p.add_argument("--preload", action="append", default=[], metavar="PATH",
                   help="with --allocators: a jemalloc or tcmalloc shared library to compare that is not installed "
                        "system-wide (repeatable)")
    p.add_argument("--authors-loop", action="store_true",
                   help="also time the authors' training iteration (a port of AdvSemiSeg's train.py, "
                        "benchmarks/authors_loop.py) beside the pipeline's with fastadvseg's losses, eager and "
                        "compiled, and with the plain PyTorch composition: images/s")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--allocator", default="auto", choices=ALLOCATOR_CHOICES,
                   help="the memory allocator of this run's process (fastadvseg/utils/allocator.py), every impl "
                        "alike; auto (default): steady, i.e. freed large buffers stay in the heap (glibc mallopt) so "
                        "that no timed call pays page faults for what ran before it; system: the C library's defaults")
    p.add_argument("--steady-malloc", action="store_true", help="the same as --allocator steady (older commands)")
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


def _status(exc: Exception) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"


def run_cases(args, device, shapes, dtypes, cases, log) -> List[dict]:
    """Time every case x impl x direction; impls of one (case, shape, dtype, direction) are timed in turns."""
    import torch

    from . import cases as C
    from .timing import peak_memory_bytes, summarize, time_interleaved

    rows: List[dict] = []
    repeats = args.repeats or (100 if device.type == "cuda" else 30)
    budget = args.budget or (0.5 if device.type == "cuda" else 1.5)
    for shape in shapes:
        backends = [b for b in C.fused_backends(device, shape, args.include_triton_cpu)
                    if args.backends is None or b in args.backends]
        impls = ["eager"] + ([] if args.no_compile else ["compile"]) + backends
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for case in cases:
                torch._dynamo.reset()  # compile once per case: no recompilation limit, no stale graphs
                sets = C.make_input_sets(case, shape, dtype, device)
                try:
                    eager_out = case.eager(sets[0]).detach().float()
                except Exception:  # the eager row below records why
                    eager_out = None
                forwards = {impl: C.impl_function(case, impl) for impl in impls}
                for direction in ("fwd", "fwdbwd") if case.has_backward else ("fwd",):
                    group: Dict[str, dict] = {}
                    fns = {}
                    for impl in impls:
                        fn = forwards[impl] if direction == "fwd" else C.forward_backward(case, forwards[impl])
                        row = group[impl] = {
                            "op": case.name, "api": case.api, "shape": shape.name, "N": shape.n, "C": shape.c,
                            "H": shape.h, "W": shape.w, "dtype": dtype_name, "direction": direction, "impl": impl,
                            "bytes": case.bytes(shape, dtype, direction), "copies": len(sets), "status": "ok"}
                        t0 = time.perf_counter()
                        try:
                            out = fn(sets[0])  # first call: JIT / compile, and the check against eager
                            if direction == "fwd" and eager_out is not None:
                                row["diff_vs_eager"] = float((out.detach().float() - eager_out).abs().max())
                            del out
                        except Exception as exc:  # unsupported dtype, backend bug: recorded, the run goes on
                            row["status"] = _status(exc)
                            continue
                        row["first_call_s"] = time.perf_counter() - t0
                        fns[impl] = (lambda f: lambda k: f(sets[k % len(sets)]))(fn)
                    try:
                        samples = time_interleaved(fns, device, repeats=repeats, budget_s=budget,
                                                   min_repeats=min(10, repeats))
                    except Exception as exc:  # a failure after a good first call: mark the group, go on
                        samples = {}
                        for impl in fns:
                            group[impl]["status"] = _status(exc)
                    for impl, times in samples.items():
                        group[impl].update(summarize(times))
                        group[impl]["peak_mem_bytes"] = peak_memory_bytes(lambda: fns[impl](0), device)
                    for row in group.values():
                        rows.append(row)
                        log(_row_line(row))
                del sets, eager_out, forwards
    _add_ratios(rows)
    return rows


def _row_line(row: dict) -> str:
    head = f"{row['shape']:>10} {row['dtype']:>8} {row['op']:<27} {row['direction']:<6} {row['impl']:<9}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    return f"{head} {row['median_ms']:9.3f} ms  (p10 {row['p10_ms']:.3f}, p90 {row['p90_ms']:.3f}, n={row['n']})"


def _add_ratios(rows: List[dict]) -> None:
    """Speed-ups over eager and compile, memory vs eager: all within this run, same case and direction."""
    from .quality import add_ranges

    base: Dict[tuple, dict] = {}
    for r in rows:
        if r["impl"] in ("eager", "compile") and r["status"] == "ok":
            base[(r["op"], r["shape"], r["dtype"], r["direction"], r["impl"])] = r
    for r in rows:
        if r["status"] != "ok":
            continue
        key = (r["op"], r["shape"], r["dtype"], r["direction"])
        for b in ("eager", "compile"):
            ref = base.get(key + (b,))
            r[f"speedup_vs_{b}"] = ref["median_ms"] / r["median_ms"] if ref else None
        eager = base.get(key + ("eager",))
        if r.get("peak_mem_bytes") is not None and eager and eager.get("peak_mem_bytes"):
            r["mem_vs_eager"] = r["peak_mem_bytes"] / eager["peak_mem_bytes"]
        else:
            r["mem_vs_eager"] = None
        r["GBps"] = r["bytes"] / (r["median_ms"] / 1e3) / 1e9
    # GPU: the two kernel backends against each other (> 1: cuda is faster)
    by_impl = {(r["op"], r["shape"], r["dtype"], r["direction"], r["impl"]): r for r in rows if r["status"] == "ok"}
    for key, r in by_impl.items():
        triton = by_impl.get(key[:4] + ("triton",))
        if key[4] == "cuda" and triton:
            r["cuda_vs_triton"] = triton["median_ms"] / r["median_ms"]
    add_ranges(rows)  # each ratio's p10-p90 bounds, and whether the two spreads overlap


def add_bandwidth_pct(rows: List[dict], copy_gbps: Optional[float]) -> None:
    for r in rows:
        if r["status"] == "ok":
            r["bw_pct"] = 100 * r["GBps"] / copy_gbps if copy_gbps else None


COPY_OP = "generator_loss[labelled]"  # the op whose bytes the same-bytes copy moves


def same_bytes_copies(args, rows: List[dict], device, shapes, log) -> List[dict]:
    """Per shape and dtype with a timed ``generator_loss[labelled]`` fwdbwd: a plain copy of the same bytes (its
    byte model), into a reused and into a fresh destination, timed in this run, beside that op's medians."""
    from .timing import copy_same_bytes

    out = []
    for shape in shapes:
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["shape"] == shape.name):
            ops = {r["impl"]: r for r in rows if (r["op"], r["shape"], r["dtype"], r["direction"], r["status"]) ==
                   (COPY_OP, shape.name, dtype, "fwdbwd", "ok")}
            if not ops:
                continue
            nbytes = next(iter(ops.values()))["bytes"]
            copies = copy_same_bytes(nbytes, device, repeats=args.repeats or (100 if device.type == "cuda" else 30),
                                     budget_s=args.budget or (0.5 if device.type == "cuda" else 1.5))
            row = {"shape": shape.name, "dtype": dtype, "op": COPY_OP, "direction": "fwdbwd", "bytes": nbytes,
                   "copy": copies, "ops": {}}
            for impl, r in ops.items():
                row["ops"][impl] = {"median_ms": r["median_ms"], "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"],
                                    "pct_of_copy": {k: 100 * c["median_ms"] / r["median_ms"]
                                                    for k, c in copies.items()}}
            out.append(row)
            log(f"# copy of {nbytes / 1e6:.2f} MB ({COPY_OP} fwdbwd at {shape.name}, {dtype}): reused dst "
                f"{copies['reused']['median_ms']:.3f} ms ({copies['reused']['GBps']:.1f} GB/s), fresh dst "
                f"{copies['fresh']['median_ms']:.3f} ms ({copies['fresh']['GBps']:.1f} GB/s)")
    return out


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
    from .render import render_markdown, render_plot
    from .shapes import shape_set
    from .timing import copy_bandwidth

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.no_validate_labels:
        fastadvseg.set_label_validation(False)
    dtypes = args.dtypes or (["float32", "bfloat16"] + (["float16"] if device.type == "cuda" else []))
    shapes = shape_set(args.shapes)
    cases = C.select_cases(args.ops)

    meta = env.collect(device, threads)
    meta["malloc"] = alloc.description
    meta["shape_set"] = args.shapes
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
    rows = [] if args.no_op_timing else run_cases(args, device, shapes, dtypes, cases, log)
    add_bandwidth_pct(rows, meta["copy_bandwidth"]["GBps"])
    copy_rows = same_bytes_copies(args, rows, device, shapes, log)
    overhead = None
    if args.call_overhead:
        from .overhead import run_overhead
        from .shapes import SMOKE

        backends = [b for b in C.fused_backends(device, SMOKE, args.include_triton_cpu)
                    if args.backends is None or b in args.backends]
        overhead = run_overhead(device, args.ops, backends, repeats=args.repeats or 200,
                                budget_s=args.budget or 0.5, log=log)
    e2e = None
    if args.e2e or args.e2e_tiny:
        from .e2e import E2E_REPEATS, E2E_SIZES, run_e2e

        size = "tiny" if args.e2e_tiny else device.type
        n, c, h, w = E2E_SIZES[size]
        e2e = run_e2e(device, n, c, h, w, segmenter=args.e2e_segmenter, repeats=E2E_REPEATS[size],
                      warmup=1 if args.e2e_tiny else 2)
        log(f"# e2e: fused {e2e['fused']['images_per_s']:.2f} img/s, reference {e2e['reference']['images_per_s']:.2f}"
            f" img/s, x{e2e['speedup']:.2f} ({e2e['models']})")
    e2e_compile = None
    if args.e2e_compile:
        from .e2e import E2E_REPEATS, E2E_SIZES, run_e2e_compile

        size = "tiny" if args.e2e_tiny else device.type
        n, c, h, w = E2E_SIZES[size]
        e2e_compile = run_e2e_compile(device, n, c, h, w, segmenter=args.e2e_segmenter, repeats=E2E_REPEATS[size],
                                      warmup=1 if args.e2e_tiny else 2)
        log(f"# e2e compile: eager {e2e_compile['eager']['median_ms']:.1f} ms, compiled "
            f"{e2e_compile['compiled']['median_ms']:.1f} ms, compiled/eager {e2e_compile['compiled_vs_eager']:.2f}x,"
            f" graph breaks {e2e_compile['graph_breaks']}")
    train_step = allocators = authors = None
    if args.train_step:
        from .train_step import IMPLS, run_train_step

        train_step = run_train_step(device, tiny=args.e2e_tiny, log=log,
                                    impls=[i for i in IMPLS if not (args.no_compile and i == "compile")])
    if args.allocators:
        from .train_step import run_allocators

        allocators = run_allocators(device, tiny=args.e2e_tiny, threads=threads, preload=args.preload, log=log)
    if args.authors_loop:
        from .authors_loop import VARIANTS, run_authors_loop

        authors = run_authors_loop(device, tiny=args.e2e_tiny, segmenter=args.e2e_segmenter, log=log,
                                   variants=[v for v in VARIANTS if not (args.no_compile and "compiled" in v)])
    memory = None
    if args.memory and device.type != "cpu":
        log("# --memory measures the CPU (RSS); on CUDA the per-op tables already have peak MiB")
    elif args.memory:
        from .memory import parse_shape, run_memory

        mshape = parse_shape(args.memory_shape)
        backends = [b for b in C.fused_backends(device, mshape, args.include_triton_cpu)
                    if args.backends is None or b in args.backends]
        memory = run_memory([c.name for c in cases], ["eager"] + ([] if args.no_compile else ["compile"]) + backends,
                            dtypes, mshape, threads=threads, validate_labels=not args.no_validate_labels, log=log)
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    meta["load_average_end"] = env.load_average()
    checks = targets.evaluate(rows, device.type, e2e, memory)
    notes = [n for n in (targets.missing_backend_note(device.type, meta.get("backends", []), meta["unavailable"]),)
             if n]
    result = {"meta": meta, "rows": rows, "overhead": overhead, "e2e": e2e, "e2e_compile": e2e_compile,
              "memory": memory, "copy_rows": copy_rows, "train_step": train_step, "allocators": allocators,
              "authors_loop": authors,
              "targets": checks, "notes": notes,
              "byte_model": {c.name: c.byte_model for c in cases}}

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
