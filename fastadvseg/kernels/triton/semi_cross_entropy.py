"""The masked self-training loss L_semi, its kept fraction and its logits gradient in one pass.

Per pixel with discriminator logit z (an (N, H, W) map of any strides and float dtype) and logits x::

    pseudo = argmax_c x                  (first maximum on ties, like torch.argmax)
    keep   = float32(z) > logit(T)  and not ignore_mask   (sigmoid(z) > T decided exactly: fastadvseg/_keep.py)
    nll    = logsumexp_c(x) - x[pseudo]  at kept pixels, 0 elsewhere
    G[c]   = softmax(x)[c] - [c == pseudo]   at kept pixels (gradient of the unnormalised sum), 0 elsewhere

logit(T) is computed once per call on the host (:func:`fastadvseg._keep.keep_logit`: a float32, -inf for
T = 0); a NaN z is never kept. One (loss_sum, kept, considered) row per program (considered = non-ignored pixels),
the rows summed in float64 (exact counts); the kept fraction is kept / considered. z and the pseudo-label are
constants: no gradient flows to d_logits.

Bytes moved: reads N·C·H·W logits + N·H·W z (+ N·H·W mask bytes), writes N·C·H·W gradient (+ N·H·W float32 loss
map for reduction="none").

With a ``size`` (H, W), logits (N, C, h, w) and z (N, hd, wd) are each read upsampled to it where their size differs
(UP_X, UP_Z; bilinear.py): the keep mask is that of the upsampled float32 z, the mask and the loss map are at
(H, W), the counts are of (H, W) pixels, and the gradient w.r.t. upsampled logits comes from
:func:`semi_grad_kernel` and bilinear.py's pass 2. Bytes moved: the low-resolution inputs once (gathers hit
cache), the full-resolution mask once by the forward and about twice by pass 1, plus the intermediate of
bilinear.py (4·N·C·H·w bytes written and read).
"""
import torch
import triton
import triton.language as tl

from ..._keep import keep_logit as _keep_logit
from .bilinear import IDENTITY_ARGS, adjoint_lanes, adjoint_step, first_pass, first_pass_launch, gather_bilinear, \
    geometry, map_at, resampled, second_pass, upsampled_logits_tile, upsampled_map, upsampled_tile_launch, window_start
from .common import all_flat, ce_grad, column_sums, first_argmax, load_logits_tile, map_arg, nll_tile, partials, \
    pix_offsets, pixel_block, store_tile, tile_launch


@triton.jit
def confident(z, considered, keep_logit):
    """The discriminator's confidence mask at considered pixels: z > logit(T) (float32 z; keep_logit from
    :func:`fastadvseg._keep.keep_logit`), i.e. sigmoid(z) > T exactly; a NaN z is never kept."""
    return considered & (z > keep_logit)


