"""How far a run's numbers can be trusted (LOADED / NOISY, ratios the p10-p90 spreads cannot decide) and the
targets judged on them (benchmarks/README.md): a ratio not measured is never met, one whose p10-p90 range contains
the target is "too noisy to tell". Only recorded numbers are read, so results files of any age are judged alike.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from .memory import MEMORY_TARGETS
from .shapes import TARGET_SHAPES

LOAD_PER_CPU, ROW_SPREAD, NOISY_SHARE, WILD_SPREAD = 0.5, 1.5, 0.2, 5.0
BASELINES = ("eager", "compile")
OVERLAP_LEGEND = ("`~` before a ratio: the two p10-p90 spreads overlap, so this run cannot tell which is faster "
                  "(the median ratio is shown, not a finding).")
TARGET_DTYPES = ("float32", "bfloat16")
FUSED = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}  # the backends each device's targets are about
GPU_TARGETS = (  # (name, row field, threshold, higher is better)
    ("fused >= 4x eager", "speedup_vs_eager", 4.0, True),
    ("fused >= 1.5x torch.compile", "speedup_vs_compile", 1.5, True),
    (">= 80% of copy bandwidth", "bw_pct", 80.0, True),
    ("peak memory <= 1/2 eager", "mem_vs_eager", 0.5, False),
)
CPU_TARGETS = (("cpu backend >= 3x eager", "speedup_vs_eager", 3.0, True),)
# Rows with targets of their own: each replaces the device's target on the same field, or adds one. The peak
# memory of the per-op tables is measured on CUDA only (the CPU's is the --memory table's RSS, MEMORY_TARGETS).
ROW_TARGETS = {
    "cross_entropy2d[upsampled]": (("fused >= 6x eager", "speedup_vs_eager", 6.0, True),
                                   ("fused >= 3x torch.compile", "speedup_vs_compile", 3.0, True),
                                   ("peak memory <= 1/4 eager", "mem_vs_eager", 0.25, False)),
    "generator_loss[labelled,upsampled]": (("fused >= 5x eager", "speedup_vs_eager", 5.0, True),),
    "generator_path[labelled,upsampled]": (("peak memory <= 1/2 eager", "mem_vs_eager", 0.5, False),),
}
ONLY_OWN_TARGETS = ("generator_path[labelled,upsampled]",)  # D's convolutions in both sides: a memory target only
MEMORY_CHECK = "peak RSS <= 1/2 eager"
E2E_TARGET = 1.2
E2E_OP = "training iteration"


# --- run quality ----------------------------------------------------------------------------------------------------

def spreads_overlap(a: dict, b: dict, unit: str = "ms") -> bool:
    """Whether two timings' p10-p90 spreads overlap (neither is measurably faster)."""
    from .timing import too_noisy  # imports torch: not at module level (the report sets TRITON_INTERPRET first)

    return too_noisy(a, b, 1.0, unit)


def add_ratios(rows: List[dict], key: Tuple[str, ...] = ("op", "shape", "dtype", "direction"),
               baselines: Tuple[str, ...] = BASELINES) -> None:
    """For every timed row, against the row of each baseline impl with the same ``key`` fields in this run:
    ``speedup_vs_<b>`` (baseline median / this median), ``speedup_vs_<b>_range`` (the ratio's p10-p90 bounds) and
    ``speedup_vs_<b>_overlap`` (whether the two spreads overlap). Idempotent."""
    from .timing import ratio_range

    timed = {tuple(r[k] for k in key) + (r["impl"],): r for r in rows
             if r.get("status") == "ok" and "median_ms" in r}
    for k, r in timed.items():
        for b in baselines:
            ref = timed.get(k[:-1] + (b,))
            r[f"speedup_vs_{b}"] = ref["median_ms"] / r["median_ms"] if ref else None
            other = ref is not None and ref is not r
            r[f"speedup_vs_{b}_range"] = ratio_range(ref, r) if other else None
            r[f"speedup_vs_{b}_overlap"] = other and spreads_overlap(ref, r)


