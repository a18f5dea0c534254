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
"""
import torch
import triton
import triton.language as tl

from .common import all_flat, bad_label_buffer, bad_label_summary, ce_grad, ce_tile, load_logits_tile, \
    column_sums, no_bad_labels, partials, pix_offsets, pixel_block, report_bad_labels, store_tile, tile_launch


@triton.jit
def cross_entropy_kernel(
    x_ptr, y_ptr, weight_ptr, grad_ptr, loss_map_ptr, partial_ptr, bad_ptr,
    C, W, HW, ignore_index, confidence, smooth_scale,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_h, sy_w,
    sg_n, sg_c, sg_h, sg_w,
    num_pblocks,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr,
    SMOOTHING: tl.constexpr, CHECK_LABELS: tl.constexpr,
):
    # confidence = 1 - eps and smooth_scale = eps / C are read only when SMOOTHING
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)
    row = n * num_pblocks + pid_p

    y = tl.load(y_ptr + pix_offsets(n, offs_p, h, w, sy_n, sy_h, sy_w, FLAT), mask=mask_p, other=ignore_index)
    counted = mask_p & (y != ignore_index) & (y >= 0) & (y < C)
    if CHECK_LABELS:
        report_bad_labels(bad_ptr, row, y, n * HW + offs_p, mask_p, ignore_index, C)

    px = pix_offsets(n, offs_p, h, w, sx_n, sx_h, sx_w, FLAT)
    x, offs_c, mask_c = load_logits_tile(x_ptr, px, sx_c, mask_p, C, BLOCK_C)
    nll, p, onehot, lse = ce_tile(x, y, counted, offs_c)
    if HAS_WEIGHT:
        wy = tl.load(weight_ptr + tl.where(counted, y, 0), mask=counted, other=0.0).to(tl.float32)
    else:
        wy = tl.where(counted, 1.0, 0.0)

    if SMOOTHING:
        if HAS_WEIGHT:
            wc = tl.load(weight_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        else:
            wc = tl.where(mask_c, 1.0, 0.0)
        w_total = tl.sum(wc, axis=0)
        # -log p[c] = lse - x[c]; padded channels (x = -inf) are selected out before the weighting (no 0 * inf)
        neg_logp = tl.where(mask_c[:, None], lse[None, :] - x, 0.0)
        smooth = tl.sum(wc[:, None] * neg_logp, axis=0)
        loss = tl.where(counted, confidence * wy * nll + smooth_scale * smooth, 0.0)
    else:
        loss = tl.where(counted, nll * wy, 0.0)

    if STORE_MAP:
        tl.store(loss_map_ptr + n * HW + offs_p, loss, mask=mask_p)
    if STORE_GRAD:
        if SMOOTHING:
            g = confidence * wy[None, :] * (p - tl.where(onehot, 1.0, 0.0)) \
                + smooth_scale * (w_total * p - wc[:, None])
            grad = tl.where(counted[None, :], g, 0.0)
        else:
            grad = ce_grad(p, onehot, counted) * wy[None, :]
        store_tile(grad_ptr, grad, pix_offsets(n, offs_p, h, w, sg_n, sg_h, sg_w, FLAT), sg_c, offs_c, mask_c, mask_p)

    tl.store(partial_ptr + row * 2, tl.sum(loss, axis=0))
    tl.store(partial_ptr + row * 2 + 1, tl.sum(wy, axis=0))


def cross_entropy_forward(x, target, weight, ignore_index: int, *, label_smoothing: float = 0.0, store_grad: bool,
                          store_map: bool, check_labels: bool = True):
    """Launch the kernel over logits x (N, C, H, W) and int64 labels target (N, H, W), any layouts.

    Returns (loss_sum, weight_sum, loss_map or None, gradient of loss_sum or None, bad): 0-d float32 sums, the
    (N, H, W) float32 per-pixel loss (store_map), the gradient in x's dtype and layout (store_grad), and bad =
    int64 [count, value of the first bad label in pixel order (0 if none)] on x's device, formed there without a
    host sync ([0, 0] without check_labels, whose kernel skips the check).
    """
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    n, c, h, w = x.shape
    launch = tile_launch(x.shape)
    rows = n * launch.blocks
    part = partials(rows, 2, x.device)
    report = bad_label_buffer(rows, x.device) if check_labels else None
    grad = torch.empty_like(x) if store_grad else None
    loss_map = torch.empty((n, h, w), dtype=torch.float32, device=x.device) if store_map else None
    if weight is not None:
        weight = weight.to(device=x.device, dtype=torch.float32).contiguous()
    sg = grad.stride() if store_grad else (0, 0, 0, 0)
    cross_entropy_kernel[launch.grid](
        x, target, weight, grad, loss_map, part, report,
        c, w, h * w, int(ignore_index), 1.0 - label_smoothing, label_smoothing / c,
        *x.stride(), *target.stride(), *sg, launch.blocks,
        FLAT=all_flat(x, target, grad), HAS_WEIGHT=weight is not None, STORE_GRAD=store_grad, STORE_MAP=store_map,
        SMOOTHING=label_smoothing != 0.0, CHECK_LABELS=check_labels,
        **launch.meta,
    )
    sums = column_sums(part)  # float64: the weight sum (a pixel count without weights) is exact
    bad = bad_label_summary(report) if check_labels else no_bad_labels(x.device)
    return sums[0], sums[1], loss_map, grad, bad
