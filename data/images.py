"""Reading images robustly: any file Pillow can open, any pixel mode; NumPy and multi-band TIFF arrays; any
channel count.

Real image folders are messy: grayscale scans, palette GIFs, CMYK JPEGs from print workflows, PNG logos with
alpha, 16-bit medical/astronomy PNGs and TIFFs, float TIFFs, multi-band satellite rasters. Every reader in this
package (folders, ``datasets`` sources, embedded samples) goes through this module, in two steps:

1. :func:`read_raw` opens a file without decoding its pixels: a lazily opened PIL image (header parsed), or an
   (H, W, C) array for ``.npy`` files and, when ``channels`` is not 3, for ``.tif``/``.tiff`` (read with tifffile).
2. :func:`decode_tensor` decodes it to a (C, H, W) tensor for our transforms; :func:`decode_pil` to a PIL image
   (RGB, or L for one channel) for PIL transforms (timm's). ``decode_tensor`` may decode a JPEG at a reduced DCT
   scale (Pillow's draft mode: 1/2, 1/4 or 1/8 of the size, several times faster than a full decode) when the
   caller will shrink the image at least that much anyway.

Channel counts (``channels``, the model's ``model.in_chans``):

- 3: any Pillow image, converted to 8-bit RGB with the rules below; ``.npy`` arrays (H, W, 3), or (H, W) /
  (H, W, 1) replicated to 3 channels like a grayscale image.
- 1: single-band Pillow images (L, 1, I;16, I, F, LA ...: converted to 8-bit gray with the rules below); ``.npy``
  and ``.tif``/``.tiff`` arrays (H, W) or (H, W, 1). Colour images are refused (:class:`ChannelMismatchError`).
- any other N: ``.npy`` arrays (H, W, N) and TIFFs whose first page holds N samples per pixel (contiguous or
  planar); anything else is refused.

Pixel limit (decompression bombs): one limit for every reader, Pillow's. Pillow refuses an image of more than
``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels (179 M with Pillow's default) from its header; ``.npy`` arrays and TIFFs
read with tifffile are held to the same number, checked from their headers (the array shape, the TIFF page shape)
before any pixel is decoded or read. Such files are unreadable like any other (skipped and counted). Change the
limit with ``PIL.Image.MAX_IMAGE_PIXELS`` (``None`` turns it off, as in Pillow).

Value scaling of arrays (from ``.npy`` and TIFF files): uint8 stays uint8 (read as value / 255 by the transforms),
uint16 is divided by 65535, bool is 0/1, float16/32/64 are used as they are; other dtypes are refused (convert them
to float first). The transforms normalise with ``(x - mean) / std`` after this scaling.

Conversion rules of Pillow images (documented because they change pixel values):

- ``RGB`` and ``L`` are used as they are; ``1``, ``P``, ``CMYK``, ``YCbCr`` ... go through Pillow's ``convert``.
- Anything with transparency (``RGBA``, ``LA``, ``PA``, palette or grayscale with a ``transparency`` entry) is
  alpha-composited **on white**: dropping alpha would expose whatever colour the encoder left under transparent
  pixels (often black), which turns logos and icons into black squares.
- High bit depth single-channel modes are scaled to 8 bits instead of clipped (Pillow's own ``convert`` clips
  ``I;16`` at 255, turning most 16-bit images white): ``I;16*`` divides by 257 (65535 -> 255); ``I`` (32-bit int)
  is used as is when it fits 0..255, divided by 257 when it fits 0..65535, else min-max stretched; ``F`` (float)
  is multiplied by 255 when it lies in [0, 1], used as is when it fits 0..255, else min-max stretched.
- Multi-frame files (animated GIF, multi-page TIFF) give their first frame; the EXIF orientation is applied (as
  the ``datasets`` image decoder does, so both readers agree).

Letters: ``C`` channels, ``H, W`` pixels.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from simmim.errors import InputNotFoundError, UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".npy"}
)
"""Lower-case suffixes treated as images when scanning folders (matched case-insensitively)."""

ARRAY_EXTENSIONS: frozenset[str] = frozenset({".npy"})
TIFF_EXTENSIONS: frozenset[str] = frozenset({".tif", ".tiff"})

RawImage = Image.Image | np.ndarray
"""What :func:`read_raw` returns: a lazily opened PIL image, or an (H, W, C) array."""

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SINGLE_BAND_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255, 255)
_TRANSPOSED = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_ORIENTATION = 0x0112  # the EXIF tag


class UnreadableImageError(OSError):
    """A file or record that cannot be decoded as an image: empty, truncated, not an image, unsupported."""


class ChannelMismatchError(UnreadableImageError):
    """A readable image whose channel count is not the one asked for (``model.in_chans``)."""


def is_image_file(path: str | Path) -> bool:
    """True when ``path`` has one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


