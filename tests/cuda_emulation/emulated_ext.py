"""A CPU stand-in for the cuda backend's extension, for machines without a GPU.

``harness.cpp`` (compiled here with the host C++ compiler and the CUDA headers) runs the per-pixel functions of
``fastadvseg/kernels/cuda/pixel_ops.cuh`` -- the code every CUDA kernel runs for one pixel -- over CPU tensors in pixel order,
and the finalize kernel's result code on the float64 column sums (raw sums, bad-label reports). :class:`EmulatedExt`
mirrors ``csrc/cuda/binding.cpp`` exactly (argument order, returns, allocation, strides, dtype codes) on top of it,
and :func:`load_emulated_backend` imports ``fastadvseg/backends/cuda.py`` with it, so the backend's autograd layer
and the kernels' math are tested end to end against the reference backend.
Not emulated: the grid loop, the block reductions, the launches and the C++ binding itself.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from ctypes import c_float, c_int, c_int64, c_uint64, c_void_p
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("harness.cpp")


def cuda_include_dir() -> Optional[str]:
    """Where cuda_runtime.h / cuda_fp16.h / cuda_bf16.h live (no GPU needed), or None."""
    candidates = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", "")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for base in candidates:
        if base and (Path(base) / "include" / "cuda_bf16.h").is_file():
            return str(Path(base) / "include")
    return None


def build_harness(out_dir: Path) -> Path:
    """Compile harness.cpp into a shared library (a few seconds)."""
    include = cuda_include_dir()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is None or cxx is None:
        raise FileNotFoundError("needs a C++ compiler and the CUDA headers (CUDA_HOME/include)")
    lib = out_dir / "libfastadvseg_cuda_emulation.so"
    cmd = [cxx, "-shared", "-fPIC", "-O1", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", include,
           "-I", str(ROOT / "fastadvseg" / "kernels" / "cuda"), str(HARNESS), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the emulation harness failed:\n{' '.join(cmd)}\n{proc.stderr}")
    return lib


class Shape4(ctypes.Structure):
    _fields_ = [("N", c_int64), ("C", c_int64), ("H", c_int64), ("W", c_int64)]


class Strided4(ctypes.Structure):
    _fields_ = [("data", c_void_p), ("sn", c_int64), ("sc", c_int64), ("sh", c_int64), ("sw", c_int64)]


class Strided3(ctypes.Structure):
    _fields_ = [("data", c_void_p), ("sn", c_int64), ("sh", c_int64), ("sw", c_int64), ("dtype", c_int)]


DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
NHW = c_int64 * 3

_SIGNATURES = {
    "emu_softmax2d_forward": [Shape4, c_int, Strided4, Strided4],
    "emu_softmax2d_backward": [Shape4, c_int, Strided4, Strided4, Strided4],
    "emu_cross_entropy2d_forward": [Shape4, c_int, Strided4, Strided3, c_void_p, c_int64, c_float, c_void_p, Strided4,
                                    c_void_p, c_void_p],
    "emu_bce_with_logits2d_forward": [c_int64, c_int64, c_int64, Strided3, Strided3, c_float, Strided3, c_void_p,
                                      Strided3, c_void_p],
    "emu_discriminator_loss_forward": [NHW, Strided3, Strided3, Strided3, NHW, Strided3, Strided3, Strided3, c_void_p],
    "emu_semi_cross_entropy2d_forward": [Shape4, c_int, Strided4, Strided3, c_float, Strided3, c_void_p, Strided4,
                                         c_void_p],
    "emu_generator_loss_forward": [Shape4, c_int, Strided4, Strided3, Strided3, c_int64, c_float, Strided4, Strided3,
                                   c_void_p, c_void_p],
    "emu_one_hot2d_forward": [Shape4, Strided3, c_int64, c_void_p, c_int, c_uint64],
}


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _shape4(t: torch.Tensor) -> Shape4:
    return Shape4(*t.shape)


def _s4(t: Optional[torch.Tensor]) -> Strided4:
    return Strided4() if t is None else Strided4(t.data_ptr(), *t.stride())


def _fmap(t: Optional[torch.Tensor]) -> Strided3:
    return Strided3() if t is None else Strided3(t.data_ptr(), *t.stride(), DTYPE_CODE[t.dtype])


def _raw(t: Optional[torch.Tensor]) -> Strided3:
    return Strided3() if t is None else Strided3(t.data_ptr(), *t.stride(), -1)


def _sums(k: int) -> torch.Tensor:
    """The binding's K raw sums (float32)."""
    return torch.empty(k, dtype=torch.float32)


def _bad() -> torch.Tensor:
    """The binding's bad-label report [count, first value] (int64)."""
    return torch.empty(2, dtype=torch.int64)


def _loss_map(need_map: bool, n: int, h: int, w: int) -> Optional[torch.Tensor]:
    return torch.empty((n, h, w), dtype=torch.float32) if need_map else None


