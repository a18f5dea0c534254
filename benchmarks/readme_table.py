"""Print the README's benchmark summary: ``python -m benchmarks.readme_table [FILE.json | DIR ...]``.

Without an argument: one table per machine, from the newest ``benchmarks/results/*.json`` of each machine (by the
date recorded inside; runs with a capped kernel build, ``FASTADVSEG_CPU_ISA``, are a different configuration and
are left out). Each table has the forward+backward rows (forward for ``one_hot2d``) of the largest shape in the
file, for every fastadvseg kernel backend, per dtype: median ms and the speed-ups over eager and torch.compile
measured in that run. Under it: the run's quality (load, spread), the training-iteration line and the target tally.
It only reformats recorded numbers; it measures nothing.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional

from .quality import OVERLAP_LEGEND, add_ranges, assess, ratio_cell, spreads_overlap
from .render import _impl_rank, table
from .targets import evaluate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BASELINES = ("eager", "compile", "reference")


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _capped(meta: dict) -> bool:
    return "FASTADVSEG_CPU_ISA" in str(meta.get("cpu_kernels", ""))


def newest_per_machine(directory: str = RESULTS) -> List[str]:
    """The newest results file of each machine in ``directory`` (capped kernel builds left out), newest first."""
    newest: Dict[str, tuple] = {}
    for path in glob.glob(os.path.join(directory, "*.json")):
        meta = _load(path)["meta"]
        if _capped(meta):
            continue
        stamp = meta.get("stamp", "")
        if meta["machine"] not in newest or stamp > newest[meta["machine"]][0]:
            newest[meta["machine"]] = (stamp, path)
    if not newest:
        raise FileNotFoundError(f"no results in {directory}; run `python -m benchmarks.report` first")
    return [path for _, path in sorted(newest.values(), reverse=True)]


def latest(directory: str = RESULTS) -> str:
    """The newest results file in ``directory``, whatever the machine."""
    return newest_per_machine(directory)[0]


def _shown(path: str) -> str:
    """The results file as the README should name it: relative to the repository root when inside it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = os.path.abspath(path)
    return os.path.relpath(full, root) if full.startswith(root + os.sep) else full


def summary(result: dict, source: str = "") -> str:
    m = result["meta"]
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    if not rows:
        return "No measured rows.\n"
    add_ranges(rows)
    biggest = max(rows, key=lambda r: r["N"] * r["C"] * r["H"] * r["W"])["shape"]
    sel = [r for r in rows if r["shape"] == biggest and r["impl"] not in BASELINES
           and (r["direction"] == "fwdbwd" or r["op"] == "one_hot2d")]
    dtypes = sorted({r["dtype"] for r in sel}, key=lambda d: (d != "float32", d))
    cells = {(r["op"], r["impl"], r["dtype"]): r for r in sel}
    lines = []
    keys = []
    for r in sel:  # the report's op order
        if (r["op"], r["impl"]) not in keys:
            keys.append((r["op"], r["impl"]))
    keys.sort(key=lambda k: _impl_rank(k[1]))
    for op, impl in keys:
        line = [op + (" (fwd)" if op == "one_hot2d" else ""), impl]
        for d in dtypes:
            r = cells.get((op, impl, d))
            line += ["-", "-", "-"] if r is None else [f"{r['median_ms']:.2f}", ratio_cell(r, "eager"),
                                                       ratio_cell(r, "compile")]
        lines.append(line)
    header = ["op", "backend"] + [f"{d} {col}" for d in dtypes for col in ("ms", "x eager", "x compile")]
    r0 = next(r for r in rows if r["shape"] == biggest)
    quality = assess(result)
    commit = m["git_commit"][:7] + ("+dirty" if m["git_commit"].endswith("+dirty") else "")
    out = [f"**{m['device']}**, {m['threads']} threads, torch {m['torch']}, {m['date']}, commit {commit}"
           + (f" (`{_shown(source)}`)" if source else "") + f". Forward+backward at N={r0['N']}, C={r0['C']}, "
           f"{r0['H']}x{r0['W']}; run quality: "
           + (" and ".join(quality["flags"]) if quality["flags"] else "quiet")
           + f" (load average {m['load_average_start'][0]:g} at start).\n\n"]
    out.append(table(header, lines))
    e2e = result.get("e2e")
    if e2e:
        out.append(f"\nTraining iteration ({e2e['shape']}): fused {e2e['fused']['images_per_s']:.1f} images/s vs "
                   f"reference {e2e['reference']['images_per_s']:.1f} images/s, {e2e['speedup']:.2f}x"
                   + (" (the p10-p90 spreads overlap: no measurable difference)"
                      if spreads_overlap(e2e["reference"], e2e["fused"]) else "") + ".\n")
    checks = evaluate(result["rows"], m["device_type"], e2e, result.get("memory"))  # the current rules
    if checks:
        met = sum(1 for c in checks if c["met"])
        undecided = sum(1 for c in checks if c["met"] is None)
        out.append(f"\nTargets: {met} of {len(checks)} met, {undecided} too noisy to tell or not measured "
                   "(details in the results file).\n")
    for note in result.get("notes", []):
        out.append(f"\n{note}\n")
    return "".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.readme_table",
                                     description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("paths", nargs="*", metavar="FILE.json | DIR",
                        help="results files, or folders (the newest run per machine); default benchmarks/results")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    paths: List[str] = []
    for arg in args.paths or [RESULTS]:
        if os.path.isdir(arg):
            paths += newest_per_machine(arg)
        elif os.path.isfile(arg):
            paths.append(arg)
        else:
            parser.error(f"no results file or folder {arg!r}")
    print("\n".join(summary(_load(p), p) for p in paths), end="")
    print(f"\n{OVERLAP_LEGEND}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
