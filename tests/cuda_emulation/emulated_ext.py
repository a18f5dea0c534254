"""A CPU stand-in for the cuda backend's extension, for machines without a GPU.

``harness.cpp`` (compiled here with the host C++ compiler and the CUDA headers) runs the per-pixel functions of
``fastadvseg/kernels/cuda/pixel_ops.cuh`` -- the code every CUDA kernel runs for one pixel -- over CPU tensors in pixel order,
and the finalize kernel's result code on the float64 column sums (raw sums, bad-label reports); for upsampled
inputs also the per-element gathers of their gradients. :class:`EmulatedExt` mirrors ``csrc/cuda/binding.cpp``
exactly (argument order, returns, allocation, strides, dtype codes, which input is resampled and how a D map's
gradient comes back to its grid) on top of it, and :func:`load_emulated_backend` imports
``fastadvseg/backends/cuda.py`` with it, so the backend's autograd layer and the kernels' math are tested end to end
against the reference backend.
Not emulated: the grid loop, the block reductions, the launches and the C++ binding itself.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
from ctypes import c_bool, c_float, c_int, c_int64, c_uint64, c_void_p
from pathlib import Path
from typing import List, Optional, Sequence

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


class Upsample(ctypes.Structure):
    _fields_ = [("h", c_int64), ("w", c_int64), ("align_corners", c_bool), ("scratch", c_void_p)]


DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
LOGIT_STATE_BYTES = 8  # kLogitStateBytes of launchers.cuh
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
    "emu_softmax2d_upsampled_forward": [Shape4, c_int, Strided4, Upsample, Strided4],
    "emu_softmax2d_upsampled_backward": [Shape4, c_int, Strided4, Strided4, Upsample, Strided4],
    "emu_cross_entropy2d_upsampled_forward": [Shape4, c_int, Strided4, Upsample, Strided3, c_void_p, c_int64, c_float,
                                              c_void_p, Strided4, c_void_p, c_void_p],
    "emu_semi_cross_entropy2d_upsampled_forward": [Shape4, c_int, Strided4, Upsample, Strided3, c_float, Strided3,
                                                   c_void_p, Strided4, c_void_p],
    "emu_generator_loss_upsampled_forward": [Shape4, c_int, Strided4, Upsample, Strided3, Strided3, c_int64, c_float,
                                             Strided4, Strided3, c_void_p, c_void_p],
    "emu_pseudo_label_cross_entropy2d_forward": [Shape4, c_int, Strided4, Upsample, Strided4, Upsample, Strided3,
                                                 c_float, c_bool, c_float, Strided3, c_void_p, Strided4, c_void_p],
    "emu_upsample_map": [c_int64, c_int64, c_int64, Strided3, c_int64, c_int64, c_bool, c_void_p],
    "emu_map_grad_gather": [c_int64, c_int64, c_int64, c_void_p, c_int64, c_int64, c_bool, Strided3],
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


def _grid(size: Optional[Sequence[int]], h: int, w: int) -> List[int]:
    """The binding's label_grid: ``size`` (two positive ints) or the input's own (h, w)."""
    if size is None:
        return [h, w]
    if len(size) != 2 or size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"fastadvseg cuda backend: size must be two positive ints (H, W), got {list(size)}")
    return [int(size[0]), int(size[1])]


def _resampled(t: torch.Tensor, grid: List[int], name: str) -> bool:
    """The binding's resampled: whether t's last two dims differ from the grid (then it must have pixels)."""
    h, w = t.shape[-2:]
    if [h, w] == grid:
        return False
    if h == 0 or w == 0:
        raise ValueError(f"fastadvseg cuda backend: cannot upsample {name} {list(t.shape)} to {tuple(grid)}: it has "
                         "no pixels")
    return True


def _state(need: bool, pixels: int) -> Optional[torch.Tensor]:
    """The binding's logit_state: LOGIT_STATE_BYTES per label-grid pixel (int64), when a gradient is due."""
    return torch.empty(pixels, dtype=torch.int64) if need else None


