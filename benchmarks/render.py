"""The Markdown and PNG of a report's result dict (the JSON written next to them), and the README's summary.

    python -m benchmarks.render benchmarks/results/FILE.json ...    # rewrite FILE.md and FILE.png from the JSON
    python -m benchmarks.render --summary [FILE.json | DIR ...]     # print the README's benchmark summary

Re-rendering re-judges the targets with the current rules (benchmarks/targets.py). The
summary takes the newest ``benchmarks/results/*.json`` of each machine (by the date recorded inside; runs with a
capped kernel build, ``FASTADVSEG_CPU_ISA``, are another configuration and left out): the forward+backward rows
(forward for ``one_hot2d``) of the largest shape, per fastadvseg kernel backend and dtype, with the run's quality,
the training-iteration line and the target tally. Neither measures anything.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Iterable, List, Optional

from .memory import MEMORY_TARGETS
from .overhead import OP_ALONE
from .shapes import TARGET_SHAPES
from .targets import (E2E_OP, OVERLAP_LEGEND, add_ratios, assess, compact_rows, evaluate, quality_header, ratio_cell,
                      spreads_overlap, verdict)

IMPL_ORDER = ("eager", "compile", "reference", "cpu", "cuda", "triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _f(v: Optional[float], fmt: str = "{:.3f}", none: str = "n/a") -> str:
    return none if v is None else fmt.format(v)


def _x(v: Optional[float]) -> str:
    return _f(v, "{:.2f}x")


def _spread(r: dict, unit: str = "ms", fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(r[f'p10_{unit}'])}-{fmt.format(r[f'p90_{unit}'])} (n={r['n']})"


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _impl_rank(impl: str) -> int:
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def _lines(header, rows, head, cells) -> List[List[str]]:
    """A table line per row: ``head(r) + cells(r)``, or ``head(r)`` and why the row did not run."""
    return [head(r) + (cells(r) if r["status"] == "ok" else
                       [f"not run: {r['status']}"] + [""] * (len(header) - len(head(r)) - 1)) for r in rows]


def _section(title: str, prose: str, header, rows, head, cells) -> str:
    return f"\n## {title}\n\n{prose}\n\n" + table(header, _lines(header, rows, head, cells))


RESULT_HEADER = ("op", "dtype", "dir", "impl", "median ms", "p10-p90 ms", "x eager", "x compile", "peak MiB",
                 "mem/eager", "GB/s", "% copy BW", "max diff vs eager")


def result_rows(rows: List[dict]) -> List[List[str]]:
    rows = sorted(rows, key=lambda r: (r["dtype"], r["op"], r["direction"], _impl_rank(r["impl"])))
    return _lines(RESULT_HEADER, rows, lambda r: [r["op"], r["dtype"], r["direction"], r["impl"]], lambda r: [
        f"{r['median_ms']:.3f}", _spread(r, fmt="{:.3f}"), ratio_cell(r, "eager"), ratio_cell(r, "compile"),
        _f(None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20, "{:.1f}"),
        _x(r.get("mem_vs_eager")), f"{r['GBps']:.1f}", _f(r.get("bw_pct"), "{:.0f}%"),
        _f(r.get("diff_vs_eager"), "{:.1e}", "-")])


def render_markdown(result: dict) -> str:
    m = result["meta"]
    add_ratios(result["rows"])
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
    md += [f"\n**Note.** {note}\n" for note in result.get("notes", [])]
    md.append("\nSpeed-ups and memory ratios are measured within this run (same process, same inputs). Times are "
              "medians of per-call times over rotating input copies; `fwd` is the training forward (inputs require "
              "grad), `fwdbwd` adds `torch.autograd.grad`. `eager` = benchmarks/reference_ops.py, `compile` = the "
              "same under torch.compile, other impls = `fastadvseg` with that `backend=`. Peak memory is "
              "torch.cuda.max_memory_allocated above the inputs (n/a on CPU in these tables; `--memory` adds a "
              "peak-RSS table). " + OVERLAP_LEGEND + "\n\n## Targets\n\n")
    checks = result.get("targets", [])
    if checks:
        header, *lines = compact_rows(checks)
        if lines:
            md.append(table(header, lines))
        md += [f"\n{c['target']}: {verdict(c)}.\n" for c in checks if c["op"] == E2E_OP]
        met = sum(1 for c in checks if c["met"])
        unmeasured = sum(1 for c in checks if c["met"] is None)
        md.append(f"\n{met} of {len(checks)} checks met ({unmeasured} not measured or too noisy to tell).\n")
    else:
        md.append("No target applies to what this run measured (targets: GPU at VOC/Cityscapes; CPU `cpu` backend "
                  "at N=2; see benchmarks/README.md).\n")
    for s in dict.fromkeys(r["shape"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["shape"] == s]
        md.append(f"\n## {s}: N={rows[0]['N']}, C={rows[0]['C']}, {rows[0]['H']}x{rows[0]['W']}\n\n")
        md.append(table(RESULT_HEADER, result_rows(rows)))
    for key in ("copy_rows", "overhead", "e2e", "e2e_compile", "train_step", "allocators", "authors_loop", "memory"):
        section = result.get(key)
        if section and (key not in STEP_PARTS or "baselines" in section):  # older results laid steps out otherwise
            md.append(render_steps(key, section) if key in STEP_PARTS else {
                "copy_rows": render_copy_rows, "overhead": render_overhead, "allocators": render_allocators,
                "memory": render_memory}[key](section))
    md.append("\n## Byte model (fewest bytes each op must move)\n\nP = N*H*W, C classes, e = bytes per logit; "
              "labels int64 (8 B), masks bool (1 B). `fwdbwd` adds the `+bwd` part.\n\n")
    md.append(table(("op", "bytes"), sorted(result.get("byte_model", {}).items())))
    return "".join(md)


def render_copy_rows(rows: List[dict]) -> str:
    """``generator_loss[labelled]`` fwdbwd beside a plain copy of its byte model's bytes, measured in this run."""
    lines = []
    for r in rows:
        c, size = r["copy"], f"{r['bytes'] / 1e6:.1f} MB" if r["bytes"] >= 1e5 else f"{r['bytes'] / 1e3:.1f} kB"
        for impl, o in sorted(r["ops"].items(), key=lambda kv: _impl_rank(kv[0])):
            lines.append([r["shape"], r["dtype"], size, *(f"{c[k]['median_ms']:.3f} ({c[k]['GBps']:.1f} GB/s)"
                                                          for k in ("reused", "fresh")),
                          f"{c['exp']['median_ms']:.3f}" if "exp" in c else "-", impl, f"{o['median_ms']:.3f}",
                          *(f"{o['pct_of_copy'][k]:.0f}%" for k in ("reused", "fresh")),
                          _in_cache_cell(o)])
    return ("\n## A plain copy of the same bytes\n\nWhat `dst.copy_(src)` achieves on the bytes the labelled "
            "`generator_loss` forward+backward must move (its byte model: half read, half written), timed in this run "
            "at the same threads: into a destination allocated once (`reused`) and into one allocated for every call "
            "(`fresh`, as an op writing a new gradient does; what that costs depends on the allocator, see the "
            "header). `% of copy`: the copy's median time over the op's, i.e. the op's speed as a fraction of a copy "
            "of its bytes. `exp of the same bytes`: `torch.exp` reading and writing those bytes, the same traffic with one "
            "exponential per float, the least arithmetic a softmax-based loss does per logit. `op in cache, scaled`: "
            "the kernel's time per pixel when its data stay in the last-level cache (the slope between two in-cache "
            "sizes, N=1, 96x96 and 192x192, so the per-call cost cancels), times this shape's pixels: what the op "
            "would take if memory were free. An op whose time is close to that is bound by its arithmetic, not by "
            "memory, and a copy's bandwidth is not its ceiling.\n\n"
            + table(("shape", "dtype", "bytes", "copy, reused dst: ms", "copy, fresh dst: ms",
                     "exp of the same bytes: ms", f"{rows[0]['op']} fwdbwd", "op ms", "% of copy (reused)",
                     "% of copy (fresh)", "op in cache, scaled: ms"), lines))


