"""The fully convolutional discriminator of Hung et al. (2018), with a choice of how far it downsamples."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

NUM_CONVS = 5  # four hidden convolutions and the classifier


class FCDiscriminator(nn.Module):
    """5 convs, channels C->ndf->2ndf->4ndf->8ndf->1, LeakyReLU(0.2) after the first four.

    ``strides`` (0..5, default 5: the paper's) of the convolutions, the first ones, are 4x4 with stride 2 and padding
    1; the others are 3x3 with stride 1 and padding 1, which keep the size of their input. Each stride-2 conv halves
    the size (rounding down), so the map D judges has ``input // 2**strides`` cells a side: the paper's D gives 2x2
    cells on a 64-pixel crop, ``strides=3`` gives 8x8 (each cell then judges an 8x8-pixel patch with a receptive
    field of 54 pixels instead of the whole crop).

    Input: class probabilities (or a one-hot map) (N, C, H, W). Output: logits (N, 1, H, W), upsampled bilinearly
    back to the input size (``upsample=True``, the default), or D's own map (N, 1, h, w) with ``(h, w) =
    output_size((H, W))`` (``upsample=False``, for losses that upsample it themselves). ``sigmoid`` of it is the
    per-pixel (per-cell) confidence that the input is ground truth.
    """

    def __init__(self, num_classes: int, ndf: int = 64, strides: int = NUM_CONVS, upsample: bool = True):
        super().__init__()
        if isinstance(strides, bool) or not isinstance(strides, int) or not 0 <= strides <= NUM_CONVS:
            raise ValueError(f"strides={strides!r}: the number of stride-2 convolutions must be an int in "
                             f"0..{NUM_CONVS}")
        self.strides = strides
        self.upsample = bool(upsample)
        chans = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8, 1]
        layers = [self._conv(a, b, i < strides) for i, (a, b) in enumerate(zip(chans[:-1], chans[1:]))]
        self.convs = nn.ModuleList(layers[:-1])
        self.classifier = layers[-1]
        self.leaky_relu = nn.LeakyReLU(0.2, inplace=True)

    @staticmethod
    def _conv(c_in: int, c_out: int, strided: bool) -> nn.Conv2d:
        return nn.Conv2d(c_in, c_out, 4, 2, 1) if strided else nn.Conv2d(c_in, c_out, 3, 1, 1)

    def output_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        """(h, w) of D's own map for an input of ``size`` (H, W)."""
        h, w = size
        for _ in range(self.strides):
            h, w = h // 2, w // 2
        return h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for conv in self.convs:
            x = self.leaky_relu(conv(x))
        x = self.classifier(x)
        if not self.upsample:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
