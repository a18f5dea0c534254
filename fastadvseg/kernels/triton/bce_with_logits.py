"""Binary cross-entropy with logits over discriminator maps, value and gradient in one pass.

Per pixel of an (N, H, W) map z (any strides, any float dtype) with target t (a constant, or a float map of any
strides and dtype), counted unless ``ignore_mask`` is True::

    bce  = (1 - t) * z + softplus(-z),  softplus(-z) = max(-z, 0) + log1p(exp(-|z|))  (stable; by hand)
    G    = sigmoid(z) - t                              (gradient of the unnormalised sum; 0 where ignored)

One (loss_sum, count) row per program; the autograd layer sums them with torch and scales G in backward.

Bytes moved: reads N·H·W z (+ N·H·W target, + N·H·W mask bytes), writes N·H·W gradient (+ N·H·W float32 loss map
for reduction="none").

With a ``size`` (H, W) other than z's (h, w) (UPSAMPLE), z is read upsampled to it (bilinear.py); target, mask and
loss map are at (H, W), the count is of (H, W) pixels, and the gradient w.r.t. the (N, h, w) map comes from
:func:`map_grad_kernel` (pass 1; also the discriminator and generator losses') and bilinear.py's pass 2. Bytes
moved: N·h·w z (gathers hit cache), the full-resolution target and mask once by the forward and about twice by
pass 1, a 4·N·H·w-byte intermediate written and read, the N·h·w gradient.
"""
import torch
import triton
import triton.language as tl

from .bilinear import IDENTITY_ARGS, adjoint_lanes, adjoint_step, first_pass, first_pass_map_block, gather_bilinear, \
    geometry, resampled, second_pass, upsampled_map, upsampled_map_block, window_start
from .common import bce_logits, column_sums, flat_pixels, map_arg, map_block, map_offsets, maps_flat, partials, \
    sigmoid


