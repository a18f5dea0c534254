"""Channel softmax of (N, C, H, W) logits (the discriminator's input) and its fused backward.

Forward, per pixel: ``p = exp(x - max_c x) / sum_c exp(x - max_c x)``, accumulated in float32, stored in the
logits' dtype. Backward reads the saved p and the incoming gradient g once::

    grad_x = p * (g - sum_c g * p)

Bytes moved: forward reads N·C·H·W logits and writes N·C·H·W probabilities; backward reads N·C·H·W p and
N·C·H·W g and writes N·C·H·W grad_x. Every tensor is addressed through its own strides.
"""
import torch
import triton
import triton.language as tl

from .common import all_flat, load_logits_tile, pix_offsets, pixel_block, softmax_tile, store_tile, tile_launch


@triton.jit
def softmax_fwd_kernel(
    x_ptr, p_ptr,
    C, W, HW,
    sx_n, sx_c, sx_h, sx_w,
    sp_n, sp_c, sp_h, sp_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)
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


def softmax_forward(x):
    """Probabilities in x's dtype (x's strides when x is dense, else contiguous)."""
    n, c, h, w = x.shape
    p = torch.empty_like(x)
    launch = tile_launch(x.shape)
    softmax_fwd_kernel[launch.grid](x, p, c, w, h * w, *x.stride(), *p.stride(), FLAT=all_flat(x, p), **launch.meta)
    return p


def softmax_backward(p, grad_p):
    """grad_x = p * (grad_p - sum_c grad_p * p), in p's dtype and layout."""
    n, c, h, w = p.shape
    dx = torch.empty_like(p)
    launch = tile_launch(p.shape)
    softmax_bwd_kernel[launch.grid](
        p, grad_p, dx, c, w, h * w, *p.stride(), *grad_p.stride(), *dx.stride(),
        FLAT=all_flat(p, grad_p, dx), **launch.meta,
    )
    return dx
