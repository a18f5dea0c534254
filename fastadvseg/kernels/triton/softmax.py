"""Channel softmax of (N, C, H, W) logits (the discriminator's input) and its fused backward.

Forward, per pixel: ``p = exp(x - max_c x) / sum_c exp(x - max_c x)``, accumulated in float32, stored in the
logits' dtype. Backward reads the saved p and the incoming gradient g once::

    grad_x = p * (g - sum_c g * p)

Bytes moved: forward reads N·C·H·W logits and writes N·C·H·W probabilities; backward reads N·C·H·W p and
N·C·H·W g and writes N·C·H·W grad_x. Every tensor is addressed through its own strides.

With a ``size`` (H, W), the forward reads (N, C, h, w) logits upsampled to it (bilinear.py) and writes the
(N, C, H, W) probabilities, the one full-resolution tensor of the loss path (the discriminator convolves it);
the backward with ``low_size`` (h, w) returns the gradient w.r.t. those logits: :func:`softmax_bwd_grad_kernel`
(pass 1) reads p and g about twice per element (adjacent lanes) and bilinear.py's pass 2 reduces its
4·N·C·H·w-byte intermediate into the N·C·h·w gradient; no full-resolution grad_x is made.
"""
import torch
import triton
import triton.language as tl

from .bilinear import IDENTITY_ARGS, adjoint_lanes, adjoint_step, first_pass, first_pass_launch, geometry, resampled, \
    second_pass, upsampled_logits_tile, upsampled_tile_launch, window_start
from .common import all_flat, load_logits_tile, pix_offsets, pixel_block, softmax_tile, store_tile, tile_launch


@triton.jit
def softmax_fwd_kernel(
    x_ptr, p_ptr,
    C, W, HW,
    sx_n, sx_c, sx_h, sx_w,
    sp_n, sp_c, sp_h, sp_w,
    H, in_h, in_w, scale_h, scale_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    UPSAMPLE: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    # UPSAMPLE: x is (N, C, in_h, in_w), read upsampled to the (H, W) of p (bilinear.py)
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)
    if UPSAMPLE:
        x, offs_c, mask_c = upsampled_logits_tile(x_ptr, n, h, w, in_h, in_w, H, W, scale_h, scale_w,
                                                  sx_n, sx_c, sx_h, sx_w, mask_p, C, BLOCK_C, ALIGN_CORNERS)
    else:
        px = pix_offsets(n, offs_p, h, w, sx_n, sx_h, sx_w, FLAT)
        x, offs_c, mask_c = load_logits_tile(x_ptr, px, sx_c, mask_p, C, BLOCK_C)
    p, lse = softmax_tile(x)
    store_tile(p_ptr, p, pix_offsets(n, offs_p, h, w, sp_n, sp_h, sp_w, FLAT), sp_c, offs_c, mask_c, mask_p)


