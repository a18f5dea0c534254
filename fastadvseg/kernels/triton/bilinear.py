"""Bilinear upsampling fused into the loss kernels: source indices, the 4-neighbour gather, and the adjoint.

With ``size = (H, W)`` a logits tensor (N, C, h, w) or a discriminator map (N, h, w) is read as if it were
``F.interpolate(x.float(), (H, W), mode="bilinear", align_corners=a)``, without that tensor ever existing. Per axis
(in -> out), PyTorch's ``upsample_bilinear2d`` source index, in float32 as PyTorch's CPU kernel computes it::

    scale = (in - 1) / (out - 1)  (align_corners; 0 when out == 1)      scale = in / out  (otherwise)
    src   = scale * d             (align_corners)                       src   = max(scale * (d + 0.5) - 0.5, 0)
    i0    = min(floor(src), in - 1),  i1 = i0 + (i0 < in - 1),  l1 = clamp(src - i0, 0, 1),  l0 = 1 - l1
    (in == out: i0 = i1 = d, l0 = 1, l1 = 0)

and the value at full-resolution pixel (d_h, d_w) is ``(x[h0, w0] l0w + x[h0, w1] l1w) l0h + (x[h1, w0] l0w +
x[h1, w1] l1w) l1h``. Both are computed with the roundings of PyTorch's CPU kernel for contiguous inputs and large
outputs (H + W > 128; its compiler fuses ``scale * (d + 0.5) - 0.5`` and each ``a * b + c * d`` into one
multiply-add), so the interpolated values are PyTorch's to the bit there (its kernel for small outputs or
channels_last inputs rounds otherwise: an ulp or two). The forward kernels gather the four neighbours per channel
from the low-resolution tensor (neighbouring pixels share them: cache hits, so DRAM sees the low-resolution tensor
about once).

The gradient w.r.t. the low-resolution tensor is the adjoint of the interpolation applied to the full-resolution
gradient G: ``g[i, j] = sum over (d_h, d_w) of wh(d_h, i) ww(d_w, j) G[d_h, d_w]``, where ``w(d, i) = l0(d) [i0(d)
== i] + l1(d) [i1(d) == i]``. It is computed as a gather in two separable passes, with no atomics, each output
summed in a fixed order (ascending full-resolution index), so results are bit-identical from run to run:

1. an op's gradient kernel (next to its forward kernel) recomputes G for the full-resolution pixels from the
   low-resolution inputs, and reduces it along one axis into a float32 intermediate of N·C·H·w (full-resolution
   rows, low-resolution columns; or N·C·h·W, whichever is smaller), never N·C·H·W;
2. :func:`adjoint_pass_kernel` reduces the intermediate along the other axis into the gradient buffer (the
   input's dtype and strides). Where one axis is not resampled (h == H or w == W) pass 1 writes the gradient
   directly and pass 2 is skipped.

A low-resolution index i receives from the full-resolution indices d with i0(d) in {i - 1, i}: a contiguous run
(src is monotone in d) that starts at or after :func:`window_start` and is shorter than ``AxisPlan.span``, which the
host computes once per (in, out, align_corners) by running the very same float32 arithmetic over every d. The
passes loop over that window with ``while``: the interpreter of Triton 3.6 cannot take a runtime bound in
``range()`` under NumPy 2.

Bytes moved by the gradient passes: pass 1 reads the low-resolution inputs (cache hits, as in the forward) and the
full-resolution per-pixel inputs (labels, masks, maps: read once per low-resolution index they feed, about twice,
adjacent lanes, so from cache after the first), writes 4·N·C·H·w bytes; pass 2 reads them (each twice, the second
time from cache) and writes the N·C·h·w gradient.
"""
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .common import MAP_BLOCK, TRITON_VERSION, map_block, tile_launch

