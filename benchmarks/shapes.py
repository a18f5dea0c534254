"""Shape sets. A shape is (N, C, H, W) of the segmentation logits; discriminator maps are (N, 1, H, W)."""
from __future__ import annotations

from typing import Dict, List, NamedTuple


class Shape(NamedTuple):
    name: str
    n: int
    c: int
    h: int
    w: int
    tiny: bool = False  # small enough for the Triton interpreter on CPU

    @property
    def pixels(self) -> int:
        return self.n * self.h * self.w

    def __str__(self) -> str:
        return f"{self.name} (N={self.n}, C={self.c}, {self.h}x{self.w})"


SMOKE = Shape("smoke", 2, 5, 17, 23, tiny=True)  # odd sizes: no kernel gets a lucky multiple of its block
VOC_SMALL = Shape("voc-n2", 2, 21, 321, 321)  # the CPU target shape: VOC at N=2
VOC = Shape("voc", 10, 21, 321, 321)
CITYSCAPES = Shape("cityscapes", 2, 19, 512, 1024)
ADE = Shape("ade", 8, 150, 512, 512)

SHAPE_SETS: Dict[str, List[Shape]] = {
    "smoke": [SMOKE],
    "small": [SMOKE, VOC_SMALL],
    "voc": [VOC],
    "cityscapes": [CITYSCAPES],
    "ade": [ADE],
    "full": [VOC, CITYSCAPES, ADE],
}

# Shapes the performance targets name, per device type.
TARGET_SHAPES = {"cuda": ("voc", "cityscapes"), "cpu": ("voc-n2",)}


def shape_set(name: str) -> List[Shape]:
    if name not in SHAPE_SETS:
        raise ValueError(f"unknown shape set {name!r}; choose one of {', '.join(SHAPE_SETS)}")
    return SHAPE_SETS[name]
