"""Binary cross-entropy with logits over discriminator maps, value and gradient in one pass.

Per pixel of an (N, H, W) map z (any strides, any float dtype) with target t (a constant, or a float map of any
strides and dtype), counted unless ``ignore_mask`` is True::

    bce  = (1 - t) * z + softplus(-z),  softplus(-z) = max(-z, 0) + log1p(exp(-|z|))  (stable; by hand)
    G    = sigmoid(z) - t                              (gradient of the unnormalised sum; 0 where ignored)

One (loss_sum, count) row per program; the autograd layer sums them with torch and scales G in backward.

Bytes moved: reads N·H·W z (+ N·H·W target, + N·H·W mask bytes), writes N·H·W gradient (+ N·H·W float32 loss map
for reduction="none").
"""
import torch
import triton
import triton.language as tl

from .common import bce_logits, column_sums, flat_pixels, map_arg, map_block, map_offsets, maps_flat, partials, \
    sigmoid


@triton.jit
def bce_block(
    pid, d_ptr, t_ptr, t_value, m_ptr, g_ptr, map_ptr,
    W, HW, NHW,
    sd_n, sd_h, sd_w, st_n, st_h, st_w, sm_n, sm_h, sm_w, sg_n, sg_h, sg_w,
    BLOCK: tl.constexpr, FLAT: tl.constexpr, T_TENSOR: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr,
):
    """BCE over one block of a map; stores the gradient / loss map if asked; returns (loss sum, count)."""
    offs, inb, n, h, w = flat_pixels(pid, NHW, HW, W, BLOCK)
    z = tl.load(d_ptr + map_offsets(offs, n, h, w, sd_n, sd_h, sd_w, FLAT), mask=inb, other=0.0).to(tl.float32)
    if T_TENSOR:
        t = tl.load(t_ptr + map_offsets(offs, n, h, w, st_n, st_h, st_w, FLAT), mask=inb, other=0.0).to(tl.float32)
    else:
        t = t_value
    counted = inb
    if HAS_MASK:
        ignored = tl.load(m_ptr + map_offsets(offs, n, h, w, sm_n, sm_h, sm_w, FLAT), mask=inb, other=1)
        counted = counted & (ignored == 0)
    loss = tl.where(counted, bce_logits(z, t), 0.0)
    if STORE_MAP:
        tl.store(map_ptr + offs, loss, mask=inb)
    if STORE_GRAD:
        grad = tl.where(counted, sigmoid(z) - t, 0.0)
        g_ptrs = g_ptr + map_offsets(offs, n, h, w, sg_n, sg_h, sg_w, FLAT)
        tl.store(g_ptrs, grad.to(g_ptr.dtype.element_ty), mask=inb)
    return tl.sum(loss, axis=0), tl.sum(counted.to(tl.float32), axis=0)


@triton.jit
def bce_kernel(
    d_ptr, t_ptr, t_value, m_ptr, g_ptr, map_ptr, partial_ptr,
    W, HW, NHW,
    sd_n, sd_h, sd_w, st_n, st_h, st_w, sm_n, sm_h, sm_w, sg_n, sg_h, sg_w,
    BLOCK: tl.constexpr, FLAT: tl.constexpr, T_TENSOR: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr,
):
    pid = tl.program_id(0)
    loss, count = bce_block(pid, d_ptr, t_ptr, t_value, m_ptr, g_ptr, map_ptr, W, HW, NHW,
                            sd_n, sd_h, sd_w, st_n, st_h, st_w, sm_n, sm_h, sm_w, sg_n, sg_h, sg_w,
                            BLOCK, FLAT, T_TENSOR, HAS_MASK, STORE_GRAD, STORE_MAP)
    tl.store(partial_ptr + pid * 2, loss)
    tl.store(partial_ptr + pid * 2 + 1, count)


def bce_forward(d, target, ignore_mask, *, store_grad: bool, store_map: bool):
    """d: (N, H, W) view. Returns (loss_sum, count, loss_map or None, gradient of the sum or None)."""
    n, h, w = d.shape
    nhw = d.numel()
    block, num_warps = map_block(nhw)
    blocks = triton.cdiv(nhw, block)
    part = partials(blocks, 2, d.device)
    grad = torch.empty_like(d) if store_grad else None
    loss_map = torch.empty((n, h, w), dtype=torch.float32, device=d.device) if store_map else None
    t_tensor = isinstance(target, torch.Tensor)
    if t_tensor and target.dim() == 0:
        target = target.expand(d.shape)  # stride 0: read in place, no copy
    t, *st = map_arg(target if t_tensor else None)
    m, *sm = map_arg(ignore_mask)
    sg = grad.stride() if store_grad else (0, 0, 0)
    bce_kernel[(blocks,)](
        d, t, 0.0 if t_tensor else float(target), m, grad, loss_map, part,
        w, h * w, nhw, *d.stride(), *st, *sm, *sg,
        BLOCK=block, FLAT=maps_flat(d, t, m, grad), T_TENSOR=t_tensor, HAS_MASK=ignore_mask is not None,
        STORE_GRAD=store_grad, STORE_MAP=store_map, num_warps=num_warps,
    )
    sums = column_sums(part)  # float64: exact count
    return sums[0], sums[1], loss_map, grad
