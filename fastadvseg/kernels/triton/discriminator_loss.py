"""The discriminator loss ``BCE(d_fake, 0) + BCE(d_real, 1)`` in one launch.

The two maps may differ in shape, dtype layout and ignore masks. A 1-D grid covers the blocks of both maps:
programs [0, blocks_fake) take d_fake with target 0, the rest take d_real with target 1; each runs
:func:`bce.bce_block` (value and gradient of the unnormalised sum in the same pass) and writes a
(loss_sum, count) row. Each term is a mean over its own non-ignored pixels, formed by the autograd layer.

Bytes moved: reads the two maps (+ mask bytes), writes their two gradients.

With a ``size`` (H, W), each map is read upsampled to it where its size differs (UP_FAKE, UP_REAL; bilinear.py),
the masks are at (H, W), each term is a mean over (H, W) pixels, and the gradient of an upsampled map comes from
:func:`.bce_with_logits.map_gradient` (its bytes there).
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .bce_with_logits import bce_block, map_gradient
from .bilinear import IDENTITY_ARGS, geometry, resampled, upsampled_map_block
from .common import column_sums, map_arg, map_block, maps_flat, partials


@triton.jit
def discriminator_kernel(
    f_ptr, fm_ptr, fg_ptr, r_ptr, rm_ptr, rg_ptr, partial_ptr,
    Wf, HWf, NHWf, sf_n, sf_h, sf_w, sfm_n, sfm_h, sfm_w, sfg_n, sfg_h, sfg_w, Hf, fin_h, fin_w, fscale_h, fscale_w,
    Wr, HWr, NHWr, sr_n, sr_h, sr_w, srm_n, srm_h, srm_w, srg_n, srg_h, srg_w, Hr, rin_h, rin_w, rscale_h, rscale_w,
    blocks_fake,
    BLOCK: tl.constexpr, FLAT_FAKE: tl.constexpr, FLAT_REAL: tl.constexpr, MASK_FAKE: tl.constexpr, MASK_REAL: tl.constexpr,
    GRAD_FAKE: tl.constexpr, GRAD_REAL: tl.constexpr, UP_FAKE: tl.constexpr, UP_REAL: tl.constexpr,
    ALIGN_CORNERS: tl.constexpr,
):
    # UP_FAKE / UP_REAL: that map is read upsampled to its (H, W) (bilinear.py; its gradient from map_grad_kernel)
    pid = tl.program_id(0)
    if pid < blocks_fake:
        loss, count = bce_block(pid, f_ptr, f_ptr, 0.0, fm_ptr, fg_ptr, f_ptr, Wf, HWf, NHWf,
                                sf_n, sf_h, sf_w, 0, 0, 0, sfm_n, sfm_h, sfm_w, sfg_n, sfg_h, sfg_w,
                                Hf, fin_h, fin_w, fscale_h, fscale_w,
                                BLOCK, FLAT_FAKE, False, MASK_FAKE, GRAD_FAKE, False, UP_FAKE, ALIGN_CORNERS)
    else:
        loss, count = bce_block(pid - blocks_fake, r_ptr, r_ptr, 1.0, rm_ptr, rg_ptr, r_ptr, Wr, HWr, NHWr,
                                sr_n, sr_h, sr_w, 0, 0, 0, srm_n, srm_h, srm_w, srg_n, srg_h, srg_w,
                                Hr, rin_h, rin_w, rscale_h, rscale_w,
                                BLOCK, FLAT_REAL, False, MASK_REAL, GRAD_REAL, False, UP_REAL, ALIGN_CORNERS)
    tl.store(partial_ptr + pid * 2, loss)
    tl.store(partial_ptr + pid * 2 + 1, count)


class _Map(NamedTuple):
    """One map of the launch: pointers (d, mask, direct gradient), geometry arguments, flags, full-resolution
    pixel count."""

    ptrs: tuple
    args: tuple
    flat: bool
    up: bool
    pixels: int


def _map_args(d, mask, grad, size, align_corners) -> _Map:
    """Pointers and geometry of one map: (d, mask, gradient the kernel stores) and (W, H·W, N·H·W, strides of d,
    mask, gradient, H, and the upsampling arguments), (H, W) = size where d is read upsampled."""
    n, h, w = d.shape
    up = resampled((h, w), size)
    big_h, big_w = size if up else (h, w)
    m, *sm = map_arg(mask)
    direct = None if up else grad
    sg = direct.stride() if direct is not None else (0, 0, 0)
    up_args = geometry((h, w), size, align_corners).args if up else IDENTITY_ARGS
    pixels = n * big_h * big_w
    return _Map((d, m, direct), (big_w, big_h * big_w, pixels, *d.stride(), *sm, *sg, big_h, *up_args),
                maps_flat(None if up else d, m, direct), up, pixels)


def discriminator_forward(fake, real, mask_fake, mask_real, *, grad_fake: bool, grad_real: bool, size=None,
                          align_corners: bool = False):
    """Returns ((fake_sum, fake_count), (real_sum, real_count), grad of fake sum or None, grad of real sum or None).
    Each map is read upsampled to size = (H, W) where its size differs (the masks are at (H, W)); the gradients have
    the maps' shapes.

    An empty map gets no program; its pointers are replaced by the other map's (never dereferenced), since an
    empty tensor may have no valid address.
    """
    gf = torch.empty_like(fake) if grad_fake else None
    gr = torch.empty_like(real) if grad_real else None
    f = _map_args(fake, mask_fake, gf, size, align_corners)
    r = _map_args(real, mask_real, gr, size, align_corners)
    block, num_warps = (upsampled_map_block if f.up or r.up else map_block)(max(f.pixels, r.pixels))
    blocks_fake = triton.cdiv(f.pixels, block)
    blocks_real = triton.cdiv(r.pixels, block)
    part = partials(blocks_fake + blocks_real, 2, fake.device)
    if blocks_fake == 0:
        f = r
    if blocks_real == 0:
        r = f
    discriminator_kernel[(blocks_fake + blocks_real,)](
        *f.ptrs, *r.ptrs, part, *f.args, *r.args, blocks_fake,
        BLOCK=block, FLAT_FAKE=f.flat, FLAT_REAL=r.flat, MASK_FAKE=f.ptrs[1] is not None,
        MASK_REAL=r.ptrs[1] is not None, GRAD_FAKE=f.ptrs[2] is not None, GRAD_REAL=r.ptrs[2] is not None,
        UP_FAKE=f.up, UP_REAL=r.up, ALIGN_CORNERS=(f.up or r.up) and bool(align_corners), num_warps=num_warps,
    )
    for d, mask, grad, target in ((fake, mask_fake, gf, 0.0), (real, mask_real, gr, 1.0)):
        if grad is not None and resampled(d.shape[-2:], size):
            map_gradient(d, grad, geometry(d.shape[-2:], size, align_corners), target=target, ignore_mask=mask)
    fs = column_sums(part[:blocks_fake])  # float64: exact counts
    rs = column_sums(part[blocks_fake:])
    return (fs[0], fs[1]), (rs[0], rs[1]), gf, gr
