"""What every result records: machine, versions, threads, date, git commit, load."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import sys
from typing import Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} logical CPUs)"


def machine_slug(device: torch.device) -> str:
    """File-name form of the machine: ``nvidia-h100-80gb-hbm3`` or ``cpu-amd-epyc-2c``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {cpu_model()} {os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


def load_average() -> Optional[tuple]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:  # not installed, or fails to import on this platform
        return None
    return triton.__version__


def collect(device: torch.device, threads: int) -> Dict[str, object]:
    now = _dt.datetime.now(_dt.timezone.utc)
    info = {
        "device_type": device.type,
        "device": device_name(device),
        "cpu": cpu_model(),
        "machine": machine_slug(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "threads": threads,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "stamp": now.strftime("%Y-%m-%d-%H%M"),
        "git_commit": git_commit(),
        "load_average_start": load_average(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "argv": " ".join(sys.argv),
    }
    try:
        import fastadvseg

        info["fastadvseg"] = fastadvseg.__version__
        info["backends"] = fastadvseg.available_backends(device)
        info["label_validation"] = fastadvseg.label_validation_enabled()
    except Exception as exc:  # the report still records why
        info["fastadvseg"] = f"import failed: {exc}"
    info["cpu_kernels"] = cpu_kernel_build()
    return info


def cpu_kernel_build() -> str:
    """Which build of the cpu backend's kernels runs here (avx512, avx2 or the portable base; the CPU and
    FASTADVSEG_CPU_ISA decide), or why there is none: the three differ by up to ~3x."""
    try:
        from fastadvseg import _C_cpu
    except Exception as exc:  # not built, or switched off
        return f"none ({type(exc).__name__})"
    cap = os.environ.get("FASTADVSEG_CPU_ISA")
    return _C_cpu.isa() + (f" (FASTADVSEG_CPU_ISA={cap})" if cap else "")
