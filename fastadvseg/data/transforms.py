"""The paper's augmentation (random scale, pad, random crop, random mirror) and the val padding, on tensors.

All randomness comes from torch's global RNG (``torch.rand`` / ``torch.randint``), so that the training
loop's ``torch.manual_seed`` and the DataLoader's per-worker seeding make runs reproducible.
Images are (3, H, W) float32 already normalised, so padding the image with 0 pads with the mean colour;
labels are (H, W) int64 padded with ``ignore_index``.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["to_tensors", "rescale", "resize", "pad_to", "random_crop", "train_augment", "val_transform"]


def to_tensors(image: np.ndarray, label: np.ndarray, mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 (0..255) or float (0..1) image and (H, W) label -> normalised (3, H, W) float32, (H, W) int64."""
    img = torch.from_numpy(np.ascontiguousarray(image))
    img = img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()
    img = img.permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    img = ((img - m) / s).contiguous()
    return img, torch.from_numpy(np.ascontiguousarray(label)).long()


def rescale(image: torch.Tensor, label: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Resize by ``scale``: image bilinearly, label by nearest neighbour (class ids are never blended)."""
    h, w = label.shape
    return resize(image, label, max(1, int(round(h * scale))), max(1, int(round(w * scale))))


def resize(image: torch.Tensor, label: torch.Tensor, nh: int, nw: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Resize to (nh, nw): image bilinearly, label by nearest neighbour."""
    h, w = label.shape
    if (nh, nw) == (h, w):
        return image, label
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    rows = ((torch.arange(nh, dtype=torch.float64) + 0.5) * (h / nh)).long().clamp_(max=h - 1)
    cols = ((torch.arange(nw, dtype=torch.float64) + 0.5) * (w / nw)).long().clamp_(max=w - 1)
    return image, label[rows[:, None], cols[None, :]]


def pad_to(image: torch.Tensor, label: torch.Tensor, height: int, width: int,
           ignore_index: int = 255) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom and right up to (height, width): image with 0, label with ``ignore_index``. Never crops."""
    h, w = label.shape
    ph, pw = max(height - h, 0), max(width - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
    return image, label


def random_crop(image: torch.Tensor, label: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    h, w = label.shape
    y0 = int(torch.randint(0, h - height + 1, ()))
    x0 = int(torch.randint(0, w - width + 1, ()))
    return image[:, y0:y0 + height, x0:x0 + width], label[y0:y0 + height, x0:x0 + width]


def train_augment(image: torch.Tensor, label: torch.Tensor, crop_size: Sequence[int],
                  scale_range: Sequence[float] = (0.5, 1.5), mirror: bool = True,
                  ignore_index: int = 255) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random scale in ``scale_range`` (uniform), pad with ignore when smaller than the crop, random crop
    to ``crop_size`` (h, w), random horizontal mirror with probability 1/2."""
    ch, cw = int(crop_size[0]), int(crop_size[1])
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if hi > lo:
        image, label = rescale(image, label, lo + (hi - lo) * float(torch.rand(())))
    elif lo != 1.0:
        image, label = rescale(image, label, lo)
    image, label = pad_to(image, label, ch, cw, ignore_index)
    image, label = random_crop(image, label, ch, cw)
    if mirror and float(torch.rand(())) < 0.5:
        image, label = image.flip(-1), label.flip(-1)
    return image.contiguous(), label.contiguous()


def val_transform(image: torch.Tensor, label: torch.Tensor, val_pad=None, ignore_index: int = 255,
                  name: str = "") -> Tuple[torch.Tensor, torch.Tensor]:
    """No augmentation; with ``val_pad`` (VOC protocol: 505) pad to val_pad x val_pad so that items batch."""
    if val_pad is None:
        return image, label
    h, w = label.shape
    if h > val_pad or w > val_pad:
        raise ValueError(f"val item {name!r} is {h}x{w}, larger than val_pad={val_pad}; "
                         f"use a larger val_pad or none (batch size 1)")
    return pad_to(image, label, val_pad, val_pad, ignore_index)
