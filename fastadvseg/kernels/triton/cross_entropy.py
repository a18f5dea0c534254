"""Fused 2-D cross-entropy with optional label smoothing: loss and logits gradient in one pass over the logits.

Per pixel (n, h, w) with label y counted (y != ignore_index and 0 <= y < C; anything else is ignored and never
used as an index), label smoothing eps (PyTorch's ``F.cross_entropy(label_smoothing=eps)``), class weights w
(w = 1 without), W = sum_c w[c] (C without weights; summed in the kernel from the weight tile, no host sync),
p = softmax(x), lse = logsumexp_c(x)::

    loss  = (1 - eps) * w[y] * (lse - x[y]) + (eps / C) * sum_c w[c] * (lse - x[c])
    G[c]  = (1 - eps) * w[y] * (p[c] - [c == y]) + (eps / C) * (W * p[c] - w[c])
    loss_sum += loss      weight_sum += w[y]

G is the gradient of the unnormalised sum; loss and G are 0 at pixels not counted. With eps = 0 (SMOOTHING off,
a constexpr) the kernel is the plain one: loss = w[y] * (lse - x[y]), G = w[y] * (p - onehot). The kernel writes
G into its own buffer (never into the logits, which may feed another loss) and one (loss_sum, weight_sum) row per
program; the autograd layer sums the rows with torch (deterministic, no atomics) and scales G in backward by
grad_output / weight_sum ("mean", PyTorch's divisor also with smoothing), grad_output ("sum") or the incoming
(N, H, W) map ("none"). Uncounted pixels are selected out with ``tl.where``, so a NaN/Inf logit there never reaches
the loss, while one at a counted pixel propagates.

Bad labels (outside [0, C), not ignore_index) are reported per program (count, first in pixel order, its value;
:func:`common.report_bad_labels`) and reduced on the device into ``bad`` = [count, first value]: the caller may
raise on it without the kernel making another pass over the labels, and without a host sync here.

Bytes moved (fwd + stored gradient): reads N·C·H·W logits + N·H·W labels (+ C weights), writes N·C·H·W gradient
(+ N·H·W float32 loss map for reduction="none"). Without a needed gradient (STORE_GRAD off) only the reads.

With a ``size`` (H, W) other than the logits' (h, w) (UPSAMPLE), the kernel reads the logits upsampled to the labels'
(H, W) (bilinear.py) and makes the same sums, loss map and label report; the gradient w.r.t. the (N, C, h, w)
logits comes from :func:`cross_entropy_grad_kernel` (pass 1) and bilinear.py's pass 2. Bytes moved: reads N·C·h·w
logits (neighbouring pixels' gathers hit cache) + N·H·W labels, writes the loss map; the gradient reads them again
(the labels about twice per pixel, adjacent lanes), writes and reads a 4·N·C·H·w-byte intermediate (or
4·N·C·h·W) and writes the N·C·h·w gradient.
"""
import torch
import triton
import triton.language as tl

from .bilinear import IDENTITY_ARGS, adjoint_lanes, adjoint_step, first_pass, first_pass_launch, gather_bilinear, \
    geometry, resampled, second_pass, upsampled_logits_tile, upsampled_tile_launch, window_start
from .common import all_flat, bad_label_buffer, bad_label_summary, ce_grad, ce_tile, load_logits_tile, \
    column_sums, nll_tile, no_bad_labels, partials, pix_offsets, pixel_block, report_bad_labels, store_tile, \
    tile_launch


@triton.jit
def label_weights(weight_ptr, y, counted, HAS_WEIGHT: tl.constexpr):
    """w[y] per pixel, 0 where not counted (1 where counted without class weights)."""
    if HAS_WEIGHT:
        wy = tl.load(weight_ptr + tl.where(counted, y, 0), mask=counted, other=0.0).to(tl.float32)
    else:
        wy = tl.where(counted, 1.0, 0.0)
    return wy


@triton.jit
def channel_weights(weight_ptr, offs_c, mask_c, HAS_WEIGHT: tl.constexpr):
    """(w per channel, W = sum_c w[c]): what the smoothing term needs."""
    if HAS_WEIGHT:
        wc = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    else:
        wc = tl.where(mask_c, 1.0, 0.0)
    return wc, tl.sum(wc, axis=0)


@triton.jit
def smoothed_ce_grad(p, onehot, counted, wy, wc, w_total, confidence, smooth_scale, SMOOTHING: tl.constexpr):
    """G of the module docstring (0 where not counted); wc and w_total are read only with SMOOTHING."""
    if SMOOTHING:
        g = confidence * wy[None, :] * (p - tl.where(onehot, 1.0, 0.0)) + smooth_scale * (w_total * p - wc[:, None])
        grad = tl.where(counted[None, :], g, 0.0)
    else:
        grad = ce_grad(p, onehot, counted) * wy[None, :]
    return grad