def _upsample(x: torch.Tensor, align_corners: bool, state: Optional[torch.Tensor]) -> Upsample:
    return Upsample(x.shape[2], x.shape[3], align_corners, _ptr(state))


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

    def softmax2d_forward(self, x, size=None, align_corners=False):
        n, c, h, w = x.shape
        grid = _grid(size, h, w)
        if _resampled(x, grid, "logits"):
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
                else torch.contiguous_format  # at::empty with x.suggest_memory_format()
            y = torch.empty((n, c, *grid), dtype=x.dtype, memory_format=fmt)
            self._call("emu_softmax2d_upsampled_forward", Shape4(n, c, *grid), DTYPE_CODE[x.dtype], _s4(x),
                       _upsample(x, align_corners, None), _s4(y))
            return y
        y = torch.empty_like(x)
        self._call("emu_softmax2d_forward", _shape4(x), DTYPE_CODE[x.dtype], _s4(x), _s4(y))
        return y

    def softmax2d_backward(self, probs, grad_probs, low_size=None, align_corners=False):
        gy = grad_probs.to(probs.dtype)
        n, c, h, w = probs.shape
        low = _grid(low_size, h, w)
        if low != [h, w]:
            fmt = torch.channels_last if probs.is_contiguous(memory_format=torch.channels_last) \
                and not probs.is_contiguous() else torch.contiguous_format
            gx = torch.empty((n, c, *low), dtype=probs.dtype, memory_format=fmt)
            dot = torch.empty((n, h, w), dtype=torch.float32)
            self._call("emu_softmax2d_upsampled_backward", _shape4(probs), DTYPE_CODE[probs.dtype], _s4(probs),
                       _s4(gy), Upsample(low[0], low[1], align_corners, dot.data_ptr()), _s4(gx))
            return gx
        gx = torch.empty_like(probs)
        self._call("emu_softmax2d_backward", _shape4(probs), DTYPE_CODE[probs.dtype], _s4(probs), _s4(gy), _s4(gx))
        return gx

    def cross_entropy2d_forward(self, x, target, weight, ignore_index, label_smoothing, need_map, need_grad,
                                size=None, align_corners=False):
        n, c, xh, xw = x.shape
        h, w = _grid(size, xh, xw)
        wt = None if weight is None else weight.float().contiguous()
        loss_map = _loss_map(need_map, n, h, w)
        grad = torch.empty_like(x) if need_grad else None
        sums, bad = _sums(2), _bad()
        if _resampled(x, [h, w], "logits"):
            state = _state(need_grad, n * h * w)
            self._call("emu_cross_entropy2d_upsampled_forward", Shape4(n, c, h, w), DTYPE_CODE[x.dtype], _s4(x),
                       _upsample(x, align_corners, state), _raw(target), _ptr(wt), ignore_index, label_smoothing,
                       _ptr(loss_map), _s4(grad), _ptr(sums), _ptr(bad))
            return [sums, loss_map, grad, bad]
        self._call("emu_cross_entropy2d_forward", _shape4(x), DTYPE_CODE[x.dtype], _s4(x), _raw(target), _ptr(wt),
                   ignore_index, label_smoothing, _ptr(loss_map), _s4(grad), _ptr(sums), _ptr(bad))
        return [sums, loss_map, grad, bad]

    # --- D maps: the binding's map_at / map_grad_buffer / gather_map_grad
    def _map_at(self, z, size, grid, align_corners, name):
        if size is None or not _resampled(z, grid, name):
            return z
        full = torch.empty((z.shape[0], *grid), dtype=torch.float32)
        self._call("emu_upsample_map", z.shape[0], z.shape[1], z.shape[2], _fmap(z), grid[0], grid[1], align_corners,
                   full.data_ptr())
        return full

    @staticmethod
    def _map_grad_buffer(need, z, z_at_grid):
        if not need:
            return None
        return torch.empty(z.shape, dtype=z.dtype) if z_at_grid is z else torch.empty_like(z_at_grid)

    def _gather_map_grad(self, grad, z, z_at_grid, align_corners):
        if grad is None or z_at_grid is z:
            return grad
        out = torch.empty(z.shape, dtype=z.dtype)
        self._call("emu_map_grad_gather", grad.shape[0], grad.shape[1], grad.shape[2], grad.data_ptr(), z.shape[1],
                   z.shape[2], align_corners, _fmap(out))
        return out

    def bce_with_logits2d_forward(self, z, target, target_value, mask, need_map, need_grad, size=None,
                                  align_corners=False):
        n = z.shape[0]
        h, w = grid = _grid(size, z.shape[1], z.shape[2])
        t = None if target is None else (target.expand(n, h, w) if target.dim() == 0 else target)
        zg = self._map_at(z, size, grid, align_corners, "d_logits")
        loss_map = _loss_map(need_map, n, h, w)
        grad = self._map_grad_buffer(need_grad, z, zg)
        sums = _sums(2)
        self._call("emu_bce_with_logits2d_forward", n, h, w, _fmap(zg), _fmap(t), target_value, _raw(mask),
                   _ptr(loss_map), _fmap(grad), _ptr(sums))
        return [sums, loss_map, self._gather_map_grad(grad, z, zg, align_corners)]

    def semi_cross_entropy2d_forward(self, x, z, threshold, mask, need_map, need_grad, size=None,
                                     align_corners=False):
        n, c, xh, xw = x.shape
        h, w = grid = _grid(size, xh, xw)
        zg = self._map_at(z, size, grid, align_corners, "d_logits")
        loss_map = _loss_map(need_map, n, h, w)
        grad = torch.empty_like(x) if need_grad else None
        sums = _sums(3)
        if _resampled(x, grid, "logits"):
            state = _state(need_grad, n * h * w)
            self._call("emu_semi_cross_entropy2d_upsampled_forward", Shape4(n, c, h, w), DTYPE_CODE[x.dtype], _s4(x),
                       _upsample(x, align_corners, state), _fmap(zg), threshold, _raw(mask), _ptr(loss_map),
                       _s4(grad), _ptr(sums))
            return [sums, loss_map, grad]
        self._call("emu_semi_cross_entropy2d_forward", _shape4(x), DTYPE_CODE[x.dtype], _s4(x), _fmap(zg), threshold,
                   _raw(mask), _ptr(loss_map), _s4(grad), _ptr(sums))
        return [sums, loss_map, grad]

    def pseudo_label_cross_entropy2d_forward(self, x, teacher, z, confidence_threshold, d_threshold, mask, need_map,
                                             need_grad, size=None, align_corners=False):
        n, c, xh, xw = x.shape
        h, w = grid = _grid(size, xh, xw)
        if teacher is not None:
            if teacher.dim() != 4 or teacher.shape[:2] != x.shape[:2] or teacher.dtype != x.dtype:
                raise ValueError(f"fastadvseg cuda backend: teacher_logits {list(teacher.shape)} {teacher.dtype} does "
                                 f"not match the logits' N = {n}, C = {c} and dtype {x.dtype}")
            if size is None and list(teacher.shape[2:]) != grid:
                raise ValueError(f"fastadvseg cuda backend: teacher_logits {list(teacher.shape)} must be at the "
                                 f"logits' grid {tuple(grid)} without size")
            if size is not None:
                _resampled(teacher, grid, "teacher_logits")
        zg = None
        if z is not None:
            if z.dim() != 3 or z.shape[0] != n:
                raise ValueError(f"fastadvseg cuda backend: d_logits {list(z.shape)} does not match the logits' N = {n}")
            zg = self._map_at(z, size, grid, align_corners, "d_logits")
        for name, m in (("d_logits", zg), ("ignore_mask", mask)):  # the binding's nhw_map
            if m is not None and list(m.shape) != [n, h, w]:
                raise ValueError(f"fastadvseg cuda backend: {name} {list(m.shape)} does not match (N, H, W) = "
                                 f"{(n, h, w)}")
        loss_map = _loss_map(need_map, n, h, w)
        grad = torch.empty_like(x) if need_grad else None
        sums = _sums(3)
        state = _state(need_grad and _resampled(x, grid, "logits"), n * h * w)
        t_up = (Upsample(h, w, align_corners, None) if teacher is None
                else _upsample(teacher, align_corners, None))
        self._call("emu_pseudo_label_cross_entropy2d_forward", Shape4(n, c, h, w), DTYPE_CODE[x.dtype], _s4(x),
                   _upsample(x, align_corners, state), _s4(teacher), t_up, _fmap(zg), d_threshold,
                   confidence_threshold is not None, 0.0 if confidence_threshold is None else confidence_threshold,
                   _raw(mask), _ptr(loss_map), _s4(grad), _ptr(sums))
        return [sums, loss_map, grad]

    def generator_loss_forward(self, x, z, target, threshold, ignore_index, need_grad_x, need_grad_z, size=None,
                               align_corners=False):
        n, c, xh, xw = x.shape
        h, w = grid = _grid(size, xh, xw)
        zg = self._map_at(z, size, grid, align_corners, "d_logits")
        gx = torch.empty_like(x) if need_grad_x else None
        gz = self._map_grad_buffer(need_grad_z, z, zg)
        sums, bad = _sums(6), _bad()
        if _resampled(x, grid, "logits"):
            state = _state(need_grad_x, n * h * w)
            self._call("emu_generator_loss_upsampled_forward", Shape4(n, c, h, w), DTYPE_CODE[x.dtype], _s4(x),
                       _upsample(x, align_corners, state), _fmap(zg), _raw(target), ignore_index, threshold, _s4(gx),
                       _fmap(gz), _ptr(sums), _ptr(bad))
        else:
            self._call("emu_generator_loss_forward", _shape4(x), DTYPE_CODE[x.dtype], _s4(x), _fmap(zg), _raw(target),
                       ignore_index, threshold, _s4(gx), _fmap(gz), _ptr(sums), _ptr(bad))
        return [sums, gx, self._gather_map_grad(gz, z, zg, align_corners), bad]

    def discriminator_loss_forward(self, fake, real, fake_mask, real_mask, need_fake_grad, need_real_grad, size=None,
                                   align_corners=False):
        fg = self._map_at(fake, size, _grid(size, *fake.shape[1:]), align_corners, "d_fake")
        rg = self._map_at(real, size, _grid(size, *real.shape[1:]), align_corners, "d_real")
        fake_grad = self._map_grad_buffer(need_fake_grad, fake, fg)
        real_grad = self._map_grad_buffer(need_real_grad, real, rg)
        sums = _sums(4)
        self._call("emu_discriminator_loss_forward", NHW(*fg.shape), _fmap(fg), _raw(fake_mask), _fmap(fake_grad),
                   NHW(*rg.shape), _fmap(rg), _raw(real_mask), _fmap(real_grad), _ptr(sums))
        return [sums, self._gather_map_grad(fake_grad, fake, fg, align_corners),
                self._gather_map_grad(real_grad, real, rg, align_corners)]

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
