"""Metrics as JSON lines and a progress line with losses (averaged over the steps since the previous line), lr,
kept fraction and ETA; optional TensorBoard scalars."""
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


class WindowMean:
    """Means of each value over the steps since the last log line: what a log line and metrics.jsonl show."""

    def __init__(self):
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}
        self.steps = 0

    def add(self, values: Dict[str, float]) -> None:
        self.steps += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> Dict[str, float]:
        """The means (and "window": the number of steps), then start a new window."""
        out = {k: s / self.counts[k] for k, s in self.sums.items()}
        out["window"] = self.steps
        self.__init__()
        return out


class TensorBoardLog:
    """The metrics.jsonl records as TensorBoard scalars (``RUN/tensorboard``) when ``tensorboard`` is on; the
    ``tensorboard`` package is optional (config.validate refuses the option without it)."""

    def __init__(self, run_dir: Optional[str]):
        self.writer = None
        if run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, record: Dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in record.items():
            if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
    """Prints ``step 120/500 [24%] ce 0.512 adv 0.693 semi 0.000 kept 0.0% D 0.691 lr 2.1e-04 | 3.1 it/s ETA 2m02s``
    (losses: means over the ``window`` steps since the previous line, said as ``(mean of 10)``)."""

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
                           ("loss_cutmix", "cutmix"), ("loss_d", "D")):
            if key in values:
                parts.append(f"{label} {values[key]:.3f}")
        if "semi_ratio" in values:
            parts.append(f"kept {100 * values['semi_ratio']:.1f}%")
        parts.append(f"lr {values['lr']:.2e}")
        if values.get("window", 1) > 1:
            parts.append(f"(mean of {values['window']})")
        parts.append(f"| {done / elapsed:.2f} it/s ETA {fmt_duration(self.eta(step))}")
        return " ".join(parts)

    def print(self, step: int, values: Dict[str, float]) -> None:
        if self.enabled:
            print(self.line(step, values), file=self.stream, flush=True)