@triton.jit
def cross_entropy_kernel(
    x_ptr, y_ptr, weight_ptr, grad_ptr, loss_map_ptr, partial_ptr, bad_ptr,
    C, W, HW, ignore_index, confidence, smooth_scale,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_h, sy_w,
    sg_n, sg_c, sg_h, sg_w,
    num_pblocks,
    H, in_h, in_w, scale_h, scale_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr,
    SMOOTHING: tl.constexpr, CHECK_LABELS: tl.constexpr,
    UPSAMPLE: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    # confidence = 1 - eps and smooth_scale = eps / C are read only when SMOOTHING; UPSAMPLE: x is (N, C, in_h,
    # in_w), read upsampled to (H, W) (bilinear.py), and the gradient comes from cross_entropy_grad_kernel
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)
    row = n * num_pblocks + pid_p

    y = tl.load(y_ptr + pix_offsets(n, offs_p, h, w, sy_n, sy_h, sy_w, FLAT), mask=mask_p, other=ignore_index)
    counted = mask_p & (y != ignore_index) & (y >= 0) & (y < C)
    if CHECK_LABELS:
        report_bad_labels(bad_ptr, row, y, n * HW + offs_p, mask_p, ignore_index, C)

    if UPSAMPLE:
        x, offs_c, mask_c = upsampled_logits_tile(x_ptr, n, h, w, in_h, in_w, H, W, scale_h, scale_w,
                                                  sx_n, sx_c, sx_h, sx_w, mask_p, C, BLOCK_C, ALIGN_CORNERS)
    else:
        px = pix_offsets(n, offs_p, h, w, sx_n, sx_h, sx_w, FLAT)
        x, offs_c, mask_c = load_logits_tile(x_ptr, px, sx_c, mask_p, C, BLOCK_C)
    nll, p, onehot, lse = ce_tile(x, y, counted, offs_c)
    wy = label_weights(weight_ptr, y, counted, HAS_WEIGHT)

    if SMOOTHING:
        wc, w_total = channel_weights(weight_ptr, offs_c, mask_c, HAS_WEIGHT)
        # -log p[c] = lse - x[c]; padded channels (x = -inf) are selected out before the weighting (no 0 * inf)
        neg_logp = tl.where(mask_c[:, None], lse[None, :] - x, 0.0)
        smooth = tl.sum(wc[:, None] * neg_logp, axis=0)
        loss = tl.where(counted, confidence * wy * nll + smooth_scale * smooth, 0.0)
    else:
        wc, w_total = wy, 0.0
        loss = tl.where(counted, nll * wy, 0.0)

    if STORE_MAP:
        tl.store(loss_map_ptr + n * HW + offs_p, loss, mask=mask_p)
    if STORE_GRAD:
        grad = smoothed_ce_grad(p, onehot, counted, wy, wc, w_total, confidence, smooth_scale, SMOOTHING)
        store_tile(grad_ptr, grad, pix_offsets(n, offs_p, h, w, sg_n, sg_h, sg_w, FLAT), sg_c, offs_c, mask_c, mask_p)

    tl.store(partial_ptr + row * 2, tl.sum(loss, axis=0))
    tl.store(partial_ptr + row * 2 + 1, tl.sum(wy, axis=0))


