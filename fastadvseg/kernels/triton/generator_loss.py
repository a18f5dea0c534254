"""The generator's whole loss in one pass: every logit and every discriminator logit read once.

Labelled form (LABELLED, target y given), per pixel with counted = (y != ignore_index and 0 <= y < C)::

    ce   = logsumexp_c(x) - x[y]            Gx[c] = softmax(x)[c] - [c == y]       at counted pixels
    adv  = BCE(z, 1) = 0 * z + softplus(-z) Gz    = sigmoid(z) - 1 = -sigmoid(-z)   at counted pixels

Unlabelled form, per pixel (all pixels count for adv)::

    adv  = BCE(z, 1)                        Gz    = -sigmoid(-z)
    keep = float32(z) > logit(T), pseudo = argmax_c x (first max)   (sigmoid(z) > T exactly: fastadvseg/_keep.py)
    semi = logsumexp_c(x) - x[pseudo]       Gx[c] = softmax(x)[c] - [c == pseudo]  at kept pixels

Gx / Gz are gradients of the unnormalised sums, stored in the logits' / d_logits' dtype and layout (STORE_GX /
STORE_GZ off when no gradient is needed); logit(T) comes from the host, computed once per call. One row per
program: (ce-or-semi sum, its count, adv sum, adv count), the rows summed in float64 (exact counts); the autograd
layer forms the means and, in backward, scales Gx and Gz by the incoming gradients of total and of each term.
The labelled form also reports its bad labels (outside [0, C), not ignore_index) per program, reduced on the
device into ``bad`` = [count, value of the first in pixel order] (see :func:`common.report_bad_labels`).

Bytes moved: reads N·C·H·W logits + N·H·W z (+ N·H·W labels), writes N·C·H·W Gx + N·H·W Gz.

With a ``size`` (H, W), logits (N, C, h, w) and z (N, hd, wd), each at its own resolution, are read upsampled to it
where their size differs (UP_X, UP_Z; bilinear.py); labels are at (H, W) and counts are of (H, W) pixels. Gx and
Gz of upsampled inputs come from the gradient passes of the cross-entropy or L_semi (:mod:`.cross_entropy`,
:mod:`.semi_cross_entropy`) and of a map (:func:`.bce_with_logits.map_gradient`), shapes of the low-resolution
inputs. Bytes moved: the low-resolution inputs once (gathers hit cache) and the labels once by the forward, about
twice more by each gradient's pass 1, plus the intermediates of bilinear.py (4·N·C·H·w and 4·N·H·wd bytes).
"""
import torch
import triton
import triton.language as tl

from ..._keep import keep_logit as _keep_logit
from .common import all_flat, bad_label_buffer, bad_label_summary, bce_logits, ce_grad, column_sums, confident, \
    first_argmax, load_logits_tile, nll_tile, no_bad_labels, partials, pix_offsets, pixel_block, report_bad_labels, \
    sigmoid, store_tile, tile_launch
from .bce_with_logits import map_gradient
from .bilinear import IDENTITY_ARGS, geometry, resampled, upsampled_logits_tile, upsampled_map, upsampled_tile_launch
from .cross_entropy import cross_entropy_gradient
from .semi_cross_entropy import semi_gradient


@triton.jit
def generator_kernel(
    x_ptr, d_ptr, y_ptr, gx_ptr, gz_ptr, partial_ptr, bad_ptr,
    C, W, HW, ignore_index, keep_logit,
    sx_n, sx_c, sx_h, sx_w,
    sd_n, sd_h, sd_w,
    sy_n, sy_h, sy_w,
    sgx_n, sgx_c, sgx_h, sgx_w,
    sgz_n, sgz_h, sgz_w,
    num_pblocks,
    H, in_h, in_w, scale_h, scale_w, zin_h, zin_w, zscale_h, zscale_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
    LABELLED: tl.constexpr, STORE_GX: tl.constexpr, STORE_GZ: tl.constexpr, CHECK_LABELS: tl.constexpr,
    UP_X: tl.constexpr, UP_Z: tl.constexpr, ALIGN_CORNERS: tl.constexpr,
):
    # CHECK_LABELS: report bad labels (the launcher sets it only with LABELLED). UP_X / UP_Z: x (N, C, in_h, in_w)
    # / z (N, zin_h, zin_w) read upsampled to (H, W) (bilinear.py); their gradients come from the gradient passes
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)
    row = n * num_pblocks + pid_p

    if UP_Z:
        z = upsampled_map(d_ptr, n, h, w, zin_h, zin_w, H, W, zscale_h, zscale_w, sd_n, sd_h, sd_w, mask_p,
                          ALIGN_CORNERS)
    else:
        pz = pix_offsets(n, offs_p, h, w, sd_n, sd_h, sd_w, FLAT)
        z = tl.load(d_ptr + pz, mask=mask_p, other=0.0).to(tl.float32)
    if UP_X:
        x, offs_c, mask_c = upsampled_logits_tile(x_ptr, n, h, w, in_h, in_w, H, W, scale_h, scale_w,
                                                  sx_n, sx_c, sx_h, sx_w, mask_p, C, BLOCK_C, ALIGN_CORNERS)
    else:
        px = pix_offsets(n, offs_p, h, w, sx_n, sx_h, sx_w, FLAT)
        x, offs_c, mask_c = load_logits_tile(x_ptr, px, sx_c, mask_p, C, BLOCK_C)
    if LABELLED:
        py = pix_offsets(n, offs_p, h, w, sy_n, sy_h, sy_w, FLAT)
        labels = tl.load(y_ptr + py, mask=mask_p, other=ignore_index)  # int64: no truncation before the check
        counted = mask_p & (labels != ignore_index) & (labels >= 0) & (labels < C)
        adv_counted = counted
        if CHECK_LABELS:
            report_bad_labels(bad_ptr, row, labels, n * HW + offs_p, mask_p, ignore_index, C)
    else:
        labels = first_argmax(x, offs_c, BLOCK_C)
        counted = confident(z, mask_p, keep_logit)
        adv_counted = mask_p
    nll, p, onehot = nll_tile(x, labels, counted, offs_c)
    adv = tl.where(adv_counted, bce_logits(z, 1.0), 0.0)

    if STORE_GX:
        pg = pix_offsets(n, offs_p, h, w, sgx_n, sgx_h, sgx_w, FLAT)
        store_tile(gx_ptr, ce_grad(p, onehot, counted), pg, sgx_c, offs_c, mask_c, mask_p)
    if STORE_GZ:
        gz = tl.where(adv_counted, -sigmoid(-z), 0.0)
        pgz = pix_offsets(n, offs_p, h, w, sgz_n, sgz_h, sgz_w, FLAT)
        tl.store(gz_ptr + pgz, gz.to(gz_ptr.dtype.element_ty), mask=mask_p)

    base = partial_ptr + row * 4
    tl.store(base, tl.sum(nll, axis=0))
    tl.store(base + 1, tl.sum(counted.to(tl.float32), axis=0))
    tl.store(base + 2, tl.sum(adv, axis=0))
    tl.store(base + 3, tl.sum(adv_counted.to(tl.float32), axis=0))


