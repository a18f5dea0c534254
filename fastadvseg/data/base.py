"""What every dataset source provides, and the torch Dataset that turns a source + ids into items.

A *source* knows a dataset's layout: its train and val ids, class names, normalisation, and how to
``load(id)`` an (H, W, 3) image (uint8, or float in [0, 1]) and an (H, W) label array. ``SegmentationSet``
adds normalisation and the train augmentation or val padding, and yields ``(image, label, name)``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import resize, to_tensors, train_augment, val_transform

__all__ = ["Source", "SegmentationSet", "IMAGENET_MEAN", "IMAGENET_STD", "default_palette", "colorize", "denormalize"]

# torchvision/ImageNet statistics of RGB in [0, 1]: the convention of ImageNet-pretrained backbones,
# used for the real-image datasets (VOC, Cityscapes, folder).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_palette(num_classes: int) -> List[Tuple[int, int, int]]:
    """The PASCAL VOC colour map (bit-interleaved), extended to any number of classes."""
    pal = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal.append((r, g, b))
    return pal


def colorize(label, palette, ignore_index: int = 255, ignore_rgb=(255, 255, 255)) -> np.ndarray:
    """(H, W) class ids (numpy or tensor) -> (H, W, 3) uint8 colours; ``ignore_index`` drawn as ``ignore_rgb``."""
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label).astype(np.int64)
    lut = np.zeros((max(256, ignore_index + 1), 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    lut[ignore_index] = ignore_rgb
    return lut[np.clip(label, 0, len(lut) - 1)]


def denormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    """A normalised (3, H, W) image tensor -> (H, W, 3) uint8 RGB, for figures."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (image.detach().float().cpu() * s + m).clamp(0, 1).mul(255).round().byte()
    return rgb.permute(1, 2, 0).numpy()


class Source:
    """Base class of dataset sources; subclasses set the attributes and implement ``load``."""

    name: str = ""
    class_names: List[str] = []
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    train_ids: List[str] = []
    val_ids: List[str] = []
    test_ids: List[str] = []  # a held-out test split, where the dataset has one (synthetic); else none
    palette: Optional[List[Tuple[int, int, int]]] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, item_id: str) -> Tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def files(self, item_id: str) -> List[str]:
        """The files ``load(item_id)`` reads, image first, mask last ([] for generated data)."""
        return []


class SegmentationSet(Dataset):
    """Items ``(image, label, name)`` of ``source`` for ``ids``; augmented when ``train`` is True.

    ``image_size`` (h, w) first resizes every item to that size (image bilinear, label nearest), e.g.
    Cityscapes at 512x1024 as in the paper; then the train augmentation or the val padding applies.
    """

    def __init__(self, source: Source, ids: Sequence[str], *, train: bool, crop_size=(321, 321),
                 scale_range=(0.5, 1.5), mirror: bool = True, val_pad: Optional[int] = None,
                 ignore_index: int = 255, image_size=None):
        self.source = source
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.ids = list(ids)
        self.train = train
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = tuple(scale_range)
        self.mirror = mirror
        self.val_pad = val_pad
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        name = self.ids[index]
        image, label = self.source.load(name)
        if image.shape[:2] != label.shape[:2]:
            raise ValueError(f"item {name!r} of {self.source.name}: image is {image.shape[0]}x{image.shape[1]} "
                             f"but its label is {label.shape[0]}x{label.shape[1]}")
        image, label = to_tensors(image, label, self.source.mean, self.source.std)
        if self.image_size is not None:
            image, label = resize(image, label, *self.image_size)
        if self.train:
            image, label = train_augment(image, label, self.crop_size, self.scale_range, self.mirror,
                                         self.ignore_index)
        else:
            image, label = val_transform(image, label, self.val_pad, self.ignore_index, name)
        return image, label, name

    def __repr__(self) -> str:
        kind = "train (augmented)" if self.train else "val"
        return f"SegmentationSet({self.source.name}, {len(self)} items, {kind})"
