"""Markdown table and PNG plot of a report's result dict (the JSON written next to them).

    python -m benchmarks.render benchmarks/results/FILE.json ...   # rewrite FILE.md and FILE.png from the JSON

Re-rendering re-judges the targets with the current rules (benchmarks/targets.py, benchmarks/quality.py); it
measures nothing.
"""
from __future__ import annotations

import json
import sys
from typing import Iterable, List, Optional

from .overhead import VIA_OPS
from .quality import OVERLAP_LEGEND, add_ranges, assess, ratio_cell, spreads_overlap
from .quality import header as quality_header
from .shapes import TARGET_SHAPES
from .targets import E2E_OP, compact_rows, evaluate, verdict

IMPL_ORDER = ("eager", "compile", "reference", "cpu", "cuda", "triton")


def _f(v: Optional[float], fmt: str = "{:.3f}", none: str = "n/a") -> str:
    return none if v is None else fmt.format(v)


def _x(v: Optional[float]) -> str:
    return _f(v, "{:.2f}x")


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _impl_rank(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def result_rows(rows: List[dict]) -> List[List[str]]:
    out = []
    for r in sorted(rows, key=lambda r: (r["dtype"], r["op"], r["direction"], _impl_rank(r["impl"]))):
        if r["status"] != "ok":
            out.append([r["op"], r["dtype"], r["direction"], r["impl"], f"not run: {r['status']}"] + [""] * 8)
            continue
        out.append([
            r["op"], r["dtype"], r["direction"], r["impl"], f"{r['median_ms']:.3f}",
            f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f} (n={r['n']})",
            ratio_cell(r, "eager"), ratio_cell(r, "compile"),
            _f(None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20, "{:.1f}"),
            _x(r.get("mem_vs_eager")), f"{r['GBps']:.1f}", _f(r.get("bw_pct"), "{:.0f}%"),
            _f(r.get("diff_vs_eager"), "{:.1e}", "-"),
        ])
    return out


RESULT_HEADER = ("op", "dtype", "dir", "impl", "median ms", "p10-p90 ms", "x eager", "x compile", "peak MiB",
                 "mem/eager", "GB/s", "% copy BW", "max diff vs eager")