def _in_cache_cell(o: dict) -> str:
    ic = o.get("in_cache")
    if not ic:
        return "-"
    return f"{ic['scaled_ms']:.3f} ({100 * ic['scaled_ms'] / o['median_ms']:.0f}% of the op's time)"


def render_overhead(o: dict) -> str:
    """The per-call cost table (benchmarks/overhead.py), with what the Python around the registered op adds."""
    by = {(r["op"], r["impl"]): r for r in o["rows"] if r["status"] == "ok"}

    def added(r):
        call = by.get((r["op"], r["impl"][: -len(OP_ALONE)])) if r["impl"].endswith(OP_ALONE) else None
        return "" if call is None else f"{call['median_us'] - r['median_us']:+.1f} us" + (
            " (spreads overlap)" if spreads_overlap(call, r, "us") else "")

    return _section(
        f"Per-call cost ({o['shape']}, {o['dtype']}, forward+backward: the kernels cost microseconds here)",
        "`eager`: the plain PyTorch composition; `<backend>`: fastadvseg's function as users call it; `<backend> op "
        "alone`: the registered op `torch.ops.fastadvseg.<op>` it runs, called directly with the same arguments, and "
        "its backward. `API adds`: the call's median minus the op's (argument checks, backend resolution, the means).",
        ("op", "impl", "median us", "p10-p90 us", "API adds"), o["rows"], lambda r: [r["op"], r["impl"]],
        lambda r: [f"{r['median_us']:.1f}", _spread(r, "us"), added(r)])


