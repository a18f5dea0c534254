"""The paper's table on your data: baseline vs adversarial vs adversarial+semi, across label fractions and seeds.

    python -m fastadvseg.experiments.table                      # the embedded synthetic data, 3 modes x 4 fractions x 3 seeds
    python -m fastadvseg.experiments.table --jobs 2 --out runs/paper_table
    python -m fastadvseg.experiments.table --init pretrained --jobs 2 --out runs/paper_table_pretrained
    python -m fastadvseg.experiments.table --fractions 1/8 --modes baseline semi --seeds 1 --steps 300
    python -m fastadvseg.experiments.table --dataset voc --data_root /data/VOCdevkit --config voc_1_8 \\
        --pretrained /weights/resnet101COCO-41f33a49.pth --steps 20000 --semi_start 5000
    python -m fastadvseg.experiments.table --out runs/paper_table --report-only   # rewrite the table from what is done

Each (mode, fraction, seed) cell is one training run, ``OUT/cells/<mode>_<fraction>_s<seed>/``, trained in its own
process (``python -m fastadvseg.train``; its output goes to ``OUT/logs/<cell>.log``), so a crashing cell is reported
and the sweep goes on. Seed k sets BOTH the labelled/unlabelled split (``split_seed = k``) and the training seed
(``seed = 1234 + k``: initialisation, batch order, augmentation); seed 0 is the plain ``python -m fastadvseg.train``
run. Re-running the same command continues a sweep: a cell with ``summary.json`` (written when its run finished) is
skipped, a cell with a checkpoint continues from it (``--resume``, bit-identical on CPU), other cells start afresh.
Ctrl-C / SIGTERM stop the running cells at a checkpoint. ``semi`` at fraction 1 is not run: with no unlabelled
images it is the same computation as ``adv`` (the paper also leaves that cell empty).

At the end (and with ``--report-only``) it writes ``OUT/table.md`` (mean +- sample std of the final mIoU over seeds
per mode x fraction, n shown, the paper's VOC numbers beside, the paired difference to the baseline),
``OUT/table.png`` (mIoU vs label fraction, one line per mode, error bars = std) and ``OUT/results.json`` (every
cell's numbers, its training diagnostics and the exact command line). The score of a cell is the mIoU of its final
model (not the best of its intermediate evaluations, which would select on the data it is scored on); on the embedded
data it is reported on the held-out test split (``eval_test``: 200 images disjoint from train and val), the val
scores beside, and any choice (a setting, a remedy) is made on val. ``--init pretrained`` starts every cell from the
shipped pretrained backbone (``python -m fastadvseg.pretrain``), ``--init scratch`` (the default) from random weights.

Besides the paper's three modes (the default), ``--modes`` takes the two controls that learn from the unlabelled
images without the discriminator: ``selftrain`` (adv+semi with L_semi's pixels chosen by the network's own confidence)
and ``mean_teacher`` (CutMix mean teacher, French et al. 2020); like ``semi`` they are not run at fraction 1. The
report pools the paired differences over the fractions too (e.g. adv - baseline over every seed x fraction pair:
mean, 95% t interval, how many pairs are positive).

Any other ``--key value`` is passed to every cell as a TrainConfig override (``python -m fastadvseg.train --help``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, List, Optional, Sequence

from ..config import MODES, UNLABELLED_MODES, ConfigError, load_config, parse_overrides, require_pipeline_extras

# Defaults for the embedded synthetic data: 1800 steps (twice the plain training default, which is far from
# converged). The whole from-scratch sweep (33 cells, each scored on val and test) took 65 minutes with --jobs 2 on
# the 2-core machine (docs/paper_table.md).
DEFAULT_STEPS = 1800
DEFAULT_FRACTIONS = ("1/8", "1/4", "1/2", "1")
DEFAULT_MODES = ("baseline", "adv", "semi")
DEFAULT_SEEDS = 3
TRAIN_SEED_BASE = 1234  # TrainConfig's default seed: seed index 0 is the default run
# Keys the sweep sets itself (per cell); overriding them would make every cell the same.
SWEEP_KEYS = ("mode", "labelled_fraction", "labelled_count", "seed", "split_seed", "split_file", "name", "run_root",
              "steps")
RESULT_FILE = "summary.json"  # written by fastadvseg.train when a run has finished

# Hung et al. (BMVC 2018), PASCAL VOC 2012 val mIoU, DeepLab-v2 ResNet-101 (COCO-pretrained): the reference only.
PAPER_VOC = {"baseline": {"1/8": 66.0, "1/4": 68.3, "1/2": 69.8, "1": 73.6},
             "semi": {"1/8": 69.5, "1/4": 72.1, "1/2": 73.8, "1": None}}
PLOT_LABELS = {"semi": "adv+semi", "selftrain": "adv+selftrain", "mean_teacher": "CutMix mean teacher"}
MODE_LABELS = {"baseline": "baseline (L_ce)", "adv": "adv (L_ce + L_adv)", "semi": "adv+semi (+ L_adv, L_semi on unlabelled)",
               "selftrain": "adv+selftrain (adv+semi, L_semi kept where G's max softmax >= selftrain_threshold)",
               "mean_teacher": "CutMix mean teacher (L_ce + CutMix CE on the EMA teacher's confident pseudo-labels)"}
# The pooled comparisons (a - b, paired by fraction and seed) of the report, where both modes were run: what L_adv
# adds, what L_semi adds to it, and the two controls against the baseline and against the paper's adv+semi.
POOLED_PAIRS = (("adv", "baseline"), ("semi", "adv"), ("semi", "baseline"), ("selftrain", "baseline"),
                ("selftrain", "semi"), ("mean_teacher", "baseline"), ("mean_teacher", "semi"))

EXPECTED = ("Expected duration with the defaults (embedded synthetic data, 1800 steps, 33 cells) with --jobs 2 on 2 "
            "CPU cores: about 65 minutes from scratch (per cell, two side by side, median: baseline 1.8, adv 3.7, "
            "semi 6.3 minutes, scoring on val and test included), about 58 minutes with --init pretrained; a third "
            "process competing for the cores makes it up to half as long again. The controls cost per cell about "
            "what semi (selftrain: 6.8 CPU minutes at 1/8) and adv (mean_teacher: 3.6) cost (estimated from runs of "
            "100 and 300 steps).")


@dataclass
class Cell:
    mode: str
    fraction: str  # "1/8"
    seed: int  # seed index k: split_seed = k, seed = TRAIN_SEED_BASE + k

    @property
    def name(self) -> str:
        return f"{self.mode}_{self.fraction.replace('/', '-')}_s{self.seed}"

    @property
    def value(self) -> float:
        return float(Fraction(self.fraction))


def parse_fraction(text: str) -> str:
    """"1/8", "0.125" -> "1/8"; "1" -> "1". Raises ValueError outside (0, 1]."""
    try:
        f = Fraction(text).limit_denominator(1000)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a fraction: {text!r}") from None
    if not 0 < f <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {text!r}")
    return str(f)


def build_cells(modes: Sequence[str], fractions: Sequence[str], seeds: Sequence[int]) -> List[Cell]:
    """Seed-major order, so that an interrupted sweep has whole tables of the first seeds. The modes that learn from
    unlabelled images are not run at fraction 1 (there are none: semi would repeat adv, mean_teacher the baseline)."""
    return [Cell(m, f, s) for s in seeds for f in fractions for m in modes if not _not_run(m, f)]


def _not_run(mode: str, fraction: str) -> bool:
    return mode in UNLABELLED_MODES and Fraction(fraction) == 1


def train_args(cell: Cell, steps: int, overrides: Dict[str, str], cells_dir: str) -> List[str]:
    args = ["--run_root", cells_dir, "--name", cell.name, "--mode", cell.mode, "--labelled_fraction", str(cell.value),
            "--seed", str(TRAIN_SEED_BASE + cell.seed), "--split_seed", str(cell.seed), "--steps", str(steps)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return args


def cell_state(run_dir: str) -> str:
    if os.path.isfile(os.path.join(run_dir, RESULT_FILE)):
        return "done"
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "last.pt")):
        return "partial"
    return "new"


class Sweep:
    """Runs cells in subprocesses, ``jobs`` at a time; SIGINT/SIGTERM stop them at a checkpoint."""

    def __init__(self, out: str, steps: int, overrides: Dict[str, str], config: Optional[str], jobs: int,
                 log=print):
        self.out, self.steps, self.overrides, self.config, self.jobs = out, steps, overrides, config, jobs
        self.cells_dir = os.path.join(out, "cells")
        self.logs_dir = os.path.join(out, "logs")
        self.log = log
        self.stopping = False
        self.procs: Dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def command(self, cell: Cell) -> List[str]:
        run_dir = os.path.join(self.cells_dir, cell.name)
        cmd = [sys.executable, "-m", "fastadvseg.train"]
        if cell_state(run_dir) == "partial":
            return cmd + ["--resume", run_dir]  # its config (steps, overrides) comes from the checkpoint
        if self.config:
            cmd += ["--config", self.config]
        return cmd + train_args(cell, self.steps, self.overrides, self.cells_dir)

    def run_cell(self, cell: Cell) -> Dict:
        run_dir = os.path.join(self.cells_dir, cell.name)
        state = cell_state(run_dir)
        if state == "done":
            return {"cell": cell.name, "status": "skipped (done)"}
        if self.stopping:
            return {"cell": cell.name, "status": "not started"}
        cmd = self.command(cell)
        os.makedirs(self.logs_dir, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.perf_counter()
        with open(os.path.join(self.logs_dir, cell.name + ".log"), "a", encoding="utf-8") as logf:
            logf.write(f"$ {shlex.join(cmd)}\n")
            logf.flush()
            with self.lock:
                if self.stopping:
                    return {"cell": cell.name, "status": "not started"}
                # own session: a Ctrl-C in the terminal reaches the cells only through us (once)
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=env)
                self.procs[cell.name] = proc
            self.log(f"[{time.strftime('%H:%M:%S')}] start {cell.name}" + (" (resuming)" if state == "partial" else ""))
            rc = proc.wait()
            with self.lock:
                self.procs.pop(cell.name, None)
        wall = time.perf_counter() - t0
        if rc in (130, 143) and cell_state(run_dir) == "partial":  # SIGINT / SIGTERM: saved, continues next time
            status = "interrupted"
        elif rc != 0:
            status = f"failed (exit code {rc}, see {os.path.join(self.logs_dir, cell.name + '.log')})"
        else:
            status = "trained" if cell_state(run_dir) == "done" else "interrupted"
        self.log(f"[{time.strftime('%H:%M:%S')}] {status} {cell.name} in {wall / 60:.1f} min")
        return {"cell": cell.name, "status": status, "wall_s": wall}

    def stop(self, signum=None, frame=None):
        with self.lock:
            if not self.stopping:
                self.log("stopping: the running cells save a checkpoint and exit; run the same command to continue")
            self.stopping = True
            for proc in self.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    def run(self, cells: Sequence[Cell]) -> List[Dict]:
        old = {}
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, self.stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with ThreadPoolExecutor(max_workers=max(1, self.jobs)) as pool:
                return list(pool.map(self.run_cell, cells))
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------- the report


def read_cell(cells_dir: str, cell: Cell) -> Dict:
    run_dir = os.path.join(cells_dir, cell.name)
    row = {"cell": cell.name, "mode": cell.mode, "fraction": cell.fraction, "seed": cell.seed,
           "split_seed": cell.seed, "train_seed": TRAIN_SEED_BASE + cell.seed, "run_dir": run_dir,
           "state": cell_state(run_dir), "miou": None}
    if row["state"] == "done":
        with open(os.path.join(run_dir, RESULT_FILE), encoding="utf-8") as f:
            s = json.load(f)
        row.update(miou=s.get("miou"), best_miou=s.get("best_miou"), pixel_acc=s.get("pixel_acc"),
                   test_miou=s.get("test_miou"), test_pixel_acc=s.get("test_pixel_acc"),
                   wall_s=s.get("wall_s"), cpu_s=s.get("cpu_s"), steps=s.get("step"))
        row["diagnostics"] = cell_diagnostics(os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "config.yaml"))
    return row


# Training diagnostics per cell (from its metrics.jsonl): D's mean confidence sigmoid(D) on the predictions (fake:
# labelled, and in semi mode unlabelled, softmax maps) and on the one-hot ground truth (real), the fraction of
# unlabelled pixels the pseudo-label term keeps (from semi_start on), and that term's share of the generator loss:
# lambda_semi L_semi / (L_ce + lambda_adv L_adv + lambda_semi_adv L_adv,unl + lambda_semi L_semi) (semi, selftrain), or
# lambda_cutmix L_cutmix / (L_ce + lambda_cutmix L_cutmix) (mean_teacher), and D's loss L_D (the halved BCE sum of its
# step: about 0.2-0.5 when D and G are balanced, near 0 when D wins outright), per phase of the run.
DIAG_KEYS = ("d_conf_fake", "d_conf_real", "semi_ratio", "semi_share", "loss_d")
PHASES = ((0.0, 0.05), (0.05, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


def cell_diagnostics(metrics_path: str, config_path: str) -> Optional[Dict]:
    """{phase "a-b": {key: mean over the logged windows of that phase}} (None without metrics)."""
    if not os.path.isfile(metrics_path):
        return None
    import yaml

    cfg = {}
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    lam = {k: float(cfg.get(k, d)) for k, d in (("lambda_adv", 0.01), ("lambda_semi_adv", 0.001), ("lambda_semi", 0.1),
                                                ("lambda_cutmix", 1.0))}
    steps = int(cfg.get("steps", 0)) or None
    records = []
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("kind") == "train":
                records.append(r)
    if not records:
        return None
    steps = steps or max(r["step"] for r in records)
    out = {}
    for lo, hi in PHASES:
        sel = [r for r in records if lo * steps < r["step"] <= hi * steps]
        vals: Dict[str, List[float]] = {k: [] for k in DIAG_KEYS}
        for r in sel:
            for k in ("d_conf_fake", "d_conf_real", "semi_ratio", "loss_d"):
                if k in r:
                    vals[k].append(r[k])
            if "loss_cutmix" in r:
                cutmix = lam["lambda_cutmix"] * r["loss_cutmix"]
                total = r.get("loss_ce", 0.0) + cutmix
                vals["semi_share"].append(cutmix / total if total > 0 else 0.0)
            elif "loss_semi" in r:
                semi = lam["lambda_semi"] * r["loss_semi"]
                total = (r.get("loss_ce", 0.0) + lam["lambda_adv"] * r.get("loss_adv", 0.0)
                         + lam["lambda_semi_adv"] * r.get("loss_semi_adv", 0.0) + semi)
                vals["semi_share"].append(semi / total if total > 0 else 0.0)
        out[f"{round(lo * steps)}-{round(hi * steps)}"] = {k: (sum(v) / len(v) if v else None) for k, v in vals.items()}
    return out


def mean_std(values: Sequence[float]):
    n = len(values)
    if n == 0:
        return None, None, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std, n


def _fmt(mean, std, n) -> str:
    if n == 0:
        return "–"
    return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "") + f" (n={n})"


def aggregate(rows: Sequence[Dict], modes: Sequence[str], fractions: Sequence[str], key: str = "miou") -> Dict:
    """{mode: {fraction: {"mean", "std", "n", "seeds"}}} in mIoU percent (``key``: "miou" on val, "test_miou" on the
    test split), plus paired differences to the baseline."""
    done = {(r["mode"], r["fraction"], r["seed"]): 100 * r[key] for r in rows if r.get(key) is not None}
    agg: Dict = {"cells": {}, "delta_vs_baseline": {}}
    for m in modes:
        for f in fractions:
            vals = {s: v for (mm, ff, s), v in done.items() if mm == m and ff == f}
            mean, std, n = mean_std(list(vals.values()))
            agg["cells"].setdefault(m, {})[f] = {"mean": mean, "std": std, "n": n, "seeds": sorted(vals)}
            if m != "baseline":
                diffs = [v - done[("baseline", f, s)] for s, v in vals.items() if ("baseline", f, s) in done]
                mean, std, n = mean_std(diffs)
                agg["delta_vs_baseline"].setdefault(m, {})[f] = {"mean": mean, "std": std, "n": n}
    return agg


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t distribution with ``df`` degrees of freedom (no scipy needed)."""
    if not 0.5 < p < 1.0 or df < 1:
        raise ValueError(f"t_quantile: p={p} must be in (0.5, 1) and df={df} >= 1")
    tail = 2.0 * (1.0 - p)  # P(|T| > t) = I_{df / (df + t^2)}(df / 2, 1 / 2)
    lo, hi = 0.0, 1.0
    while _betainc(df / 2.0, 0.5, df / (df + hi * hi)) > tail:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if _betainc(df / 2.0, 0.5, df / (df + mid * mid)) > tail:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def pooled_differences(rows: Sequence[Dict], modes: Sequence[str], key: str = "miou",
                       pairs: Sequence = POOLED_PAIRS) -> List[Dict]:
    """For each (a, b) of ``pairs`` with both modes in ``modes``: the differences a - b in mIoU points, paired by
    (fraction, seed) over every pair where both cells are done (``key``: "miou" on val, "test_miou" on test), pooled
    over the fractions: {"a", "b", "n", "mean", "std", "ci95": (low, high) from the t distribution with n - 1 degrees
    of freedom (None for n < 2), "positive": how many differences are > 0}."""
    done = {(r["mode"], r["fraction"], r["seed"]): 100 * r[key] for r in rows if r.get(key) is not None}
    out = []
    for a, b in pairs:
        if a not in modes or b not in modes:
            continue
        diffs = [v - done[(b, f, s)] for (m, f, s), v in sorted(done.items()) if m == a and (b, f, s) in done]
        mean, std, n = mean_std(diffs)
        ci = None
        if n > 1:
            half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
            ci = (mean - half, mean + half)
        out.append({"a": a, "b": b, "n": n, "mean": mean, "std": std, "ci95": ci,
                    "positive": sum(d > 0 for d in diffs)})
    return out


