"""Print the README-ready summary of a results file: ``python -m benchmarks.readme_table [FILE.json | DIR]``.

Without an argument it reads the newest ``benchmarks/results/*.json`` (by the date recorded inside). It prints
forward+backward rows (forward for ``one_hot2d``) of the largest shape in the file, for every fastadvseg backend,
with the speed-ups over eager and torch.compile measured in that run, then the end-to-end line and the SPEC
section 5 tally. It only reformats recorded numbers; it measures nothing.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import List, Optional

from .render import _impl_rank, _x, table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def latest(directory: str = RESULTS) -> str:
    files = glob.glob(os.path.join(directory, "*.json"))
    if not files:
        raise FileNotFoundError(f"no results in {directory}; run `python -m benchmarks.report` first")

    def stamp(path: str) -> str:
        with open(path) as f:
            return json.load(f)["meta"].get("stamp", "")

    return max(files, key=stamp)


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
    biggest = max(rows, key=lambda r: r["N"] * r["C"] * r["H"] * r["W"])["shape"]
    sel = [r for r in rows if r["shape"] == biggest and r["impl"] not in ("eager", "compile")
           and (r["direction"] == "fwdbwd" or r["op"] == "one_hot2d")]
    sel.sort(key=lambda r: (r["dtype"], r["op"], _impl_rank(r["impl"])))
    gpu = m["device_type"] == "cuda"
    header = ["op", "dtype", "backend", "ms (median)", "x eager", "x compile"]
    header += ["% copy BW", "mem/eager"] if gpu else []
    body = []
    for r in sel:
        line = [r["op"] + (" (fwd)" if r["direction"] == "fwd" else ""), r["dtype"], r["impl"], f"{r['median_ms']:.3f}",
                _x(r.get("speedup_vs_eager")), _x(r.get("speedup_vs_compile"))]
        if gpu:
            line += ["n/a" if r.get("bw_pct") is None else f"{r['bw_pct']:.0f}%", _x(r.get("mem_vs_eager"))]
        body.append(line)
    r0 = next(r for r in rows if r["shape"] == biggest)
    out = [f"Forward+backward, {biggest} (N={r0['N']}, C={r0['C']}, {r0['H']}x{r0['W']}); measured on "
           f"{m['device']}, {m['threads']} threads, torch {m['torch']}, {m['date']}, commit {m['git_commit'][:12]}{'+dirty' if m['git_commit'].endswith('+dirty') else ''}, "
           f"load average {m['load_average_start']} at start"
           + (f" (`{_shown(source)}`)" if source else "") + ".\n\n"]
    out.append(table(header, body))
    e2e = result.get("e2e")
    if e2e:
        out.append(f"\nTraining iteration ({e2e['shape']}; {e2e['models']}): fused {e2e['fused']['images_per_s']:.2f} "
                   f"images/s vs reference {e2e['reference']['images_per_s']:.2f} images/s, {e2e['speedup']:.2f}x.\n")
    checks = result.get("targets", [])
    if checks:
        met = sum(1 for c in checks if c["met"])
        out.append(f"\nSPEC section 5: {met} of {len(checks)} checks met (details in the results file).\n")
    for note in result.get("notes", []):
        out.append(f"\n{note}\n")
    return "".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else latest()
    if os.path.isdir(path):
        path = latest(path)
    with open(path) as f:
        print(summary(json.load(f), path), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
