"""Backend dispatch: the one table that maps a backend name to its implementation.

Every public op goes  public function (checks, once)  ->  :func:`resolve` (backend by name, device and dtype)
->  the backend module's function of the same name (an autograd Function around a kernel)  ->  kernel.

A backend is a module in ``fastadvseg.backends`` that defines every op in :data:`OPS` with the argument lists of
``fastadvseg/backends/reference.py`` (already validated, maps as (N, H, W) views), plus:

* ``DTYPES``: the logit dtypes it runs;
* ``supports_device(device) -> bool``: whether it can run on that device *now*;
* importing it raises ``ImportError`` with a readable reason when it is not usable on this machine;
* optionally ``find_bad_labels`` (the label check of the public functions, see :func:`find_bad_labels`);
* optionally ``checks_labels = True`` on an op that takes labels: the op raises
  :func:`fastadvseg._validate.raise_bad_labels` itself (from a pass it makes anyway) when label validation is on,
  and the public function skips its separate check.

Adding a backend means writing that module and adding one row to :data:`BACKENDS`.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

OPS = (
    "softmax2d",
    "cross_entropy2d",
    "bce_with_logits2d",
    "semi_cross_entropy2d",
    "one_hot2d",
    "generator_loss",
    "discriminator_loss",
)

ENV_BACKEND = "FASTADVSEG_BACKEND"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    auto_devices: Tuple[str, ...]  # device types for which backend="auto" may pick it
    description: str


# The table. Order is the preference of backend="auto" for each device type.
BACKENDS: Tuple[BackendSpec, ...] = (
    BackendSpec("triton", "fastadvseg.backends.triton", ("cuda",),
                "Triton kernels; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1"),
    BackendSpec("cuda", "fastadvseg.backends.cuda", ("cuda",),
                "CUDA C++ kernels, built by setup.py where torch has CUDA"),
    BackendSpec("cpu", "fastadvseg.backends.cpu", ("cpu",),
                "C++/OpenMP kernels, a pybind11 extension built by setup.py"),
    BackendSpec("reference", "fastadvseg.backends.reference", ("cpu", "cuda", "mps", "xpu", "meta"),
                "plain PyTorch ops: the ground truth and the fallback"),
)
_BY_NAME: Dict[str, BackendSpec] = {b.name: b for b in BACKENDS}
BACKEND_NAMES = tuple(_BY_NAME)

_modules: Dict[str, object] = {}
_unavailable: Dict[str, str] = {}
_warned: set = set()
_resolved: Dict[tuple, Tuple[str, Callable]] = {}


def _load(name: str):
    """Import a backend module once; remember why it failed."""
    if name in _modules:
        return _modules[name]
    if name in _unavailable:
        return None
    try:
        module = importlib.import_module(_BY_NAME[name].module)
    except Exception as exc:  # ImportError, or an extension that fails to load
        _unavailable[name] = f"{type(exc).__name__}: {exc}"
        return None
    missing = [op for op in OPS if not callable(getattr(module, op, None))]
    if missing:
        _unavailable[name] = f"backend module {module.__name__} lacks {', '.join(missing)}"
        return None
    _modules[name] = module
    return module


def unavailable_reason(name: str) -> Optional[str]:
    """Why a backend cannot be used on this machine (None if it loads)."""
    _load(name)
    return _unavailable.get(name)


def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Backend names usable on this machine (optionally for one device), in order of preference.

    Without ``device``, a backend is listed if it runs on at least one device present here (the CPU, and CUDA
    when a GPU is visible).
    """
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    names = []
    for spec in BACKENDS:
        module = _load(spec.name)
        if module is not None and any(module.supports_device(d) for d in devices):
            names.append(spec.name)
    return names


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _explicit(name: str, device: torch.device, dtype: torch.dtype):
    if name not in _BY_NAME:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKEND_NAMES}")
    module = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} is not available on this machine: {_unavailable[name]}")
    if not module.supports_device(device):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)" if name == "triton" else ""
        raise ValueError(f"backend {name!r} cannot run on {device.type} tensors{hint}")
    if dtype not in module.DTYPES:
        raise TypeError(f"backend {name!r} does not run {dtype} inputs; it runs {', '.join(map(str, module.DTYPES))}")
    return module


def _auto(device: torch.device, dtype: torch.dtype):
    skipped = []
    for spec in BACKENDS:
        if device.type not in spec.auto_devices:
            continue
        module = _load(spec.name)
        if module is None:
            skipped.append(f"{spec.name}: {_unavailable[spec.name]}")
        elif not module.supports_device(device):
            skipped.append(f"{spec.name}: cannot run on {device.type}")
        elif dtype not in module.DTYPES:
            skipped.append(f"{spec.name}: does not run {dtype}")
        else:
            if spec.name == "reference" and skipped:
                _warn_once(
                    f"{device.type}/{dtype}",
                    f"fastadvseg: using the reference (plain PyTorch) backend for {dtype} on {device.type}; "
                    "faster backends were skipped: " + "; ".join(skipped),
                )
            return spec.name, module
    raise RuntimeError(f"no fastadvseg backend runs on {device.type}: " + "; ".join(skipped))


def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> Tuple[str, Callable]:
    """(backend name, implementation) for ``op`` on tensors of ``device``/``dtype``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    requested = backend
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto").strip() or "auto"
    key = (op, requested, backend, device.type, dtype)
    hit = _resolved.get(key)
    if hit is not None:
        return hit
    if backend == "auto":
        name, module = _auto(device, dtype)
    else:
        name, module = backend, _explicit(backend, device, dtype)
    impl = _compile_boundary(name, getattr(module, op))
    _resolved[key] = (name, impl)
    return name, impl


def _compile_boundary(backend: str, fn: Callable) -> Callable:
    """``fn`` as torch.compile should see it: kernel launches are opaque to it, so a kernel backend's function
    is an explicit graph break (compiled code that calls our ops keeps working); the reference backend's plain
    torch ops stay traceable."""
    if backend == "reference":
        return fn
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def boundary(*args, **kwargs):
        # torch.compiler.disable's wrapper costs ~20 us per call in eager mode too; only traced code needs it
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return boundary


def find_bad_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> Tuple[int, int]:
    """(count, first in pixel order) of int64 labels outside [0, C) that are not ``ignore_index``: the label check
    of the public functions, by the first backend in :data:`BACKENDS` order that offers this helper for the
    target's device (the ``cpu`` kernel does it in one pass; ``reference`` with torch ops)."""
    key = ("find_bad_labels", target.device.type)
    hit = _resolved.get(key)
    if hit is None:
        for spec in BACKENDS:
            if target.device.type not in spec.auto_devices:
                continue
            module = _load(spec.name)
            if module is not None and hasattr(module, "find_bad_labels") and module.supports_device(target.device):
                hit = _resolved[key] = (spec.name, _compile_boundary(spec.name, module.find_bad_labels))
                break
        else:
            raise RuntimeError(f"no fastadvseg backend checks labels on {target.device.type}")
    return hit[1](target, num_classes, ignore_index)


def _reset_for_tests() -> None:
    """Forget loaded modules, reasons and warnings (tests that force a backend off use this)."""
    _modules.clear()
    _unavailable.clear()
    _warned.clear()
    _resolved.clear()
