"""The confidence-masked pseudo-label loss: the student's cross-entropy against the teacher's argmax, kept where the
teacher and/or the discriminator is confident, its kept fraction and the student's gradient in one pass.

Per pixel, with student logits x, teacher logits t (HAS_TEACHER; otherwise t is x itself, the same registers: the
logits are read once and serve both), discriminator logit z (HAS_D) and confidence threshold tau (HAS_TAU)::

    y     = argmax_c t                       (first maximum on ties, a NaN counts as the maximum: torch.argmax)
    conf  = 1 / sum_c exp(t_c - max_c t)     (the teacher's max softmax, float32, IEEE division)
    keep  = not ignore_mask
            and conf >= tau                  (HAS_TAU; a NaN or +inf teacher logit makes conf NaN: never kept)
            and float32(z) > logit(T)        (HAS_D: sigmoid(z) > T decided exactly, fastadvseg/_keep.py)
    nll   = logsumexp_c(x) - x[y]            at kept pixels, 0 elsewhere
    G[c]  = softmax(x)[c] - [c == y]         at kept pixels (gradient of the unnormalised sum), 0 elsewhere

logit(T) comes from the host, once per call (:func:`fastadvseg._keep.keep_logit`). One (loss_sum, kept,
considered) row per program (considered = not-ignored pixels), the rows summed in float64 (exact counts): the
kept fraction stays on the device. y, conf and z are constants: no gradient flows to the teacher or to D. With
HAS_TEACHER and HAS_TAU off and HAS_D on this is L_semi: :mod:`.semi_cross_entropy` (and the unlabelled generator
loss's gradient) launch these kernels so.

Bytes moved: reads N·C·H·W logits (+ N·C·H·W teacher logits with a teacher) (+ N·H·W z with D) (+ N·H·W mask
bytes), writes N·C·H·W gradient (+ N·H·W float32 loss map for reduction="none"). Each element once.

With a ``size`` (H, W), the logits (N, C, h, w), the teacher (N, C, ht, wt) and z (N, hd, wd) are each read
upsampled to it from their own resolution where it differs (UP_X, UP_T, UP_Z; bilinear.py); the mask and the loss
map are at (H, W), the counts are of (H, W) pixels. The gradient w.r.t. upsampled logits comes from
:func:`pseudo_label_grad_kernel` (pass 1, which recomputes the teacher's label and confidence and the keep mask
per full-resolution pixel it visits) and bilinear.py's pass 2: no full-resolution logits or gradient tensor, no
atomics. Bytes moved: the low-resolution inputs once (gathers hit cache), the full-resolution mask (and a
full-resolution teacher or z) once by the forward and about twice more by pass 1, plus bilinear.py's intermediate
(4·N·C·H·w bytes written and read).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._keep import keep_logit as _keep_logit
from .bilinear import IDENTITY_ARGS, adjoint_lanes, adjoint_step, first_pass, first_pass_launch, gather_bilinear, \
    geometry, map_at, resampled, second_pass, upsampled_logits_tile, upsampled_map, upsampled_tile_launch, \
    window_start
from .common import all_flat, ce_grad, column_sums, confident, first_argmax, load_logits_tile, map_arg, nll_tile, \
    partials, pix_offsets, pixel_block, store_tile, tile_launch


# ----------------------------------------------------------------------------------------- device building blocks

@triton.jit
def logits_at(ptr, n, offs_p, h, w, in_h, in_w, out_h, out_w, scale_h, scale_w, s_n, s_c, s_h, s_w, mask_p, C,
              BLOCK_C: tl.constexpr, FLAT: tl.constexpr, UPSAMPLE: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    """The [BLOCK_C, BLOCK_P] float32 tile of (N, C, in_h, in_w) logits at full-resolution pixels (h, w) of image n
    (flat indices offs_p, used under FLAT): upsampled (UPSAMPLE) or read as they are (the logits are at full
    resolution). :func:`common.load_logits_tile`'s contract; returns (x, offs_c, mask_c)."""
    if UPSAMPLE:
        x, offs_c, mask_c = upsampled_logits_tile(ptr, n, h, w, in_h, in_w, out_h, out_w, scale_h, scale_w,
                                                  s_n, s_c, s_h, s_w, mask_p, C, BLOCK_C, ALIGN_CORNERS)
    else:
        x, offs_c, mask_c = load_logits_tile(ptr, pix_offsets(n, offs_p, h, w, s_n, s_h, s_w, FLAT), s_c, mask_p,
                                             C, BLOCK_C)
    return x, offs_c, mask_c


