"""What every result records (machine, versions, threads, date, git commit, load), and the fresh processes that
``--memory`` and ``--allocators`` measure in."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from typing import Callable, Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "benchmark-child-result: "


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        sha, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def load_average() -> Optional[tuple]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or fails to import on this platform
        return None


def status_text(exc: BaseException) -> str:
    """An exception as one line of a results row."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def collect(device, threads: int) -> Dict[str, object]:
    import torch

    now = _dt.datetime.now(_dt.timezone.utc)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info = {
        "device_type": device.type, "device": gpu or f"{cpu_model()} ({os.cpu_count()} logical CPUs)",
        "cpu": cpu_model(), "machine": re.sub(r"[^a-z0-9]+", "-", (gpu or f"cpu {cpu_model()} {os.cpu_count()}c")
                                              .lower()).strip("-"),
        "python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
        "cuda": torch.version.cuda, "threads": threads, "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "stamp": now.strftime("%Y-%m-%d-%H%M"), "git_commit": git_commit(), "load_average_start": load_average(),
        "logical_cpus": os.cpu_count(), "platform": platform.platform(), "argv": " ".join(sys.argv),
    }
    import fastadvseg

    info.update(fastadvseg=fastadvseg.__version__, backends=fastadvseg.available_backends(device),
                label_validation=fastadvseg.label_validation_enabled())
    try:  # which build of the cpu backend's kernels runs here: avx512, avx2 and the portable base differ by ~3x
        from fastadvseg import _C_cpu

        cap = os.environ.get("FASTADVSEG_CPU_ISA")
        info["cpu_kernels"] = _C_cpu.isa() + (f" (FASTADVSEG_CPU_ISA={cap})" if cap else "")
    except Exception as exc:  # not built, or switched off
        info["cpu_kernels"] = f"none ({type(exc).__name__})"
    return info


def run_child(module: str, spec: dict, env: Dict[str, str], timeout: float) -> dict:
    """``python -m <module> '<spec as JSON>'`` in a fresh process with ``env``: the JSON its :func:`child_main`
    printed, or a RuntimeError with the last line of its output."""
    proc = subprocess.run([sys.executable, "-m", module, json.dumps(spec)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    tagged = [line for line in proc.stdout.splitlines() if line.startswith(TAG)]
    if proc.returncode != 0 or not tagged:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise RuntimeError(f"child exited {proc.returncode}: {lines[-1][:160]}")
    return json.loads(tagged[-1][len(TAG):])


def child_main(measure: Callable[[dict], dict]) -> None:
    """The child's side of :func:`run_child`: one JSON spec in, one tagged JSON line out (other output ignored)."""
    print(TAG + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