def render_markdown(result: dict) -> str:
    m = result["meta"]
    add_ranges(result["rows"])
    md = [f"# fastadvseg benchmark: {m['device']}, {m['date']}\n\n", quality_header(result), "\n"]
    md.append(table(("key", "value"), [
        ("device", m["device"]), ("CPU", m["cpu"]), ("threads (torch.set_num_threads)", m["threads"]),
        ("python / torch / triton", f"{m['python']} / {m['torch']} / {m['triton']}"),
        ("CUDA (torch build)", m["cuda"]), ("git commit", m["git_commit"]), ("date", m["date"]),
        ("fastadvseg backends listed", ", ".join(m.get("backends", [])) or "none"),
        ("not timed", "; ".join(f"{k}: {v}" for k, v in m.get("unavailable", {}).items()) or "-"),
        ("cpu backend kernels", m.get("cpu_kernels", "not recorded")),
        ("label validation", m.get("label_validation")), ("malloc", m.get("malloc", "glibc defaults")),
        ("shape set", m["shape_set"]),
        ("measured copy bandwidth", f"{m['copy_bandwidth']['GBps']:.1f} GB/s (read + write of "
                                    f"{m['copy_bandwidth']['bytes'] // 2**20} MiB)"),
        ("load average (1/5/15 min) at start / end", f"{m['load_average_start']} / {m['load_average_end']}"),
        ("run time", f"{m['elapsed_s']} s"), ("command", f"`{m['argv']}`"),
    ]))
    for note in result.get("notes", []):
        md.append(f"\n**Note.** {note}\n")
    md.append("\nSpeed-ups and memory ratios are measured within this run (same process, same inputs). Times are "
              "medians of per-call times over rotating input copies; `fwd` is the training forward (inputs require "
              "grad), `fwdbwd` adds `torch.autograd.grad`. `eager` = benchmarks/reference_ops.py, `compile` = the "
              "same under torch.compile, other impls = `fastadvseg` with that `backend=`. Peak memory is "
              "torch.cuda.max_memory_allocated above the inputs (n/a on CPU in these tables; `--memory` adds a "
              "peak-RSS table). " + OVERLAP_LEGEND + "\n")
    md.append("\n## Targets\n\n")
    checks = result.get("targets", [])
    if checks:
        header, *lines = compact_rows(checks)
        if lines:
            md.append(table(header, lines))
        for c in checks:
            if c["op"] == E2E_OP:
                md.append(f"\n{c['target']}: {verdict(c)}.\n")
        met = sum(1 for c in checks if c["met"])
        unmeasured = sum(1 for c in checks if c["met"] is None)
        md.append(f"\n{met} of {len(checks)} checks met ({unmeasured} not measured or too noisy to tell).\n")
    else:
        md.append("No target applies to what this run measured (targets: GPU at VOC/Cityscapes; CPU `cpu` backend "
                  "at N=2; see benchmarks/README.md).\n")
    shapes = []
    for r in result["rows"]:
        if r["shape"] not in shapes:
            shapes.append(r["shape"])
    for s in shapes:
        rows = [r for r in result["rows"] if r["shape"] == s]
        r0 = rows[0]
        md.append(f"\n## {s}: N={r0['N']}, C={r0['C']}, {r0['H']}x{r0['W']}\n\n")
        md.append(table(RESULT_HEADER, result_rows(rows)))
    versus = [r for r in result["rows"] if r.get("cuda_vs_triton") is not None]
    if versus:
        md.append("\n## cuda vs triton (same run; > 1: the CUDA C++ kernel is faster)\n\n")
        md.append(table(("shape", "op", "dtype", "dir", "cuda ms", "triton / cuda"), [
            (r["shape"], r["op"], r["dtype"], r["direction"], f"{r['median_ms']:.3f}", f"{r['cuda_vs_triton']:.2f}x")
            for r in sorted(versus, key=lambda r: (r["shape"], r["dtype"], r["op"], r["direction"]))]))
    if result.get("copy_rows"):
        md.append(render_copy_rows(result["copy_rows"]))
    if result.get("overhead"):
        md.append(render_overhead(result["overhead"]))
    e2e = result.get("e2e")
    if e2e:
        md.append("\n## Training iteration (end to end)\n\n")
        md.append(f"{e2e['shape']}, {e2e['dtype']}; {e2e['models']}. One iteration = G update on a labelled and "
                  "an unlabelled batch + D update; steps interleaved fused/reference.\n\n")
        md.append(table(("losses", "median ms / iter", "p10-p90 ms", "images/s", "speed-up"), [
            (k if k == "reference" else f"fused ({e2e['fused_backend']})", f"{e2e[k]['median_ms']:.1f}",
             f"{e2e[k]['p10_ms']:.1f}-{e2e[k]['p90_ms']:.1f} (n={e2e[k]['n']})", f"{e2e[k]['images_per_s']:.2f}",
             f"{e2e['speedup']:.2f}x" if k == "fused" else "1.00x") for k in ("fused", "reference")]))
        if spreads_overlap(e2e["reference"], e2e["fused"]):
            md.append("\nThe two p10-p90 spreads overlap: this run cannot tell whether the fused losses make the "
                      "iteration faster.\n")
    if result.get("e2e_compile"):
        md.append(render_e2e_compile(result["e2e_compile"]))
    if result.get("train_step"):
        md.append(render_train_step(result["train_step"]))
    if result.get("allocators"):
        md.append(render_allocators(result["allocators"]))
    if result.get("authors_loop"):
        md.append(render_authors_loop(result["authors_loop"]))
    if result.get("memory"):
        md.append(render_memory(result["memory"]))
    md.append("\n## Byte model (fewest bytes each op must move)\n\nP = N*H*W, C classes, e = bytes per logit; "
              "labels int64 (8 B), masks bool (1 B). `fwdbwd` adds the `+bwd` part.\n\n")
    md.append(table(("op", "bytes"), sorted(result.get("byte_model", {}).items())))
    return "".join(md)