_FAULTS = "Faults: minor page faults per step (`getrusage` ru_minflt), median (p90)."


STEP_PARTS = {  # results key: (section title, what it adds to the impls' description)
    "e2e": ("Training iteration (end to end)", ""),
    "e2e_compile": ("Compiled training step (eager vs torch.compile of the loss functions)",
                    "`.backward()` and the optimizer steps run outside the compiled functions"),
    "train_step": ("Training step as the pipeline runs it (`--train-step`)", "`losses`: the losses alone, a labelled "
                   "plus an unlabelled `generator_loss`, summed, one backward, the leaves' `.grad` set to None"),
    "authors_loop": ("The authors' training iteration (`--authors-loop`)", "`authors`: a port of AdvSemiSeg's "
                     "iteration (train.py, utils/loss.py) to current PyTorch, numpy round trips included "
                     "(benchmarks/authors_loop.py), the same computation as the pipeline's step"),
}


def render_steps(key: str, t: dict) -> str:
    """A training part of benchmarks/train_step.py: its steps, per impl, with the ratios to its baselines."""
    title, impls = STEP_PARTS[key]
    notes = ""
    if key == "e2e_compile":
        notes = " Graph breaks in fastadvseg's loss calls (torch._dynamo.explain): " + (
            f"not counted ({t['explain_status']})" if t["graph_breaks"] is None else
            f"**{t['graph_breaks']}** in {t['graphs']} graphs" + "".join(f"; `{r}`" for r in t["break_reasons"])) + "."
    return _section(
        title, f"`pipeline`: one iteration of `python -m fastadvseg.train`'s loop (learning rates set, the batch "
        "moved from the host, `fastadvseg.utils.step.train_step`: G on a labelled and an unlabelled batch, SGD; D on "
        "fake and real maps, Adam; the values read back). `fastadvseg`: fastadvseg's losses (backend auto); `eager`: "
        "benchmarks/reference_ops.py; `*compile*`: those under torch.compile, each loss function. "
        f"{impls + '. ' if impls else ''}{t['models']}; the same initial weights, "
        f"optimizers and batch for every impl; images = N labelled + N unlabelled. Allocator: {t['allocator']}. "
        f"Threads: {t['threads']}. Each impl runs a block of consecutive steps per round (the first untimed; `n`: the "
        f"timed steps), {t['rounds']} rounds, the order rotating; `first step s`: the very first step, compilation "
        f"included. `x <impl>`: that impl's median over this one's. {_FAULTS} {OVERLAP_LEGEND}{notes}",
        ("step", "shape", "impl", "median ms", "p10-p90 ms", "images/s", *(f"x {b}" for b in t["baselines"]),
         "faults/step", "first step s"), t["rows"],
        lambda r: [r["step"], f"{r['shape']} (N={r['N']}, C={r['C']}, {r['H']}x{r['W']})", r["impl"]],
        lambda r: [f"{r['median_ms']:.1f}", _spread(r), f"{r['images_per_s']:.2f}",
                   *(ratio_cell(r, b) for b in t["baselines"]), f"{r['faults_median']:.0f} ({r['faults_p90']:.0f})",
                   f"{r['first_step_s']:.1f}"])


