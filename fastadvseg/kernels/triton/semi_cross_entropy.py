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
"""
import torch
import triton
import triton.language as tl

from ..._keep import keep_logit as _keep_logit
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
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    HAS_MASK: tl.constexpr, STORE_GRAD: tl.constexpr, STORE_MAP: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)

    considered = mask_p
    if HAS_MASK:
        ignored = tl.load(m_ptr + pix_offsets(n, offs_p, h, w, sm_n, sm_h, sm_w, FLAT), mask=mask_p, other=1)
        considered = considered & (ignored == 0)
    z = tl.load(d_ptr + pix_offsets(n, offs_p, h, w, sd_n, sd_h, sd_w, FLAT), mask=mask_p, other=0.0).to(tl.float32)
    keep = confident(z, considered, keep_logit)

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


def semi_forward(x, d, threshold: float, ignore_mask, *, store_grad: bool, store_map: bool):
    """x: (N, C, H, W), d: (N, H, W) view. Returns (loss_sum, kept, considered, loss_map or None, grad or None)."""
    n, c, h, w = x.shape
    launch = tile_launch(x.shape)
    part = partials(n * launch.blocks, 3, x.device)
    grad = torch.empty_like(x) if store_grad else None
    loss_map = torch.empty((n, h, w), dtype=torch.float32, device=x.device) if store_map else None
    m, *sm = map_arg(ignore_mask)
    sg = grad.stride() if store_grad else (0, 0, 0, 0)
    semi_kernel[launch.grid](
        x, d, m, grad, loss_map, part,
        c, w, h * w, _keep_logit(threshold),
        *x.stride(), *d.stride(), *sm, *sg, launch.blocks,
        FLAT=all_flat(x, d, m, grad), HAS_MASK=ignore_mask is not None, STORE_GRAD=store_grad, STORE_MAP=store_map, **launch.meta,
    )
    sums = column_sums(part)
    return sums[0], sums[1], sums[2], loss_map, grad
