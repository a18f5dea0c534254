"""Building blocks shared by the Triton kernels: tile geometry, the logits tile, stable scalar math.

Every loss kernel works on a ``[BLOCK_C, BLOCK_P]`` tile: all channels of a block of ``BLOCK_P`` pixels of one
image (grid = (pixel blocks, N)). Offsets are computed from (n, c, h, w) and the four strides in int64, so any
layout (contiguous NCHW, channels_last, sliced views, large storage offsets) is read in place, and N·C·H·W may
exceed 2**31. Values are converted to float32 right after the load (under ``TRITON_INTERPRET=1`` arithmetic on
bfloat16 gives NaN) and cast to the destination pointer's element type on store.

No libdevice: ``log1p``, ``softplus`` and ``sigmoid`` are written here with ``tl.exp``/``tl.log`` in stable forms.
"""
import re
from typing import NamedTuple

import torch
import triton
import triton.language as tl


def triton_version(version: str = triton.__version__) -> tuple:
    """(major, minor) of a Triton version string: "3.6.0" -> (3, 6), "3.10.0+git1234" -> (3, 10)."""
    parts = re.findall(r"\d+", version)[:2]
    return tuple(int(p) for p in parts) + (0,) * (2 - len(parts))


# Tile size (elements of the [BLOCK_C, BLOCK_P] tile), chosen per Triton release by registers, since the releases
# compile the same kernel very differently: the largest tile at which no kernel spills at C <= 256, with room to
# spare. Under 4 warps (128 threads) a thread holds TILE_ELEMS / 128 elements of each tile-sized value.
#   Triton >= 3.9: 4096 (32x128 at C = 19/21, 256x16 at C = 150/256): at most 191 registers per thread, no spill;
#     5 programs (20480 tile elements) per H100 SM for the VOC/Cityscapes cross-entropy (84 registers).
#   Triton < 3.9 (3.6 is the one supported): 1024 (32x32, 256x4): at most 160 registers (the sliced int64
#     cross-entropy with smoothing; 93-96 for the core ones), no spill. At 4096 Triton 3.6 takes all 255
#     registers and spills up to 880 bytes (VOC/Cityscapes tiles, gradient stored); at 2048 with 4 warps it
#     reaches 254 registers (no margin), at 4096 with 8 warps 248 and one spill; 2048 with 8 warps (152 at most)
#     keeps fewer tile elements per SM (4096-6144 against 5120-7168 at 1024 with 4 warps) at C = 19/21.
# The numbers: python -m tools.compile_check (README, "Triton"); no GPU timed these choices.
TRITON_VERSION = triton_version()
TILE_ELEMS = 4096 if TRITON_VERSION >= (3, 9) else 1024
MAP_BLOCK = 1024  # pixels per program for the kernels that only read (N, H, W) maps

# Registers: the compile check (python -m tools.compile_check) compiles every kernel at these
# tiles for sm_90 and fails on any register spill at C <= 256, unless a comment in the kernel sources reads
# "accepted spill of `<kernel>` at block <BLOCK_C or BLOCK>: <why it is acceptable>". Where a tile spills, change
# tile_shape / map_block rather than add such a comment. Three are accepted today (sm_90, C <= 256; CI runs the
# check under Triton 3.6 and 3.9): small Triton 3.6 spills of the pseudo-label kernels' heaviest variants, in
# pseudo_label.py.