def _pooled_rows(pooled: Sequence[Dict]) -> List[str]:
    lines = ["| paired difference, pooled over fractions | pairs | mean Δ | 95% interval (t) | pairs > 0 |",
             "|---|---|---|---|---|"]
    for p in pooled:
        name = f"{PLOT_LABELS.get(p['a'], p['a'])} − {PLOT_LABELS.get(p['b'], p['b'])}"
        if not p["n"]:
            lines.append(f"| {name} | 0 | – | – | – |")
            continue
        ci = "–" if p["ci95"] is None else f"[{p['ci95'][0]:+.2f}, {p['ci95'][1]:+.2f}]"
        lines.append(f"| {name} | {p['n']} | {p['mean']:+.2f} | {ci} | {p['positive']} of {p['n']} |")
    return lines


def _score_rows(agg: Dict, modes: Sequence[str], fractions: Sequence[str]) -> List[str]:
    head = "| | " + " | ".join(f"{f} labels" for f in fractions) + " |"
    lines = [head, "|---" * (len(fractions) + 1) + "|"]
    for m in modes:
        cells = agg["cells"][m]
        lines.append(f"| {MODE_LABELS.get(m, m)} | "
                     + " | ".join(f"– (no unlabelled images: = {'baseline' if m == 'mean_teacher' else 'adv'})"
                                  if _not_run(m, f) else _fmt(cells[f]["mean"], cells[f]["std"], cells[f]["n"])
                                  for f in fractions) + " |")
    for m, d in agg["delta_vs_baseline"].items():
        lines.append(f"| Δ {m} − baseline (paired by seed) | "
                     + " | ".join("–" if _not_run(m, f) else
                                  (f"{d[f]['mean']:+.1f}" + (f" ± {d[f]['std']:.1f}" if d[f]["std"] is not None else "")
                                   if d[f]["n"] else "–") for f in fractions) + " |")
    return lines


