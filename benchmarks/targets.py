"""The performance targets, as checks over a report's rows: each target met or not, with the gap.

* GPU (cuda), shapes VOC and Cityscapes, float32 and bfloat16, forward+backward, every fused backend:
  >= 4x the eager reference, >= 1.5x torch.compile of it, >= 80% of the measured copy bandwidth for the bytes
  the op must move, peak memory <= 1/2 of eager's.
* CPU, the same ops at N=2 (shape ``voc-n2``), forward+backward: the ``cpu`` backend >= 3x eager; and (``--memory``)
  for ``cross_entropy2d`` and labelled ``generator_loss`` a peak RSS above baseline <= 1/2 of eager's.
* Training iteration (``--e2e``) on GPU: fused losses >= 1.2x the images/s of the reference losses.

Only measured ratios are judged: a ratio that was not measured (backend missing, op failed) is listed as
"not measured" with the reason, never as met; a ratio whose p10-p90 range contains the target is "too noisy to
tell" (``benchmarks/quality.py``), never met or missed on its median alone.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from .memory import MEMORY_TARGET, MEMORY_TARGET_OPS
from .quality import straddles
from .shapes import TARGET_SHAPES

TARGET_DTYPES = ("float32", "bfloat16")

FUSED = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}  # the backends each device's targets are about
GPU_TARGETS = (  # (name, row field, threshold, higher is better)
    ("fused >= 4x eager", "speedup_vs_eager", 4.0, True),
    ("fused >= 1.5x torch.compile", "speedup_vs_compile", 1.5, True),
    (">= 80% of copy bandwidth", "bw_pct", 80.0, True),
    ("peak memory <= 1/2 eager", "mem_vs_eager", 0.5, False),
)
CPU_TARGETS = (("cpu backend >= 3x eager", "speedup_vs_eager", 3.0, True),)
UNITS = {"bw_pct": "{:.0f}%"}  # everything else is a ratio, printed as 1.23x
E2E_TARGET = 1.2
E2E_OP = "training iteration"


def _judge(value: Optional[float], threshold: float, higher: bool) -> Dict[str, object]:
    if value is None:
        return {"value": None, "met": None, "gap": "not measured"}
    met = value >= threshold if higher else value <= threshold
    if met:
        gap = "-"
    elif higher:
        gap = f"needs {threshold / value:.2f}x more" if value > 0 else "needs > 0"
    else:
        gap = f"{value / threshold:.2f}x over"
    return {"value": value, "met": met, "gap": gap}


MEMORY_CHECK = "peak RSS <= 1/2 eager"


def evaluate(rows: List[dict], device_type: str, e2e: Optional[dict] = None,
             memory: Optional[dict] = None) -> List[dict]:
    """One check per (target, op, shape, dtype, fused backend) the targets name and this run covered."""
    checks = []
    shapes = TARGET_SHAPES.get(device_type, ())
    targets = GPU_TARGETS if device_type == "cuda" else CPU_TARGETS
    for row in rows:
        if (row["shape"] not in shapes or row["dtype"] not in TARGET_DTYPES or row["direction"] != "fwdbwd"
                or row["impl"] not in FUSED.get(device_type, ())):
            continue
        for name, field, threshold, higher in targets:
            check = {"target": name, "field": field, "op": row["op"], "shape": row["shape"], "dtype": row["dtype"],
                     "impl": row["impl"], "threshold": threshold}
            check.update(_judge(row.get(field) if row["status"] == "ok" else None, threshold, higher))
            if row["status"] != "ok":
                check["gap"] = f"not measured ({row['status']})"
            elif straddles(row, field, threshold):
                lo, hi = straddles(row, field, threshold)
                check.update(met=None, gap=f"too noisy to tell (p10-p90 allow {lo:.2f}x-{hi:.2f}x)")
            checks.append(check)
    memory_rows = (memory or {}).get("rows", []) if device_type == "cpu" else []  # RSS: a CPU measurement
    for row in memory_rows:
        if (row["shape"] not in shapes or row["dtype"] not in TARGET_DTYPES or row["op"] not in MEMORY_TARGET_OPS
                or row["impl"] not in FUSED["cpu"]):
            continue
        check = {"target": MEMORY_CHECK, "field": "mem_vs_eager", "op": row["op"], "shape": row["shape"],
                 "dtype": row["dtype"], "impl": row["impl"], "threshold": MEMORY_TARGET}
        check.update(_judge(row.get("mem_vs_eager"), MEMORY_TARGET, False))
        if row["status"] != "ok":
            check["gap"] = f"not measured ({row['status']})"
        elif row.get("too_noisy"):
            lo, hi = row["mem_vs_eager_range"]
            check.update(met=None, gap=f"too noisy to tell (p10-p90 allow {lo:.2f}x-{hi:.2f}x)")
        checks.append(check)
    if e2e and device_type == "cuda" and e2e.get("speedup") is not None:
        check = {"target": "training iteration >= 1.2x images/s", "field": "speedup", "op": E2E_OP,
                 "shape": e2e.get("shape", ""),
                 "dtype": e2e.get("dtype", ""), "impl": e2e.get("fused_backend", "auto"), "threshold": E2E_TARGET}
        check.update(_judge(e2e["speedup"], E2E_TARGET, True))
        checks.append(check)
    return checks


def missing_backend_note(device_type: str, backends: List[str], reasons: Dict[str, str]) -> Optional[str]:
    """A sentence for the report when the backend a target is about did not run at all."""
    wanted = ("cpu",) if device_type == "cpu" else ("triton", "cuda")
    absent = [b for b in wanted if b not in backends]
    if device_type == "cpu" and absent:
        return (f"The `cpu` backend is not available ({reasons.get('cpu', 'not listed')}): this run compares "
                "fastadvseg's `reference` backend with eager and torch.compile only; the CPU target is not measured.")
    if device_type == "cuda" and absent:
        return "Not available on this run: " + "; ".join(f"`{b}` ({reasons.get(b, 'not listed')})" for b in absent)
    return None


def verdict(check: dict) -> str:
    word = {True: "met", False: f"NOT met ({check['gap']})", None: check["gap"]}[check["met"]]
    return f"{format_value(check)} {word}"


def format_value(check: dict) -> str:
    if check["value"] is None:
        return "n/a"
    return UNITS.get(check["field"], "{:.2f}x").format(check["value"])


def compact_rows(checks: List[dict]) -> List[List[str]]:
    """One line per (op, shape, dtype, backend), one cell per target: "5.10x met" / "2.00x NOT met (needs 2.00x
    more)" / "n/a not measured"."""
    checks = [c for c in checks if c["op"] != E2E_OP]
    lines: Dict[tuple, Dict[str, str]] = {}
    for c in checks:
        lines.setdefault((c["op"], c["shape"], c["dtype"], c["impl"]), {})[c["target"]] = verdict(c)
    names = []
    for c in checks:
        if c["target"] not in names:
            names.append(c["target"])
    return [["op", "shape", "dtype", "impl"] + names] + [list(k) + [cells.get(n, "") for n in names]
                                                         for k, cells in lines.items()]