def tile_shape(num_classes: int, num_pixels: int, tile_elems: int = TILE_ELEMS) -> tuple:
    """(BLOCK_C, BLOCK_P, num_warps) for a [all channels x block of pixels] tile of about ``tile_elems`` elements
    (TILE_ELEMS depends on the Triton release: see above)."""
    block_c = triton.next_power_of_2(num_classes)
    block_p = max(1, min(tile_elems // block_c, triton.next_power_of_2(max(num_pixels, 1))))
    num_warps = 8 if block_c * block_p >= 8192 else 4
    return block_c, block_p, num_warps


def map_block(num_pixels: int) -> tuple:
    """(BLOCK, num_warps) for the kernels over discriminator-sized (N, H, W) maps."""
    block = max(16, min(MAP_BLOCK, triton.next_power_of_2(max(num_pixels, 1))))
    return block, 4


@triton.jit
def log1p(u):
    """log(1 + u) accurate for small u (Goldberg's trick), without libdevice."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def softplus(z):
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)), finite for every finite z."""
    return tl.maximum(z, 0.0) + log1p(tl.exp(-tl.abs(z)))


@triton.jit
def bce_logits(z, t):
    """BCE(sigmoid(z), t) = (1 - t) * z + softplus(-z), PyTorch's form, so infinities give what PyTorch gives
    (inf for z = +inf, t = 0; NaN for 0 * inf)."""
    return (1.0 - t) * z + softplus(-z)


@triton.jit
def sigmoid(z):
    """1 / (1 + exp(-z)) without overflow: exp is only taken of -|z|."""
    e = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def pixel_block(pid_p, HW, W, BLOCK_P: tl.constexpr):
    """This program's block of pixels of one image: flat indices in [0, H·W), in-bounds mask, and (h, w).

    Pixel indices of one image fit int32 (the host checks H·W < 2**31); memory offsets are int64
    (:func:`pix_offsets`).
    """
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    h = offs_p // W
    return offs_p, mask_p, h, offs_p - h * W


@triton.jit
def pix_offsets(n, offs_p, h, w, s_n, s_h, s_w, FLAT: tl.constexpr):
    """Element offsets (int64) of the block's pixels in a tensor with strides (s_n, [s_c,] s_h, s_w).

    FLAT: every tensor of the launch has s_h == W * s_w (contiguous NCHW, channels_last, (N, H, W) maps): the
    offset is then ``n * s_n + p * s_w``, with no (h, w) split, and Triton sees the contiguity (vector loads).
    """
    if FLAT:
        return n * s_n + offs_p.to(tl.int64) * s_w
    else:
        return n * s_n + h.to(tl.int64) * s_h + w.to(tl.int64) * s_w


@triton.jit
def flat_pixels(pid, NHW, HW, W, BLOCK: tl.constexpr):
    """Block ``pid`` of the flat pixel range [0, N·H·W) of a map: flat indices (int64), mask, and (n, h, w)."""
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < NHW
    n = offs // HW
    r = offs - n * HW
    h = r // W
    return offs, mask, n, h, r - h * W


@triton.jit
def map_offsets(offs, n, h, w, s_n, s_h, s_w, FLAT: tl.constexpr):
    """Element offsets (int64) of flat map pixels ``offs`` = (n, h, w); FLAT: the map is ``offs * s_w``."""
    if FLAT:
        return offs * s_w
    else:
        return n * s_n + h * s_h + w * s_w


@triton.jit
def load_logits_tile(x_ptr, pix, stride_c, mask_p, C, BLOCK_C: tl.constexpr):
    """The [BLOCK_C, BLOCK_P] float32 logits tile at pixel offsets ``pix`` (from :func:`pix_offsets`).

    Padded channels hold -inf (so they vanish from max and logsumexp), out-of-range pixels hold 0 (finite: no NaN
    is made for them). Returns (x, offs_c, mask_c).
    """
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    ptrs = x_ptr + (offs_c.to(tl.int64)[:, None] * stride_c + pix[None, :])
    x = tl.load(ptrs, mask=mask_c[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
    x = tl.where(mask_c[:, None], x, float("-inf"))
    return x, offs_c, mask_c


@triton.jit
def store_tile(ptr, val, pix, stride_c, offs_c, mask_c, mask_p):
    """Store a [BLOCK_C, BLOCK_P] float32 tile at pixel offsets ``pix``, cast to the buffer's dtype."""
    ptrs = ptr + (offs_c.to(tl.int64)[:, None] * stride_c + pix[None, :])
    tl.store(ptrs, val.to(ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.jit
def softmax_tile(x):
    """Channel softmax of a logits tile: (p, lse) with p [BLOCK_C, BLOCK_P] and lse [BLOCK_P] = log sum exp."""
    m = tl.max(x, axis=0)
    e = tl.exp(x - m[None, :])
    s = tl.sum(e, axis=0)
    return e * (1.0 / s)[None, :], m + tl.log(s)


@triton.jit
def first_argmax(x, offs_c, BLOCK_C: tl.constexpr):
    """Index of the first maximum over channels (torch.argmax's tie rule); a NaN counts as the maximum."""
    is_nan = x != x
    m = tl.max(tl.where(is_nan, float("-inf"), x), axis=0)
    # rank: a NaN channel c -> c, a maximal channel c -> BLOCK_C + c, others -> 2 * BLOCK_C; the smallest wins
    c = offs_c[:, None]
    rank = tl.where(is_nan, c, tl.where(x == m[None, :], c + BLOCK_C, 2 * BLOCK_C))
    best = tl.min(rank, axis=0)
    return tl.where(best >= BLOCK_C, best - BLOCK_C, best)


@triton.jit
def ce_tile(x, labels, counted, offs_c):
    """Cross-entropy of a logits tile against ``labels`` ([BLOCK_P] int64), only where ``counted``.

    Returns (nll, p, onehot, lse): nll = lse - x[label] ([BLOCK_P], 0 where not counted, selected with ``tl.where``
    so a NaN/Inf logit at an uncounted pixel never reaches the loss), the softmax tile p, the boolean one-hot tile
    and lse = logsumexp over the channels ([BLOCK_P], every pixel). The gradient of the nll sum is ``p - onehot``
    at counted pixels (see :func:`ce_grad`).
    """
    p, lse = softmax_tile(x)
    onehot = offs_c[:, None] == labels[None, :]
    x_y = tl.sum(tl.where(onehot, x, 0.0), axis=0)
    nll = tl.where(counted, lse - x_y, 0.0)
    return nll, p, onehot, lse


@triton.jit
def nll_tile(x, labels, counted, offs_c):
    """(nll, p, onehot) of :func:`ce_tile`, for the kernels that do not need lse."""
    nll, p, onehot, lse = ce_tile(x, labels, counted, offs_c)
    return nll, p, onehot


@triton.jit
def ce_grad(p, onehot, counted):
    """Gradient of sum(nll) w.r.t. the logits tile: softmax - onehot at counted pixels, 0 elsewhere."""
    return tl.where(counted[None, :], p - tl.where(onehot, 1.0, 0.0), 0.0)


@triton.jit
def confident(z, considered, keep_logit):
    """The discriminator's confidence mask at considered pixels: z > logit(T) (float32 z; keep_logit from
    :func:`fastadvseg._keep.keep_logit`), i.e. sigmoid(z) > T exactly; a NaN z is never kept."""
    return considered & (z > keep_logit)


# Flat pixel index of "no bad label in this block" in the report (flat indices are < N·H·W < 2**47)
NO_BAD_LABEL = 2 ** 62
BAD_REPORT_COLS = 3  # (count, flat index of the first bad label, its value), int64


@triton.jit
def report_bad_labels(rep_ptr, row, labels, flat, mask_p, ignore_index, C):
    """Store this program's bad-label report at row ``row`` of the int64 [programs, 3] buffer.

    A bad label is outside [0, C) and not ``ignore_index``. The row is (how many, the flat pixel index
    n·H·W + h·W + w of the first one, its value), or (0, NO_BAD_LABEL, 0) without any; labels stay int64 (2**40
    and -1 are reported as they are). A few reductions over the block's [BLOCK_P] labels, next to a
    [BLOCK_C, BLOCK_P] tile: negligible.
    """
    bad = mask_p & (labels != ignore_index) & ((labels < 0) | (labels >= C))
    first = tl.min(tl.where(bad, flat, 4611686018427387904), axis=0)  # NO_BAD_LABEL, as a literal
    value = tl.sum(tl.where(bad & (flat == first), labels, 0), axis=0)
    base = rep_ptr + row * 3
    tl.store(base, tl.sum(bad.to(tl.int64), axis=0))
    tl.store(base + 1, first)
    tl.store(base + 2, value.to(tl.int64))


# ----------------------------------------------------------------------------------------------- host-side helpers

class TileLaunch(NamedTuple):
    """Launch geometry of a tile kernel over (N, C, H, W) logits: grid (pixel blocks, N)."""

    grid: tuple
    blocks: int  # pixel blocks per image; program (p, n) writes partial row n * blocks + p
    meta: dict  # BLOCK_C, BLOCK_P, num_warps


def tile_launch(shape, tile_elems: int = TILE_ELEMS) -> TileLaunch:
    """The launch over (N, C, H, W) at tiles of about ``tile_elems`` elements (:func:`tile_shape`)."""
    n, c, h, w = shape
    if h * w >= 2 ** 31 or n > 65535:
        raise ValueError(f"logits of shape {tuple(shape)} exceed the triton kernels' grid: need H*W < 2**31 "
                         "and N <= 65535 (split the batch)")
    block_c, block_p, num_warps = tile_shape(c, h * w, tile_elems)
    blocks = triton.cdiv(h * w, block_p)
    return TileLaunch((blocks, n), blocks, dict(BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps))


def plane_flat(t) -> bool:
    """Whether the (H, W) planes of an NCHW tensor or (N, H, W) map are flat: stride_h == W * stride_w."""
    return t.shape[-2] == 1 or t.stride(-2) == t.shape[-1] * t.stride(-1)


def map_flat(t) -> bool:
    """Whether a whole (N, H, W) map is flat: element (n, h, w) sits at ((n * H + h) * W + w) * stride_w."""
    n, h, w = t.shape
    return plane_flat(t) and (n == 1 or t.stride(0) == h * w * t.stride(-1))


def maps_flat(*maps) -> bool:
    """The FLAT flag of a map kernel: every (N, H, W) map it addresses is flat as a whole."""
    return all(map_flat(t) for t in maps if t is not None)


def all_flat(*tensors) -> bool:
    """The FLAT flag of a tile kernel: every tensor it addresses per pixel has flat (H, W) planes."""
    return all(plane_flat(t) for t in tensors if t is not None)


def map_arg(t):
    """(tensor, stride_n, stride_h, stride_w) of an optional (N, H, W) map; bool masks are read as uint8.

    A missing map becomes a dummy pointer that the kernel never dereferences (its HAS_* flag is off).
    """
    if t is None:
        return None, 0, 0, 0
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return (t, *t.stride())


def partials(rows: int, cols: int, device) -> torch.Tensor:
    """The per-program partial-sum buffer (float32 [rows, cols]), summed with torch afterwards: no atomics.

    Sum it with :func:`column_sums`: a program's count (kept, considered, counted pixels) is exact in float32 (it
    counts at most one block, <= 4096 pixels), and a float32 sum of the rows would not be beyond 2**24 pixels (a
    Cityscapes batch of 8 at 1024x2048 is exactly 2**24).
    """
    return torch.empty((rows, cols), dtype=torch.float32, device=device)


def column_sums(part: torch.Tensor) -> torch.Tensor:
    """The column sums of a partial-sum buffer, summed in float64 (one reduction on the device, no host sync) and
    rounded once to float32, the dtype of every launch's sums: counts exact up to 2**53 pixels before that one
    rounding, as every backend does; the loss sums get the same (more accurate) reduction."""
    return part.sum(dim=0, dtype=torch.float64).float()


def bad_label_buffer(rows: int, device) -> torch.Tensor:
    """The per-program bad-label report buffer (int64 [rows, 3]) of :func:`report_bad_labels`."""
    return torch.empty((rows, BAD_REPORT_COLS), dtype=torch.int64, device=device)


def bad_label_summary(report: torch.Tensor) -> torch.Tensor:
    """[count, value of the first bad label in pixel order (0 if none)], int64 of shape (2,) on the report's
    device, reduced with torch ops there: no host synchronisation (the caller decides when to look).

    The first bad label is the one with the smallest flat pixel index over all programs (the row order need not
    be pixel order); a row without a bad label holds NO_BAD_LABEL and value 0, so with none at all the argmin
    lands on such a row and the value is 0. No rows (an empty launch): [0, 0].
    """
    if report.shape[0] == 0:
        return no_bad_labels(report.device)
    count = report[:, 0].sum().view(1)
    row = report[:, 1].argmin().view(1)
    return torch.cat((count, report[:, 2].index_select(0, row)))


def no_bad_labels(device) -> torch.Tensor:
    """The report when no label was checked: [0, 0] int64 on ``device``."""
    return torch.zeros(2, dtype=torch.int64, device=device)