def _check_channels(channels: int) -> None:
    if not isinstance(channels, int) or channels < 1:
        raise UserError(f"channels must be a positive integer, got {channels!r} (model.in_chans)")


# ------------------------------------------------------------------------------------------------ opening files


def pixel_limit() -> int | None:
    """The most pixels an image may have, for every reader: Pillow's refusal threshold, ``2 *
    PIL.Image.MAX_IMAGE_PIXELS`` (read at each call, so a changed ``MAX_IMAGE_PIXELS`` applies); None: no limit."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


def check_pixels(height: int, width: int, name: str) -> None:
    """Refuse an image of ``height x width`` pixels (from its header) above :func:`pixel_limit`, before it is
    decoded: a small compressed file can expand to gigabytes (a decompression bomb)."""
    limit = pixel_limit()
    if limit is not None and height * width > limit:
        raise UnreadableImageError(f"{name} is {width}x{height} = {height * width} pixels, more than the limit of "
                                   f"{limit} (2 x PIL.Image.MAX_IMAGE_PIXELS): a possible decompression bomb; raise "
                                   "PIL.Image.MAX_IMAGE_PIXELS if such images are expected")


def _read_tiff(source: str | Path | io.BytesIO, name: str) -> np.ndarray:
    """The first page of a TIFF as (H, W) or (H, W, S): samples moved last when stored planar (S, H, W). The
    page's size is checked against :func:`pixel_limit` from its header, before decoding."""
    import tifffile

    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        depth = max(int(getattr(page, "imagedepth", 1) or 1), 1)  # volumes hold depth planes of H x W
        check_pixels(int(page.imagelength) * depth, int(page.imagewidth), name)
        a = page.asarray()
        axes = page.axes
    if a.ndim == 3 and axes[0] in "SC" and axes[-1] not in "SC":  # planar: samples first
        a = np.moveaxis(a, 0, -1)
    return a


def _read_npy(file: Any, name: str) -> np.ndarray:
    """A ``.npy`` array from an open binary file; its shape is read from the header and checked against
    :func:`pixel_limit` (pixels: the first two axes, (H, W[, C]); for other shapes every value counts) before
    the data is read."""
    start = file.tell()
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, _, _ = np.lib.format.read_array_header_1_0(file)
    else:
        shape, _, _ = np.lib.format.read_array_header_2_0(file)
    if len(shape) in (2, 3):
        check_pixels(int(shape[0]), int(shape[1]), name)
    else:
        check_pixels(math.prod(int(n) for n in shape), 1, name)  # refused later as "not an image" anyway
    file.seek(start)
    return np.load(file, allow_pickle=False)


