"""Any folder of images and masks.

Layout under ``root``::

    images/<id>.jpg|.jpeg|.png
    masks/<id>.png        single-channel (palette or greyscale): pixel value = class id, 255 = ignore
    train.txt, val.txt    optional id lists (one id per line). With only one of them, the other split is
                          every remaining id; with neither, a deterministic 90/10 split of the ids sorted
                          by name: every 10th id (the 10th, 20th, ...) is val (at least one val id).
    classes.txt           optional class names, one per line (line k = class k). Without it the number
                          of classes is max(mask value other than 255) + 1 over all masks, read once at
                          build time (in parallel, remembered: see check.py), and the names are "class_0",
                          "class_1", ...; a mask value above 254 is refused, naming its file.

Normalisation: the ImageNet mean/std.
"""
from __future__ import annotations

import os

from .base import IMAGENET_MEAN, IMAGENET_STD, Source, default_palette
from .check import infer_num_classes
from .io import IMAGE_EXTENSIONS, read_id_list, read_image, read_mask, require_dir

__all__ = ["FolderSource"]


class FolderSource(Source):
    def __init__(self, root: str, ignore_index: int = 255):
        self.name = "folder"
        self.root = require_dir(root, "dataset folder")
        self.image_dir = require_dir(os.path.join(self.root, "images"), "images")
        self.mask_dir = require_dir(os.path.join(self.root, "masks"), "masks")
        self.images = {}
        for f in sorted(os.listdir(self.image_dir)):
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTENSIONS:
                self.images.setdefault(stem, os.path.join(self.image_dir, f))
        if not self.images:
            raise FileNotFoundError(f"no .jpg/.jpeg/.png images in {self.image_dir}")
        all_ids = sorted(self.images)
        lists = {s: os.path.join(self.root, s + ".txt") for s in ("train", "val")}
        given = {s: read_id_list(p) for s, p in lists.items() if os.path.isfile(p)}
        for s, ids in given.items():
            unknown = [i for i in ids if i not in self.images]
            if unknown:
                raise ValueError(f"{lists[s]} names {len(unknown)} id(s) without an image in {self.image_dir}, "
                                 f"e.g. {unknown[:3]}")
        if "train" in given and "val" in given:
            self.train_ids, self.val_ids = given["train"], given["val"]
        elif given:
            (s, ids), = given.items()
            rest = [i for i in all_ids if i not in set(ids)]
            self.train_ids, self.val_ids = (ids, rest) if s == "train" else (rest, ids)
        else:
            n = len(all_ids)
            val_idx = set(range(9, n, 10)) or ({n - 1} if n > 1 else set())
            self.val_ids = [i for k, i in enumerate(all_ids) if k in val_idx]
            self.train_ids = [i for k, i in enumerate(all_ids) if k not in val_idx]
        classes_txt = os.path.join(self.root, "classes.txt")
        if os.path.isfile(classes_txt):
            with open(classes_txt, encoding="utf-8") as f:
                self.class_names = [line.strip() for line in f if line.strip()]
            if not self.class_names:
                raise ValueError(f"{classes_txt} lists no class names")
        else:  # every item read once, in parallel, remembered for the check before training (check.py)
            n = infer_num_classes(self, self.train_ids + self.val_ids, ignore_index, where=self.mask_dir)
            self.class_names = [f"class_{k}" for k in range(n)]
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.palette = default_palette(len(self.class_names))

    def _mask_path(self, item_id: str) -> str:
        return os.path.join(self.mask_dir, item_id + ".png")

    def files(self, item_id: str):
        return [self.images.get(item_id, os.path.join(self.image_dir, item_id)), self._mask_path(item_id)]

    def load(self, item_id: str):
        if item_id not in self.images:
            raise FileNotFoundError(f"no image for id {item_id!r} in {self.image_dir}")
        return read_image(self.images[item_id]), read_mask(self._mask_path(item_id))
