"""Datasets for semi-supervised segmentation: one ``build_data`` call gives the labelled, unlabelled and
val sets of a dataset, the labelled split (drawn from a seed or reused from a file) and its metadata.

    bundle = build_data("synthetic", crop_size=(81, 81), labelled_fraction=0.125, split_seed=0)
    save_split(bundle.split, run_dir / "split.json")
    image, label, name = bundle.labelled[0]    # (3, 81, 81) float32, (81, 81) int64 (255 = ignore), "train_0003"

Datasets (``dataset``): ``"synthetic"`` (embedded, generated, no files: the default), ``"voc"``
(PASCAL VOC 2012 + SBD train_aug), ``"cityscapes"`` (19 trainIds), ``"folder"`` (images/ + masks/).
Each source module documents its layout. Module map::

    check.py       checking every file before training (parallel, cached by size and mtime)
    io.py          reading images / masks / id lists, errors that name the file (Pillow)
    base.py        Source (a dataset's layout) and SegmentationSet (items, augmentation), palettes
    transforms.py  the paper's augmentation (random scale, pad with ignore, random crop, mirror), val padding
    split.py       the labelled/unlabelled split: draw from a seed, save, load, check
    synthetic.py   the embedded default dataset (and a sample dumper: python -m fastadvseg.data.synthetic)
    voc.py, cityscapes.py, folder.py   the file-based datasets
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from torch.utils.data import Dataset

from .base import IMAGENET_MEAN, IMAGENET_STD, SegmentationSet, Source, colorize, default_palette, denormalize
from .split import draw_split, load_split, resolve_split, save_split

__all__ = ["DataBundle", "build_data", "build_source", "save_split", "load_split", "draw_split",
           "DATASETS", "SegmentationSet", "Source", "colorize", "denormalize", "default_palette",
           "IMAGENET_MEAN", "IMAGENET_STD"]

DATASETS = ("synthetic", "voc", "cityscapes", "folder")


@dataclass
class DataBundle:
    labelled: Dataset                 # training items whose labels are used (augmented)
    unlabelled: Optional[Dataset]     # training items whose labels are not used (augmented); None at fraction 1
    val: Dataset                      # evaluation items, not augmented (every choice is made on these)
    num_classes: int
    class_names: List[str]
    ignore_index: int
    split: dict                       # {"labelled": [ids...], "unlabelled": [ids...]}
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    palette: List[Tuple[int, int, int]] = field(default_factory=list)  # RGB per class, for figures
    dataset: str = ""
    test: Optional[Dataset] = None    # held-out test items, not augmented (synthetic only); None: no test split


def build_source(dataset: str, root: Optional[str] = None, *, ignore_index: int = 255, synthetic_seed: int = 0,
                 synthetic_size: int = 96, synthetic_num_train: int = 1000, synthetic_num_val: int = 200,
                 synthetic_num_test: int = 200) -> Source:
    """The :class:`Source` (layout, ids, classes, loader) of ``dataset``."""
    if dataset == "synthetic":
        from .synthetic import SyntheticSource

        return SyntheticSource(seed=synthetic_seed, size=synthetic_size, num_train=synthetic_num_train,
                               num_val=synthetic_num_val, num_test=synthetic_num_test)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if root is None:
        raise ValueError(f"dataset {dataset!r} needs a root folder (root=...)")
    if dataset == "voc":
        from .voc import VOCSource

        return VOCSource(root)
    if dataset == "cityscapes":
        from .cityscapes import CityscapesSource

        return CityscapesSource(root)
    from .folder import FolderSource

    return FolderSource(root, ignore_index=ignore_index)


def build_data(dataset: str, root: Optional[str] = None, *, crop_size=(321, 321), labelled_fraction: float = 0.125,
               labelled_count: Optional[int] = None, split_seed: int = 0, split_file: Optional[str] = None,
               scale_range=(0.5, 1.5), mirror: bool = True, val_pad: Optional[int] = None,
               val_limit: Optional[int] = None, ignore_index: int = 255, image_size=None, synthetic_seed: int = 0,
               synthetic_size: int = 96, synthetic_num_train: int = 1000, synthetic_num_val: int = 200,
               synthetic_num_test: int = 200) -> DataBundle:
    """Build the labelled / unlabelled / val datasets of ``dataset``.

    Split: with ``split_file`` the saved split is reused (error naming the file if it is missing, corrupt
    or names unknown ids); else ``labelled_count`` (or ``round(labelled_fraction * n_train)``) ids are drawn
    with ``numpy.random.default_rng(split_seed)``. ``labelled_fraction == 1`` (and no unlabelled ids) gives
    ``unlabelled = None``. Training items are augmented (random scale in ``scale_range``, pad with ignore,
    random crop to ``crop_size``, random mirror) with torch's RNG; val items are not, and are padded to
    ``val_pad`` x ``val_pad`` when it is given. ``val_limit`` keeps the first ``val_limit`` val ids. A source with a
    held-out test split (synthetic) also gives ``test`` (all its ids, treated as val items); else ``test`` is None.
    ``image_size`` (h, w), when given, resizes every train and val item to that size first (image bilinear,
    label nearest): the paper's Cityscapes protocol is ``image_size=(512, 1024)``, ``scale_range=(1, 1)``,
    ``crop_size=(512, 1024)``; metrics are then computed at that resolution.
    The ``synthetic_*`` options set the embedded dataset's seed, image size and number of items.
    """
    if isinstance(crop_size, int):
        crop_size = (crop_size, crop_size)
    crop_size = (int(crop_size[0]), int(crop_size[1]))
    if min(crop_size) < 1:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    if len(scale_range) != 2 or not 0 < float(scale_range[0]) <= float(scale_range[1]):
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
    source = build_source(dataset, root, ignore_index=ignore_index, synthetic_seed=synthetic_seed,
                          synthetic_size=synthetic_size, synthetic_num_train=synthetic_num_train,
                          synthetic_num_val=synthetic_num_val, synthetic_num_test=synthetic_num_test)
    if split_file is not None:
        split = resolve_split(split_file, source.train_ids)
    else:
        split = draw_split(source.train_ids, labelled_fraction=labelled_fraction, labelled_count=labelled_count,
                           seed=split_seed)
    val_ids = list(source.val_ids)
    if val_limit is not None:
        if int(val_limit) < 1:
            raise ValueError(f"val_limit must be >= 1, got {val_limit}")
        val_ids = val_ids[: int(val_limit)]
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    train_kw = dict(train=True, crop_size=crop_size, scale_range=tuple(scale_range), mirror=mirror,
                    ignore_index=ignore_index, image_size=image_size)
    labelled = SegmentationSet(source, split["labelled"], **train_kw)
    unlabelled = SegmentationSet(source, split["unlabelled"], **train_kw) if split["unlabelled"] else None
    val = SegmentationSet(source, val_ids, train=False, val_pad=val_pad, ignore_index=ignore_index,
                          image_size=image_size)
    test_ids = list(getattr(source, "test_ids", None) or [])
    test = SegmentationSet(source, test_ids, train=False, val_pad=val_pad, ignore_index=ignore_index,
                           image_size=image_size) if test_ids else None
    return DataBundle(labelled=labelled, unlabelled=unlabelled, val=val, num_classes=source.num_classes,
                      class_names=list(source.class_names), ignore_index=ignore_index, split=split,
                      mean=tuple(source.mean), std=tuple(source.std),
                      palette=list(source.palette or default_palette(source.num_classes)), dataset=dataset,
                      test=test)
