"""Real images that ship inside installed packages: demos and tests run with no download.

- Photos: ``skimage.data`` images bundled in the scikit-image wheel (those needing ``pooch`` downloads are skipped
  if they fail) and scikit-learn's two sample photos (china, flower): 21 images of 172..1411 px.
- Digits: scikit-learn's 1797 labelled 8x8 handwritten digits (values 0..16), rescaled to 0..255 and upsampled.

Decoded once per process (``functools.lru_cache``); the public functions return fresh copies, so callers may
modify what they get without corrupting the cache.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from .images import to_rgb

logger = logging.getLogger(__name__)

SKIMAGE_NAMES: tuple[str, ...] = (
    "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
    "colorwheel", "logo", "camera", "horse", "coins", "moon", "brick", "grass", "gravel", "page", "text", "clock",
)  # fmt: skip


def _array_to_rgb(a: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 3) or (H, W, 4) array of bool / uint8 / float in [0, 1] -> PIL RGB."""
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float64) * (255.0 if a.max() <= 1.0 else 1.0)), 0, 255).astype(np.uint8)
    return to_rgb(Image.fromarray(a))


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[tuple[str, Image.Image], ...]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    out: list[tuple[str, Image.Image]] = []
    for name in SKIMAGE_NAMES:
        try:
            out.append((f"skimage:{name}", _array_to_rgb(np.asarray(getattr(skimage.data, name)()))))
        except Exception as err:  # e.g. an image that needs a download in this scikit-image version
            logger.warning("skipping skimage.data.%s: %s: %s", name, type(err).__name__, err)
    bunch = load_sample_images()
    for fname, a in zip(bunch.filenames, bunch.images, strict=True):
        out.append((f"sklearn:{Path(fname).name}", _array_to_rgb(a)))
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _digits(size: int) -> tuple[tuple[Image.Image, ...], tuple[int, ...]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8), 0..16 -> 0..255
    images = tuple(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC).convert("RGB") for p in pixels)
    return images, tuple(int(t) for t in bunch.target)


def photo_names() -> list[str]:
    """Names of the images :func:`sample_photos` returns, in the same order (``skimage:NAME``, ``sklearn:FILE``)."""
    return [name for name, _ in _photos()]


def sample_photos() -> list[Image.Image]:
    """The embedded photos as PIL RGB images of their native sizes (fresh copies)."""
    return [img.copy() for _, img in _photos()]


def sample_digits(size: int = 32) -> tuple[list[Image.Image], list[int]]:
    """The 1797 scikit-learn digits as (size x size) PIL RGB images (bicubic upsampled) and their labels 0..9."""
    if size <= 0:
        raise ValueError(f"digit size must be positive, got {size}")
    images, labels = _digits(size)
    return [img.copy() for img in images], list(labels)
