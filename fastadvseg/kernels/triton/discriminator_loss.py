"""The discriminator loss ``BCE(d_fake, 0) + BCE(d_real, 1)`` in one launch.

The two maps may differ in shape, dtype layout and ignore masks. A 1-D grid covers the blocks of both maps:
programs [0, blocks_fake) take d_fake with target 0, the rest take d_real with target 1; each runs
:func:`bce.bce_block` (value and gradient of the unnormalised sum in the same pass) and writes a
(loss_sum, count) row. Each term is a mean over its own non-ignored pixels, formed by the autograd layer.

Bytes moved: reads the two maps (+ mask bytes), writes their two gradients.
"""
import torch
import triton
import triton.language as tl

from .bce_with_logits import bce_block
from .common import column_sums, map_arg, map_block, maps_flat, partials


@triton.jit
def discriminator_kernel(
    f_ptr, fm_ptr, fg_ptr, r_ptr, rm_ptr, rg_ptr, partial_ptr,
    Wf, HWf, NHWf, sf_n, sf_h, sf_w, sfm_n, sfm_h, sfm_w, sfg_n, sfg_h, sfg_w,
    Wr, HWr, NHWr, sr_n, sr_h, sr_w, srm_n, srm_h, srm_w, srg_n, srg_h, srg_w,
    blocks_fake,
    BLOCK: tl.constexpr, FLAT_FAKE: tl.constexpr, FLAT_REAL: tl.constexpr, MASK_FAKE: tl.constexpr, MASK_REAL: tl.constexpr,
    GRAD_FAKE: tl.constexpr, GRAD_REAL: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < blocks_fake:
        loss, count = bce_block(pid, f_ptr, f_ptr, 0.0, fm_ptr, fg_ptr, f_ptr, Wf, HWf, NHWf,
                                sf_n, sf_h, sf_w, 0, 0, 0, sfm_n, sfm_h, sfm_w, sfg_n, sfg_h, sfg_w,
                                BLOCK, FLAT_FAKE, False, MASK_FAKE, GRAD_FAKE, False)
    else:
        loss, count = bce_block(pid - blocks_fake, r_ptr, r_ptr, 1.0, rm_ptr, rg_ptr, r_ptr, Wr, HWr, NHWr,
                                sr_n, sr_h, sr_w, 0, 0, 0, srm_n, srm_h, srm_w, srg_n, srg_h, srg_w,
                                BLOCK, FLAT_REAL, False, MASK_REAL, GRAD_REAL, False)
    tl.store(partial_ptr + pid * 2, loss)
    tl.store(partial_ptr + pid * 2 + 1, count)


def _map_args(d, mask, grad):
    """Pointers and geometry of one map: (d, mask, grad) and (W, H·W, N·H·W, strides of d, mask, grad)."""
    _, h, w = d.shape
    m, *sm = map_arg(mask)
    sg = grad.stride() if grad is not None else (0, 0, 0)
    return (d, m, grad), (w, h * w, d.numel(), *d.stride(), *sm, *sg)


def discriminator_forward(fake, real, mask_fake, mask_real, *, grad_fake: bool, grad_real: bool):
    """Returns ((fake_sum, fake_count), (real_sum, real_count), grad of fake sum or None, grad of real sum or None).

    An empty map gets no program; its pointers are replaced by the other map's (never dereferenced), since an
    empty tensor may have no valid address.
    """
    block, num_warps = map_block(max(fake.numel(), real.numel()))
    blocks_fake = triton.cdiv(fake.numel(), block)
    blocks_real = triton.cdiv(real.numel(), block)
    part = partials(blocks_fake + blocks_real, 2, fake.device)
    gf = torch.empty_like(fake) if grad_fake else None
    gr = torch.empty_like(real) if grad_real else None
    ptr_f, geo_f = _map_args(fake, mask_fake, gf)
    ptr_r, geo_r = _map_args(real, mask_real, gr)
    if blocks_fake == 0:
        ptr_f, geo_f = ptr_r, geo_r
    if blocks_real == 0:
        ptr_r, geo_r = ptr_f, geo_f
    discriminator_kernel[(blocks_fake + blocks_real,)](
        *ptr_f, *ptr_r, part, *geo_f, *geo_r, blocks_fake,
        BLOCK=block, FLAT_FAKE=maps_flat(*ptr_f), FLAT_REAL=maps_flat(*ptr_r), MASK_FAKE=ptr_f[1] is not None, MASK_REAL=ptr_r[1] is not None,
        GRAD_FAKE=ptr_f[2] is not None, GRAD_REAL=ptr_r[2] is not None, num_warps=num_warps,
    )
    f = column_sums(part[:blocks_fake])  # float64: exact counts
    r = column_sums(part[blocks_fake:])
    return (f[0], f[1]), (r[0], r[1]), gf, gr
