"""Cityscapes (fine annotations), 19 evaluation classes.

Layout under ``root``::

    leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
    gtFine/{train,val}/<city>/<stem>_gtFine_labelIds.png

Item ids are ``<city>/<stem>``. The official labelIds are mapped to the 19 trainIds with a lookup table;
every other labelId (void classes, license plate, ...) becomes 255 (ignore).
Normalisation: the ImageNet mean/std.
"""
from __future__ import annotations

import os

import numpy as np

from .base import IMAGENET_MEAN, IMAGENET_STD, Source
from .io import read_image, read_mask, require_dir

__all__ = ["CITYSCAPES_CLASSES", "LABEL_TO_TRAIN", "CityscapesSource", "labelids_to_trainids"]

CITYSCAPES_CLASSES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle"]
# labelId of each trainId 0..18, from the Cityscapes label definitions.
_TRAIN_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
LABEL_TO_TRAIN = np.full(256, 255, dtype=np.uint8)
LABEL_TO_TRAIN[_TRAIN_LABEL_IDS] = np.arange(len(_TRAIN_LABEL_IDS), dtype=np.uint8)
PALETTE = [(128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
           (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
           (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)]

_IMG_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


def labelids_to_trainids(label: np.ndarray) -> np.ndarray:
    """Map an array of Cityscapes labelIds to trainIds (0..18, 255 = ignore)."""
    return LABEL_TO_TRAIN[np.clip(np.asarray(label), 0, 255).astype(np.intp)]


def _scan(image_root: str):
    ids = []
    for city in sorted(os.listdir(image_root)):
        d = os.path.join(image_root, city)
        if os.path.isdir(d):
            ids += [f"{city}/{f[:-len(_IMG_SUFFIX)]}" for f in sorted(os.listdir(d)) if f.endswith(_IMG_SUFFIX)]
    if not ids:
        raise FileNotFoundError(f"no *{_IMG_SUFFIX} images in {image_root}/<city>/")
    return ids


class CityscapesSource(Source):
    def __init__(self, root: str):
        self.name = "cityscapes"
        self.root = require_dir(root, "Cityscapes root")
        self.class_names = list(CITYSCAPES_CLASSES)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.palette = list(PALETTE)
        self.split_of = {}
        ids = {}
        for split in ("train", "val"):
            ids[split] = _scan(require_dir(os.path.join(self.root, "leftImg8bit", split), f"Cityscapes {split} images"))
            self.split_of.update({i: split for i in ids[split]})
        self.train_ids, self.val_ids = ids["train"], ids["val"]

    def files(self, item_id: str):
        split = self.split_of.get(item_id)
        if split is None:
            raise KeyError(f"unknown Cityscapes id {item_id!r}")
        return [os.path.join(self.root, "leftImg8bit", split, item_id + _IMG_SUFFIX),
                os.path.join(self.root, "gtFine", split, item_id + _LABEL_SUFFIX)]

    def load(self, item_id: str):
        image_path, label_path = self.files(item_id)
        return read_image(image_path), labelids_to_trainids(read_mask(label_path))