def diagnostics_table(rows: Sequence[Dict], modes: Sequence[str], fractions: Sequence[str]) -> List[str]:
    """Per mode x fraction x phase of training: the diagnostics (DIAG_KEYS), mean over the seeds done."""
    lines = ["| mode | labels | steps | D conf. on predictions | D conf. on ground truth | kept fraction (pseudo-labels) "
             "| pseudo-label term's share of G's loss | L_D |", "|---|---|---|---|---|---|---|---|"]
    for m in modes:
        if m == "baseline":
            continue  # no discriminator, no pseudo-labels
        for f in fractions:
            diags = [r["diagnostics"] for r in rows if r["mode"] == m and r["fraction"] == f and r.get("diagnostics")]
            if not diags:
                continue
            for phase in diags[0]:
                vals = []
                for k in DIAG_KEYS:
                    v = [d[phase][k] for d in diags if phase in d and d[phase][k] is not None]
                    vals.append("–" if not v else (f"{100 * sum(v) / len(v):.2f} %" if k == "semi_share"
                                                   else f"{sum(v) / len(v):.3f}"))
                lines.append(f"| {PLOT_LABELS.get(m, m)} | {f} | {phase} | " + " | ".join(vals) + " |")
    return lines


def write_table(path: str, aggs: Dict[str, Dict], modes: Sequence[str], fractions: Sequence[str], meta: Dict,
                rows: Sequence[Dict] = (), pooled: Optional[Dict[str, List[Dict]]] = None) -> str:
    """``aggs``: {"test": aggregate on the test split (reported), "val": on val}; the test table comes first.
    ``pooled``: {"test"/"val": :func:`pooled_differences`}."""
    lines = [f"# Label-fraction table: {meta['dataset']}, {meta['steps']} steps"
             + (f", init {meta['init']}" if meta.get("init") else ""), ""]
    if "test" in aggs:
        lines += [f"**Reported: mIoU (%) of the final model on the held-out test split**, mean ± sample std over seeds "
                  f"(n = seeds done). Seed k: split_seed k, training seed {TRAIN_SEED_BASE}+k. Nothing was chosen on "
                  f"the test split; the val table below is what any choice looks at.", ""]
        lines += _score_rows(aggs["test"], modes, fractions)
        lines += ["", "mIoU (%) of the final model on the val set (the same models):", ""]
    else:
        lines += [f"mIoU (%) of the final model on the val set, mean ± sample std over seeds (n = seeds done). "
                  f"Seed k: split_seed k, training seed {TRAIN_SEED_BASE}+k.", ""]
    lines += _score_rows(aggs["val"], modes, fractions)
    for split, comparisons in (pooled or {}).items():
        if comparisons:
            lines += ["", f"Paired differences pooled over the fractions ({split} mIoU points; each pair: one fraction, "
                      f"one seed; the interval is mean ± t(0.975, n-1) · std / √n, treating the pairs as independent):",
                      ""] + _pooled_rows(comparisons)
    diag = diagnostics_table(rows, modes, fractions)
    if len(diag) > 2:
        lines += ["", "Training diagnostics (mean over the seeds and the logged windows of each phase; D conf. = mean "
                  "sigmoid(D) over non-ignored pixels; predictions: the softmax maps D sees as fake, in adv+semi mode "
                  "labelled and unlabelled; kept fraction: unlabelled pixels above semi_threshold (selftrain: G's max "
                  "softmax >= selftrain_threshold; mean teacher: the teacher's >= teacher_threshold), from semi_start "
                  "on; share: lambda_semi L_semi (mean teacher: lambda_cutmix L_cutmix) over G's whole loss; L_D: D's loss, "
                  "the halved sum of its BCE on predictions and ground truth):", ""] + diag
    head = "| | " + " | ".join(f"{f} labels" for f in fractions) + " |"
    lines += ["", "For reference only, a different setting (PASCAL VOC 2012 val, DeepLab-v2 ResNet-101 from COCO-pretrained "
              "weights, 20k steps; Hung et al., BMVC 2018):", "", head, "|---" * (len(fractions) + 1) + "|"]
    for m, row in PAPER_VOC.items():
        lines.append(f"| paper VOC: {MODE_LABELS[m]} | "
                     + " | ".join(("–" if row.get(f) is None else f"{row[f]:.1f}") if f in row else "n/a"
                                  for f in fractions) + " |")
    lines += ["", f"Cells done: {meta['done']} of {meta['total']}"
              + (f" (**incomplete**: {meta['total'] - meta['done']} missing)" if meta["done"] < meta["total"] else "")
              + ".", "", "Command:", "", "```", meta["command"], "```", ""]
    text = "\n".join(lines)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def plot_table(path: str, agg: Dict, modes: Sequence[str], fractions: Sequence[str], title: str,
               split: str = "val") -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    xs = [float(Fraction(f)) for f in fractions]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for i, m in enumerate(modes):
        pts = [(x, c["mean"], c["std"] or 0.0) for x, f in zip(xs, fractions) if (c := agg["cells"][m][f])["n"]]
        if pts:
            ax.errorbar([p[0] * (1 + 0.03 * (i - 1)) for p in pts], [p[1] for p in pts],  # a small offset per mode
                        yerr=[p[2] for p in pts], marker="o", capsize=3, label=PLOT_LABELS.get(m, m))
    ax.set_title(title, fontsize=9)
    ax2 = axes[1]
    for m, row in PAPER_VOC.items():
        pts = [(float(Fraction(f)), v) for f, v in row.items() if v is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", ls="--", label=PLOT_LABELS.get(m, m))
    ax2.set_title("reference: paper, PASCAL VOC (different setting)", fontsize=9)
    for a in axes:
        a.set_xscale("log", base=2)
        a.set_xticks(xs if a is ax else [0.125, 0.25, 0.5, 1.0])
        a.set_xticklabels(fractions if a is ax else ["1/8", "1/4", "1/2", "1"])
        a.set_xlabel("fraction of labelled training images")
        a.set_ylabel(f"{split if a is ax else 'val'} mIoU (%)")
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: str, cells: Sequence[Cell], modes, fractions, meta: Dict, statuses: Optional[List[Dict]] = None):
    cells_dir = os.path.join(out, "cells")
    rows = [read_cell(cells_dir, c) for c in cells]
    for row, st in zip(rows, statuses or [{}] * len(rows)):
        if st.get("status"):
            row["last_status"] = st["status"]
    aggs = {"val": aggregate(rows, modes, fractions)}
    pooled = {"val": pooled_differences(rows, modes)}
    if any(r.get("test_miou") is not None for r in rows):
        aggs = {"test": aggregate(rows, modes, fractions, "test_miou"), **aggs}
        pooled = {"test": pooled_differences(rows, modes, "test_miou"), **pooled}
    meta = {**meta, "done": sum(r["state"] == "done" for r in rows), "total": len(rows)}
    os.makedirs(out, exist_ok=True)
    text = write_table(os.path.join(out, "table.md"), aggs, modes, fractions, meta, rows, pooled)
    split = "test" if "test" in aggs else "val"
    plot_table(os.path.join(out, "table.png"), aggs[split], modes, fractions,
               f"{meta['dataset']}, {meta['steps']} steps, {split} mIoU, mean ± std over seeds", split)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "paper_voc": PAPER_VOC, "aggregate": aggs["val"], "aggregate_test": aggs.get("test"),
                   "pooled": pooled["val"], "pooled_test": pooled.get("test"), "cells": rows}, f, indent=2)
    return text, rows


