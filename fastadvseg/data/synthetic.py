"""The embedded default dataset: procedurally generated scenes of textured shapes (no files, no download).

Every item is a pure function of ``(seed, split, index)``: ``generate(index, split, seed)`` draws all of
its randomness from ``numpy.random.default_rng([seed, split_code, index])``, so item 17 of "train" is
the same on every machine and in every DataLoader worker.

What makes it a fair, non-trivial segmentation task:

* 7 foreground classes told apart by **shape** (disc, square, triangle, ring, star, cross, crescent),
  randomly rotated, mildly stretched, radius 10..30 px at the default 96x96 (3x scale range; radii scale
  with the image size);
* **texture** and **colour** help but do not decide: each class has a preferred texture (used 70% of the
  time, otherwise any of 8 textures) and a preferred hue (Gaussian spread that overlaps the neighbouring
  classes' hues); the background uses the same textures and colours;
* **clutter**: a coloured low-frequency background, distractor strokes and irregular blobs of the
  background class painted with object-like colours and textures;
* **occlusion**: 2..6 objects per image painted in random order over each other;
* **illumination**: global gain, a linear light gradient, a colour cast, blur and sensor noise;
* a 1-pixel **ignore band** (255) on the inside of every object contour, like VOC's boundary band.

``python -m fastadvseg.data.synthetic --out DIR --n 8`` writes samples as PNGs (image | colourised label).
"""
from __future__ import annotations

import argparse
import colorsys
import math
import os
import time
from functools import lru_cache
from typing import List, Tuple

import numpy as np

from .base import Source, colorize

__all__ = ["CLASS_NAMES", "SPLITS", "generate", "SyntheticSource", "PALETTE", "MEAN", "STD"]

CLASS_NAMES = ["background", "disc", "square", "triangle", "ring", "star", "cross", "crescent"]
SPLITS = {"train": 0, "val": 1, "test": 2}
IGNORE = 255
# Mean / std of the generated RGB (in [0, 1]) over 400 train items of seed 0 (measured, rounded).
MEAN = (0.37, 0.35, 0.35)
STD = (0.22, 0.21, 0.22)
PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
           (245, 130, 48), (145, 30, 180), (70, 240, 240)]

NUM_TEXTURES = 8
# Preferred texture of each foreground class (index into the texture list of _texture).
_PREFERRED_TEXTURE = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6}
_P_PREFERRED = 0.7
_HUE_SPREAD = 0.07  # std of an object's hue around its class's hue; class hues are 1/7 apart
_R_MIN, _R_MAX = 10.0, 30.0


