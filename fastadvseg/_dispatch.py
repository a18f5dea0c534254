"""Backend dispatch: the one table that maps a backend name to its module.

The path of a call: public function (``fastadvseg/functional.py``: argument checks, once) -> :func:`resolve`
(backend by name, device and dtype) -> for a kernel backend, the registered op ``torch.ops.fastadvseg.<op>``
(``fastadvseg/_ops.py``: its autograd rule, then its device implementation) -> :func:`launcher` (this table) -> the
backend module's launch -> kernel. The ``reference`` backend is plain PyTorch, called by the public function
itself, so that ``torch.compile`` traces it.

What a kernel backend module defines, and what its launches receive and return, is written in
``fastadvseg/backends/_launch.py``. Adding a backend means writing that module and adding one row to
:data:`BACKENDS`.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

# the launches every kernel backend module defines (fastadvseg/backends/_launch.py)
LAUNCHES = (
    "softmax2d",
    "softmax2d_backward",
    "cross_entropy2d",
    "bce_with_logits2d",
    "semi_cross_entropy2d",
    "one_hot2d",
    "generator_loss",
    "discriminator_loss",
    "pseudo_label_cross_entropy2d",
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
_resolved: Dict[tuple, str] = {}


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
    missing = [] if name == 'reference' else [op for op in LAUNCHES if not callable(getattr(module, op, None))]
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
    return name


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
            return spec.name
    raise RuntimeError(f"no fastadvseg backend runs on {device.type}: " + "; ".join(skipped))


@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend name that runs ``op`` on tensors of ``device``/``dtype``.

    Under ``torch.compile`` this runs once, at trace time, as a constant of the graph (importing a backend
    there would otherwise be a graph break); a compiled function keeps the backend it was traced with. A compiled
    function gets the same kernels as eager code: every op of a kernel backend is one opaque node of the graph.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    requested = backend
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND, "auto").strip() or "auto"
    key = (op, requested, backend, device.type, dtype)
    name = _resolved.get(key)
    if name is None:
        name = _auto(device, dtype) if backend == "auto" else _explicit(backend, device, dtype)
        _resolved[key] = name
    return name


def launcher(name: str):
    """The module of a kernel backend, for the registered ops' device implementations."""
    module = _modules.get(name)
    if module is None:
        module = _load(name) if name in _BY_NAME else None
        if module is None:
            raise RuntimeError(f"fastadvseg backend {name!r} is not available: "
                               f"{_unavailable.get(name, 'unknown backend')}")
    return module


def _reset_for_tests() -> None:
    """Forget loaded modules, reasons and warnings (tests that force a backend off use this)."""
    _modules.clear()
    _unavailable.clear()
    _warned.clear()
    _resolved.clear()
