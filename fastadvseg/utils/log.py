"""Metrics as JSON lines and a progress line with losses, lr, kept fraction and ETA."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


class MetricsLog:
    """Append-only ``metrics.jsonl``: one object per line, each with ``"step"`` and ``"kind"`` ("train"/"val").

    On resume from a checkpoint taken after ``k`` steps, lines of steps > k (written after that checkpoint by the
    interrupted run) are dropped first, so the file reads like the log of one uninterrupted run.
    """

    def __init__(self, path: Optional[str], resume_step: Optional[int] = None):
        self.path = path
        if path is None:
            return
        if resume_step is not None and os.path.isfile(path):
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= resume_step]
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                for r in kept:
                    f.write(json.dumps(r) + "\n")
            os.replace(tmp, path)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        if self.path is None:
            return
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self.path is not None:
            self._f.close()


def read_metrics(path: str) -> List[Dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line torn by a kill: skip it
                    pass
    return out


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Prints ``step 120/500 [24%] ce 0.512 adv 0.693 semi 0.000 kept 0.0% D 0.691 lr 2.1e-04 | 3.1 it/s ETA 2m02s``."""

    def __init__(self, total: int, start: int, enabled: bool = True, stream=None):
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()

    def eta(self, step: int) -> float:
        done = step + 1 - self.start
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        return (self.total - step - 1) / rate if rate > 0 else float("inf")

    def line(self, step: int, values: Dict[str, float]) -> str:
        done = step + 1 - self.start
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        parts = [f"step {step + 1}/{self.total} [{100 * (step + 1) / self.total:3.0f}%]"]
        for key, label in (("loss_ce", "ce"), ("loss_adv", "adv"), ("loss_semi_adv", "adv_u"), ("loss_semi", "semi"),
                           ("loss_d", "D")):
            if key in values:
                parts.append(f"{label} {values[key]:.3f}")
        if "semi_ratio" in values:
            parts.append(f"kept {100 * values['semi_ratio']:.1f}%")
        parts.append(f"lr {values['lr']:.2e}")
        parts.append(f"| {done / elapsed:.2f} it/s ETA {fmt_duration(self.eta(step))}")
        return " ".join(parts)

    def print(self, step: int, values: Dict[str, float]) -> None:
        if self.enabled:
            print(self.line(step, values), file=self.stream, flush=True)
