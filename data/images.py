"""Reading images robustly: any file Pillow can open, any pixel mode, always 8-bit RGB out.

Real image folders are messy: grayscale scans, palette GIFs, CMYK JPEGs from print workflows, PNG logos with
alpha, 16-bit medical/astronomy PNGs and TIFFs, float TIFFs. The pretraining transform wants 8-bit RGB, so every
reader in this package (folders, ``datasets`` sources, embedded samples) goes through :func:`to_rgb`.

Conversion rules (documented because they change pixel values):

- ``RGB`` is returned as is; ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr`` ... go through Pillow's ``convert("RGB")``.
- Anything with transparency (``RGBA``, ``LA``, ``PA``, palette or grayscale with a ``transparency`` entry) is
  alpha-composited **on white**: dropping alpha would expose whatever colour the encoder left under transparent
  pixels (often black), which turns logos and icons into black squares.
- High bit depth single-channel modes are scaled to 8 bits instead of clipped (Pillow's own ``convert`` clips
  ``I;16`` at 255, turning most 16-bit images white): ``I;16*`` divides by 257 (65535 -> 255); ``I`` (32-bit int)
  is used as is when it fits 0..255, divided by 257 when it fits 0..65535, else min-max stretched; ``F`` (float)
  is multiplied by 255 when it lies in [0, 1], used as is when it fits 0..255, else min-max stretched.
- Multi-frame files (animated GIF, multi-page TIFF) give their first frame; the EXIF orientation is applied (as
  the ``datasets`` image decoder does, so both readers agree).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
"""Lower-case suffixes treated as images when scanning folders (matched case-insensitively)."""

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)


def is_image_file(path: str | Path) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a single-channel ``I;16*`` / ``I`` / ``F`` image to uint8, (H, W), without clipping at 255."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return np.round(a.astype(np.float32) / 257.0).astype(np.uint8)
    a = a.astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0
    else:  # unknown range: stretch what is there rather than clip it
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a loaded PIL image of any mode to 8-bit ``RGB`` (rules in the module docstring).

    Returns ``img`` itself when it is already RGB without transparency, otherwise a new image.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def finish_decode(img: Image.Image) -> Image.Image:
    """First frame, pixels loaded, EXIF orientation applied, converted to RGB; always a new image object.

    Loading here (not lazily in the transform) makes truncated files fail inside the reader, where the dataset
    can catch the error and skip the file.
    """
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()
    orientation = img.getexif().get(Image.ExifTags.Base.Orientation)
    if orientation not in (None, 1):
        img = ImageOps.exif_transpose(img)
    out = to_rgb(img)
    return out.copy() if out is img else out


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` and return its first frame as an 8-bit RGB image of the file's size, (W, H) in PIL terms.

    Raises:
        FileNotFoundError: the file does not exist.
        OSError: the file is empty, truncated, not an image, or in a format Pillow cannot decode; the message
            names the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            return finish_decode(img)
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise OSError(f"cannot read image {path}: {type(err).__name__}: {err}") from err
