"""The keep rule of L_semi (``semi_cross_entropy2d`` and the unlabelled ``generator_loss``), one formula for every
backend.

A pixel with discriminator logit z is kept (confident) where ``sigmoid(z) > T``. Every backend decides it as

    keep  <=>  float32(z) > logit(float32(T))      (compared as real numbers; logit(T) = log(T / (1 - T)))

which is ``sigmoid(z) > T`` evaluated exactly, without a sigmoid that rounds or underflows:

* T is taken in float32 (the precision every kernel receives it in);
* T = 0 keeps every z but -inf (sigmoid(-inf) = 0) and NaN, also z far below -88 where a float32 sigmoid is 0;
  T so close to 1 that it rounds to 1.0 in float32 (above 1 - 2**-25) keeps nothing;
* a NaN z is never kept.

:func:`keep_logit` computes the constant once per call on the host: logit(float32(T)) in float64, then rounded
*down* to float32 (to the largest float32 <= it), so that the float32 comparison ``z > keep_logit(T)`` is exactly
``z > logit(T)`` for every float32 z. The reference and triton backends get it from here; the cpu and cuda kernels
compute the same constant once per call in host C++ from the float32 T they receive, with the same float64
formula, libm calls and rounding (``keep_logit`` in csrc/cpu/kernels_impl.h, ``keep_logit_of`` in
fastadvseg/kernels/cuda/pixel_ops.cuh). tests/test_backend_parity.py checks that all of them keep the same pixels.
"""
from __future__ import annotations

import math
import struct

import torch


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _float32_below(value: float) -> float:
    """The largest float32 strictly below the float32 ``value`` (finite, or +inf)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    if value > 0:
        bits -= 1
    elif value == 0:
        bits = 0x80000001  # the negative float32 nearest to zero
    else:
        bits += 1
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _logit64(t: float) -> float:
    """logit(t) in float64 for a float32 t in (0, 1), accurate to a few float64 ulps also near t = 1/2 (where
    log(t) - log(1 - t) cancels): there log1p((2t - 1) / (1 - t)), whose 2t - 1 and 1 - t are exact."""
    if 0.25 <= t <= 0.75:
        return math.log1p((2.0 * t - 1.0) / (1.0 - t))
    return math.log(t) - math.log1p(-t)


def keep_logit(threshold: float) -> float:
    """The float32 L with ``keep <=> float32(z) > L``: logit(float32(T)) rounded down to float32, -inf for T = 0,
    +inf for a T that rounds to 1 in float32."""
    t = _float32(float(threshold))
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    exact = _logit64(t)
    low = _float32(exact)
    return _float32_below(low) if low > exact else low


def keep_mask(z: torch.Tensor, threshold) -> torch.Tensor:
    """``float32(z) > keep_logit(T)`` as a tensor: the reference backend's keep mask. Traced by torch.compile,
    where T may be symbolic (``dynamic=True``) and :func:`keep_logit`'s struct calls cannot be traced, the same
    float64 formula and the same rounding down to float32 are written in torch ops."""
    z = z.float()
    if not torch.compiler.is_compiling():
        return z > keep_logit(threshold)
    t = torch.tensor(threshold, dtype=torch.float64, device=z.device).float().double()  # float32(T)
    inner = (t >= 0.25) & (t <= 0.75)
    exact = torch.where(inner, torch.log1p((2.0 * t - 1.0) / (1.0 - t)), torch.log(t) - torch.log1p(-t))
    low = exact.float()
    low = torch.where(low.double() > exact, torch.nextafter(low, low.new_tensor(-math.inf)), low)
    bound = torch.where(t <= 0.0, -math.inf, torch.where(t >= 1.0, math.inf, low.double())).float()
    return z > bound