# Tiles of the kernels that gather upsampled logits (the forward tiles and pass 1), by registers (sm_90,
# C <= 256; python -m tools.compile_check reports them). The four gathers' 64-bit addresses per element make
# larger tiles spill: the forward at 4096 elements (Triton 3.9, 256x16: 255 registers, up to 144 bytes), pass 1 at
# 2048 needs up to 238, and ptxas spills some variants at 16 and at 8 elements per thread even at 64 to 80 registers
# (the L_semi and generator tiles with both inputs upsampled in float16: 8 to 104 bytes). Measured without a spill:
# Triton 3.9 at 1024 elements (at most 72 registers in the forward, 128 in pass 1), Triton 3.6 at 512 (106 and
# 162; at 1024 its pass 1 takes all 255 and spills 160 bytes). Maps read upsampled take blocks of 512 (at most 80
# registers; Triton 3.6 spills 8 bytes at 1024), pass 1 of a map GRAD_MAP_BLOCK lanes (at most 64).
GATHER_TILE_ELEMS = 1024 if TRITON_VERSION >= (3, 9) else 512
UPSAMPLED_MAP_BLOCK = MAP_BLOCK // 2
GRAD_MAP_BLOCK = 256


# ----------------------------------------------------------------------------------------- device building blocks

@triton.jit
def source_index(dst, in_size, out_size, scale, ALIGN_CORNERS: tl.constexpr):
    """(i0, i1, l0, l1) of destination indices ``dst`` (int32) along one axis: PyTorch's bilinear source index."""
    d = dst.to(tl.float32)
    if ALIGN_CORNERS:
        src = scale * d
    else:
        # rounded once, as PyTorch's CPU kernel computes it (its compiler fuses the multiply-add)
        src = tl.maximum(tl.fma(d + 0.5, scale, -0.5), 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0: truncation is floor
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    i1 = i0 + tl.where(i0 < in_size - 1, 1, 0)
    same = in_size == out_size  # PyTorch copies such an axis: both neighbours are d, weights (1, 0)
    i0 = tl.where(same, dst, i0)
    i1 = tl.where(same, dst, i1)
    l1 = tl.where(same, 0.0, l1)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def window_start(j, inv_scale, ALIGN_CORNERS: tl.constexpr):
    """The first full-resolution index the adjoint visits for low-resolution index ``j`` (int32): two below the
    estimate of the first d with i0(d) >= j - 1 (0 for j <= 1: every i0 is >= 0), so that float rounding never
    skips one."""
    if ALIGN_CORNERS:
        first = (j.to(tl.float32) - 1.0) * inv_scale
    else:
        first = (j.to(tl.float32) - 0.5) * inv_scale - 0.5
    return tl.where(j > 1, tl.maximum(first.to(tl.int32) - 2, 0), 0)


@triton.jit
def adjoint_weight(i0, i1, l0, l1, j):
    """(feeds, weight): whether a full-resolution index with neighbours (i0, i1) feeds low-resolution index ``j``,
    and its weight there (l0 + l1 where i0 == i1 == j, as PyTorch's backward adds both)."""
    feeds = (i0 == j) | (i1 == j)
    return feeds, tl.where(i0 == j, l0, 0.0) + tl.where(i1 == j, l1, 0.0)


@triton.jit
def gather_bilinear(base, s_h, s_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, mask):
    """The bilinear value at ``base`` (pointers to the (0, 0) element, any shape broadcasting with the indices) from
    the four neighbours (h0|h1, w0|w1), in float32 with PyTorch's CPU kernel's operations (its compiler contracts
    them into these fused multiply-adds), so that the value is PyTorch's to the bit; masked-off elements read 0."""
    r0 = h0.to(tl.int64) * s_h
    r1 = h1.to(tl.int64) * s_h
    c0 = w0.to(tl.int64) * s_w
    c1 = w1.to(tl.int64) * s_w
    v00 = tl.load(base + (r0 + c0), mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + (r0 + c1), mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + (r1 + c0), mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + (r1 + c1), mask=mask, other=0.0).to(tl.float32)
    top = tl.fma(v00, lw0, v01 * lw1)
    bottom = tl.fma(v10, lw0, v11 * lw1)
    return tl.fma(top, lh0, bottom * lh1)


@triton.jit
def upsampled_logits_tile(x_ptr, n, h, w, in_h, in_w, out_h, out_w, scale_h, scale_w,
                          s_n, s_c, s_h, s_w, mask_p, C, BLOCK_C: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    """The [BLOCK_C, BLOCK_P] float32 tile of the upsampled logits at full-resolution pixels (h, w) (int32
    [BLOCK_P]) of image n: :func:`common.load_logits_tile`'s contract (padded channels -inf, masked pixels 0).
    Returns (x, offs_c, mask_c)."""
    h0, h1, lh0, lh1 = source_index(h, in_h, out_h, scale_h, ALIGN_CORNERS)
    w0, w1, lw0, lw1 = source_index(w, in_w, out_w, scale_w, ALIGN_CORNERS)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = x_ptr + (n * s_n + offs_c.to(tl.int64)[:, None] * s_c)
    x = gather_bilinear(base, s_h, s_w, h0[None, :], h1[None, :], lh0[None, :], lh1[None, :], w0[None, :],
                        w1[None, :], lw0[None, :], lw1[None, :], mask_c[:, None] & mask_p[None, :])
    return tl.where(mask_c[:, None], x, float("-inf")), offs_c, mask_c


@triton.jit
def upsampled_map(d_ptr, n, h, w, in_h, in_w, out_h, out_w, scale_h, scale_w, s_n, s_h, s_w, mask,
                  ALIGN_CORNERS: tl.constexpr):
    """The upsampled (N, h, w) map at full-resolution pixels (n, h, w) (any matching shapes), float32, 0 where
    masked."""
    h0, h1, lh0, lh1 = source_index(h, in_h, out_h, scale_h, ALIGN_CORNERS)
    w0, w1, lw0, lw1 = source_index(w, in_w, out_w, scale_w, ALIGN_CORNERS)
    return gather_bilinear(d_ptr + n * s_n, s_h, s_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, mask)


@triton.jit
def map_at(d_ptr, n, h, w, in_h, in_w, out_h, out_w, scale_h, scale_w, s_n, s_h, s_w, mask,
           UPSAMPLE: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    """A (N, h, w) map's float32 value at full-resolution pixels (n, h, w): upsampled (UPSAMPLE) or read as it is
    (the map is at full resolution); 0 where masked."""
    if UPSAMPLE:
        z = upsampled_map(d_ptr, n, h, w, in_h, in_w, out_h, out_w, scale_h, scale_w, s_n, s_h, s_w, mask,
                          ALIGN_CORNERS)
    else:
        z = tl.load(d_ptr + (n * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w), mask=mask, other=0.0)
        z = z.to(tl.float32)
    return z


@triton.jit
def adjoint_lanes(pid_p, lanes, lanes_b, BLOCK_P: tl.constexpr):
    """A gradient pass's block of lanes over an (A, B) grid: mask and (a, b) (int32)."""
    offs = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    a = offs // lanes_b
    return offs < lanes, a, offs - a * lanes_b


@triton.jit
def adjoint_step(a, b, start, k, in_h, in_w, out_h, out_w, scale_h, scale_w, mask,
                 ALIGN_CORNERS: tl.constexpr, REDUCE_W: tl.constexpr):
    """Step k of a pass-1 lane (a, b) of the (H, w) grid (REDUCE_W: full-resolution row a, low-resolution column b)
    or of the (h, W) grid: the full-resolution pixel (d_h, d_w) it visits, the tensor's source indices there, and
    (feeds, weight) of that pixel for the lane's low-resolution index.

    Returns (d_h, d_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, feeds, weight).
    """
    if REDUCE_W:
        d_h = a
        d_w = start + k
    else:
        d_h = start + k
        d_w = b
    h0, h1, lh0, lh1 = source_index(d_h, in_h, out_h, scale_h, ALIGN_CORNERS)
    w0, w1, lw0, lw1 = source_index(d_w, in_w, out_w, scale_w, ALIGN_CORNERS)
    if REDUCE_W:
        feeds, weight = adjoint_weight(w0, w1, lw0, lw1, b)
        feeds = feeds & mask & (d_w < out_w)
    else:
        feeds, weight = adjoint_weight(h0, h1, lh0, lh1, a)
        feeds = feeds & mask & (d_h < out_h)
    return d_h, d_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, feeds, weight


@triton.jit
def adjoint_pass_kernel(
    t_ptr, out_ptr,
    C, in_size, out_size, scale, inv_scale, span, lanes_b, lanes,
    st_n, st_c, st_h, st_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN_CORNERS: tl.constexpr, REDUCE_W: tl.constexpr,
):
    """Pass 2: out[n, c, i, j] = sum over d of w(d, .) t[n, c, ., .] along one axis (REDUCE_W: t is (N, C, h, W),
    d runs over its columns; else t is (N, C, H, w), d runs over its rows), d ascending; cast to out's dtype."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    mask_p, a, b = adjoint_lanes(pid_p, lanes, lanes_b, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c64 = offs_c.to(tl.int64)[:, None]
    if REDUCE_W:
        start = window_start(b, inv_scale, ALIGN_CORNERS)
    else:
        start = window_start(a, inv_scale, ALIGN_CORNERS)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    k = 0
    while k < span:  # not range(span): see bilinear.py
        d = start + k
        i0, i1, l0, l1 = source_index(d, in_size, out_size, scale, ALIGN_CORNERS)
        if REDUCE_W:
            feeds, weight = adjoint_weight(i0, i1, l0, l1, b)
            pix = a.to(tl.int64) * st_h + d.to(tl.int64) * st_w
        else:
            feeds, weight = adjoint_weight(i0, i1, l0, l1, a)
            pix = d.to(tl.int64) * st_h + b.to(tl.int64) * st_w
        feeds = feeds & mask_p & (d < out_size)
        t = tl.load(t_ptr + (n * st_n + c64 * st_c + pix[None, :]), mask=mask_c[:, None] & feeds[None, :],
                    other=0.0)
        acc += tl.where(feeds[None, :], weight[None, :] * t, 0.0)
        k += 1
    po = n * so_n + c64 * so_c + (a.to(tl.int64) * so_h + b.to(tl.int64) * so_w)[None, :]
    tl.store(out_ptr + po, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


# ------------------------------------------------------------------------------------------------ host-side plan

class AxisPlan(NamedTuple):
    """One axis of an upsampling: sizes, PyTorch's float32 scale, and what the adjoint's window needs."""

    low: int
    full: int
    scale: float  # a float32 value
    inv_scale: float  # a float32 value, about 1 / scale (0 where scale is 0)
    span: int  # full-resolution indices a low-resolution index's window covers


def _f32(v) -> np.float32:
    return np.float32(v)


@functools.lru_cache(maxsize=1024)
def axis_plan(low: int, full: int, align_corners: bool) -> AxisPlan:
    """The plan of one axis, in -> out = low -> full. The span is measured, not estimated: the kernels' float32
    source indices and window starts are evaluated here for every index with numpy (IEEE float32, as a GPU without
    contraction), then 2 are added for a fused multiply-add rounding one index differently on the GPU."""
    if align_corners:
        scale = _f32(low - 1) / _f32(full - 1) if full > 1 else _f32(0.0)
        inv = _f32((full - 1) / (low - 1)) if low > 1 and full > 1 else _f32(0.0)
    else:
        scale = _f32(low) / _f32(full)
        inv = _f32(full / low)
    d = np.arange(full, dtype=np.int64)
    if low == full:
        i0 = d
    else:
        if align_corners:
            src = scale * d.astype(np.float32)
        else:
            src = np.maximum((np.float64(scale) * (d + 0.5) - 0.5).astype(np.float32), _f32(0.0))
        i0 = np.minimum(src.astype(np.int64), low - 1)
    j = np.arange(low, dtype=np.int64)
    jf = j.astype(np.float32)
    first_est = (jf - _f32(1.0)) * inv if align_corners else (jf - _f32(0.5)) * inv - _f32(0.5)
    start = np.where(j > 1, np.maximum(first_est.astype(np.int32).astype(np.int64) - 2, 0), 0)
    # the run of d with i0(d) in {j - 1, j}: from the first d with i0 >= j - 1 to the last with i0 <= j
    first = np.searchsorted(i0, j - 1, side="left")
    last = np.searchsorted(i0, j, side="right") - 1
    fed = last >= first
    if np.any(fed & ((first < start) | ((start > 0) & (first < start + 1)))):
        raise RuntimeError(f"bilinear adjoint window of {low} -> {full} (align_corners={align_corners}) starts "
                           "after its first index")
    span = int((last - start)[fed].max()) + 1 + 2 if fed.any() else 1
    return AxisPlan(low, full, float(scale), float(inv), span)


def check_size(size: Sequence[int], what: str) -> Tuple[int, int]:
    """``size`` as (H, W) of positive ints, or a one-line ValueError naming ``what``."""
    try:
        out = tuple(int(s) for s in size)
    except TypeError:
        raise TypeError(f"size must be a pair of ints (H, W), got {size!r} ({what})") from None
    if len(out) != 2 or min(out) <= 0:
        raise ValueError(f"size must be two positive ints (H, W), got {tuple(size)} ({what})")
    return out


def resampled(low_hw: Sequence[int], size: Optional[Tuple[int, int]]) -> bool:
    """Whether a tensor at ``low_hw`` is read upsampled: a size is given and differs from it."""
    return size is not None and tuple(low_hw) != tuple(size)


class Geometry(NamedTuple):
    """The upsampling of one tensor: (h, w) -> (H, W) with align_corners, and the kernels' arguments for it."""

    h: AxisPlan
    w: AxisPlan
    align_corners: bool

    @property
    def args(self) -> tuple:
        """(in_h, in_w, scale_h, scale_w): the forward gather's arguments (out_h, out_w come with the launch)."""
        return self.h.low, self.w.low, self.h.scale, self.w.scale


def geometry(low_hw: Sequence[int], size: Tuple[int, int], align_corners: bool) -> Geometry:
    align_corners = bool(align_corners)
    return Geometry(axis_plan(int(low_hw[0]), int(size[0]), align_corners),
                    axis_plan(int(low_hw[1]), int(size[1]), align_corners), align_corners)


IDENTITY_ARGS = (1, 1, 1.0, 1.0)  # geometry arguments of a tensor read as it is (the kernel never uses them)


class AdjointPass(NamedTuple):
    """How pass 1 of a gradient runs: the axis it reduces, its (A, B) lane grid, and where it writes."""

    reduce_w: bool
    lanes_a: int
    lanes_b: int
    plan: AxisPlan  # of the axis pass 1 reduces
    out: torch.Tensor  # (N, C, A, B): the float32 intermediate, or the gradient itself when one pass suffices


def first_pass(grad: torch.Tensor, geo: Geometry) -> AdjointPass:
    """Pass 1's plan for the gradient ``grad`` (N, C, h, w) (of a (N, h, w) map: ``grad.unsqueeze(1)``): where only
    one axis is resampled it is the only pass, and writes ``grad``; otherwise it reduces the axis that leaves the
    smaller intermediate (W when H·w <= h·W)."""
    n, c, h, w = grad.shape
    big_h, big_w = geo.h.full, geo.w.full
    if h == big_h:
        return AdjointPass(True, h, w, geo.w, grad)
    if w == big_w:
        return AdjointPass(False, h, w, geo.h, grad)
    reduce_w = big_h * w <= h * big_w
    a, b = (big_h, w) if reduce_w else (h, big_w)
    inter = torch.empty((n, c, a, b), dtype=torch.float32, device=grad.device)
    return AdjointPass(reduce_w, a, b, geo.w if reduce_w else geo.h, inter)


def upsampled_tile_launch(shape):
    """The launch of a forward tile kernel over (N, C, H, W) that reads its logits upsampled (GATHER_TILE_ELEMS)."""
    return tile_launch(shape, GATHER_TILE_ELEMS)


def upsampled_map_block(num_pixels: int) -> tuple:
    """(BLOCK, num_warps) of a forward map kernel that reads a map upsampled."""
    block, num_warps = map_block(num_pixels)
    return min(block, UPSAMPLED_MAP_BLOCK), num_warps


def first_pass_launch(first: AdjointPass):
    """The tile launch of pass 1 over its (N, C, A, B) lanes (GATHER_TILE_ELEMS)."""
    return tile_launch(first.out.shape, GATHER_TILE_ELEMS)


def first_pass_map_block(first: AdjointPass) -> tuple:
    """(BLOCK, num_warps) of pass 1 of a map: lanes per program, at most GRAD_MAP_BLOCK."""
    block, num_warps = map_block(first.lanes_a * first.lanes_b)
    return min(block, GRAD_MAP_BLOCK), num_warps


def second_pass(first: AdjointPass, grad: torch.Tensor, geo: Geometry) -> None:
    """Pass 2, where pass 1 wrote an intermediate: reduce the other axis into ``grad`` (N, C, h, w)."""
    if first.out is grad:
        return
    plan = geo.h if first.reduce_w else geo.w
    n, c, h, w = grad.shape
    launch = tile_launch(grad.shape)
    adjoint_pass_kernel[launch.grid](
        first.out, grad,
        c, plan.low, plan.full, plan.scale, plan.inv_scale, plan.span, w, h * w,
        *first.out.stride(), *grad.stride(),
        ALIGN_CORNERS=geo.align_corners, REDUCE_W=not first.reduce_w, **launch.meta,
    )