def read_raw(path: str | Path, channels: int = 3) -> RawImage:
    """Open ``path`` without decoding its pixels where the format allows (see the module docstring).

    Raises:
        FileNotFoundError: the file does not exist.
        UnreadableImageError: the file is empty or not an image Pillow / NumPy / tifffile can open; names the path.
    """
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix in ARRAY_EXTENSIONS:
            with open(path, "rb") as f:
                return _read_npy(f, str(path))
        if suffix in TIFF_EXTENSIONS and channels != 3:
            return _read_tiff(path, str(path))
        return Image.open(path)  # lazy: pixels are decoded in decode_pil / decode_tensor
    except UnreadableImageError:  # already names the file (over the pixel limit)
        raise
    except FileNotFoundError as err:
        raise InputNotFoundError(f"image file {path} does not exist") from err
    except IsADirectoryError as err:
        raise UnreadableImageError(f"cannot read image {path}: it is a folder") from err
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise UnreadableImageError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def raw_from_bytes(data: bytes, name: str = "", channels: int = 3) -> RawImage:
    """Like :func:`read_raw` for file contents held in memory; ``name`` (a file name or path, may be empty) picks
    the reader by its suffix and appears in errors."""
    suffix = os.path.splitext(name)[1].lower()
    try:
        if suffix in ARRAY_EXTENSIONS:
            return _read_npy(io.BytesIO(data), name or "embedded bytes")
        if suffix in TIFF_EXTENSIONS and channels != 3:
            return _read_tiff(io.BytesIO(data), name or "embedded bytes")
        return Image.open(io.BytesIO(data))
    except UnreadableImageError:
        raise
    except Exception as err:
        raise UnreadableImageError(f"cannot read image ({name or 'embedded bytes'}): {type(err).__name__}: {err}") \
            from err


def _name(raw: Any) -> str:
    return getattr(raw, "filename", "") or "image"


def _release(img: Image.Image) -> None:
    """Close the file a lazily opened image still holds (multi-frame files keep it open after ``load``)."""
    if getattr(img, "fp", None) is not None:
        img.close()


# ----------------------------------------------------------------------------------------- Pillow conversions


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


def native_channels(img: Image.Image) -> int:
    """Colour channels of a PIL image, alpha not counted: 1 for gray modes and gray palettes, else 3."""
    if img.mode in _SINGLE_BAND_MODES:
        return 1
    if img.mode in ("P", "PA") and img.palette is not None:
        pal = np.frombuffer(img.palette.tobytes(), dtype=np.uint8)
        if img.palette.mode == "RGB" and pal.size % 3 == 0:
            rgb = pal.reshape(-1, 3)
            return 1 if bool((rgb == rgb[:, :1]).all()) else 3
    return 3


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


