"""The task of the position-bias study: handwritten digits in photographic clutter, renderable at any resolution.

Each sample is a *layout* drawn once from a seeded generator: one of scikit-learn's 1797 real 8x8 digits, a square
crop of one of the 21 photos that ship with scikit-image / scikit-learn as the background, the digit's size and
position as fractions of the canvas, and an ink colour. :func:`render` draws the same layouts at any pixel size from
the original images, so a test at 128 px shows the model the *same scenes* as at 64 px with twice the pixels per
object, as the paper tests ImageNet models at 384 and 512 px after training at 256.

Why this task (and not plain digits or photo crops): the digit spans most of the canvas (70-95%) on a textured
background (text, coins, gravel, faces...), so the class depends on how strokes 10-40 px apart are arranged, across
several windows of the first stages; colour and texture statistics say nothing about it. In a pilot, a model whose
V1 position table had barely moved from zero reached 21% (chance: 10%) against 67% with log-CPB, so the variants
have something to differ on, and a tiny SwinV2 stays well below 100% in a CPU-minute budget.

Training views are random square crops of the scenes magnified 1-1.6x (they may cut the digit, as RandomResizedCrop
cuts ImageNet objects); tests show whole scenes. Digits thus look larger in training than in a test at the training
size, and a test at 1.5x the resolution shows them at about the training scale: the train/test resolution
discrepancy behind the paper's 384 px result exceeding its 256 px one (Touvron et al., FixRes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from simmim.data.samples import sample_photos

PHOTO_SHORT_SIDE = 384  # photos are shrunk once to this short side: crops keep real detail up to ~200 px renders
DIGIT_SCALE = (0.7, 0.95)  # digit side / canvas side
MAX_ZOOM = 1.6  # training views magnify the scene up to 1.6x
CROP_FRACTION = (0.3, 0.7)  # background crop side / photo short side
BACKGROUND_GAIN = 0.6  # the photo is dimmed so the (bright) ink stays readable; its texture still clutters


@dataclass(frozen=True)
class Layout:
    """One scene, resolution-free: which digit, which background crop, where the digit sits and its colour."""

    digit: int  # index into scikit-learn's digits
    photo: int  # index into the embedded photos
    box: tuple[float, float, float]  # background crop: left, top, side, as fractions of the photo's (w, h, short side)
    scale: float  # digit side / canvas side
    pos: tuple[float, float]  # digit top-left (x, y) / canvas side
    ink: tuple[int, int, int]  # RGB
    view: tuple[float, float, float] = (0.0, 0.0, 1.0)  # the part shown: left, top, side / canvas side (1 = all)


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    out = []
    for img in sample_photos():
        f = PHOTO_SHORT_SIDE / min(img.size)
        out.append(np.asarray(img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images / 16.0).astype(np.float32), bunch.target.astype(np.int64)  # (1797, 8, 8) in [0, 1], (1797,)


def digit_split(split: str) -> np.ndarray:
    """Indices of the digits in ``split``: every 5th digit is ``val`` (as ``embedded:digits``), the rest ``train``."""
    idx = np.arange(len(_digits()[1]))
    return idx[idx % 5 == 0] if split == "val" else idx[idx % 5 != 0]


def draw_layouts(digits: np.ndarray, n: int, seed: int, zoom: bool = False) -> list[Layout]:
    """``n`` random scenes over the digit indices ``digits`` (cycled in a seeded order); a pure function of its
    arguments. ``zoom`` shows a random square part of each scene that still holds the whole digit, magnified
    1-:data:`MAX_ZOOM` x (log-uniform): the training augmentation, as RandomResizedCrop is for ImageNet."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    order = np.concatenate([rng.permutation(digits) for _ in range(-(-n // len(digits)))])[:n]
    out = []
    for d in order:
        p = int(rng.integers(len(photos)))
        h, w = photos[p].shape[:2]
        side = rng.uniform(*CROP_FRACTION) * min(h, w)
        box = (rng.uniform(0, w - side) / w, rng.uniform(0, h - side) / h, side / min(h, w))
        scale = rng.uniform(*DIGIT_SCALE)
        pos = (rng.uniform(0, 1 - scale), rng.uniform(0, 1 - scale))
        ink = tuple(int(c) for c in rng.integers(170, 256, size=3))
        view = (0.0, 0.0, 1.0)
        if zoom:  # a random square view of the scene, magnified log-uniformly; it may cut the digit, as RRC does
            side = 1 / math.exp(rng.uniform(0, math.log(MAX_ZOOM)))
            view = (rng.uniform(0, 1 - side), rng.uniform(0, 1 - side), side)
        out.append(Layout(int(d), p, box, float(scale), pos, ink, view))  # type: ignore[arg-type]
    return out


def render_one(layout: Layout, size: int) -> np.ndarray:
    """The layout's view at ``size`` x ``size`` px: (size, size, 3) uint8."""
    left, top, side = layout.view
    full = max(round(size / side), size)  # the whole scene at this size, then the view cut out of it
    x0, y0 = min(round(left * full), full - size), min(round(top * full), full - size)
    return _scene(layout, full)[y0:y0 + size, x0:x0 + size]


def _scene(layout: Layout, size: int) -> np.ndarray:
    """The whole scene at ``size`` px: (size, size, 3) uint8."""
    photo = _photos()[layout.photo]
    h, w = photo.shape[:2]
    side = layout.box[2] * min(h, w)
    left, top = layout.box[0] * w, layout.box[1] * h
    bg = Image.fromarray(photo).resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    canvas = np.asarray(bg, dtype=np.float32) * BACKGROUND_GAIN  # (size, size, 3)
    s = max(round(layout.scale * size), 1)
    glyph = Image.fromarray(_digits()[0][layout.digit]).resize((s, s), Image.Resampling.BICUBIC)
    alpha = np.clip(np.asarray(glyph), 0.0, 1.0)[..., None]  # (s, s, 1) ink coverage
    x, y = round(layout.pos[0] * size), round(layout.pos[1] * size)
    patch = canvas[y:y + s, x:x + s]
    alpha = alpha[: patch.shape[0], : patch.shape[1]]
    canvas[y:y + s, x:x + s] = patch * (1 - alpha) + np.asarray(layout.ink, dtype=np.float32) * alpha
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def render(layouts: list[Layout], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes at ``size`` px -> (images (B, 3, size, size) uint8, labels (B,) int64)."""
    images = np.stack([render_one(lay, size) for lay in layouts])  # (B, size, size, 3)
    labels = _digits()[1][[lay.digit for lay in layouts]]
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
