"""The pretraining task: procedurally generated scenes DISJOINT from the embedded target data (synthetic.py).

Used by ``python -m fastadvseg.pretrain`` to give the compact segmenter a pretrained start, the way the paper starts
from ImageNet / MS-COCO weights: a task that shares no image and no class with the target data.

* 6 foreground classes, none of the target's (disc, square, triangle, ring, star, cross, crescent): **hexagon,
  L-shape, arrow, hourglass, half-disc, heart**, randomly rotated, mildly stretched, radius 7..30 px;
* 5 textures, none of the target's 8 (flat, stripes, checkerboard, dots, speckle, concentric rings, grid lines,
  interference): **zigzag, radial spokes, bricks, wavy lines, clouds**; any texture and any hue for any class (only
  the shape tells the class);
* background: a two-colour smooth field with one of these textures, and 0..3 wavy distractor strokes;
* the same camera as the target data (illumination, blur, noise, the 1-pixel ignore band: ``synthetic.finish``);
* its own random streams: ``default_rng([seed, 7, index])`` (the target data use split codes 0..2), so no item is
  an item of the target data.

``generate_pretrain(index, seed, size)`` -> (size, size, 3) float32 image in [0, 1], (size, size) uint8 label.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from .synthetic import _colours, _grid, _smooth_noise, finish, object_frame

__all__ = ["PRETRAIN_CLASSES", "generate_pretrain", "STREAM"]

PRETRAIN_CLASSES = ["background", "hexagon", "L-shape", "arrow", "hourglass", "half-disc", "heart"]
STREAM = 7  # the random-stream code of the pretraining items (target data: train 0, val 1, test 2)
NUM_TEXTURES = 5
_R_MIN, _R_MAX = 7.0, 30.0


def _texture(rng, kind: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Texture ``kind`` (0..4) in [0, 1] at pixel coordinates (y, x)."""
    a = rng.uniform(0, math.pi)
    period = rng.uniform(4.0, 9.0)
    yr = x * math.sin(a) + y * math.cos(a) + rng.uniform(0, period)
    xr = x * math.cos(a) - y * math.sin(a) + rng.uniform(0, period)
    if kind == 0:  # zigzag: stripes bent into a triangle wave
        return (np.mod(xr + np.abs(np.mod(yr, period) - period / 2), period) < period / 2).astype(np.float32)
    if kind == 1:  # radial spokes around a random centre
        cy, cx = y.mean() + rng.normal(0, 5), x.mean() + rng.normal(0, 5)
        return 0.5 + 0.5 * np.sin(int(rng.integers(5, 12)) * np.arctan2(y - cy, x - cx))
    if kind == 2:  # bricks: rows of offset blocks with mortar lines
        row = np.floor(yr / period)
        u = np.mod(xr + 0.5 * period * np.mod(row, 2) * 2, 2 * period)
        return ((np.mod(yr, period) > 1.0) & (u > 1.0)).astype(np.float32)
    if kind == 3:  # wavy lines
        w = 2 * math.pi / period
        return 0.5 + 0.5 * np.sin(w * xr + 2.0 * np.sin(0.35 * w * yr))
    # kind 4: clouds (smooth noise of a finer grid than the background's)
    field = _smooth_noise(rng, int(max(y.shape[0], x.shape[-1], 2)), 1, n=9)[..., 0]
    return field[: y.shape[0], : y.shape[-1]]


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of pretraining class ``cls``'s shape in its local frame (circumradius about 1)."""
    au, av = np.abs(u), np.abs(v)
    if cls == 1:  # regular hexagon
        return (av <= 0.866) & (0.866 * au + 0.5 * av <= 0.866)
    if cls == 2:  # L-shape
        return ((u >= -0.7) & (u <= -0.2) & (av <= 0.8)) | ((v >= 0.3) & (v <= 0.8) & (u >= -0.7) & (u <= 0.7))
    if cls == 3:  # arrow: a shaft and a triangular head
        shaft = (u >= -0.9) & (u <= 0.1) & (av <= 0.2)
        head = (u >= 0.1) & (u <= 0.9) & (av <= 0.6 * (0.9 - u) / 0.8)
        return shaft | head
    if cls == 4:  # hourglass: two triangles tip to tip
        return (av <= 0.85) & (au <= 0.05 + 0.75 * av)
    if cls == 5:  # half-disc
        return (u * u + v * v <= 1.0) & (v >= -0.1)
    if cls == 6:  # heart
        x, y = 1.2 * u, -1.2 * v + 0.2
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    raise ValueError(f"unknown pretraining class {cls}")


def _paint(img, region, y, x, rng, mask: np.ndarray) -> None:
    if not mask.any():
        return
    c1, c2 = _colours(rng, rng.random())
    t = _texture(rng, int(rng.integers(NUM_TEXTURES)), y, x)[..., None]
    sub = img[region]
    sub[mask] = (c1 * t + c2 * (1.0 - t))[mask]


def generate_pretrain(index: int, seed: int = 0, size: int = 64) -> Tuple[np.ndarray, np.ndarray]:
    """Pretraining item ``index``: a (size, size, 3) float32 image in [0, 1] and a (size, size) uint8 label."""
    rng = np.random.default_rng([int(seed), STREAM, int(index)])
    yy, xx = _grid(size)
    c1, c2 = _colours(rng, rng.random())
    field = _smooth_noise(rng, size, 1)
    img = c1 * field + c2 * (1.0 - field)
    img *= 0.8 + 0.2 * _texture(rng, int(rng.integers(NUM_TEXTURES)), yy, xx)[..., None]
    label = np.zeros((size, size), np.uint8)
    region = (slice(0, size), slice(0, size))
    for _ in range(int(rng.integers(0, 4))):  # wavy distractor strokes of the background class
        a, off, amp = rng.uniform(0, math.pi), rng.uniform(0, size), rng.uniform(2, 8)
        d = xx * math.sin(a) - yy * math.cos(a) - off + amp * np.sin(2 * math.pi * (xx * math.cos(a) + yy * math.sin(a))
                                                                   / rng.uniform(15, 40))
        _paint(img, region, yy, xx, rng, np.abs(d) <= rng.uniform(0.8, 2.5))
    for _ in range(int(rng.integers(2, 7))):  # objects, painted over each other (occlusion)
        cls = int(rng.integers(1, len(PRETRAIN_CLASSES)))
        r = _R_MIN * (_R_MAX / _R_MIN) ** rng.random()
        region, y, x, u, v = object_frame(rng, r, size, margin=0.1)
        mask = _shape_mask(cls, u, v)
        _paint(img, region, y, x, rng, mask)
        label[region][mask] = cls
    return finish(img, label, rng, size)