class EmulatedExt:
    """The API of fastadvseg._cuda_kernels (csrc/cuda/binding.cpp), on CPU tensors: same argument order, same
    returns (lists with None for results not requested)."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = argtypes, c_int

    def _call(self, name, *args):
        rc = getattr(self.lib, name)(*args)
        assert rc == 0, f"{name} returned {rc}"

    def softmax2d_forward(self, x):
        y = torch.empty_like(x)
        self._call("emu_softmax2d_forward", _shape4(x), DTYPE_CODE[x.dtype], _s4(x), _s4(y))
        return y

    def softmax2d_backward(self, probs, grad_probs):
        gy = grad_probs.to(probs.dtype)
        gx = torch.empty_like(probs)
        self._call("emu_softmax2d_backward", _shape4(probs), DTYPE_CODE[probs.dtype], _s4(probs), _s4(gy), _s4(gx))
        return gx

    def cross_entropy2d_forward(self, x, target, weight, ignore_index, label_smoothing, need_map, need_grad):
        n, _, h, w = x.shape
        wt = None if weight is None else weight.float().contiguous()
        loss_map = _loss_map(need_map, n, h, w)
        grad = torch.empty_like(x) if need_grad else None
        sums, bad = _sums(2), _bad()
        self._call("emu_cross_entropy2d_forward", _shape4(x), DTYPE_CODE[x.dtype], _s4(x), _raw(target), _ptr(wt),
                   ignore_index, label_smoothing, _ptr(loss_map), _s4(grad), _ptr(sums), _ptr(bad))
        return [sums, loss_map, grad, bad]

    def bce_with_logits2d_forward(self, z, target, target_value, mask, need_map, need_grad):
        n, h, w = z.shape
        t = None if target is None else (target.expand(z.shape) if target.dim() == 0 else target)
        loss_map = _loss_map(need_map, n, h, w)
        grad = torch.empty((n, h, w), dtype=z.dtype) if need_grad else None
        sums = _sums(2)
        self._call("emu_bce_with_logits2d_forward", n, h, w, _fmap(z), _fmap(t), target_value, _raw(mask),
                   _ptr(loss_map), _fmap(grad), _ptr(sums))
        return [sums, loss_map, grad]

    def semi_cross_entropy2d_forward(self, x, z, threshold, mask, need_map, need_grad):
        n, _, h, w = x.shape
        loss_map = _loss_map(need_map, n, h, w)
        grad = torch.empty_like(x) if need_grad else None
        sums = _sums(3)
        self._call("emu_semi_cross_entropy2d_forward", _shape4(x), DTYPE_CODE[x.dtype], _s4(x), _fmap(z), threshold,
                   _raw(mask), _ptr(loss_map), _s4(grad), _ptr(sums))
        return [sums, loss_map, grad]

    def generator_loss_forward(self, x, z, target, threshold, ignore_index, need_grad_x, need_grad_z):
        n, _, h, w = x.shape
        gx = torch.empty_like(x) if need_grad_x else None
        gz = torch.empty((n, h, w), dtype=z.dtype) if need_grad_z else None
        sums, bad = _sums(6), _bad()
        self._call("emu_generator_loss_forward", _shape4(x), DTYPE_CODE[x.dtype], _s4(x), _fmap(z), _raw(target),
                   ignore_index, threshold, _s4(gx), _fmap(gz), _ptr(sums), _ptr(bad))
        return [sums, gx, gz, bad]

    def discriminator_loss_forward(self, fake, real, fake_mask, real_mask, need_fake_grad, need_real_grad):
        fake_grad = torch.empty(fake.shape, dtype=fake.dtype) if need_fake_grad else None
        real_grad = torch.empty(real.shape, dtype=real.dtype) if need_real_grad else None
        sums = _sums(4)
        self._call("emu_discriminator_loss_forward", NHW(*fake.shape), _fmap(fake), _raw(fake_mask), _fmap(fake_grad),
                   NHW(*real.shape), _fmap(real), _raw(real_mask), _fmap(real_grad), _ptr(sums))
        return [sums, fake_grad, real_grad]

    def one_hot2d_forward(self, target, out, ignore_index):
        assert out.is_contiguous()
        one = torch.ones((), dtype=out.dtype)
        bits = int.from_bytes(bytes(one.reshape(1).view(torch.uint8).tolist()), "little")
        self._call("emu_one_hot2d_forward", _shape4(out), _raw(target), ignore_index, out.data_ptr(),
                   out.element_size(), bits)


def load_emulated_backend(ext: EmulatedExt, monkeypatch):
    """fastadvseg/backends/cuda.py imported with ``ext`` as its extension (a separate module object: the real
    dispatch table is untouched), whether or not the real extension is built and already imported.

    The backend's ``from .. import _cuda_kernels`` takes the package's attribute when there is one (set by the
    first import of the real extension, e.g. by ``available_backends("cuda")``) before it looks in sys.modules:
    both are replaced for the test, or a built extension would be picked up and refuse the CPU tensors."""
    import fastadvseg

    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.8")
    monkeypatch.setitem(sys.modules, "fastadvseg._cuda_kernels", ext)
    monkeypatch.setattr(fastadvseg, "_cuda_kernels", ext, raising=False)
    path = ROOT / "fastadvseg" / "backends" / "cuda.py"
    spec = importlib.util.spec_from_file_location("fastadvseg.backends._cuda_emulated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._ext is ext, "the emulated backend picked up another extension than the emulation"
    return module
