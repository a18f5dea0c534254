"""The fully convolutional discriminator of Hung et al. (2018)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FCDiscriminator(nn.Module):
    """5 convs 4x4 stride 2 pad 1, channels C->ndf->2ndf->4ndf->8ndf->1, LeakyReLU(0.2) after the first four.

    Input: class probabilities (or a one-hot map) (N, C, H, W). Output: logits (N, 1, H, W), upsampled bilinearly
    back to the input size; ``sigmoid`` of it is the per-pixel confidence that the input is ground truth.
    """

    def __init__(self, num_classes: int, ndf: int = 64):
        super().__init__()
        chans = [num_classes, ndf, ndf * 2, ndf * 4, ndf * 8]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, 2, 1) for a, b in zip(chans[:-1], chans[1:]))
        self.classifier = nn.Conv2d(ndf * 8, 1, 4, 2, 1)
        self.leaky_relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for conv in self.convs:
            x = self.leaky_relu(conv(x))
        x = self.classifier(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)