def to_gray(img: Image.Image) -> Image.Image:
    """Convert a loaded single-band PIL image to 8-bit ``L`` (same rules as :func:`to_rgb`); raises
    :class:`ChannelMismatchError` for colour images. Returns ``img`` itself when it is already plain ``L``."""
    if native_channels(img) != 1:
        raise ChannelMismatchError(f"{_name(img)} is a colour ({img.mode}) image but model.in_chans is 1; convert "
                                   "the images to grayscale or set model.in_chans=3")
    if img.mode == "L" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_high_depth_to_uint8(img))
    if _has_transparency(img):
        la = img.convert("LA")
        background = Image.new("LA", la.size, (255, 255))
        return Image.alpha_composite(background.convert("RGBA"), la.convert("RGBA")).convert("L")
    return img.convert("L")


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) of ``img`` once its EXIF orientation is applied; reads only the header of a lazily opened file."""
    w, h = img.size
    return (h, w) if _orientation(img) in _TRANSPOSED else (w, h)


def _orientation(img: Image.Image) -> int:
    if "exif" not in img.info and img.format not in ("TIFF", "MPO"):
        return 1  # no EXIF block: skip parsing (the common case, and free)
    return int(img.getexif().get(_ORIENTATION, 1) or 1)


def _decoded(img: Image.Image, channels: int, max_reduction: float = 1.0) -> Image.Image:
    """First frame, pixels loaded (at up to ``max_reduction`` smaller per side for a lazily opened JPEG), EXIF
    orientation applied, converted to RGB (3 channels) or L (1). May return ``img`` itself."""
    if max_reduction >= 2.0:  # only JPEG implements draft; it picks a DCT scale of 1/2, 1/4 or 1/8 no smaller
        w, h = img.size       # than the requested size, and does nothing once the image is loaded
        img.draft(None, (math.ceil(w / max_reduction), math.ceil(h / max_reduction)))
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img.load()
    if _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if channels == 3:
        return to_rgb(img)
    if channels == 1:
        return to_gray(img)
    raise ChannelMismatchError(f"{_name(img)} is a {native_channels(img)}-channel {img.format or ''} image but "
                               f"model.in_chans is {channels}; images with {channels} channels must be .npy arrays "
                               "(H, W, C) or multi-band TIFFs")


def finish_decode(img: Image.Image, channels: int = 3) -> Image.Image:
    """First frame, pixels loaded, EXIF orientation applied, converted to RGB (or L for ``channels=1``); always a
    new image object.

    Loading here (not lazily in the transform) makes truncated files fail inside the reader, where the dataset
    can catch the error and skip the file.
    """
    out = _decoded(img, channels)
    return out.copy() if out is img else out


# ------------------------------------------------------------------------------------------------- decoding


def _array_to_tensor(a: np.ndarray, channels: int, name: str) -> torch.Tensor:
    """(H, W) or (H, W, C) array -> (channels, H, W) uint8 or float32 tensor (scaling in the module docstring)."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise UnreadableImageError(f"{name}: an array of shape {a.shape} is not an image; expected (H, W) or (H, W, C)")
    c = a.shape[2]
    if c != channels and not (c == 1 and channels == 3):
        hint = " (it looks like (C, H, W): store images as (H, W, C))" if a.shape[0] == channels else ""
        raise ChannelMismatchError(f"{name} has {c} channels but model.in_chans is {channels}{hint}")
    if a.dtype == np.uint8:
        t = torch.from_numpy(np.ascontiguousarray(a))
    elif a.dtype == np.uint16:
        t = torch.from_numpy(a.astype(np.float32) * np.float32(1.0 / 65535.0))
    elif a.dtype == bool:
        t = torch.from_numpy(a.astype(np.float32))
    elif a.dtype.kind == "f":
        t = torch.from_numpy(np.nan_to_num(a.astype(np.float32, copy=False), copy=True))
    else:
        raise UnreadableImageError(f"{name}: arrays of dtype {a.dtype} are not supported; use uint8, uint16 or float")
    t = t.permute(2, 0, 1)  # (C, H, W) view of the (H, W, C) array
    return t.expand(3, -1, -1) if c != channels else t


def _pixels(img: Image.Image, padded: bool) -> torch.Tensor:
    """(H, W, C) uint8 tensor of a loaded RGB or L image.

    ``padded`` RGB: a zero-copy view of Pillow's own buffer through its Arrow export, (H, W, 4): Pillow stores RGB
    as 4 bytes a pixel, the 4th is padding. Else (or when the export is not possible: old Pillow, an image stored in
    several memory blocks) a packed copy.
    """
    if padded and img.mode == "RGB":
        try:
            import pyarrow as pa

            flat = pa.array(img).values.to_numpy(zero_copy_only=True)  # (H * W * 4,) read-only view
            with warnings.catch_warnings():  # torch warns that it cannot protect read-only memory: we never write
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(flat).view(img.size[1], img.size[0], 4)
        except Exception:  # the copy below always works
            pass
    a = np.array(img)  # (H, W[, C]) uint8, a writable copy (np.asarray would be a read-only view)
    if a.dtype != np.uint8:  # mode "1": bools
        a = a.astype(np.uint8) * 255
    return torch.from_numpy(a if a.ndim == 3 else a[:, :, None])


@contextlib.contextmanager
def _reading(raw: Image.Image) -> Iterator[None]:
    """Decoding ``raw``: any reader error becomes :class:`UnreadableImageError` naming the file (a channel
    mismatch stays itself), and the file is released whatever happens."""
    try:
        yield
    except ChannelMismatchError:
        raise
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        raise UnreadableImageError(f"cannot read image {_name(raw)}: {type(err).__name__}: {err}") from err
    finally:
        _release(raw)