@lru_cache(maxsize=8)
def _grid(size: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


@lru_cache(maxsize=8)
def _upsample_matrix(size: int, n: int) -> np.ndarray:
    """(size, n) bilinear interpolation weights from an n-point grid to ``size`` pixels."""
    pos = (np.arange(size, dtype=np.float32) + 0.5) * (n - 1) / size
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
    f = pos - i0
    m = np.zeros((size, n), np.float32)
    m[np.arange(size), i0] = 1 - f
    m[np.arange(size), i0 + 1] += f
    return m


def _smooth_noise(rng, size: int, channels: int, n: int = 5) -> np.ndarray:
    """(size, size, channels) smooth random field in [0, 1] (bilinear upsampling of an n x n grid)."""
    g = rng.random((channels, n, n), dtype=np.float32)
    m = _upsample_matrix(size, n)
    return np.einsum("yi,cij,xj->yxc", m, g, m)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def _colours(rng, hue: float) -> Tuple[np.ndarray, np.ndarray]:
    """A base colour of ``hue`` and a darker, slightly hue-shifted second colour for the texture."""
    s, v = rng.uniform(0.35, 0.95), rng.uniform(0.5, 1.0)
    c1 = _hsv(hue, s, v)
    c2 = _hsv(hue + rng.normal(0, 0.05), min(1.0, s * rng.uniform(0.8, 1.2)), v * rng.uniform(0.3, 0.7))
    return c1, c2


def _texture(rng, kind: int, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Texture ``kind`` in [0, 1] at pixel coordinates (y, x) (any shape)."""
    a = rng.uniform(0, math.pi)
    period = rng.uniform(4.0, 8.0)
    yr = x * math.sin(a) + y * math.cos(a) + rng.uniform(0, period)
    xr = x * math.cos(a) - y * math.sin(a) + rng.uniform(0, period)
    w = 2 * math.pi / period
    if kind == 0:  # flat with a soft shading gradient
        return 0.75 + 0.25 * np.tanh(xr / 12.0)
    if kind == 1:  # stripes
        return 0.5 + 0.5 * np.sin(w * xr)
    if kind == 2:  # checkerboard
        return ((np.floor(xr / period) + np.floor(yr / period)) % 2).astype(np.float32)
    if kind == 3:  # dots
        return (np.cos(w * xr) * np.cos(w * yr) > 0.3).astype(np.float32)
    if kind == 4:  # speckle
        return rng.random(x.shape, dtype=np.float32)
    if kind == 5:  # concentric rings around a random centre
        cy, cx = y.mean() + rng.normal(0, 4), x.mean() + rng.normal(0, 4)
        return 0.5 + 0.5 * np.sin(w * np.sqrt((y - cy) ** 2 + (x - cx) ** 2))
    if kind == 6:  # grid lines
        return (np.minimum(np.mod(xr, period), np.mod(yr, period)) > 1.3).astype(np.float32)
    # kind 7: blotchy interference of two waves
    b = a + rng.uniform(0.6, 2.5)
    return 0.5 + 0.25 * (np.sin(w * xr) + np.sin(0.7 * w * (x * math.cos(b) - y * math.sin(b))))


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of class ``cls``'s shape in its local frame (circumradius about 1)."""
    if cls == 1:  # disc
        return u * u + v * v <= 1.0
    if cls == 2:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if cls == 3:  # equilateral triangle, circumradius 1.2
        m = np.ones(u.shape, bool)
        for k in range(3):
            t = -math.pi / 2 + 2 * math.pi * k / 3
            m &= u * math.cos(t) + v * math.sin(t) <= 0.6
        return m
    if cls == 4:  # ring
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55 ** 2)
    if cls == 5:  # five-pointed star
        r = np.sqrt(u * u + v * v)
        return r <= 0.5 + 0.5 * (0.5 + 0.5 * np.cos(5 * np.arctan2(v, u)))
    if cls == 6:  # cross
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
    if cls == 7:  # crescent
        return (u * u + v * v <= 1.0) & ((u - 0.5) ** 2 + v * v > 0.75 ** 2)
    raise ValueError(f"unknown class {cls}")


def _paint(img, region, y, x, rng, kind: int, hue: float, mask: np.ndarray) -> None:
    if not mask.any():  # e.g. a stroke entirely outside the image
        return
    c1, c2 = _colours(rng, hue)
    t = _texture(rng, kind, y, x)[..., None]
    col = c1 * t + c2 * (1.0 - t)
    sub = img[region]
    sub[mask] = col[mask]


def _box(y0: float, y1: float, x0: float, x1: float, size: int) -> Tuple[slice, slice]:
    """The pixel slices of a bounding box, clipped to the image (may be empty)."""
    return (slice(min(size, max(0, int(y0))), min(size, max(0, int(y1) + 2))),
            slice(min(size, max(0, int(x0))), min(size, max(0, int(x1) + 2))))


def _class_hue(cls: int) -> float:
    return (cls - 1) / 7.0


def _texture_for(rng, cls: int) -> int:
    if rng.random() < _P_PREFERRED:
        return _PREFERRED_TEXTURE[cls]
    return int(rng.integers(NUM_TEXTURES))


def object_frame(rng, r: float, size: int, margin: float = 0.2):
    """An object of radius ``r`` placed at random (centre at least ``margin * r`` inside the image), rotated and
    mildly stretched: its bounding box ``region``, the pixel coordinates ``y, x`` there and its local frame ``u, v``
    (the shape's circumradius is about 1)."""
    yy, xx = _grid(size)
    cy, cx = rng.uniform(margin * r, size - margin * r, 2)
    theta = rng.uniform(0, 2 * math.pi)
    stretch = rng.uniform(0.85, 1.15)
    region = _box(cy - 1.45 * r, cy + 1.45 * r, cx - 1.45 * r, cx + 1.45 * r, size)
    y, x = yy[region], xx[region]
    dy, dx = y - cy, x - cx
    u = (math.cos(theta) * dx + math.sin(theta) * dy) / (r * stretch)
    v = (-math.sin(theta) * dx + math.cos(theta) * dy) * stretch / r
    return region, y, x, u, v


def generate(index: int, split: str = "train", seed: int = 0, size: int = 96) -> Tuple[np.ndarray, np.ndarray]:
    """Item ``index`` of ``split``: a (size, size, 3) float32 image in [0, 1] and a (size, size) uint8 label."""
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; expected one of {sorted(SPLITS)}")
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    yy, xx = _grid(size)

    # Background: two colours blended by a smooth field, plus a faint texture.
    c1, c2 = _colours(rng, rng.random())
    field = _smooth_noise(rng, size, 1)
    img = c1 * field + c2 * (1.0 - field)
    tex = _texture(rng, int(rng.integers(NUM_TEXTURES)), yy, xx)[..., None]
    img *= 0.85 + 0.15 * tex
    label = np.zeros((size, size), np.uint8)

    # Clutter of the background class: strokes and irregular blobs with object-like colours/textures.
    for _ in range(int(rng.integers(1, 4))):
        p0, p1 = rng.uniform(-10, size + 10, 2), rng.uniform(-10, size + 10, 2)
        width = rng.uniform(0.8, 2.5)
        region = _box(min(p0[0], p1[0]) - 3, max(p0[0], p1[0]) + 3, min(p0[1], p1[1]) - 3, max(p0[1], p1[1]) + 3, size)
        y, x = yy[region], xx[region]
        d = p1 - p0
        t = np.clip(((y - p0[0]) * d[0] + (x - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
        dist2 = (y - p0[0] - t * d[0]) ** 2 + (x - p0[1] - t * d[1]) ** 2
        _paint(img, region, y, x, rng, int(rng.integers(NUM_TEXTURES)), rng.random(), dist2 <= width ** 2)
    for _ in range(int(rng.integers(0, 3))):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(3.0, 9.0)
        region = _box(cy - 1.3 * r, cy + 1.3 * r, cx - 1.3 * r, cx + 1.3 * r, size)
        y, x = yy[region], xx[region]
        ang = np.arctan2(y - cy, x - cx)
        rad = r * (1 + 0.3 * np.sin(rng.integers(2, 4) * ang + rng.uniform(0, 6.3))) * np.where(
            np.cos(ang - rng.uniform(0, 6.3)) > 0, 1.0, rng.uniform(0.4, 0.8))
        _paint(img, region, y, x, rng, int(rng.integers(NUM_TEXTURES)), rng.random(),
               (y - cy) ** 2 + (x - cx) ** 2 <= rad ** 2)

    # Objects, painted over each other in random order (occlusion).
    for _ in range(int(rng.integers(2, 7))):
        cls = int(rng.integers(1, len(CLASS_NAMES)))
        r = _R_MIN * (_R_MAX / _R_MIN) ** rng.random() * size / 96.0
        region, y, x, u, v = object_frame(rng, r, size)
        mask = _shape_mask(cls, u, v)
        hue = _class_hue(cls) + rng.normal(0, _HUE_SPREAD)
        _paint(img, region, y, x, rng, _texture_for(rng, cls), hue, mask)
        label[region][mask] = cls

    return finish(img, label, rng, size)


def finish(img: np.ndarray, label: np.ndarray, rng, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """The camera, shared with the pretraining data (fastadvseg/data/pretrain_shapes.py): illumination (gain, linear
    light gradient, colour cast), blur and sensor noise; then the 1-pixel ignore band inside every object contour."""
    yy, xx = _grid(size)
    gy, gx = rng.uniform(-0.5, 0.5, 2)
    light = rng.uniform(0.55, 1.35) * (1 + gy * (yy / size - 0.5) + gx * (xx / size - 0.5))
    img *= light[..., None] * (1 + rng.normal(0, 0.06, 3)).astype(np.float32)
    img[1:-1] = 0.15 * img[:-2] + 0.7 * img[1:-1] + 0.15 * img[2:]
    img[:, 1:-1] = 0.15 * img[:, :-2] + 0.7 * img[:, 1:-1] + 0.15 * img[:, 2:]
    img += rng.uniform(0.01, 0.06) * rng.standard_normal(img.shape, dtype=np.float32)
    np.clip(img, 0.0, 1.0, out=img)

    # Ignore band: object pixels with a 4-neighbour of another class.
    edge = np.zeros_like(label, dtype=bool)
    diff_v = label[1:] != label[:-1]
    diff_h = label[:, 1:] != label[:, :-1]
    edge[1:] |= diff_v
    edge[:-1] |= diff_v
    edge[:, 1:] |= diff_h
    edge[:, :-1] |= diff_h
    label[edge & (label != 0)] = IGNORE
    return img.astype(np.float32, copy=False), label


class SyntheticSource(Source):
    """``num_train`` train ids ``train_0000...``, ``num_val`` val ids ``val_0000...`` and ``num_test`` held-out test ids
    ``test_0000...``, generated on demand. The three splits are disjoint by construction: each item's randomness is
    ``default_rng([seed, split_code, index])`` with its own split code (train 0, val 1, test 2), so no test image is a
    train or val image, whatever the counts; the test split was fixed (200 items of seed 0) before any run scored it."""

    def __init__(self, seed: int = 0, size: int = 96, num_train: int = 1000, num_val: int = 200, num_test: int = 200):
        self.name = "synthetic"
        self.seed, self.size = int(seed), int(size)
        self.class_names = list(CLASS_NAMES)
        self.mean, self.std = MEAN, STD
        self.palette = list(PALETTE)
        self.train_ids = [f"train_{i:04d}" for i in range(int(num_train))]
        self.val_ids = [f"val_{i:04d}" for i in range(int(num_val))]
        self.test_ids = [f"test_{i:04d}" for i in range(int(num_test))]

    def load(self, item_id: str):
        split, _, idx = item_id.rpartition("_")
        if split not in SPLITS or not idx.isdigit():
            raise ValueError(f"not a synthetic item id: {item_id!r} (expected e.g. 'train_0007')")
        return generate(int(idx), split, self.seed, self.size)


def dump_samples(out: str, n: int = 8, split: str = "train", seed: int = 0, size: int = 96, zoom: int = 3) -> List[str]:
    """Write ``n`` items as PNGs (image | colourised label, enlarged ``zoom`` times); return the paths."""
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    paths = []
    for i in range(n):
        img, lab = generate(i, split, seed, size)
        pair = np.concatenate([(img * 255 + 0.5).astype(np.uint8), np.full((size, 4, 3), 255, np.uint8),
                               colorize(lab, PALETTE)], axis=1)
        pair = pair.repeat(zoom, 0).repeat(zoom, 1)
        path = os.path.join(out, f"{split}_{i:04d}.png")
        Image.fromarray(pair).save(path)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fastadvseg.data.synthetic",
                                description="Write samples of the embedded synthetic dataset as PNGs.")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=8, help="number of items")
    p.add_argument("--split", default="train", choices=sorted(SPLITS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--zoom", type=int, default=3, help="enlargement of the written PNGs")
    p.add_argument("--time", type=int, default=0, metavar="N", help="also time generating N items")
    a = p.parse_args(argv)
    for path in dump_samples(a.out, a.n, a.split, a.seed, a.size, a.zoom):
        print(path)
    if a.time:
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(a.time):
            generate(i, a.split, a.seed, a.size)
        wall, cpu = (time.perf_counter() - w0) / a.time, (time.process_time() - c0) / a.time
        print(f"generation: {1e3 * cpu:.2f} ms CPU ({1e3 * wall:.2f} ms wall) per {a.size}x{a.size} item, "
              f"mean over {a.time}")


if __name__ == "__main__":
    main()
