"""PASCAL VOC 2012 (with the SBD "train_aug" list when present).

Layout under ``root`` (``root`` may be the VOC2012 folder itself, or a folder holding ``VOC2012`` or
``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClassAug/<id>.png   (SBD-augmented labels, greyscale class ids)  - preferred when present
    SegmentationClass/<id>.png      (VOC palette PNGs: palette index = class id, 255 = boundary/ignore)
    ImageSets/Segmentation/train_aug.txt (else train.txt), val.txt

Training ids that are also in val.txt are dropped from the training list (with a warning), so that
a train_aug list that includes val images never leaks them into training.
Normalisation: the ImageNet mean/std (RGB in [0, 1]) - the convention of ImageNet-pretrained backbones.
"""
from __future__ import annotations

import os
import warnings

from .base import IMAGENET_MEAN, IMAGENET_STD, Source, default_palette
from .io import read_id_list, read_image, read_mask, require_dir

__all__ = ["VOC_CLASSES", "VOCSource"]

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor"]


def _find_base(root: str) -> str:
    for cand in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    raise FileNotFoundError(f"no PASCAL VOC 2012 layout under {root}: expected JPEGImages/ in it, "
                            f"in {os.path.join(root, 'VOC2012')} or in {os.path.join(root, 'VOCdevkit', 'VOC2012')}")


class VOCSource(Source):
    def __init__(self, root: str):
        self.name = "voc"
        root = require_dir(root, "PASCAL VOC root")
        self.base = _find_base(root)
        self.class_names = list(VOC_CLASSES)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.palette = default_palette(len(VOC_CLASSES))
        sets = os.path.join(self.base, "ImageSets", "Segmentation")
        aug = os.path.join(sets, "train_aug.txt")
        self.train_list = aug if os.path.isfile(aug) else os.path.join(sets, "train.txt")
        self.val_list = os.path.join(sets, "val.txt")
        self.val_ids = read_id_list(self.val_list)
        val = set(self.val_ids)
        train = read_id_list(self.train_list)
        self.train_ids = [i for i in train if i not in val]
        if len(self.train_ids) < len(train):
            warnings.warn(f"{len(train) - len(self.train_ids)} ids of {self.train_list} are also in "
                          f"{self.val_list}; they were dropped from training")
        self.label_dirs = [d for d in (os.path.join(self.base, "SegmentationClassAug"),
                                       os.path.join(self.base, "SegmentationClass")) if os.path.isdir(d)]
        if not self.label_dirs:
            raise FileNotFoundError(f"no label folder in {self.base}: expected SegmentationClassAug/ or SegmentationClass/")

    def files(self, item_id: str):
        labels = [os.path.join(d, item_id + ".png") for d in self.label_dirs]
        return [os.path.join(self.base, "JPEGImages", item_id + ".jpg"),
                next((p for p in labels if os.path.isfile(p)), labels[0])]

    def load(self, item_id: str):
        image_path, label_path = self.files(item_id)
        image = read_image(image_path)
        if os.path.isfile(label_path):
            return image, read_mask(label_path)
        raise FileNotFoundError(f"label of {item_id!r} not found: looked for "
                                + " and ".join(os.path.join(d, item_id + ".png") for d in self.label_dirs))