def decode_tensor(raw: RawImage | torch.Tensor, channels: int = 3, max_reduction: float = 1.0,
                  padded: bool = False) -> tuple[torch.Tensor, tuple[float, float]]:
    """Decode ``raw`` to a tensor (C, H', W'): uint8 (values read as / 255) or float32 (values as they are).

    A lazily opened JPEG is decoded at a reduced DCT scale when ``max_reduction >= 2``, never by more than
    ``max_reduction`` per side. Returns the tensor (a view with channels-last strides, not to be modified) and the
    reduction ``(sy, sx) = (H / H', W / W')`` against :func:`oriented_size` (``(1.0, 1.0)`` for a full decode).
    ``padded=True`` allows one extra trailing channel of padding (Pillow's RGBX layout, returned without a copy;
    resize first, then drop it: resizing 4 interleaved channels is as fast as 3).

    Raises:
        UnreadableImageError: the pixels cannot be decoded (truncated file, bad data); names the image.
        ChannelMismatchError: the image does not have ``channels`` channels (see the module docstring).
    """
    _check_channels(channels)
    if isinstance(raw, torch.Tensor):  # already decoded (C, H, W)
        if raw.dim() != 3 or raw.shape[0] not in (channels, 1):
            raise ChannelMismatchError(f"a tensor image of shape {tuple(raw.shape)} does not have model.in_chans "
                                       f"{channels} channels")
        return raw.expand(channels, -1, -1), (1.0, 1.0)
    if isinstance(raw, np.ndarray):
        return _array_to_tensor(raw, channels, "array image"), (1.0, 1.0)
    if not isinstance(raw, Image.Image):
        raise TypeError(f"expected a PIL image, an array or a tensor, got {type(raw).__name__}")
    stored_w, stored_h = raw.size  # before draft, which shrinks .size
    with _reading(raw):
        img = _decoded(raw, channels, max_reduction)
        t = _pixels(img, padded)  # (H, W, C)
        transposed = _orientation(raw) in _TRANSPOSED  # known for sure only now (a PNG's EXIF may follow its pixels)
    full_w, full_h = (stored_h, stored_w) if transposed else (stored_w, stored_h)
    t = t.permute(2, 0, 1)  # (C, H, W), channels-last strides
    return t, (full_h / t.shape[1], full_w / t.shape[2])


def decode_pil(raw: RawImage | torch.Tensor, channels: int = 3) -> Image.Image:
    """Decode ``raw`` to a new PIL image: RGB for ``channels=3``, L for 1 (for PIL transforms such as timm's).

    Arrays are converted with the scaling of the module docstring, then to 8 bits (x 255, rounded, clipped).
    Raises :class:`UnreadableImageError` / :class:`ChannelMismatchError` as :func:`decode_tensor`, and
    ``ValueError`` for other channel counts (PIL cannot hold them; use :func:`decode_tensor`).
    """
    if channels not in (1, 3):
        raise ValueError(f"PIL images have 1 or 3 channels, not model.in_chans {channels}; use decode_tensor")
    if isinstance(raw, Image.Image):
        with _reading(raw):
            return finish_decode(raw, channels)
    t, _ = decode_tensor(raw, channels)
    if t.dtype != torch.uint8:
        t = (t.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    a = t.permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    return Image.fromarray(a[:, :, 0] if channels == 1 else a, mode="L" if channels == 1 else "RGB")


def load_image(path: str | Path, channels: int = 3) -> Image.Image | torch.Tensor:
    """The image at ``path`` decoded: PIL RGB (3 channels) or L (1), or a tensor (C, H, W) for other counts."""
    raw = read_raw(path, channels)
    try:
        return decode_pil(raw, channels) if channels in (1, 3) else decode_tensor(raw, channels)[0]
    except UnreadableImageError as err:
        if str(path) in str(err):
            raise
        raise type(err)(f"{path}: {err}") from err


def load_rgb(path: str | Path) -> Image.Image:
    """Open ``path`` and return its first frame as an 8-bit RGB image of the file's size, (W, H) in PIL terms.

    Raises:
        FileNotFoundError: the file does not exist.
        OSError (:class:`UnreadableImageError`): the file is empty, truncated, not an image, or in a format that
            cannot be decoded; the message names the path.
    """
    img = load_image(path, 3)
    assert isinstance(img, Image.Image)
    return img
