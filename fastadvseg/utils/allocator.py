"""The memory allocator of the programs that own their process: freed large buffers reused, not faulted in anew.

A training step allocates the logits, D's maps and every gradient afresh and frees them at its end (the loop sets
the gradients to None). With glibc's defaults a freed buffer above the mmap threshold (128 KiB, rising to at most
32 MiB as buffers are freed) is unmapped, and free memory at the top of the heap above the trim threshold goes
back to the OS: the next step faults the same memory in again, 4 KiB at a time, and its time depends on what the
allocator did after the previous one. Measured on 2 cores (benchmarks/README.md, ``--allocators``): the default
pipeline step at 2x321x321 took ~100 000 minor page faults (~400 MB) per step; the losses alone at the Cityscapes
shape ~39 000 per step, since their 80 MB buffers are above glibc's 32 MiB cap.

``python -m fastadvseg.train``, ``python -m fastadvseg.evaluate``, the training runs of
``python -m fastadvseg.experiments.table`` and ``python -m benchmarks.report`` call :func:`configure` for their own
process (``--allocator``, a TrainConfig key; the run's first log line and config.yaml say what was chosen):

* ``auto`` (default): what is in effect already if the process runs with jemalloc or tcmalloc preloaded (your own
  ``LD_PRELOAD``), else ``steady``.
* ``steady``: glibc's ``mallopt(M_MMAP_THRESHOLD)`` and ``mallopt(M_TRIM_THRESHOLD)`` at 2 GiB (the largest value
  mallopt takes), set at run time: buffers up to 2 GiB come from the heap and stay there when freed, so the next
  step reuses them. The process keeps its peak memory until it exits. Needs glibc (Linux); elsewhere it changes
  nothing and says so. The same as ``MALLOC_MMAP_THRESHOLD_=2147483647 MALLOC_TRIM_THRESHOLD_=2147483647`` in the
  environment, without restarting the process.
* ``jemalloc`` / ``tcmalloc``: the process re-executes itself (same arguments) with that library in
  ``LD_PRELOAD`` (jemalloc with ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1``: it keeps freed pages; with its
  defaults, and with the settings of PyTorch's ``torch.backends.xeon.run_cpu``, it still returned the large ones
  to the OS in our measurement), as PyTorch's CPU launcher does. Only from a program's entry point; the library
  comes from the system (``apt install libjemalloc2`` / ``libtcmalloc-minimal4``) or the environment's ``lib/``;
  when it is not found: ``steady``, and the log line says why.
* ``system``: the process is left as it is.

``import fastadvseg`` never calls any of this: the library changes no process-wide setting. To get the same effect
in your own training script, see "CPU performance" in README.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass
from typing import Dict, MutableMapping, Optional, Sequence

from ..config import ALLOCATORS as CHOICES  # auto, steady, jemalloc, tcmalloc, system

# the shared-library stems of each preloadable allocator, most specific first
LIBRARIES = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc_minimal", "tcmalloc")}
# settings a preloaded library gets unless the environment already has them
LIBRARY_ENV = {"jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
               "tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}}  # no "large alloc" messages
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
STEADY_BYTES = 2 ** 31 - 1  # mallopt takes an int
STEADY_TEXT = ("steady (glibc mallopt: M_MMAP_THRESHOLD and M_TRIM_THRESHOLD 2 GiB, so freed buffers stay in the "
               "heap and are reused)")
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
             "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
REEXEC_MARK = "FASTADVSEG_ALLOCATOR_REEXEC"  # set in the re-executed process: never re-execute twice


@dataclass(frozen=True)
class Allocator:
    """``name``: steady, jemalloc, tcmalloc or system (what a run's config.yaml records); ``description``: one line
    saying what it is and, where a request could not be met, why."""
    name: str
    description: str

    def log_line(self) -> str:
        off = "" if self.name == "system" else "; --allocator system leaves the C library's defaults"
        return f"allocator: {self.description}{off}"


_configured: Optional[Allocator] = None  # what configure() set in this process


def loaded_library() -> Optional[str]:
    """``"jemalloc"`` or ``"tcmalloc"`` when this process has that allocator loaded (e.g. by LD_PRELOAD)."""
    try:
        with open("/proc/self/maps") as f:
            text = f.read()
    except OSError:  # not Linux: what LD_PRELOAD says
        text = os.environ.get("LD_PRELOAD", "")
    for name, stems in LIBRARIES.items():
        if any(f"lib{stem}" in text for stem in stems):
            return name
    return None


def find_library(name: str) -> Optional[str]:
    """The jemalloc or tcmalloc shared library to preload, None when it is not installed: ``lib/`` of this Python's
    environment ($CONDA_PREFIX, $VIRTUAL_ENV, sys.prefix), then the system's library path (ldconfig)."""
    prefixes = [os.environ.get("CONDA_PREFIX"), os.environ.get("VIRTUAL_ENV"), sys.prefix]
    for stem in LIBRARIES[name]:
        for prefix in filter(None, prefixes):
            hits = sorted(glob.glob(os.path.join(prefix, "lib", f"lib{stem}.so*")))
            if hits:
                return hits[0]
        found = ctypes.util.find_library(stem)
        if found:
            return found
    return None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def set_steady() -> Optional[str]:
    """Raise glibc's mmap and trim thresholds to 2 GiB (``mallopt``) for this process; None when done, else why not.
    Process-wide and not undone: for a program's own process only (never called by ``import fastadvseg``)."""
    libc = _glibc()
    if libc is None:
        return "no glibc mallopt on this platform"
    if libc.mallopt(M_MMAP_THRESHOLD, STEADY_BYTES) != 1 or libc.mallopt(M_TRIM_THRESHOLD, STEADY_BYTES) != 1:
        return "mallopt refused the thresholds"
    return None


def environment_settings(env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """The glibc malloc settings the environment gives (MALLOC_*_ variables, GLIBC_TUNABLES)."""
    env = os.environ if env is None else env
    return {k: env[k] for k in GLIBC_ENV if env.get(k)}


def in_effect() -> Allocator:
    """What this process allocates with: a preloaded jemalloc/tcmalloc, what :func:`configure` set, or the C
    library's defaults (with any malloc settings from the environment)."""
    lib = loaded_library()
    if lib:
        conf = {k: os.environ[k] for k in LIBRARY_ENV[lib] if os.environ.get(k)}
        return Allocator(lib, f"{lib} (preloaded" + "".join(f", {k}={v}" for k, v in conf.items()) + ")")
    if _configured is not None:
        return _configured
    env = environment_settings()
    return Allocator("system", "system (the C library's defaults" +
                     ("; from the environment: " + " ".join(f"{k}={v}" for k, v in env.items()) if env else "") + ")")


def configure(request: str = "auto", *, reexec: bool = False, argv: Optional[Sequence[str]] = None) -> Allocator:
    """Set this process's allocator as ``request`` (one of :data:`CHOICES`) asks; returns what is in effect.

    For a program's own process, from its entry point: mallopt is process-wide and stays. ``reexec``: for
    ``jemalloc`` / ``tcmalloc``, the process may replace itself (``os.execve``, same interpreter and ``argv``,
    default ``sys.orig_argv``) with the library preloaded; this call then does not return. Without it, or when the
    library is not installed, ``steady`` is used instead and the description says why.
    """
    global _configured
    if request not in CHOICES:
        raise ValueError(f"allocator {request!r}: choose one of {', '.join(CHOICES)}")
    lib = loaded_library()
    if request == "system" or (lib and request in ("auto", lib)):
        return in_effect()
    if lib:  # the user's own preload wins over a request for another allocator
        return Allocator(lib, f"{in_effect().description[:-1]}; --allocator {request} does not replace it)")
    note = ""
    if request in LIBRARIES:
        path = find_library(request)
        if path is None:
            note = f"{request} asked for but not found (apt install {_package(request)})"
        elif os.environ.get(REEXEC_MARK) == request:
            note = f"{request} preloaded from {path} but not loaded"
        elif not reexec or getattr(sys, "orig_argv", None) is None and argv is None:
            note = f"{request} needs a restart of the process (only a program's entry point does that)"
        else:
            _reexec(request, path, argv)
    why = set_steady()
    if why:
        _configured = Allocator("system", f"system (the C library's defaults: {why})" + (f"; {note}" if note else ""))
    else:
        _configured = Allocator("steady", STEADY_TEXT + (f"; {note}" if note else ""))
    return _configured


def _package(name: str) -> str:
    return {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}[name]


def preload_env(name: str, path: str, env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: this process's) for a process that runs with allocator library ``path`` preloaded."""
    out = dict(os.environ if env is None else env)
    out["LD_PRELOAD"] = path + (":" + out["LD_PRELOAD"] if out.get("LD_PRELOAD") else "")
    for key, value in LIBRARY_ENV[name].items():
        out.setdefault(key, value)
    out[REEXEC_MARK] = name
    return out


def plain_env(env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """``env`` (default: this process's) without what :func:`configure` added: a child process started with it
    allocates with the C library's defaults unless it configures itself (benchmarks that measure memory)."""
    out = dict(os.environ if env is None else env)
    name = out.pop(REEXEC_MARK, None)
    if name and out.get("LD_PRELOAD"):
        keep = [p for p in out["LD_PRELOAD"].split(":") if not any(f"lib{s}" in p for s in LIBRARIES[name])]
        if keep:
            out["LD_PRELOAD"] = ":".join(keep)
        else:
            del out["LD_PRELOAD"]
        for key, value in LIBRARY_ENV[name].items():
            if out.get(key) == value:
                del out[key]
    return out


def _reexec(name: str, path: str, argv: Optional[Sequence[str]]) -> None:
    argv = list(argv if argv is not None else sys.orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, preload_env(name, path))
