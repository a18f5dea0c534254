"""Reading images, masks and id lists from disk, with errors that name the file.

PIL (Pillow) is the only image dependency: it reads JPEG and PNG, including palette PNGs whose palette
index is the class id (PASCAL VOC), which is what segmentation masks need. torchvision is not used.
"""
from __future__ import annotations

import os
from typing import List

import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "read_image", "read_mask", "read_id_list", "require_dir"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Single-channel PIL modes whose pixel values are the class ids themselves.
_MASK_MODES = {"P", "L", "I", "I;16", "I;16L", "I;16B"}


def _open(path, kind: str):
    try:
        from PIL import Image
    except ImportError as e:  # Pillow comes with the "train" extra
        raise ImportError("fastadvseg needs Pillow to read image files: pip install 'fastadvseg[train]'") from e
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} file not found: {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now, so that a truncated or corrupt file fails here, with its name
    except Exception as e:
        raise ValueError(f"cannot read {kind} file {path}: {type(e).__name__}: {e}") from e
    return img


def read_image(path) -> np.ndarray:
    """An RGB image as a (H, W, 3) uint8 array."""
    img = _open(path, "image")
    return np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)


def read_mask(path) -> np.ndarray:
    """A label mask as a (H, W) int64 array of class ids (palette index for palette PNGs).

    Colour (RGB) masks are refused: the class of a colour is ambiguous without a palette.
    """
    img = _open(path, "mask")
    if img.mode not in _MASK_MODES:
        raise ValueError(f"mask file {path} has PIL mode {img.mode!r}; expected a single-channel PNG "
                         f"(palette or greyscale) whose pixel values are class ids, 255 = ignore")
    return np.asarray(img).astype(np.int64, copy=False)


def read_id_list(path) -> List[str]:
    """Ids from a text file, one per line. Lines like ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``
    (DeepLab's list format) give the stem of the first path, ``x``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"id list not found: {path}")
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            first = line.split()[0]
            if "/" in first or first.lower().endswith(IMAGE_EXTENSIONS):
                first = os.path.splitext(os.path.basename(first))[0]
            ids.append(first)
    if not ids:
        raise ValueError(f"id list {path} is empty")
    return ids


def require_dir(path, what: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} directory not found: {path}")
    return path