def ratio_cell(row: dict, baseline: str) -> str:
    """``3.23x``, ``~1.10x`` when the spreads overlap, ``n/a`` when not measured."""
    value = row.get(f"speedup_vs_{baseline}")
    if value is None:
        return "n/a"
    return ("~" if row.get(f"speedup_vs_{baseline}_overlap") else "") + f"{value:.2f}x"


def assess(result: dict) -> dict:
    """``{"loaded", "noisy", "flags", "lines"}``: what the header of a report says about the run."""
    meta = result["meta"]
    rows = [r for r in result.get("rows", []) if r.get("status") == "ok" and r.get("p10_ms")]
    lines, flags = [], []
    hit = re.search(r"\((\d+) logical CPUs\)", meta.get("device", ""))  # older results say it only there
    load, cpus = meta.get("load_average_start"), meta.get("logical_cpus") or (int(hit.group(1)) if hit else None)
    loaded = bool(load and cpus and load[0] >= LOAD_PER_CPU * cpus)
    if load:
        lines.append(f"1-minute load average {load[0]:g} at the start" + (f" on {cpus} logical CPUs" if cpus else "")
                     + (f" (end: {meta['load_average_end'][0]:g}, this run included)"
                        if meta.get("load_average_end") else "") + (": other work was running" if loaded else ""))
    noisy = False
    if rows:
        spreads = sorted(((r["p90_ms"] / r["p10_ms"], r) for r in rows), key=lambda t: t[0])
        wide = sum(1 for s, _ in spreads if s > ROW_SPREAD)
        worst, w = spreads[-1]
        noisy = wide >= NOISY_SHARE * len(rows) or worst > WILD_SPREAD
        lines.append(f"{wide} of {len(rows)} timed rows have p90/p10 > {ROW_SPREAD:g}; the widest: {w['op']} "
                     f"{w['dtype']} {w['direction']} {w['impl']} ({w['shape']}), p10 {w['p10_ms']:.3f} ms, median "
                     f"{w['median_ms']:.3f} ms, p90 {w['p90_ms']:.3f} ms")
    flags = [flag for flag, on in (("LOADED", loaded), ("NOISY", noisy)) if on]
    return {"loaded": loaded, "noisy": noisy, "flags": flags, "lines": lines}


def quality_header(result: dict) -> str:
    """The Markdown paragraph that opens a report: the run's quality, flagged when loaded or noisy."""
    q = assess(result)
    return (f"**Run quality: {' and '.join(q['flags']) or 'quiet'}.** " + "; ".join(q["lines"]) + "."
            + (" Treat its ratios as rough: rerun on an idle machine before drawing conclusions." if q["flags"]
               else "") + "\n")


# --- targets --------------------------------------------------------------------------------------------------------

def _judge(check: dict, value: Optional[float], bounds=None, status: str = "ok") -> dict:
    """``check`` with its value, ``met`` (None: not measured or too noisy to tell) and the gap to the target."""
    threshold, higher = check["threshold"], check.pop("higher")
    check["value"] = value
    if status != "ok" or value is None:
        check.update(met=None, gap="not measured" + (f" ({status})" if status != "ok" else ""))
    elif bounds and bounds[0] <= threshold <= bounds[1]:
        check.update(met=None, gap=f"too noisy to tell (p10-p90 allow {bounds[0]:.2f}x-{bounds[1]:.2f}x)")
    elif (value >= threshold) if higher else (value <= threshold):
        check.update(met=True, gap="-")
    elif higher:
        check.update(met=False, gap=f"needs {threshold / value:.2f}x more" if value > 0 else "needs > 0")
    else:
        check.update(met=False, gap=f"{value / threshold:.2f}x over")
    return check


def row_targets(op: str, device_type: str) -> tuple:
    """(name, row field, threshold, higher is better) of every target a fused ``op`` row is judged on."""
    generic = GPU_TARGETS if device_type == "cuda" else CPU_TARGETS
    own = tuple(t for t in ROW_TARGETS.get(op, ()) if device_type == "cuda" or t[1] != "mem_vs_eager")
    fields = {t[1] for t in own}
    return (() if op in ONLY_OWN_TARGETS else tuple(t for t in generic if t[1] not in fields)) + own