def render_overhead(o: dict) -> str:
    """The per-call cost table (benchmarks/overhead.py): per op, each impl's median and spread, and what the
    dispatcher adds to fastadvseg's eager call."""
    md = [f"\n## Per-call cost ({o['shape']}, {o['dtype']}, forward+backward: the kernels cost microseconds here)\n\n",
          "`eager`: the plain PyTorch composition; `<backend>`: fastadvseg's function as users call it; `<backend> via "
          "torch.ops`: the same call through the registered op and PyTorch's dispatcher (the path of compiled, "
          "exported or intercepted code). `dispatcher adds`: the via-torch.ops median minus the direct one.\n\n"]
    by = {(r["op"], r["impl"]): r for r in o["rows"] if r["status"] == "ok"}
    lines = []
    for r in o["rows"]:
        if r["status"] != "ok":
            lines.append([r["op"], r["impl"], f"not measured: {r['status']}", "", ""])
            continue
        added = ""
        if r["impl"].endswith(VIA_OPS):
            direct = by.get((r["op"], r["impl"][: -len(VIA_OPS)]))
            if direct:
                added = f"{r['median_us'] - direct['median_us']:+.1f} us" + (
                    " (spreads overlap)" if spreads_overlap(direct, r, "us") else "")
        lines.append([r["op"], r["impl"], f"{r['median_us']:.1f}", f"{r['p10_us']:.1f}-{r['p90_us']:.1f} (n={r['n']})",
                      added])
    md.append(table(("op", "impl", "median us", "p10-p90 us", "dispatcher adds"), lines))
    return "".join(md)


def render_e2e_compile(e: dict) -> str:
    md = ["\n## Compiled training step (eager vs torch.compile of the loss functions)\n\n",
          f"{e['shape']}, {e['dtype']}; {e['models']}. Losses: {e['losses']}; compiled: {e['compile']}; "
          "`.backward()` and the optimizer steps run outside it in both. Steps of the four variants interleaved, the "
          "same G, D and optimizers. First compiled step (compilation, not timed): "
          f"{e['first_compiled_step_s']:.1f} s with fastadvseg's losses, {e['first_reference_compiled_step_s']:.1f} s "
          "with the reference losses.\n\n"]
    if e["graph_breaks"] is None:
        md.append(f"Graph breaks: not counted (torch._dynamo.explain failed: {e['explain_status']}).\n\n")
    else:
        reasons = "; ".join(f"`{r}`" for r in e["break_reasons"])
        md.append(f"Graph breaks (torch._dynamo.explain of fastadvseg's two loss functions): **{e['graph_breaks']}** "
                  f"in {e['graphs']} graphs" + (f"; reasons: {reasons}" if reasons else "") + ".\n\n")
    ratio = {"compiled": "compiled_vs_eager", "reference_compiled": "reference_compiled_vs_eager"}
    md.append(table(("losses", "step", "median ms", "p10-p90 ms", "compiled / eager"), [
        ("reference" if k.startswith("reference") else "fastadvseg", k.replace("reference_", ""),
         f"{e[k]['median_ms']:.1f}", f"{e[k]['p10_ms']:.1f}-{e[k]['p90_ms']:.1f} (n={e[k]['n']})",
         f"{e[ratio[k]]:.2f}x" if k in ratio else "1.00x")
        for k in ("eager", "compiled", "reference_eager", "reference_compiled")]))
    lo, hi = e["compiled_vs_eager_range"]
    if e["too_noisy"]:
        md.append(f"\nToo noisy to tell whether the compiled step is slower: the p10-p90 spreads allow "
                  f"compiled/eager from {lo:.2f}x to {hi:.2f}x (median {e['compiled_vs_eager']:.2f}x).\n")
    else:
        word = "no slower than" if e["compiled_vs_eager"] <= 1 else "SLOWER than"
        md.append(f"\nWith fastadvseg's losses the compiled step is {word} eager: compiled/eager "
                  f"{e['compiled_vs_eager']:.2f}x (p10-p90 allow {lo:.2f}x-{hi:.2f}x).\n")
    rlo, rhi = e["reference_compiled_vs_eager_range"]
    clo, chi = e["compiled_vs_reference_compiled_range"]
    md.append(f"With the reference losses, compiled/eager is {e['reference_compiled_vs_eager']:.2f}x "
              f"({rlo:.2f}x-{rhi:.2f}x): what torch.compile does to this G and D on this machine. Compiled with "
              f"fastadvseg's losses / compiled with the reference losses: {e['compiled_vs_reference_compiled']:.2f}x "
              f"({clo:.2f}x-{chi:.2f}x).\n")
    return "".join(md)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def render_copy_rows(rows: List[dict]) -> str:
    """``generator_loss[labelled]`` fwdbwd beside a plain copy of its byte model's bytes, measured in this run."""
    md = ["\n## A plain copy of the same bytes\n\n",
          "What `dst.copy_(src)` achieves on the bytes the labelled `generator_loss` forward+backward must move (its "
          "byte model: half read, half written), timed in this run at the same threads: into a destination allocated "
          "once (`reused`) and into one allocated for every call (`fresh`, as an op writing a new gradient does; what "
          "that costs depends on the allocator, see the header). `% of copy`: the copy's median time over the op's, "
          "i.e. the op's speed as a fraction of a copy of its bytes.\n\n"]
    lines = []
    for r in rows:
        c = r["copy"]
        for impl, o in sorted(r["ops"].items(), key=lambda kv: _impl_rank(kv[0])):
            lines.append([r["shape"], r["dtype"], _mb(r["bytes"]),
                          f"{c['reused']['median_ms']:.3f} ({c['reused']['GBps']:.1f} GB/s)",
                          f"{c['fresh']['median_ms']:.3f} ({c['fresh']['GBps']:.1f} GB/s)", impl,
                          f"{o['median_ms']:.3f}", f"{o['pct_of_copy']['reused']:.0f}%",
                          f"{o['pct_of_copy']['fresh']:.0f}%"])
    md.append(table(("shape", "dtype", "bytes", "copy, reused dst: ms", "copy, fresh dst: ms",
                     f"{rows[0]['op']} fwdbwd", "op ms", "% of copy (reused)", "% of copy (fresh)"), lines))
    return "".join(md)