@triton.jit
def teacher_confidence(t):
    """The teacher's max softmax per pixel, 1 / sum_c exp(t_c - max_c t), with an IEEE division (padded channels
    are -inf: they add 0)."""
    m = tl.max(t, axis=0)
    s = tl.sum(tl.exp(t - m[None, :]), axis=0)
    return tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def pseudo_label_keep(t, offs_c, keep, tau, BLOCK_C: tl.constexpr, HAS_TAU: tl.constexpr):
    """(the teacher's label, keep & the teacher is confident): argmax of the teacher tile t, and under HAS_TAU its
    confidence >= tau (a NaN confidence fails it)."""
    label = first_argmax(t, offs_c, BLOCK_C)
    if HAS_TAU:
        keep = keep & (teacher_confidence(t) >= tau)
    return label, keep


# ---------------------------------------------------------------------------------------------------- kernels

@triton.jit
def pseudo_label_kernel(
    x_ptr, t_ptr, d_ptr, m_ptr, grad_ptr, loss_map_ptr, partial_ptr,
    C, W, HW, keep_logit, tau,
    sx_n, sx_c, sx_h, sx_w,
    st_n, st_c, st_h, st_w,
    sd_n, sd_h, sd_w,
    sm_n, sm_h, sm_w,
    sg_n, sg_c, sg_h, sg_w,
    num_pblocks,
    H, in_h, in_w, scale_h, scale_w, tin_h, tin_w, tscale_h, tscale_w, zin_h, zin_w, zscale_h, zscale_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    HAS_TEACHER: tl.constexpr, HAS_D: tl.constexpr, HAS_TAU: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr,
    UP_X: tl.constexpr, UP_T: tl.constexpr, UP_Z: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    # UP_X / UP_T / UP_Z: x (N, C, in_h, in_w) / t (N, C, tin_h, tin_w) / z (N, zin_h, zin_w) read upsampled to
    # (H, W) (bilinear.py); the gradient of an upsampled x comes from pseudo_label_grad_kernel
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)

    considered = mask_p
    if HAS_MASK:
        ignored = tl.load(m_ptr + pix_offsets(n, offs_p, h, w, sm_n, sm_h, sm_w, FLAT), mask=mask_p, other=1)
        considered = considered & (ignored == 0)
    keep = considered
    if HAS_D:
        if UP_Z:
            z = upsampled_map(d_ptr, n, h, w, zin_h, zin_w, H, W, zscale_h, zscale_w, sd_n, sd_h, sd_w, mask_p,
                              ALIGN_CORNERS)
        else:  # pix_offsets, not map_at: under FLAT Triton sees a contiguous run of z (vector loads)
            z = tl.load(d_ptr + pix_offsets(n, offs_p, h, w, sd_n, sd_h, sd_w, FLAT), mask=mask_p, other=0.0)
            z = z.to(tl.float32)
        keep = confident(z, keep, keep_logit)

    # the teacher's tile is done with (label, keep) before the student's is loaded: one tile live at a time
    # (sm_90, Triton 3.9, C = 150/256 at 256x16 with every flag: 146 registers, against 230 the other way round)
    if HAS_TEACHER:
        t, offs_c, _ = logits_at(t_ptr, n, offs_p, h, w, tin_h, tin_w, H, W, tscale_h, tscale_w,
                                 st_n, st_c, st_h, st_w, mask_p, C, BLOCK_C, FLAT, UP_T, ALIGN_CORNERS)
        label, keep = pseudo_label_keep(t, offs_c, keep, tau, BLOCK_C, HAS_TAU)
    x, offs_c, mask_c = logits_at(x_ptr, n, offs_p, h, w, in_h, in_w, H, W, scale_h, scale_w,
                                  sx_n, sx_c, sx_h, sx_w, mask_p, C, BLOCK_C, FLAT, UP_X, ALIGN_CORNERS)
    if not HAS_TEACHER:
        label, keep = pseudo_label_keep(x, offs_c, keep, tau, BLOCK_C, HAS_TAU)
    nll, p, onehot = nll_tile(x, label, keep, offs_c)

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
def pseudo_label_grad_kernel(
    x_ptr, t_ptr, d_ptr, m_ptr, out_ptr,
    C, keep_logit, tau,
    in_h, in_w, out_h, out_w, scale_h, scale_w, inv_scale, span, lanes_b, lanes,
    tin_h, tin_w, tscale_h, tscale_w, zin_h, zin_w, zscale_h, zscale_w,
    sx_n, sx_c, sx_h, sx_w,
    st_n, st_c, st_h, st_w,
    sd_n, sd_h, sd_w,
    sm_n, sm_h, sm_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_TEACHER: tl.constexpr, HAS_D: tl.constexpr, HAS_TAU: tl.constexpr, HAS_MASK: tl.constexpr,
    UP_T: tl.constexpr, UP_Z: tl.constexpr, ALIGN_CORNERS: tl.constexpr, REDUCE_W: tl.constexpr,
):
    """Pass 1 of the gradient w.r.t. logits read upsampled (bilinear.py): G = softmax - onehot(teacher's label) at
    kept pixels, recomputed per full-resolution pixel from the low-resolution logits, the teacher (upsampled with
    its own geometry under UP_T, else read at full resolution) and z (likewise, UP_Z)."""
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
        keep = feeds
        if HAS_MASK:
            ignored = tl.load(m_ptr + (n * sm_n + d_h.to(tl.int64) * sm_h + d_w.to(tl.int64) * sm_w), mask=feeds,
                              other=1)
            keep = keep & (ignored == 0)
        if HAS_D:
            z = map_at(d_ptr, n, d_h, d_w, zin_h, zin_w, out_h, out_w, zscale_h, zscale_w, sd_n, sd_h, sd_w, feeds,
                       UP_Z, ALIGN_CORNERS)
            keep = confident(z, keep, keep_logit)
        if HAS_TEACHER:  # before the student's tile, as in the forward
            # (flat offsets are never used here: FLAT off addresses (d_h, d_w) through the strides)
            t, _, _ = logits_at(t_ptr, n, d_w, d_h, d_w, tin_h, tin_w, out_h, out_w, tscale_h, tscale_w,
                                st_n, st_c, st_h, st_w, feeds, C, BLOCK_C, False, UP_T, ALIGN_CORNERS)
            label, keep = pseudo_label_keep(t, offs_c, keep, tau, BLOCK_C, HAS_TAU)
        x = gather_bilinear(x_base, sx_h, sx_w, h0[None, :], h1[None, :], lh0[None, :], lh1[None, :], w0[None, :],
                            w1[None, :], lw0[None, :], lw1[None, :], mask_c[:, None] & feeds[None, :])
        x = tl.where(mask_c[:, None], x, float("-inf"))
        if not HAS_TEACHER:
            label, keep = pseudo_label_keep(x, offs_c, keep, tau, BLOCK_C, HAS_TAU)
        nll, p, onehot = nll_tile(x, label, keep, offs_c)
        acc += tl.where(feeds[None, :], weight[None, :] * ce_grad(p, onehot, keep), 0.0)
        k += 1
    po = n * so_n + offs_c.to(tl.int64)[:, None] * so_c + (a.to(tl.int64) * so_h + b.to(tl.int64) * so_w)[None, :]
    tl.store(out_ptr + po, acc.to(out_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


# ------------------------------------------------------------------------------------------------------- host

def _strides4(t: Optional[torch.Tensor]) -> tuple:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _strides3(t: Optional[torch.Tensor]) -> tuple:
    return tuple(t.stride()) if t is not None else (0, 0, 0)


# Registers (python -m tools.compile_check, sm_90): no spill under Triton 3.9. Under Triton 3.6 the variants with a
# separate teacher, D, tau and a mask all given spill a little at the other kernels' tiles; accepted, not yet tuned
# (no GPU has timed either choice; a smaller tile for just those variants is the alternative):
# accepted spill of `pseudo_label_kernel` at block 32: Triton 3.6 only, 8 bytes in two bfloat16 variants at C 19/21 (teacher + D + tau + mask; 168 and 80 registers)
# accepted spill of `pseudo_label_grad_kernel` at block 32: Triton 3.6 only, 24 bytes at 255 registers in the bfloat16 variant at C 19/21 with teacher and D both upsampled, tau and a mask
# accepted spill of `pseudo_label_grad_kernel` at block 256: Triton 3.6 only, 8 bytes at 96 registers at C 150/256 (teacher + D + tau + mask, every dtype)

def pseudo_label_gradient(x, teacher, d, ignore_mask, keep_logit: float, tau: Optional[float], grad, geo, tgeo=None,
                          zgeo=None) -> None:
    """The gradient of the loss sum w.r.t. logits x (N, C, h, w) read upsampled by ``geo``, into ``grad`` (passes 1
    and 2). teacher (N, C, ht, wt) or None (x is its own teacher) and d (N, hd, wd) or None are read upsampled by
    ``tgeo`` / ``zgeo``, or at full resolution where those are None; keep_logit from
    :func:`fastadvseg._keep.keep_logit` (used with d); tau None: no confidence test. Also L_semi's and the
    unlabelled generator loss's gradient (:func:`.semi_cross_entropy.semi_gradient`)."""
    n, c, h, w = x.shape
    first = first_pass(grad, geo)
    lanes = first_pass_launch(first)
    m, *sm = map_arg(ignore_mask)
    pseudo_label_grad_kernel[lanes.grid](
        x, teacher, d, m, first.out,
        c, keep_logit, 0.0 if tau is None else tau,
        h, w, geo.h.full, geo.w.full, geo.h.scale, geo.w.scale, first.plan.inv_scale, first.plan.span,
        first.lanes_b, first.lanes_a * first.lanes_b,
        *(tgeo.args if tgeo is not None else IDENTITY_ARGS), *(zgeo.args if zgeo is not None else IDENTITY_ARGS),
        *x.stride(), *_strides4(teacher), *_strides3(d), *sm, *first.out.stride(),
        HAS_TEACHER=teacher is not None, HAS_D=d is not None, HAS_TAU=tau is not None,
        HAS_MASK=ignore_mask is not None, UP_T=tgeo is not None, UP_Z=zgeo is not None,
        ALIGN_CORNERS=geo.align_corners, REDUCE_W=first.reduce_w, **lanes.meta,
    )
    second_pass(first, grad, geo)


def pseudo_label_forward(x, teacher, d, confidence_threshold: Optional[float], d_threshold: float, ignore_mask, *,
                         store_grad: bool, store_map: bool, size=None, align_corners: bool = False):
    """x: (N, C, h, w) student logits; teacher: (N, C, ht, wt) or None (x is its own teacher); d: (N, hd, wd) view
    or None; ignore_mask: (N, H, W) bool or None. Each input is read upsampled to size = (H, W) where its size
    differs (without a size all are at x's size). Returns (loss_sum, kept, considered, loss_map (N, H, W) float32 or
    None, gradient of the loss sum w.r.t. x (x's shape, dtype and dense layout) or None)."""
    n, c, h, w = x.shape
    big_h, big_w = size if size is not None else (h, w)
    up_x = resampled((h, w), size)
    up_t = teacher is not None and resampled(teacher.shape[-2:], size)
    up_z = d is not None and resampled(d.shape[-2:], size)
    geo = geometry((h, w), size, align_corners) if up_x else None
    tgeo = geometry(teacher.shape[-2:], size, align_corners) if up_t else None
    zgeo = geometry(d.shape[-2:], size, align_corners) if up_z else None
    # the tiles that gather (bilinear.py) are smaller: four addresses per element
    launch = (upsampled_tile_launch if up_x or up_t else tile_launch)((n, c, big_h, big_w))
    part = partials(n * launch.blocks, 3, x.device)
    grad = torch.empty_like(x) if store_grad else None
    direct_grad = None if up_x else grad
    loss_map = torch.empty((n, big_h, big_w), dtype=torch.float32, device=x.device) if store_map else None
    m, *sm = map_arg(ignore_mask)
    has_tau = confidence_threshold is not None
    tau = float(confidence_threshold) if has_tau else 0.0
    keep_logit = _keep_logit(d_threshold) if d is not None else 0.0
    pseudo_label_kernel[launch.grid](
        x, teacher, d, m, direct_grad, loss_map, part,
        c, big_w, big_h * big_w, keep_logit, tau,
        *x.stride(), *_strides4(teacher), *_strides3(d), *sm, *_strides4(direct_grad), launch.blocks,
        big_h, *(geo.args if up_x else IDENTITY_ARGS), *(tgeo.args if up_t else IDENTITY_ARGS),
        *(zgeo.args if up_z else IDENTITY_ARGS),
        FLAT=all_flat(None if up_x else x, None if up_t else teacher, None if up_z else d, m, direct_grad),
        HAS_TEACHER=teacher is not None, HAS_D=d is not None, HAS_TAU=has_tau, HAS_MASK=ignore_mask is not None,
        STORE_GRAD=direct_grad is not None, STORE_MAP=store_map, UP_X=up_x, UP_T=up_t, UP_Z=up_z,
        ALIGN_CORNERS=(up_x or up_t or up_z) and bool(align_corners), **launch.meta,
    )
    if up_x and store_grad:
        pseudo_label_gradient(x, teacher, d, ignore_mask, keep_logit, tau if has_tau else None, grad, geo, tgeo,
                              zgeo)
    sums = column_sums(part)
    return sums[0], sums[1], sums[2], loss_map, grad
