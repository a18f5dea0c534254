"""Fused 2-D cross-entropy: loss and logits gradient in one pass over the logits.

Per pixel (n, h, w) with label y counted (y != ignore_index and 0 <= y < C; anything else is ignored and never
used as an index)::

    nll   = logsumexp_c(x) - x[y]                 loss_sum += w[y] * nll      weight_sum += w[y]
    G[c]  = w[y] * (softmax(x)[c] - [c == y])     (gradient of the unnormalised sum; 0 at ignored pixels)

w[y] = 1 without class weights. The kernel writes G into its own buffer (never into the logits, which may feed
another loss) and one (loss_sum, weight_sum) row per program; the autograd layer sums the rows with torch
(deterministic, no atomics) and scales G in backward by grad_output / weight_sum ("mean"), grad_output ("sum") or
the incoming (N, H, W) map ("none"). Ignored pixels are selected out with ``tl.where``, so a NaN/Inf logit there
never reaches the loss, while one at a counted pixel propagates.

Bytes moved (fwd + stored gradient): reads N·C·H·W logits + N·H·W labels (+ C weights), writes N·C·H·W gradient
(+ N·H·W float32 loss map for reduction="none"). Without a needed gradient (STORE_GRAD off) only the reads.
"""
import torch
import triton
import triton.language as tl

from .common import all_flat, ce_grad, load_logits_tile, nll_tile, partials, pix_offsets, pixel_block, \
    store_tile, tile_launch


@triton.jit
def cross_entropy_kernel(
    x_ptr, y_ptr, weight_ptr, grad_ptr, loss_map_ptr, partial_ptr,
    C, W, HW, ignore_index,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_h, sy_w,
    sg_n, sg_c, sg_h, sg_w,
    num_pblocks,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)

    y = tl.load(y_ptr + pix_offsets(n, offs_p, h, w, sy_n, sy_h, sy_w, FLAT), mask=mask_p, other=ignore_index)
    counted = mask_p & (y != ignore_index) & (y >= 0) & (y < C)

    px = pix_offsets(n, offs_p, h, w, sx_n, sx_h, sx_w, FLAT)
    x, offs_c, mask_c = load_logits_tile(x_ptr, px, sx_c, mask_p, C, BLOCK_C)
    nll, p, onehot = nll_tile(x, y, counted, offs_c)
    if HAS_WEIGHT:
        wy = tl.load(weight_ptr + tl.where(counted, y, 0), mask=counted, other=0.0).to(tl.float32)
    else:
        wy = tl.where(counted, 1.0, 0.0)
    loss = tl.where(counted, nll * wy, 0.0)

    if STORE_MAP:
        tl.store(loss_map_ptr + n * HW + offs_p, loss, mask=mask_p)
    if STORE_GRAD:
        grad = ce_grad(p, onehot, counted) * wy[None, :]
        store_tile(grad_ptr, grad, pix_offsets(n, offs_p, h, w, sg_n, sg_h, sg_w, FLAT), sg_c, offs_c, mask_c, mask_p)

    row = (n * num_pblocks + pid_p) * 2
    tl.store(partial_ptr + row, tl.sum(loss, axis=0))
    tl.store(partial_ptr + row + 1, tl.sum(wy, axis=0))


def cross_entropy_forward(x, target, weight, ignore_index: int, *, store_grad: bool, store_map: bool):
    """Launch the kernel. Returns (loss_sum, weight_sum, loss_map or None, gradient of the sum or None)."""
    n, c, h, w = x.shape
    launch = tile_launch(x.shape)
    part = partials(n * launch.blocks, 2, x.device)
    grad = torch.empty_like(x) if store_grad else None
    loss_map = torch.empty((n, h, w), dtype=torch.float32, device=x.device) if store_map else None
    if weight is not None:
        weight = weight.to(device=x.device, dtype=torch.float32).contiguous()
    sg = grad.stride() if store_grad else (0, 0, 0, 0)
    cross_entropy_kernel[launch.grid](
        x, target, weight, grad, loss_map, part,
        c, w, h * w, ignore_index,
        *x.stride(), *target.stride(), *sg, launch.blocks,
        FLAT=all_flat(x, target, grad), HAS_WEIGHT=weight is not None, STORE_GRAD=store_grad, STORE_MAP=store_map,
        **launch.meta,
    )
    sums = part.sum(dim=0)
    return sums[0], sums[1], loss_map, grad