def _step_cells(r: dict, ratios=("eager", "compile")) -> List[str]:
    cells = [f"{r['median_ms']:.1f}", f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f} (n={r['n']})",
             f"{r['images_per_s']:.1f}"]
    for b in ratios:
        cells.append(ratio_cell(r, b) if r.get(f"speedup_vs_{b}") is not None else "n/a")
    cells.append(f"{r['faults_median']:.0f} ({r['faults_p90']:.0f})")
    return cells


def render_train_step(t: dict) -> str:
    md = ["\n## Training step as the pipeline runs it (`--train-step`)\n\n",
          "`pipeline`: `fastadvseg.utils.step.train_step`, the code `python -m fastadvseg.train` runs (G on a labelled "
          "and an unlabelled batch, two backward passes, SGD; D on fake and real maps, Adam), gradients set to None "
          f"every step, activations alive; {t['models']}. `losses`: a labelled plus an unlabelled `generator_loss`, "
          "summed, one backward, the leaves' `.grad` set to None. `fastadvseg`: its losses (backend auto); `eager`: "
          "benchmarks/reference_ops.py; `compile`: those under torch.compile. Images = N labelled + N unlabelled. "
          f"Allocator: {t['allocator']}. Threads: {t['threads']}. Each impl runs a block of consecutive steps per "
          f"round (the first untimed; `n`: the timed steps), {t['rounds']} rounds, the order rotating. Faults: minor "
          "page faults per step (`getrusage` ru_minflt), median (p90). " + OVERLAP_LEGEND + "\n\n"]
    lines = []
    for r in t["rows"]:
        head = [r["step"], f"{r['shape']} (N={r['N']}, C={r['C']}, {r['H']}x{r['W']})", r["impl"]]
        if r["status"] != "ok":
            lines.append(head + [f"not run: {r['status']}"] + [""] * 6)
            continue
        lines.append(head + _step_cells(r) + [f"{r['first_step_s']:.1f}"])
    md.append(table(("step", "shape", "impl", "median ms", "p10-p90 ms", "images/s", "x eager", "x compile",
                     "faults/step", "first step s"), lines))
    return "".join(md)