@triton.jit
def semi_kernel(
    x_ptr, d_ptr, m_ptr, grad_ptr, loss_map_ptr, partial_ptr,
    C, W, HW, keep_logit,
    sx_n, sx_c, sx_h, sx_w,
    sd_n, sd_h, sd_w,
    sm_n, sm_h, sm_w,
    sg_n, sg_c, sg_h, sg_w,
    num_pblocks,
    H, in_h, in_w, scale_h, scale_w, zin_h, zin_w, zscale_h, zscale_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    HAS_MASK: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr,
    UP_X: tl.constexpr, UP_Z: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    # UP_X / UP_Z: x is (N, C, in_h, in_w) / z is (N, zin_h, zin_w), read upsampled to (H, W) (bilinear.py); the
    # gradient of an upsampled x comes from semi_grad_kernel
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)

    considered = mask_p
    if HAS_MASK:
        ignored = tl.load(m_ptr + pix_offsets(n, offs_p, h, w, sm_n, sm_h, sm_w, FLAT), mask=mask_p, other=1)
        considered = considered & (ignored == 0)
    if UP_Z:
        z = upsampled_map(d_ptr, n, h, w, zin_h, zin_w, H, W, zscale_h, zscale_w, sd_n, sd_h, sd_w, mask_p,
                          ALIGN_CORNERS)
    else:
        z = tl.load(d_ptr + pix_offsets(n, offs_p, h, w, sd_n, sd_h, sd_w, FLAT), mask=mask_p, other=0.0)
        z = z.to(tl.float32)
    keep = confident(z, considered, keep_logit)

    if UP_X:
        x, offs_c, mask_c = upsampled_logits_tile(x_ptr, n, h, w, in_h, in_w, H, W, scale_h, scale_w,
                                                  sx_n, sx_c, sx_h, sx_w, mask_p, C, BLOCK_C, ALIGN_CORNERS)
    else:
        px = pix_offsets(n, offs_p, h, w, sx_n, sx_h, sx_w, FLAT)
        x, offs_c, mask_c = load_logits_tile(x_ptr, px, sx_c, mask_p, C, BLOCK_C)
    pseudo = first_argmax(x, offs_c, BLOCK_C)
    nll, p, onehot = nll_tile(x, pseudo, keep, offs_c)

    if STORE_MAP:
        tl.store(loss_map_ptr + n * HW + offs_p, nll, mask=mask_p)
    if STORE_GRAD:
        pg = pix_offsets(n, offs_p, h, w, sg_n, sg_h, sg_w, FLAT)
        store_tile(grad_ptr, ce_grad(p, onehot, keep), pg, sg_c, offs_c, mask_c, mask_p)

    row = (n * num_pblocks + pid_p) * 3
    tl.store(partial_ptr + row, tl.sum(nll, axis=0))
    tl.store(partial_ptr + row + 1, tl.sum(keep.to(tl.float32), axis=0))
    tl.store(partial_ptr + row + 2, tl.sum(considered.to(tl.float32), axis=0))


