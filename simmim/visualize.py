"""SimMIM reconstruction grids for TensorBoard and PNG files.

One row per sample, four columns: input | masked input (masked pixels gray) | prediction | prediction pasted into the
visible pixels. The last column is what SimMIM is judged on: only masked pixels enter the loss, so the prediction on
visible pixels is meaningless and is replaced by the input there.

Shapes: ``B`` batch, ``C`` channels, ``H, W`` pixels, ``h, w`` token grid of the mask.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import make_grid

from simmim.data.transforms import denormalize
from simmim.errors import DISK_ERRORS, RunStopped, UserError, disk_errno

logger = logging.getLogger(__name__)

MASK_GRAY = 0.5  # value shown on masked pixels in the "masked input" column
GRID_PADDING = 2


def reconstruction_grid(
    images: Tensor,
    mask: Tensor,
    pred: Tensor,
    mean: Sequence[float] | Tensor,
    std: Sequence[float] | Tensor,
    max_images: int = 8,
) -> Tensor:
    """Build a reconstruction grid: one row per sample (at most ``max_images``), four columns.

    Args:
        images: (B, C, H, W) normalised inputs.
        mask: (B, h, w) on the token grid, True/1 = masked; upsampled to pixels by repeating each cell
            (H // h, W // w) times (nearest).
        pred: (B, C, H, W) normalised reconstruction, as ``SimMIM(...)(images, mask).pred``.
        mean, std: per-channel normalisation used for ``images`` (C values each).
        max_images: rows to show; the first ``min(B, max_images)`` samples are used.

    Returns:
        float32 CPU tensor in [0, 1] of shape (3, n * (H + 2) + 2, 4 * (W + 2) + 2), n = min(B, max_images)
        (grayscale shown as gray, multi-band images by their first three bands, see :func:`displayable`),
        ready for TensorBoard ``add_image`` (CHW). Columns: input, masked input (masked pixels 0.5 gray),
        prediction, prediction on masked pixels pasted into the input. Everything is de-normalised and clamped.
    """
    if images.ndim != 4 or pred.shape != images.shape:
        raise ValueError(
            f"images and pred must both be (B, C, H, W), got {tuple(images.shape)} and {tuple(pred.shape)}"
        )
    B, C, H, W = images.shape
    if mask.ndim != 3 or mask.shape[0] != B:
        raise ValueError(f"mask must be (B, h, w) with B={B}, got {tuple(mask.shape)}")
    h, w = mask.shape[1:]
    if H % h or W % w:
        raise ValueError(f"image size {H}x{W} is not a multiple of the mask grid {h}x{w}")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")

    n = min(B, max_images)
    images = images[:n].detach().float().cpu()
    pred = pred[:n].detach().float().cpu()
    m = mask[:n].detach().cpu().bool()
    m = m.repeat_interleave(H // h, dim=1).repeat_interleave(W // w, dim=2).unsqueeze(1)  # (n, 1, H, W)

    x = denormalize(images, mean, std)  # (n, C, H, W) in [0, 1]
    p = denormalize(pred, mean, std)  # (n, C, H, W) in [0, 1]
    masked = torch.where(m, torch.full_like(x, MASK_GRAY), x)
    pasted = torch.where(m, p, x)

    tiles = torch.stack([x, masked, p, pasted], dim=1).flatten(0, 1)  # (n * 4, C, H, W), row-major per sample
    return make_grid(displayable(tiles), nrow=4, padding=GRID_PADDING)  # (3, n * (H + 2) + 2, 4 * (W + 2) + 2)


def displayable(x: Tensor) -> Tensor:
    """(B, C, H, W) images of any channel count -> (B, 1 or 3, H, W) for a picture: grayscale and RGB as they are,
    multi-band images as their first three bands (two bands: the first, as gray)."""
    channels = x.shape[1]
    if channels in (1, 3):
        return x
    return x[:, :3] if channels > 3 else x[:, :1]


def save_png(grid: Tensor, path: str | Path) -> Path:
    """Write a (C, H, W) image (C = 1 or 3; float in [0, 1] or uint8) as PNG, atomically, creating parent dirs."""
    if grid.ndim != 3 or grid.shape[0] not in (1, 3):
        raise ValueError(f"grid must be (1 or 3, H, W), got {tuple(grid.shape)}")
    grid = grid.detach().cpu()
    if grid.dtype != torch.uint8:
        grid = (grid.float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = np.ascontiguousarray(grid.permute(1, 2, 0).numpy())  # (H, W, C)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("wrote reconstruction grid %s", path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# output folders of the picture commands (simmim reconstruct, simmim inspect)


def check_out_dir(out: str | Path, names: Sequence[str], overwrite: bool) -> Path:
    """Check that the folder ``out`` can take the files ``names`` before any work, so a refusal changes nothing:
    ``out`` is a folder or does not exist yet (it is created at the first write), and none of ``names`` exists
    there unless ``overwrite``. Nothing else in ``out`` is ever touched."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder (it is created if missing)")
    existing = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    if existing and not overwrite:
        raise UserError(f"{out / existing[0]} exists ({len(existing)} of the outputs do); pass --overwrite to "
                        "replace them, or another --out")
    if odd := [n for n in existing if not (out / n).is_file() or (out / n).is_symlink()]:
        raise UserError(f"{out / odd[0]} is not a plain file, so --overwrite does not replace it; move it away or "
                        "pick another --out")
    return out


def write_output(write: Any, path: Path, written: int) -> Path:
    """Run ``write(path)`` (an atomic writer) with a disk error turned into a one-line stop naming the path and
    how many outputs were ``written`` before it."""
    try:
        write(path)
    except OSError as err:
        if (no := disk_errno(err)) is None:
            raise
        raise RunStopped(f"cannot write {path}: {DISK_ERRORS[no]}; {written} file(s) were written before it; "
                         "fix the disk and run again with --overwrite") from None
    return path


def save_text(text: str, path: str | Path) -> Path:
    """Write ``text`` to ``path`` atomically (a temporary file renamed into place), creating parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
