"""Inputs of the cuda backend's tests (emulated or on a GPU): random values in float64, memory layouts, labels."""
from __future__ import annotations

import torch


def rand(shape, gen, scale=3.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def with_layout(base: torch.Tensor, layout: str, device="cpu") -> torch.Tensor:
    """A tensor on ``device`` equal to ``base`` (4-D or 3-D) with the given memory layout, detached."""
    base = base.to(device)
    if layout == "contiguous":
        out = base.clone()
    elif layout == "channels_last":
        out = (base.clone().contiguous(memory_format=torch.channels_last) if base.dim() == 4
               else base.unsqueeze(1).contiguous(memory_format=torch.channels_last)[:, 0])
    elif layout == "sliced":  # a strided view with a storage offset: every dimension sliced
        big = torch.zeros([2 * s + 3 for s in base.shape], dtype=base.dtype, device=base.device)
        out = big[tuple(slice(1, 1 + 2 * s, 2) for s in base.shape)]
        out.copy_(base)
        assert out.storage_offset() > 0
    elif layout == "w_major":  # 3-D only: memory order (w, h, n), the reverse of pixel order
        out = base.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    else:
        raise ValueError(layout)
    return out.detach()


def target(shape, gen, ignore_frac=0.25, ignore_index=255, layout="contiguous", device="cpu"):
    n, c, h, w = shape
    t = torch.randint(0, c, (n, h, w), generator=gen)
    t[torch.rand((n, h, w), generator=gen) < ignore_frac] = ignore_index
    return with_layout(t, layout, device)


def mask(shape_nhw, gen, frac=0.3, layout="contiguous", device="cpu"):
    return with_layout(torch.rand(shape_nhw, generator=gen) < frac, layout, device)