def generator_forward(x, d, target, ignore_index: int, threshold: float, *, store_gx: bool, store_gz: bool,
                      check_labels: bool = True, size=None, align_corners: bool = False):
    """x: (N, C, h, w), d: (N, hd, wd) view, target (N, H, W) int64 or None (unlabelled form); x and d are each read
    upsampled to size = (H, W) where their size differs (without a size all are at x's size).

    Returns (term_sum, term_count, adv_sum, adv_count, Gx or None, Gz or None, bad); the term is ce (labelled) or
    semi (unlabelled); Gx and Gz have x's and d's shapes. bad = int64 [count, value of the first bad label in pixel
    order (0 if none)] on x's device, formed there without a host sync; [0, 0] for the unlabelled form or without
    check_labels.
    """
    n, c, h, w = x.shape
    big_h, big_w = size if size is not None else (h, w)
    up_x, up_z = resampled((h, w), size), resampled(d.shape[-2:], size)
    geo = geometry((h, w), size, align_corners) if up_x else None
    zgeo = geometry(d.shape[-2:], size, align_corners) if up_z else None
    launch = (upsampled_tile_launch if up_x else tile_launch)((n, c, big_h, big_w))
    rows = n * launch.blocks
    part = partials(rows, 4, x.device)
    labelled = target is not None
    check = labelled and check_labels
    report = bad_label_buffer(rows, x.device) if check else None
    gx = torch.empty_like(x) if store_gx else None
    gz = torch.empty_like(d) if store_gz else None
    direct_gx = None if up_x else gx
    direct_gz = None if up_z else gz
    keep_logit = _keep_logit(threshold)
    generator_kernel[launch.grid](
        x, d, target, direct_gx, direct_gz, part, report,
        c, big_w, big_h * big_w, int(ignore_index), keep_logit,
        *x.stride(), *d.stride(),
        *(target.stride() if labelled else (0, 0, 0)),
        *(direct_gx.stride() if direct_gx is not None else (0, 0, 0, 0)),
        *(direct_gz.stride() if direct_gz is not None else (0, 0, 0)),
        launch.blocks,
        big_h, *(geo.args if up_x else IDENTITY_ARGS), *(zgeo.args if up_z else IDENTITY_ARGS),
        FLAT=all_flat(None if up_x else x, None if up_z else d, target, direct_gx, direct_gz), LABELLED=labelled,
        STORE_GX=direct_gx is not None, STORE_GZ=direct_gz is not None, CHECK_LABELS=check, UP_X=up_x, UP_Z=up_z,
        ALIGN_CORNERS=(up_x or up_z) and bool(align_corners), **launch.meta,
    )
    if up_x and store_gx:
        if labelled:
            cross_entropy_gradient(x, target, None, int(ignore_index), 0.0, gx, geo)
        else:
            semi_gradient(x, d, None, keep_logit, gx, geo, zgeo, up_z)
    if up_z and store_gz:
        map_gradient(d, gz, zgeo, target=1.0, labels=target, ignore_index=int(ignore_index), num_classes=c,
                     adversarial=True)
    s = column_sums(part)
    bad = bad_label_summary(report) if check else no_bad_labels(x.device)
    return s[0], s[1], s[2], s[3], gx, gz, bad
