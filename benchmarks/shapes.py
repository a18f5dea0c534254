"""Shape sets. A shape is (N, C, H, W) of the segmentation logits and labels; discriminator maps are (N, 1, H, W)."""
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
TINY = Shape("tiny", 1, 5, 33, 33, tiny=True)  # training steps in smoke tests: the smallest crop D takes (stride 32)
E2E_CPU = Shape("e2e-cpu", 2, 21, 129, 129)  # a training iteration of the compact G on a CPU, N labelled + N not

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


def parse_shape(text: str) -> Shape:
    """A shape by name (``voc-n2``) or ``NxCxHxW`` (``1x5x128x128``)."""
    named = {s.name: s for s in (SMOKE, VOC_SMALL, VOC, CITYSCAPES, ADE, TINY, E2E_CPU)}
    if text in named:
        return named[text]
    try:
        n, c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r}: a shape name or NxCxHxW") from None
    return Shape(text, n, c, h, w)