@triton.jit
def bce_block(
    pid, d_ptr, t_ptr, t_value, m_ptr, g_ptr, map_ptr,
    W, HW, NHW,
    sd_n, sd_h, sd_w, st_n, st_h, st_w, sm_n, sm_h, sm_w, sg_n, sg_h, sg_w,
    H, in_h, in_w, scale_h, scale_w,
    BLOCK: tl.constexpr, FLAT: tl.constexpr, T_TENSOR: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr, UPSAMPLE: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    """BCE over one block of a map; stores the gradient / loss map if asked; returns (loss sum, count).
    UPSAMPLE: z is (N, in_h, in_w), read upsampled to (H, W) (bilinear.py); its gradient comes from
    map_grad_kernel."""
    offs, inb, n, h, w = flat_pixels(pid, NHW, HW, W, BLOCK)
    if UPSAMPLE:
        z = upsampled_map(d_ptr, n, h.to(tl.int32), w.to(tl.int32), in_h, in_w, H, W, scale_h, scale_w,
                          sd_n, sd_h, sd_w, inb, ALIGN_CORNERS)
    else:
        z = tl.load(d_ptr + map_offsets(offs, n, h, w, sd_n, sd_h, sd_w, FLAT), mask=inb, other=0.0)
        z = z.to(tl.float32)
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
    H, in_h, in_w, scale_h, scale_w,
    BLOCK: tl.constexpr, FLAT: tl.constexpr, T_TENSOR: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr, UPSAMPLE: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    pid = tl.program_id(0)
    loss, count = bce_block(pid, d_ptr, t_ptr, t_value, m_ptr, g_ptr, map_ptr, W, HW, NHW,
                            sd_n, sd_h, sd_w, st_n, st_h, st_w, sm_n, sm_h, sm_w, sg_n, sg_h, sg_w,
                            H, in_h, in_w, scale_h, scale_w,
                            BLOCK, FLAT, T_TENSOR, HAS_MASK, STORE_GRAD, STORE_MAP, UPSAMPLE, ALIGN_CORNERS)
    tl.store(partial_ptr + pid * 2, loss)
    tl.store(partial_ptr + pid * 2 + 1, count)


@triton.jit
def map_grad_kernel(
    d_ptr, t_ptr, t_value, m_ptr, y_ptr, out_ptr,
    ignore_index, C,
    in_h, in_w, out_h, out_w, scale_h, scale_w, inv_scale, span, lanes_b, lanes,
    sd_n, sd_h, sd_w, st_n, st_h, st_w, sm_n, sm_h, sm_w, sy_n, sy_h, sy_w, so_n, so_h, so_w,
    BLOCK: tl.constexpr, T_TENSOR: tl.constexpr, HAS_MASK: tl.constexpr, LABELLED: tl.constexpr,
    ADVERSARIAL: tl.constexpr, ALIGN_CORNERS: tl.constexpr, REDUCE_W: tl.constexpr,
):
    """Pass 1 of the gradient w.r.t. a map z read upsampled (bilinear.py): G = sigmoid(z) - t (ADVERSARIAL: the
    generator's -sigmoid(-z), t = 1) at counted pixels (not ignored by the mask; LABELLED: a valid label), z
    recomputed per full-resolution pixel from the low-resolution map."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    mask_p, a, b = adjoint_lanes(pid_p, lanes, lanes_b, BLOCK)
    if REDUCE_W:
        start = window_start(b, inv_scale, ALIGN_CORNERS)
    else:
        start = window_start(a, inv_scale, ALIGN_CORNERS)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    k = 0
    while k < span:  # not range(span): see bilinear.py
        d_h, d_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, feeds, weight = adjoint_step(
            a, b, start, k, in_h, in_w, out_h, out_w, scale_h, scale_w, mask_p, ALIGN_CORNERS, REDUCE_W)
        dh64 = d_h.to(tl.int64)
        dw64 = d_w.to(tl.int64)
        counted = feeds
        if HAS_MASK:
            ignored = tl.load(m_ptr + (n * sm_n + dh64 * sm_h + dw64 * sm_w), mask=feeds, other=1)
            counted = counted & (ignored == 0)
        if LABELLED:
            y = tl.load(y_ptr + (n * sy_n + dh64 * sy_h + dw64 * sy_w), mask=feeds, other=ignore_index)
            counted = counted & (y != ignore_index) & (y >= 0) & (y < C)
        z = gather_bilinear(d_ptr + n * sd_n, sd_h, sd_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, feeds)
        if ADVERSARIAL:
            g = -sigmoid(-z)
        else:
            if T_TENSOR:
                t = tl.load(t_ptr + (n * st_n + dh64 * st_h + dw64 * st_w), mask=feeds, other=0.0).to(tl.float32)
            else:
                t = t_value
            g = sigmoid(z) - t
        acc += tl.where(feeds, weight * tl.where(counted, g, 0.0), 0.0)
        k += 1
    po = n * so_n + a.to(tl.int64) * so_h + b.to(tl.int64) * so_w
    tl.store(out_ptr + po, acc.to(out_ptr.dtype.element_ty), mask=mask_p)


def map_gradient(d, grad, geo, *, target=0.0, ignore_mask=None, labels=None, ignore_index: int = 0,
                 num_classes: int = 0, adversarial: bool = False) -> None:
    """The gradient of a BCE sum w.r.t. a map d (N, h, w) read upsampled by ``geo``, into ``grad`` (d's shape):
    pass 1 (:func:`map_grad_kernel`) and pass 2 of bilinear.py. ``target``: a float or a full-resolution map;
    pixels count unless ``ignore_mask`` says so and, with ``labels`` (the labelled generator loss), where the
    label is valid; ``adversarial``: the generator's form of the gradient."""
    g4 = grad.unsqueeze(1)
    first = first_pass(g4, geo)
    lanes = first.lanes_a * first.lanes_b
    block, num_warps = first_pass_map_block(first)
    t_tensor = isinstance(target, torch.Tensor)
    if t_tensor and target.dim() == 0:
        target = target.expand((d.shape[0], geo.h.full, geo.w.full))
    t, *st = map_arg(target if t_tensor else None)
    m, *sm = map_arg(ignore_mask)
    y, *sy = map_arg(labels)
    so = first.out.stride()
    map_grad_kernel[(triton.cdiv(lanes, block), d.shape[0])](
        d, t, 0.0 if t_tensor else float(target), m, y, first.out,
        ignore_index, num_classes,
        d.shape[1], d.shape[2], geo.h.full, geo.w.full, geo.h.scale, geo.w.scale, first.plan.inv_scale,
        first.plan.span, first.lanes_b, lanes,
        *d.stride(), *st, *sm, *sy, so[0], so[2], so[3],
        BLOCK=block, T_TENSOR=t_tensor, HAS_MASK=ignore_mask is not None, LABELLED=labels is not None,
        ADVERSARIAL=adversarial, ALIGN_CORNERS=geo.align_corners, REDUCE_W=first.reduce_w, num_warps=num_warps,
    )
    second_pass(first, g4, geo)


def bce_forward(d, target, ignore_mask, *, store_grad: bool, store_map: bool, size=None, align_corners: bool = False):
    """d: (N, h, w) view, read upsampled to size = (H, W) where its size differs; target and ignore_mask at (H, W).
    Returns (loss_sum, count, loss_map (N, H, W) or None, gradient of the sum w.r.t. d or None)."""
    n, h, w = d.shape
    up = resampled((h, w), size)
    big_h, big_w = size if up else (h, w)
    geo = geometry((h, w), size, align_corners) if up else None
    nhw = n * big_h * big_w
    block, num_warps = (upsampled_map_block if up else map_block)(nhw)
    blocks = triton.cdiv(nhw, block)
    part = partials(blocks, 2, d.device)
    grad = torch.empty_like(d) if store_grad else None
    direct_grad = None if up else grad
    loss_map = torch.empty((n, big_h, big_w), dtype=torch.float32, device=d.device) if store_map else None
    t_tensor = isinstance(target, torch.Tensor)
    if t_tensor and target.dim() == 0:
        target = target.expand((n, big_h, big_w))  # stride 0: read in place, no copy
    t, *st = map_arg(target if t_tensor else None)
    m, *sm = map_arg(ignore_mask)
    sg = direct_grad.stride() if direct_grad is not None else (0, 0, 0)
    bce_kernel[(blocks,)](
        d, t, 0.0 if t_tensor else float(target), m, direct_grad, loss_map, part,
        big_w, big_h * big_w, nhw, *d.stride(), *st, *sm, *sg,
        big_h, *(geo.args if up else IDENTITY_ARGS),
        BLOCK=block, FLAT=maps_flat(None if up else d, t, m, direct_grad), T_TENSOR=t_tensor,
        HAS_MASK=ignore_mask is not None, STORE_GRAD=direct_grad is not None, STORE_MAP=store_map, UPSAMPLE=up,
        ALIGN_CORNERS=up and bool(align_corners), num_warps=num_warps,
    )
    if up and store_grad:
        map_gradient(d, grad, geo, target=target if t_tensor else float(target), ignore_mask=ignore_mask)
    sums = column_sums(part)  # float64: exact count
    return sums[0], sums[1], loss_map, grad