@triton.jit
def cross_entropy_grad_kernel(
    x_ptr, y_ptr, weight_ptr, out_ptr,
    C, ignore_index, confidence, smooth_scale,
    in_h, in_w, out_h, out_w, scale_h, scale_w, inv_scale, span, lanes_b, lanes,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_h, sy_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
    ALIGN_CORNERS: tl.constexpr, REDUCE_W: tl.constexpr,
):
    """Pass 1 of the gradient w.r.t. logits read upsampled (bilinear.py): lane (a, b) of the (H, w) grid
    (REDUCE_W) or of the (h, W) grid sums weight * G over the full-resolution pixels that feed its low-resolution
    index, G recomputed from the low-resolution logits and the labels (bad labels count as ignored)."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    mask_p, a, b = adjoint_lanes(pid_p, lanes, lanes_b, BLOCK_P)
    if REDUCE_W:
        start = window_start(b, inv_scale, ALIGN_CORNERS)
    else:
        start = window_start(a, inv_scale, ALIGN_CORNERS)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = x_ptr + (n * sx_n + offs_c.to(tl.int64)[:, None] * sx_c)
    if SMOOTHING:
        wc, w_total = channel_weights(weight_ptr, offs_c, mask_c, HAS_WEIGHT)
    else:
        wc, w_total = tl.zeros((BLOCK_C,), dtype=tl.float32), 0.0  # not read
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    k = 0
    while k < span:  # not range(span): see bilinear.py
        d_h, d_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, feeds, weight = adjoint_step(
            a, b, start, k, in_h, in_w, out_h, out_w, scale_h, scale_w, mask_p, ALIGN_CORNERS, REDUCE_W)
        y = tl.load(y_ptr + (n * sy_n + d_h.to(tl.int64) * sy_h + d_w.to(tl.int64) * sy_w), mask=feeds,
                    other=ignore_index)
        counted = feeds & (y != ignore_index) & (y >= 0) & (y < C)
        x = gather_bilinear(x_base, sx_h, sx_w, h0[None, :], h1[None, :], lh0[None, :], lh1[None, :], w0[None, :],
                            w1[None, :], lw0[None, :], lw1[None, :], mask_c[:, None] & feeds[None, :])
        x = tl.where(mask_c[:, None], x, float("-inf"))
        nll, p, onehot = nll_tile(x, y, counted, offs_c)
        wy = label_weights(weight_ptr, y, counted, HAS_WEIGHT)
        grad = smoothed_ce_grad(p, onehot, counted, wy, wc, w_total, confidence, smooth_scale, SMOOTHING)
        acc += tl.where(feeds[None, :], weight[None, :] * grad, 0.0)
        k += 1
    po = n * so_n + offs_c.to(tl.int64)[:, None] * so_c + (a.to(tl.int64) * so_h + b.to(tl.int64) * so_w)[None, :]
    tl.store(out_ptr + po, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def cross_entropy_gradient(x, target, weight, ignore_index: int, label_smoothing: float, grad, geo) -> None:
    """The gradient of the loss sum w.r.t. logits x (N, C, h, w) read upsampled by ``geo``, into ``grad`` (x's
    shape): pass 1 (:func:`cross_entropy_grad_kernel`) and pass 2 of bilinear.py. ``weight``: float32 contiguous
    or None. Shared with the labelled generator loss."""
    n, c, h, w = x.shape
    first = first_pass(grad, geo)
    lanes = first_pass_launch(first)
    cross_entropy_grad_kernel[lanes.grid](
        x, target, weight, first.out,
        c, ignore_index, 1.0 - label_smoothing, label_smoothing / c,
        h, w, geo.h.full, geo.w.full, geo.h.scale, geo.w.scale, first.plan.inv_scale, first.plan.span,
        first.lanes_b, first.lanes_a * first.lanes_b,
        *x.stride(), *target.stride(), *first.out.stride(),
        HAS_WEIGHT=weight is not None, SMOOTHING=label_smoothing != 0.0, ALIGN_CORNERS=geo.align_corners,
        REDUCE_W=first.reduce_w, **lanes.meta,
    )
    second_pass(first, grad, geo)


def cross_entropy_forward(x, target, weight, ignore_index: int, *, label_smoothing: float = 0.0, store_grad: bool,
                          store_map: bool, check_labels: bool = True, size=None, align_corners: bool = False):
    """Launch the kernel over logits x (N, C, h, w) and int64 labels target (N, H, W), any layouts; (H, W) = size,
    or x's own (h, w) without a size (or with size equal to it).

    Returns (loss_sum, weight_sum, loss_map or None, gradient of loss_sum or None, bad): 0-d float32 sums, the
    (N, H, W) float32 per-pixel loss (store_map), the gradient w.r.t. x in x's dtype, shape and layout (store_grad),
    and bad = int64 [count, value of the first bad label in pixel order (0 if none)] on x's device, formed there
    without a host sync ([0, 0] without check_labels, whose kernel skips the check). With x read upsampled, the
    gradient comes from the two passes of bilinear.py (no (N, C, H, W) tensor is made).
    """
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    n, c, h, w = x.shape
    up = resampled((h, w), size)
    big_h, big_w = size if up else (h, w)
    geo = geometry((h, w), size, align_corners) if up else None
    launch = (upsampled_tile_launch if up else tile_launch)((n, c, big_h, big_w))
    rows = n * launch.blocks
    part = partials(rows, 2, x.device)
    report = bad_label_buffer(rows, x.device) if check_labels else None
    grad = torch.empty_like(x) if store_grad else None
    direct_grad = grad if not up else None
    loss_map = torch.empty((n, big_h, big_w), dtype=torch.float32, device=x.device) if store_map else None
    if weight is not None:
        weight = weight.to(device=x.device, dtype=torch.float32).contiguous()
    sg = direct_grad.stride() if direct_grad is not None else (0, 0, 0, 0)
    smoothing = label_smoothing != 0.0
    cross_entropy_kernel[launch.grid](
        x, target, weight, direct_grad, loss_map, part, report,
        c, big_w, big_h * big_w, int(ignore_index), 1.0 - label_smoothing, label_smoothing / c,
        *x.stride(), *target.stride(), *sg, launch.blocks,
        big_h, *(geo.args if up else IDENTITY_ARGS),
        FLAT=all_flat(target, direct_grad) if up else all_flat(x, target, grad), HAS_WEIGHT=weight is not None,
        STORE_GRAD=direct_grad is not None, STORE_MAP=store_map, SMOOTHING=smoothing, CHECK_LABELS=check_labels,
        UPSAMPLE=up, ALIGN_CORNERS=up and bool(align_corners),
        **launch.meta,
    )
    if up and store_grad:
        cross_entropy_gradient(x, target, weight, int(ignore_index), label_smoothing, grad, geo)
    sums = column_sums(part)  # float64: the weight sum (a pixel count without weights) is exact
    bad = bad_label_summary(report) if check_labels else no_bad_labels(x.device)
    return sums[0], sums[1], loss_map, grad, bad