def memory_check_name(threshold: float) -> str:
    """``peak RSS <= 1/2 eager`` for 0.5."""
    return f"peak RSS <= 1/{1 / threshold:g} eager" if threshold < 1 else f"peak RSS <= {threshold:g}x eager"


def evaluate(rows: List[dict], device_type: str, e2e: Optional[dict] = None,
             memory: Optional[dict] = None) -> List[dict]:
    """One check per (target, op, shape, dtype, fused backend) the targets name and this run covered."""
    checks = []
    shapes = TARGET_SHAPES.get(device_type, ())

    def named(row):
        return (row["shape"] in shapes and row["dtype"] in TARGET_DTYPES
                and row["impl"] in FUSED.get(device_type, ()))

    for row in rows:
        if not named(row) or row["direction"] != "fwdbwd":
            continue
        for name, field, threshold, higher in row_targets(row["op"], device_type):
            checks.append(_judge({"target": name, "field": field, "op": row["op"], "shape": row["shape"],
                                  "dtype": row["dtype"], "impl": row["impl"], "threshold": threshold,
                                  "higher": higher}, row.get(field), row.get(f"{field}_range"), row["status"]))
    for row in (memory or {}).get("rows", []) if device_type == "cpu" else ():  # RSS: a CPU measurement
        if named(row) and row["op"] in MEMORY_TARGETS:
            threshold = MEMORY_TARGETS[row["op"]]
            checks.append(_judge({"target": memory_check_name(threshold), "field": "mem_vs_eager", "op": row["op"],
                                  "shape": row["shape"], "dtype": row["dtype"], "impl": row["impl"],
                                  "threshold": threshold, "higher": False}, row.get("mem_vs_eager"),
                                 row.get("mem_vs_eager_range") if row.get("too_noisy") else None, row["status"]))
    if e2e and device_type == "cuda" and e2e.get("speedup") is not None:
        checks.append(_judge({"target": "training iteration >= 1.2x images/s", "field": "speedup", "op": E2E_OP,
                              "shape": e2e.get("shape", ""), "dtype": e2e.get("dtype", ""),
                              "impl": e2e.get("fused_backend", "auto"), "threshold": E2E_TARGET, "higher": True},
                             e2e["speedup"]))
    return checks


def missing_backend_note(device_type: str, backends: List[str], reasons: Dict[str, str]) -> Optional[str]:
    """A sentence for the report when the backend a target is about did not run at all."""
    absent = [b for b in FUSED.get(device_type, ()) if b not in backends]
    if device_type == "cpu" and absent:
        return (f"The `cpu` backend is not available ({reasons.get('cpu', 'not listed')}): this run compares "
                "fastadvseg's `reference` backend with eager and torch.compile only; the CPU target is not measured.")
    if absent:
        return "Not available on this run: " + "; ".join(f"`{b}` ({reasons.get(b, 'not listed')})" for b in absent)
    return None


def verdict(check: dict) -> str:
    value = "n/a" if check["value"] is None else ("{:.0f}%" if check["field"] == "bw_pct" else "{:.2f}x").format(
        check["value"])
    return f"{value} " + {True: "met", False: f"NOT met ({check['gap']})", None: check["gap"]}[check["met"]]


def compact_rows(checks: List[dict]) -> List[List[str]]:
    """One line per (op, shape, dtype, backend), one cell per target: "5.10x met" / "2.00x NOT met (needs 2.00x
    more)" / "n/a not measured"."""
    checks = [c for c in checks if c["op"] != E2E_OP]
    lines: Dict[tuple, Dict[str, str]] = {}
    for c in checks:
        lines.setdefault((c["op"], c["shape"], c["dtype"], c["impl"]), {})[c["target"]] = verdict(c)
    names = list(dict.fromkeys(c["target"] for c in checks))
    return [["op", "shape", "dtype", "impl"] + names] + [list(k) + [cells.get(n, "") for n in names]
                                                         for k, cells in lines.items()]