def render_allocators(a: dict) -> str:
    if a.get("skipped"):
        return f"\n## Allocators (`--allocators`)\n\nNot measured: {a['skipped']}.\n"
    md = ["\n## Allocators (`--allocators`)\n\n",
          "The steps of `--train-step` (impls: " + ", ".join(a["impls"]) + "; " + "; ".join(a["jobs"]) + ") in a "
          f"fresh process per allocator, the processes alternating over {a['rounds']} round(s) of {a['block']} timed "
          f"steps each, threads {a['threads']}. What `python -m fastadvseg.train --allocator ...` picks from (its "
          "default: `auto`, see fastadvseg/utils/allocator.py). RSS: the process's resident set after its steps, and "
          "its high-water mark.\n\n"]
    md.append(table(("allocator", "as run"), a["allocators"].items()))
    md.append("\n")
    lines = []
    for r in a["rows"]:
        head = [r["step"], r["shape"], r["impl"], r["allocator"]]
        if r["status"] != "ok":
            lines.append(head + [f"not run: {r['status']}"] + [""] * 5)
            continue
        lines.append(head + [f"{r['median_ms']:.1f}", f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f} (n={r['n']})",
                             f"{r['faults_median']:.0f} ({r['faults_p90']:.0f})",
                             _f(r.get("rss_after_MiB"), "{:.0f}"), _f(r.get("peak_rss_MiB"), "{:.0f}")])
    md.append(table(("step", "shape", "impl", "allocator", "median ms", "p10-p90 ms", "faults/step", "RSS MiB",
                     "peak RSS MiB"), lines))
    return "".join(md)


def render_authors_loop(a: dict) -> str:
    md = ["\n## The authors' training iteration (`--authors-loop`)\n\n",
          f"{a['shape']}, {a['dtype']}, {a['device']}; {a['models']}, the same initial weights, optimizers and "
          "batches for every variant. `authors`: a port of AdvSemiSeg's iteration (train.py, utils/loss.py) to current "
          "PyTorch, numpy round trips included (benchmarks/authors_loop.py); the others: the pipeline's "
          "`train_step`, the same computation. Every variant gets its batch on the host and reads its loss values "
          f"back. Threads {a['threads']}; {a['block']} timed steps per block, {a['rounds']} rounds. "
          "`x authors`: images/s over the authors' (p10-p90 range of the ratio).\n\n"]
    lines = []
    for r in a["rows"]:
        if r["status"] != "ok":
            lines.append([r["variant"], r["what"], f"not run: {r['status']}", "", "", "", ""])
            continue
        lo, hi = (r.get("speedup_vs_authors_range") if r["variant"] != "authors" else None) or (None, None)
        lines.append([r["variant"], r["what"], f"{r['median_ms']:.1f}",
                      f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f} (n={r['n']})", f"{r['images_per_s']:.2f}",
                      _x(r.get("speedup_vs_authors")) + (f" ({lo:.2f}-{hi:.2f})" if lo is not None else ""),
                      f"{r['first_step_s']:.1f}"])
    md.append(table(("variant", "what", "median ms", "p10-p90 ms", "images/s", "x authors", "first step s"), lines))
    return "".join(md)


def render_memory(mem: dict) -> str:
    md = [f"\n## Peak memory of one forward+backward, CPU ({mem['shape']}: N={mem['N']}, C={mem['C']}, "
          f"{mem['H']}x{mem['W']})\n\n",
          f"Peak resident set size above the baseline (inputs and everything else alive before the call), "
          f"outputs and gradients included: {mem['method']}. {mem['malloc']}, so every buffer that large is its own "
          f"mapping and is returned to the OS when freed. Threads: {mem['threads']}. Median of {mem['repeats']} "
          "calls with p10-p90. `mem/eager` < 1: the impl needs less. RSS does not depend on other load on the "
          "machine; `too noisy to tell` marks a ratio whose p10-p90 spreads straddle the target (0.5x for "
          "cross_entropy2d and labelled generator_loss, else 1x).\n\n"]
    lines = []
    for r in sorted(mem["rows"], key=lambda r: (r["dtype"], r["op"], _impl_rank(r["impl"]))):
        if r["status"] != "ok":
            lines.append([r["op"], r["dtype"], r["impl"], f"not measured: {r['status']}", "", "", ""])
            continue
        note = "-"
        if r.get("too_noisy"):
            lo, hi = r["mem_vs_eager_range"]
            note = f"too noisy to tell ({lo:.2f}x-{hi:.2f}x)"
        lines.append([r["op"], r["dtype"], r["impl"], f"{r['median_MiB']:.2f}",
                      f"{r['p10_MiB']:.2f}-{r['p90_MiB']:.2f} (n={r['n']})", _x(r.get("mem_vs_eager")), note])
    md.append(table(("op", "dtype", "impl", "peak MiB", "p10-p90 MiB", "mem/eager", "note"), lines))
    return "".join(md)