def render_allocators(a: dict) -> str:
    if a.get("skipped"):
        return f"\n## Allocators (`--allocators`)\n\nNot measured: {a['skipped']}.\n"
    return _section(
        "Allocators (`--allocators`)",
        f"The steps of `--train-step` (impls: {', '.join(a['impls'])}; {'; '.join(a['jobs'])}) in a fresh process per "
        f"allocator, the processes alternating over {a['rounds']} round(s) of {a['block']} timed steps each, threads "
        f"{a['threads']}: what `python -m fastadvseg.train --allocator auto` picks from (fastadvseg/utils/allocator.py)"
        f". RSS: the process's resident set after its steps, and its high-water mark. {_FAULTS}\n\n"
        + table(("allocator", "as run"), a["allocators"].items()).rstrip("\n"),
        ("step", "shape", "impl", "allocator", "median ms", "p10-p90 ms", "faults/step", "RSS MiB", "peak RSS MiB"),
        a["rows"], lambda r: [r["step"], r["shape"], r["impl"], r["allocator"]],
        lambda r: [f"{r['median_ms']:.1f}", _spread(r), f"{r['faults_median']:.0f} ({r['faults_p90']:.0f})",
                   _f(r.get("rss_after_MiB"), "{:.0f}"), _f(r.get("peak_rss_MiB"), "{:.0f}")])


def render_memory(mem: dict) -> str:
    return _section(
        f"Peak memory of one forward+backward, CPU ({mem['shape']}: N={mem['N']}, C={mem['C']}, "
        f"{mem['H']}x{mem['W']})",
        "Peak resident set size above the baseline (inputs and everything else alive before the call), outputs and "
        f"gradients included: {mem['method']}. {mem['malloc']}, so every buffer that large is its own mapping and is "
        f"returned to the OS when freed. Threads: {mem['threads']}. Median of {mem['repeats']} calls with p10-p90. "
        "`mem/eager` < 1: the impl needs less. RSS does not depend on other load on the machine; `too noisy to "
        "tell` marks a ratio whose p10-p90 spreads straddle the target ("
        + ", ".join(f"{t:g}x for {op}" for op, t in MEMORY_TARGETS.items()) + "; else 1x).",
        ("op", "dtype", "impl", "peak MiB", "p10-p90 MiB", "mem/eager", "note"),
        sorted(mem["rows"], key=lambda r: (r["dtype"], r["op"], _impl_rank(r["impl"]))),
        lambda r: [r["op"], r["dtype"], r["impl"]],
        lambda r: [f"{r['median_MiB']:.2f}", _spread(r, "MiB", "{:.2f}"), _x(r.get("mem_vs_eager")),
                   "too noisy to tell ({:.2f}x-{:.2f}x)".format(*r["mem_vs_eager_range"]) if r.get("too_noisy")
                   else "-"])


