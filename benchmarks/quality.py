"""How far a run's numbers can be trusted: the machine's load, the spread of each timing, and which ratios the
spreads cannot decide.

* **loaded**: the 1-minute load average at the start of the run was at least half the logical CPU count (other
  work was running; on a 2-core machine, a load of 1.0).
* **noisy**: at least a fifth of the timed rows have a p90/p10 spread above 1.5, or one row above 5 (e.g. a
  median of 47.9 ms over a p10 of 0.27 ms: a process that was descheduled for most calls).
* a ratio (``x eager``, ``x compile``) **overlaps** when the two p10-p90 spreads overlap: the run cannot tell which
  side is faster, whatever the medians say. Such a ratio is shown as ``~1.10x``, and a target is judged only when
  the whole p10-p90 range of the ratio lies on one side of it (otherwise "too noisy to tell").

Works on results files of any age: it needs only the recorded p10/p90 and load averages.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

LOAD_PER_CPU = 0.5
ROW_SPREAD = 1.5
NOISY_SHARE = 0.2
WILD_SPREAD = 5.0
BASELINES = ("eager", "compile")


def _key(row: dict) -> tuple:
    return row["op"], row["shape"], row["dtype"], row["direction"]


def add_ranges(rows: List[dict]) -> None:
    """For every timed row: ``speedup_vs_<eager|compile>_range`` (the ratio's p10-p90 bounds) and
    ``speedup_vs_<...>_overlap`` (whether the two spreads overlap). Idempotent."""
    from .timing import ratio_range  # imports torch: not at module level (the report sets TRITON_INTERPRET first)

    base: Dict[tuple, dict] = {(_key(r), r["impl"]): r for r in rows
                               if r["impl"] in BASELINES and r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        for b in BASELINES:
            ref = base.get((_key(r), b))
            if ref is None or r["impl"] == b:
                r[f"speedup_vs_{b}_range"], r[f"speedup_vs_{b}_overlap"] = None, False
                continue
            r[f"speedup_vs_{b}_range"] = ratio_range(ref, r)  # speed-up = baseline time / this time
            r[f"speedup_vs_{b}_overlap"] = spreads_overlap(ref, r)


def spreads_overlap(a: dict, b: dict, unit: str = "ms") -> bool:
    """Whether two timings' p10-p90 spreads overlap (neither is measurably faster)."""
    from .timing import ratio_range

    lo, hi = ratio_range(a, b, unit)
    return lo <= 1.0 <= hi


def ratio_cell(row: dict, baseline: str) -> str:
    """``3.23x``, ``~1.10x`` when the spreads overlap, ``n/a`` when not measured."""
    value = row.get(f"speedup_vs_{baseline}")
    if value is None:
        return "n/a"
    return ("~" if row.get(f"speedup_vs_{baseline}_overlap") else "") + f"{value:.2f}x"


OVERLAP_LEGEND = ("`~` before a ratio: the two p10-p90 spreads overlap, so this run cannot tell which is faster "
                  "(the median ratio is shown, not a finding).")


def logical_cpus(meta: dict) -> Optional[int]:
    if meta.get("logical_cpus"):
        return int(meta["logical_cpus"])
    for text, pattern in ((meta.get("device", ""), r"\((\d+) logical CPUs\)"), (meta.get("machine", ""), r"-(\d+)c$")):
        hit = re.search(pattern, text)
        if hit:
            return int(hit.group(1))
    return None


def assess(result: dict) -> dict:
    """``{"loaded", "noisy", "flags", "lines"}``: what the header of a report says about the run."""
    meta = result["meta"]
    rows = [r for r in result.get("rows", []) if r.get("status") == "ok" and r.get("p10_ms")]
    lines, flags = [], []
    load, cpus = meta.get("load_average_start"), logical_cpus(meta)
    loaded = bool(load and cpus and load[0] >= LOAD_PER_CPU * cpus)
    if load:
        where = f" on {cpus} logical CPUs" if cpus else ""
        lines.append(f"1-minute load average {load[0]:g} at the start{where}"
                     + (f" (end: {meta['load_average_end'][0]:g}, this run included)"
                        if meta.get("load_average_end") else "")
                     + (": other work was running" if loaded else ""))
    if loaded:
        flags.append("LOADED")
    noisy = False
    if rows:
        spreads = sorted(((r["p90_ms"] / r["p10_ms"], r) for r in rows), key=lambda t: t[0])
        wide = sum(1 for s, _ in spreads if s > ROW_SPREAD)
        worst, w = spreads[-1]
        noisy = wide >= NOISY_SHARE * len(rows) or worst > WILD_SPREAD
        lines.append(f"{wide} of {len(rows)} timed rows have p90/p10 > {ROW_SPREAD:g}; the widest: {w['op']} "
                     f"{w['dtype']} {w['direction']} {w['impl']} ({w['shape']}), p10 {w['p10_ms']:.3f} ms, median "
                     f"{w['median_ms']:.3f} ms, p90 {w['p90_ms']:.3f} ms")
    if noisy:
        flags.append("NOISY")
    return {"loaded": loaded, "noisy": noisy, "flags": flags, "lines": lines}


def header(result: dict) -> str:
    """The Markdown paragraph that opens a report: the run's quality, flagged when loaded or noisy."""
    q = assess(result)
    verdict = " and ".join(q["flags"]) if q["flags"] else "quiet"
    advice = (" Treat its ratios as rough: rerun on an idle machine before drawing conclusions."
              if q["flags"] else "")
    return f"**Run quality: {verdict}.** " + "; ".join(q["lines"]) + "." + advice + "\n"


def straddles(row: dict, field: str, threshold: float) -> Optional[Tuple[float, float]]:
    """The ratio's p10-p90 range when it contains ``threshold`` (a target the run cannot decide), else None."""
    bounds = row.get(f"{field}_range")
    if bounds and bounds[0] <= threshold <= bounds[1]:
        return tuple(bounds)
    return None