def render_plot(result: dict, path: str) -> None:
    """Speed-up over eager (log scale) per op, one panel per (shape, dtype), forward+backward (fwd for one_hot2d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    rows = [r for r in result["rows"] if r["status"] == "ok" and r["impl"] != "eager"
            and (r["direction"] == "fwdbwd" or r["op"] == "one_hot2d")]
    panels = sorted({(r["shape"], r["dtype"]) for r in result["rows"]})
    impls = sorted({r["impl"] for r in rows}, key=_impl_rank)
    ops = []
    for r in result["rows"]:
        if r["op"] not in ops:
            ops.append(r["op"])
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(max(8, 1.3 * len(ops)), 3.2 * max(1, len(panels))),
                             squeeze=False)
    width = 0.8 / max(1, len(impls))
    target = {"cuda": 4.0, "cpu": 3.0}.get(result["meta"].get("device_type"))
    add_ranges(result["rows"])
    for ax, (shape, dtype) in zip(axes[:, 0], panels):
        for j, impl in enumerate(impls):
            vals, low, high = [], [], []
            for op in ops:
                hit = [r for r in rows if (r["shape"], r["dtype"], r["op"], r["impl"]) == (shape, dtype, op, impl)]
                value = (hit[0].get("speedup_vs_eager") or 0) if hit else 0
                bounds = (hit[0].get("speedup_vs_eager_range") if hit else None) or (value, value)
                vals.append(value)
                low.append(max(value - bounds[0], 0))
                high.append(max(bounds[1] - value, 0))
            ax.bar([i + (j - (len(impls) - 1) / 2) * width for i in range(len(ops))], vals, width, label=impl,
                   yerr=[low, high], error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.axhline(1.0, color="black", linewidth=0.8)
        if target and shape in TARGET_SHAPES.get(result["meta"].get("device_type"), ()):
            ax.axhline(target, color="red", linewidth=0.8, linestyle="--", label=f"{target:g}x eager")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 2, 3, 5, 10, 30, 100, 300]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylabel("x eager")
        ax.set_title(f"{shape}, {dtype}, forward+backward (one_hot2d: forward)", fontsize=9)
        ax.set_xticks(range(len(ops)))
        ax.set_xticklabels(ops, rotation=20, ha="right", fontsize=7)
    for ax in axes[:, 0]:
        ax.legend(fontsize=7, ncol=len(impls) + 1)
    m = result["meta"]
    flags = assess(result)["flags"]
    fig.suptitle(f"fastadvseg speed-up over eager PyTorch (median; error bars: p10-p90 of the ratio): {m['device']}, "
                 f"{m['date']}" + (f" - {' and '.join(flags)} RUN" if flags else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rerender(path: str) -> None:
    """Rewrite the .md and .png of a results JSON with the current renderer and target rules."""
    with open(path) as f:
        result = json.load(f)
    add_ranges(result["rows"])
    result["targets"] = evaluate(result["rows"], result["meta"]["device_type"], result.get("e2e"),
                                 result.get("memory"))
    stem = path[:-len(".json")] if path.endswith(".json") else path
    with open(stem + ".md", "w") as f:
        f.write(render_markdown(result))
    render_plot(result, stem + ".png")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        rerender(arg)
        print(f"rendered {arg}")