def render_plot(result: dict, path: str) -> None:
    """Speed-up over eager (log scale) per op, one panel per (shape, dtype), forward+backward (fwd for one_hot2d)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    add_ratios(result["rows"])
    rows = {(r["shape"], r["dtype"], r["op"], r["impl"]): r for r in result["rows"] if r["status"] == "ok"
            and r["impl"] != "eager" and (r["direction"] == "fwdbwd" or r["op"] == "one_hot2d")}
    panels = sorted({(r["shape"], r["dtype"]) for r in result["rows"]})
    impls = sorted({k[3] for k in rows}, key=_impl_rank)
    ops = list(dict.fromkeys(r["op"] for r in result["rows"]))
    fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(max(8, 1.3 * len(ops)), 3.2 * max(1, len(panels))),
                             squeeze=False)
    width = 0.8 / max(1, len(impls))
    device_type = result["meta"].get("device_type")
    target = {"cuda": 4.0, "cpu": 3.0}.get(device_type)
    for ax, (shape, dtype) in zip(axes[:, 0], panels):
        for j, impl in enumerate(impls):
            hits = [rows.get((shape, dtype, op, impl), {}) for op in ops]
            vals = [h.get("speedup_vs_eager") or 0 for h in hits]
            bounds = [h.get("speedup_vs_eager_range") or (v, v) for h, v in zip(hits, vals)]
            ax.bar([i + (j - (len(impls) - 1) / 2) * width for i in range(len(ops))], vals, width, label=impl,
                   yerr=[[max(v - b[0], 0) for v, b in zip(vals, bounds)], [max(b[1] - v, 0) for v, b in
                                                                           zip(vals, bounds)]],
                   error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.axhline(1.0, color="black", linewidth=0.8)
        if target and shape in TARGET_SHAPES.get(device_type, ()):
            ax.axhline(target, color="red", linewidth=0.8, linestyle="--", label=f"{target:g}x eager")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 2, 3, 5, 10, 30, 100, 300]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylabel("x eager")
        ax.set_title(f"{shape}, {dtype}, forward+backward (one_hot2d: forward)", fontsize=9)
        ax.set_xticks(range(len(ops)))
        ax.set_xticklabels(ops, rotation=20, ha="right", fontsize=7)
    for ax in axes[:, 0] if impls else ():
        ax.legend(fontsize=7, ncol=len(impls) + 1)
    m, flags = result["meta"], assess(result)["flags"]
    fig.suptitle(f"fastadvseg speed-up over eager PyTorch (median; error bars: p10-p90 of the ratio): {m['device']}, "
                 f"{m['date']}" + (f" - {' and '.join(flags)} RUN" if flags else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the README's summary -----------------------------------------------------------------------------------------

def newest_per_machine(directory: str = RESULTS) -> List[str]:
    """The newest results file of each machine in ``directory`` (capped kernel builds left out), newest first."""
    newest = {}
    for path in glob.glob(os.path.join(directory, "*.json")):
        with open(path) as f:
            meta = json.load(f)["meta"]
        if "FASTADVSEG_CPU_ISA" in str(meta.get("cpu_kernels", "")):
            continue
        if meta["machine"] not in newest or meta.get("stamp", "") > newest[meta["machine"]][0]:
            newest[meta["machine"]] = (meta.get("stamp", ""), path)
    if not newest:
        raise FileNotFoundError(f"no results in {directory}; run `python -m benchmarks.report` first")
    return [path for _, path in sorted(newest.values(), reverse=True)]


def summary(result: dict, source: str = "") -> str:
    m = result["meta"]
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return "No measured rows.\n"
    add_ratios(rows)
    biggest = max(rows, key=lambda r: r["N"] * r["C"] * r["H"] * r["W"])
    sel = [r for r in rows if r["shape"] == biggest["shape"] and r["impl"] not in ("eager", "compile", "reference")
           and (r["direction"] == "fwdbwd" or r["op"] == "one_hot2d")]
    dtypes = sorted({r["dtype"] for r in sel}, key=lambda d: (d != "float32", d))
    cells = {(r["op"], r["impl"], r["dtype"]): r for r in sel}
    lines = []
    for op, impl in sorted(dict.fromkeys((r["op"], r["impl"]) for r in sel), key=lambda k: _impl_rank(k[1])):
        line = [op + (" (fwd)" if op == "one_hot2d" else ""), impl]
        for d in dtypes:
            r = cells.get((op, impl, d))
            line += ["-"] * 3 if r is None else [f"{r['median_ms']:.2f}", ratio_cell(r, "eager"),
                                                 ratio_cell(r, "compile")]
        lines.append(line)
    quality, shown = assess(result), os.path.abspath(source)
    shown = os.path.relpath(shown, ROOT) if shown.startswith(ROOT + os.sep) else shown
    commit = m["git_commit"][:7] + ("+dirty" if m["git_commit"].endswith("+dirty") else "")
    out = [f"**{m['device']}**, {m['threads']} threads, torch {m['torch']}, {m['date']}, commit {commit}"
           + (f" (`{shown}`)" if source else "") + f". Forward+backward at N={biggest['N']}, C={biggest['C']}, "
           f"{biggest['H']}x{biggest['W']}; run quality: " + (" and ".join(quality["flags"]) or "quiet")
           + f" (load average {m['load_average_start'][0]:g} at start).\n\n",
           table(["op", "backend"] + [f"{d} {col}" for d in dtypes for col in ("ms", "x eager", "x compile")], lines)]
    e2e = result.get("e2e")
    if e2e and e2e.get("speedup"):
        out.append(f"\nTraining iteration ({e2e['shape']}): fused {e2e['fused']['images_per_s']:.1f} images/s vs "
                   f"reference {e2e['reference']['images_per_s']:.1f} images/s, {e2e['speedup']:.2f}x"
                   + (" (the p10-p90 spreads overlap: no measurable difference)"
                      if spreads_overlap(e2e["reference"], e2e["fused"]) else "") + ".\n")
    checks = evaluate(result["rows"], m["device_type"], e2e, result.get("memory"))  # the current rules
    if checks:
        met, undecided = sum(1 for c in checks if c["met"]), sum(1 for c in checks if c["met"] is None)
        out.append(f"\nTargets: {met} of {len(checks)} met, {undecided} too noisy to tell or not measured "
                   "(details in the results file).\n")
    out += [f"\n{note}\n" for note in result.get("notes", [])]
    return "".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="FILE.json | DIR")
    parser.add_argument("--summary", action="store_true", help="print the README's summary of the results files, "
                        "or of the newest run per machine of each folder (default: benchmarks/results)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.paths or args.summary):
        parser.error("name the results files to render (or --summary)")
    paths: List[str] = []
    for arg in args.paths or [RESULTS]:
        if not (os.path.isfile(arg) or os.path.isdir(arg) and args.summary):
            parser.error(f"no results file or folder {arg!r}")
        paths += newest_per_machine(arg) if os.path.isdir(arg) else [arg]
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        if args.summary:
            print(summary(result, path))
            continue
        add_ratios(result["rows"])  # the current renderer and target rules on the recorded numbers
        result["targets"] = evaluate(result["rows"], result["meta"]["device_type"], result.get("e2e"),
                                     result.get("memory"))
        stem = path[:-len(".json")] if path.endswith(".json") else path
        with open(stem + ".md", "w") as f:
            f.write(render_markdown(result))
        render_plot(result, stem + ".png")
        print(f"rendered {path}")
    if args.summary:
        print(OVERLAP_LEGEND)
    return 0


if __name__ == "__main__":
    sys.exit(main())
