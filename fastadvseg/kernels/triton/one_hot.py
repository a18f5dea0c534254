"""One-hot encoding of a label map: (N, H, W) int64 -> (N, C, H, W) in the requested dtype.

out[n, c, h, w] = 1 if c == y[n, h, w] and y is a valid label (!= ignore_index, 0 <= y < C), else 0: ignored and
out-of-range pixels are all-zero vectors (the discriminator's "real" input). Never indexes with a bad label.

Bytes moved: reads N·H·W labels, writes N·C·H·W outputs.
"""
import torch
import triton
import triton.language as tl

from .common import all_flat, pix_offsets, pixel_block, store_tile, tile_launch

# dtypes the kernel stores directly; anything else is produced in float32 and converted
STORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@triton.jit
def one_hot_kernel(
    y_ptr, out_ptr,
    C, W, HW, ignore_index,
    sy_n, sy_h, sy_w,
    so_n, so_c, so_h, so_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, FLAT: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p, mask_p, h, w = pixel_block(pid_p, HW, W, BLOCK_P)
    y = tl.load(y_ptr + pix_offsets(n, offs_p, h, w, sy_n, sy_h, sy_w, FLAT), mask=mask_p, other=ignore_index)
    valid = (y != ignore_index) & (y >= 0) & (y < C)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    hot = tl.where((offs_c[:, None] == y[None, :]) & valid[None, :], 1.0, 0.0)
    store_tile(out_ptr, hot, pix_offsets(n, offs_p, h, w, so_n, so_h, so_w, FLAT), so_c, offs_c, mask_c, mask_p)


def one_hot(target, num_classes: int, ignore_index: int, dtype):
    n, h, w = target.shape
    if dtype == torch.bool:
        return one_hot(target, num_classes, ignore_index, torch.uint8).view(torch.bool)
    if dtype not in STORE_DTYPES:
        return one_hot(target, num_classes, ignore_index, torch.float32).to(dtype)
    out = torch.empty((n, num_classes, h, w), dtype=dtype, device=target.device)
    launch = tile_launch(out.shape)
    one_hot_kernel[launch.grid](
        target, out, num_classes, w, h * w, int(ignore_index), *target.stride(), *out.stride(),
        FLAT=all_flat(target, out), **launch.meta,
    )
    return out