@triton.jit
def semi_grad_kernel(
    x_ptr, d_ptr, m_ptr, out_ptr,
    C, keep_logit,
    in_h, in_w, out_h, out_w, scale_h, scale_w, inv_scale, span, lanes_b, lanes,
    zin_h, zin_w, zscale_h, zscale_w,
    sx_n, sx_c, sx_h, sx_w,
    sd_n, sd_h, sd_w,
    sm_n, sm_h, sm_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, HAS_MASK: tl.constexpr, UP_Z: tl.constexpr,
    ALIGN_CORNERS: tl.constexpr, REDUCE_W: tl.constexpr,
):
    """Pass 1 of the gradient w.r.t. logits read upsampled (bilinear.py), L_semi's G = softmax - onehot(argmax) at
    kept pixels, recomputed per full-resolution pixel from the low-resolution logits and z (upsampled with its own
    geometry under UP_Z, else read at full resolution). Also the unlabelled generator loss's (no mask)."""
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
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    k = 0
    while k < span:  # not range(span): see bilinear.py
        d_h, d_w, h0, h1, lh0, lh1, w0, w1, lw0, lw1, feeds, weight = adjoint_step(
            a, b, start, k, in_h, in_w, out_h, out_w, scale_h, scale_w, mask_p, ALIGN_CORNERS, REDUCE_W)
        considered = feeds
        if HAS_MASK:
            ignored = tl.load(m_ptr + (n * sm_n + d_h.to(tl.int64) * sm_h + d_w.to(tl.int64) * sm_w), mask=feeds,
                              other=1)
            considered = considered & (ignored == 0)
        z = map_at(d_ptr, n, d_h, d_w, zin_h, zin_w, out_h, out_w, zscale_h, zscale_w, sd_n, sd_h, sd_w, feeds,
                   UP_Z, ALIGN_CORNERS)
        keep = confident(z, considered, keep_logit)
        x = gather_bilinear(x_base, sx_h, sx_w, h0[None, :], h1[None, :], lh0[None, :], lh1[None, :], w0[None, :],
                            w1[None, :], lw0[None, :], lw1[None, :], mask_c[:, None] & feeds[None, :])
        x = tl.where(mask_c[:, None], x, float("-inf"))
        pseudo = first_argmax(x, offs_c, BLOCK_C)
        nll, p, onehot = nll_tile(x, pseudo, keep, offs_c)
        acc += tl.where(feeds[None, :], weight[None, :] * ce_grad(p, onehot, keep), 0.0)
        k += 1
    po = n * so_n + offs_c.to(tl.int64)[:, None] * so_c + (a.to(tl.int64) * so_h + b.to(tl.int64) * so_w)[None, :]
    tl.store(out_ptr + po, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


def semi_gradient(x, d, ignore_mask, keep_logit: float, grad, geo, zgeo, up_z: bool) -> None:
    """The gradient of the L_semi sum w.r.t. logits x (N, C, h, w) read upsampled by ``geo``, into ``grad``; z is
    read upsampled by ``zgeo`` (up_z) or at full resolution. Shared with the unlabelled generator loss."""
    n, c, h, w = x.shape
    first = first_pass(grad, geo)
    lanes = first_pass_launch(first)
    m, *sm = map_arg(ignore_mask)
    semi_grad_kernel[lanes.grid](
        x, d, m, first.out,
        c, keep_logit,
        h, w, geo.h.full, geo.w.full, geo.h.scale, geo.w.scale, first.plan.inv_scale, first.plan.span,
        first.lanes_b, first.lanes_a * first.lanes_b,
        *(zgeo.args if up_z else IDENTITY_ARGS),
        *x.stride(), *d.stride(), *sm, *first.out.stride(),
        HAS_MASK=ignore_mask is not None, UP_Z=up_z, ALIGN_CORNERS=geo.align_corners, REDUCE_W=first.reduce_w,
        **lanes.meta,
    )
    second_pass(first, grad, geo)


def semi_forward(x, d, threshold: float, ignore_mask, *, store_grad: bool, store_map: bool, size=None,
                 align_corners: bool = False):
    """x: (N, C, h, w), d: (N, hd, wd) view, each read upsampled to size = (H, W) where its size differs (without a
    size all are at x's size). Returns (loss_sum, kept, considered, loss_map (N, H, W) or None, gradient w.r.t. x
    or None)."""
    n, c, h, w = x.shape
    big_h, big_w = size if size is not None else (h, w)
    up_x, up_z = resampled((h, w), size), resampled(d.shape[-2:], size)
    geo = geometry((h, w), size, align_corners) if up_x else None
    zgeo = geometry(d.shape[-2:], size, align_corners) if up_z else None
    launch = (upsampled_tile_launch if up_x else tile_launch)((n, c, big_h, big_w))
    part = partials(n * launch.blocks, 3, x.device)
    grad = torch.empty_like(x) if store_grad else None
    direct_grad = None if up_x else grad
    loss_map = torch.empty((n, big_h, big_w), dtype=torch.float32, device=x.device) if store_map else None
    m, *sm = map_arg(ignore_mask)
    sg = direct_grad.stride() if direct_grad is not None else (0, 0, 0, 0)
    keep_logit = _keep_logit(threshold)
    semi_kernel[launch.grid](
        x, d, m, direct_grad, loss_map, part,
        c, big_w, big_h * big_w, keep_logit,
        *x.stride(), *d.stride(), *sm, *sg, launch.blocks,
        big_h, *(geo.args if up_x else IDENTITY_ARGS), *(zgeo.args if up_z else IDENTITY_ARGS),
        FLAT=all_flat(None if up_x else x, None if up_z else d, m, direct_grad), HAS_MASK=ignore_mask is not None,
        STORE_GRAD=direct_grad is not None, STORE_MAP=store_map, UP_X=up_x, UP_Z=up_z,
        ALIGN_CORNERS=(up_x or up_z) and bool(align_corners), **launch.meta,
    )
    if up_x and store_grad:
        semi_gradient(x, d, ignore_mask, keep_logit, grad, geo, zgeo, up_z)
    sums = column_sums(part)
    return sums[0], sums[1], sums[2], loss_map, grad