@triton.jit
def softmax_bwd_kernel(
    p_ptr, g_ptr, dx_ptr,
    C, W, HW,
    sp_n, sp_c, sp_h, sp_w,
    sg_n, sg_c, sg_h, sg_w,
    sd_n, sd_c, sd_h, sd_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = mask_c[:, None] & mask_p[None, :]
    c64 = offs_c.to(tl.int64)[:, None]
    p_ptrs = p_ptr + (c64 * sp_c + pix_offsets(n, offs_p, h, w, sp_n, sp_h, sp_w, FLAT)[None, :])
    g_ptrs = g_ptr + (c64 * sg_c + pix_offsets(n, offs_p, h, w, sg_n, sg_h, sg_w, FLAT)[None, :])
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    dot = tl.sum(g * p, axis=0)
    dx = p * (g - dot[None, :])
    store_tile(dx_ptr, dx, pix_offsets(n, offs_p, h, w, sd_n, sd_h, sd_w, FLAT), sd_c, offs_c, mask_c, mask_p)


@triton.jit
def softmax_bwd_grad_kernel(
    p_ptr, g_ptr, out_ptr,
    C, in_h, in_w, out_h, out_w, scale_h, scale_w, inv_scale, span, lanes_b, lanes,
    sp_n, sp_c, sp_h, sp_w,
    sg_n, sg_c, sg_h, sg_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ALIGN_CORNERS: tl.constexpr, REDUCE_W: tl.constexpr,
):
    """Pass 1 of the gradient w.r.t. logits whose softmax was taken upsampled (bilinear.py): the full-resolution
    p * (g - sum_c g p) from the saved probabilities and the incoming gradient, reduced along one axis."""
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    mask_p, a, b = adjoint_lanes(pid_p, lanes, lanes_b, BLOCK_P)
    if REDUCE_W:
        start = window_start(b, inv_scale, ALIGN_CORNERS)
    else:
        start = window_start(a, inv_scale, ALIGN_CORNERS)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    c64 = offs_c.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    k = 0
    while k < span:  # not range(span): see bilinear.py
        d_h, d_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, feeds, weight = adjoint_step(
            a, b, start, k, in_h, in_w, out_h, out_w, scale_h, scale_w, mask_p, ALIGN_CORNERS, REDUCE_W)
        dh64 = d_h.to(tl.int64)[None, :]
        dw64 = d_w.to(tl.int64)[None, :]
        mask = mask_c[:, None] & feeds[None, :]
        p = tl.load(p_ptr + (n * sp_n + c64 * sp_c + dh64 * sp_h + dw64 * sp_w), mask=mask, other=0.0)
        g = tl.load(g_ptr + (n * sg_n + c64 * sg_c + dh64 * sg_h + dw64 * sg_w), mask=mask, other=0.0)
        p = p.to(tl.float32)
        g = g.to(tl.float32)
        dot = tl.sum(g * p, axis=0)
        acc += tl.where(feeds[None, :], weight[None, :] * (p * (g - dot[None, :])), 0.0)
        k += 1
    po = n * so_n + c64 * so_c + (a.to(tl.int64) * so_h + b.to(tl.int64) * so_w)[None, :]
    tl.store(out_ptr + po, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def _like_layout(x, shape):
    """An empty tensor of ``shape`` in x's dtype, channels_last where x is (and is not also contiguous)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def softmax_forward(x, size=None, align_corners: bool = False):
    """Probabilities in x's dtype (x's strides when x is dense, else contiguous). With a size = (H, W) other than
    x's (h, w): the softmax of x upsampled to (H, W), (N, C, H, W), channels_last where x is."""
    n, c, h, w = x.shape
    up = resampled((h, w), size)
    if up:
        p = _like_layout(x, (n, c, *size))
        geo = geometry((h, w), size, align_corners)
    else:
        p = torch.empty_like(x)
    big_h, big_w = p.shape[-2:]
    launch = (upsampled_tile_launch if up else tile_launch)(p.shape)
    softmax_fwd_kernel[launch.grid](
        x, p, c, big_w, big_h * big_w, *x.stride(), *p.stride(), big_h, *(geo.args if up else IDENTITY_ARGS),
        FLAT=all_flat(p) if up else all_flat(x, p), UPSAMPLE=up, ALIGN_CORNERS=up and bool(align_corners),
        **launch.meta,
    )
    return p


def softmax_backward(p, grad_p, low_size=None, align_corners: bool = False):
    """grad_x = p * (grad_p - sum_c grad_p * p), in p's dtype and layout. With a low_size = (h, w) other than p's
    (H, W): the gradient w.r.t. the (N, C, h, w) logits the softmax was taken of upsampled, the adjoint of the
    upsampling applied to grad_x (the passes of bilinear.py: no full-resolution grad_x is made), in p's dtype,
    channels_last where p is."""
    n, c, big_h, big_w = p.shape
    if not resampled((big_h, big_w), low_size):
        dx = torch.empty_like(p)
        launch = tile_launch(p.shape)
        softmax_bwd_kernel[launch.grid](
            p, grad_p, dx, c, big_w, big_h * big_w, *p.stride(), *grad_p.stride(), *dx.stride(),
            FLAT=all_flat(p, grad_p, dx), **launch.meta,
        )
        return dx
    h, w = low_size
    geo = geometry((h, w), (big_h, big_w), align_corners)
    dx = _like_layout(p, (n, c, h, w))
    first = first_pass(dx, geo)
    lanes = first_pass_launch(first)
    softmax_bwd_grad_kernel[lanes.grid](
        p, grad_p, first.out,
        c, h, w, big_h, big_w, geo.h.scale, geo.w.scale, first.plan.inv_scale, first.plan.span,
        first.lanes_b, first.lanes_a * first.lanes_b,
        *p.stride(), *grad_p.stride(), *first.out.stride(),
        ALIGN_CORNERS=geo.align_corners, REDUCE_W=first.reduce_w, **lanes.meta,
    )
    second_pass(first, dx, geo)
    return dx