# ---------------------------------------------------------------------------------------------------- the CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastadvseg.experiments.table", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXPECTED)
    p.add_argument("--dataset", default="synthetic", help="synthetic (embedded, default), voc, cityscapes, folder")
    p.add_argument("--data_root", default=None, help="the dataset's root folder (not needed for synthetic)")
    p.add_argument("--config", default=None, help="a shipped config or YAML file for every cell (e.g. voc_1_8)")
    p.add_argument("--fractions", nargs="+", default=list(DEFAULT_FRACTIONS), help="label fractions (default 1/8 1/4 1/2 1)")
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES,
                   help=f"of {', '.join(MODES)} (default: {' '.join(DEFAULT_MODES)}, the paper's table)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help="number of seeds k = 0..N-1; each sets split_seed=k AND seed=1234+k (default 3)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps per cell (default {DEFAULT_STEPS} for synthetic, else the config's)")
    p.add_argument("--out", default="runs/paper_table", help="output directory (default runs/paper_table)")
    p.add_argument("--jobs", type=int, default=1, help="cells trained in parallel processes, each with 1 torch thread")
    p.add_argument("--report-only", action="store_true", help="only (re)write table.md/png and results.json")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    try:
        require_pipeline_extras("python -m fastadvseg.experiments.table")
        overrides = parse_overrides(rest)
        bad = sorted(k for k in overrides if k in SWEEP_KEYS)
        if bad:
            raise ConfigError(f"{', '.join(bad)} are set by the sweep per cell; use --modes/--fractions/--seeds/--steps")
        fractions = list(dict.fromkeys(parse_fraction(f) for f in args.fractions))
        if args.seeds < 1 or args.jobs < 1:
            raise ConfigError("--seeds and --jobs must be >= 1")
        overrides = {"dataset": args.dataset, **({"data_root": args.data_root} if args.data_root else {}), **overrides}
        overrides.setdefault("num_threads", "1")
        if args.dataset == "synthetic" and not args.config:
            overrides.setdefault("val_limit", "none")  # all 200 val images (the training default scores 96)
            overrides.setdefault("eval_test", "true")  # and the final model on the 200 held-out test images
        base = load_config(args.config, overrides)  # validates every override once, before any cell starts
        steps = args.steps or (DEFAULT_STEPS if args.dataset == "synthetic" and not args.config else base.steps)
        if "semi_start" not in overrides and not args.config:
            overrides["semi_start"] = str(steps // 4)  # the paper's 5000 of 20000
        load_config(args.config, {**overrides, "steps": steps})
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    modes = list(dict.fromkeys(args.modes))
    cells = build_cells(modes, fractions, range(args.seeds))
    meta = {"command": shlex.join(["python", "-m", "fastadvseg.experiments.table", *argv]),
            "dataset": args.dataset, "steps": steps, "modes": modes, "fractions": fractions, "seeds": args.seeds,
            "overrides": overrides, "config": args.config,
            "init": base.init or ("pretrained" if base.pretrained else "scratch")}
    statuses = None
    previous = os.path.join(args.out, "results.json")
    if args.report_only and os.path.isfile(previous):  # keep the command that trained the cells
        with open(previous, encoding="utf-8") as f:
            meta = {**meta, "command": json.load(f).get("command", meta["command"]), "report_command": meta["command"]}
    if not args.report_only:
        # each cell is its own `python -m fastadvseg.train` process and sets its own allocator (--allocator passes on)
        print(f"allocator: each training run sets its own: --allocator {overrides.get('allocator', 'auto')} "
              f"(fastadvseg/utils/allocator.py; each cell's config.yaml and log say what it used)")
        states = [cell_state(os.path.join(args.out, "cells", c.name)) for c in cells]
        print(f"{len(cells)} cells ({states.count('done')} done, {states.count('partial')} to resume) in {args.out}, "
              f"{args.jobs} at a time; {steps} steps each")
        sweep = Sweep(args.out, steps, overrides, args.config, args.jobs)
        statuses = sweep.run(cells)
    text, rows = report(args.out, cells, modes, fractions, meta, statuses)
    print(text)
    failed = [s for s in statuses or [] if s["status"].startswith("failed")]
    for s in failed:
        print(f"FAILED: {s['cell']}: {s['status']}", file=sys.stderr)
    print(f"wrote {os.path.join(args.out, 'table.md')}, table.png, results.json")
    if statuses is not None and sweep.stopping:
        return 130  # stopped by a signal: the same command continues the sweep
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
