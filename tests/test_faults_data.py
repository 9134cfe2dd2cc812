"""Fault injection on the data side (issue 15 items 6-10 and 12's ``eval --stage``): decompression bombs in every
reader, fine-tuning data that would be silently wrong (other classes on resume, empty class folders, labels out of
range), split keys named right, and probe stages checked up front. Each refusal is one line naming the fix and
leaves the output directory as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from simmim.data import ImageFolderSource, MaskedImageDataset, MaskGenerator, images
from simmim.data.images import UnreadableImageError, raw_from_bytes, read_raw
from simmim.data.transforms import pretrain_transform

# ----------------------------------------------------------------------------------------------------------------
# item 6: one pixel limit for every reader, checked from the header


def _bomb_tiff(path: Path, side: int = 14336) -> None:
    """A tiled, zlib-compressed single-band TIFF of ``side`` x ``side`` zeros: about 300 kB on disk for 205 M
    pixels, more than Pillow's 179 M limit."""
    tile = np.zeros((1024, 1024), np.uint8)
    tifffile.imwrite(path, (tile for _ in range((side // 1024) ** 2)), shape=(side, side), dtype="uint8",
                     tile=(1024, 1024), compression="zlib", photometric="minisblack")


def _bomb_npy(path: Path, side: int = 14336) -> None:
    """A real .npy of ``side`` x ``side`` uint8 whose data is a hole in a sparse file (no disk space used):
    ``np.load`` would read all 205 MB."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (side, side)})
        f.truncate(f.tell() + side * side)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bombs")
    _bomb_tiff(root / "bomb.tif")
    _bomb_npy(root / "bomb.npy")
    return root / "bomb.tif", root / "bomb.npy"


def test_huge_tiff_and_npy_are_refused_from_their_headers(bombs):
    tif, npy = bombs
    assert tif.stat().st_size < 1_000_000
    for path, channels in ((tif, 1), (tif, 4), (npy, 1), (npy, 3)):
        with pytest.raises(UnreadableImageError, match=r"14336x14336 = 205520896 pixels.*MAX_IMAGE_PIXELS") as e:
            read_raw(path, channels)
        assert str(path) in str(e.value)
    with pytest.raises(UnreadableImageError, match="pixels, more than the limit"):  # bytes held in memory too
        raw_from_bytes(tif.read_bytes(), "x.tif", channels=1)
    assert 14336**2 > images.pixel_limit() == 2 * Image.MAX_IMAGE_PIXELS


def test_the_one_limit_is_pillows_and_applies_to_every_reader(tmp_path, monkeypatch):
    """Lowering ``PIL.Image.MAX_IMAGE_PIXELS`` lowers the limit of the PNG, TIFF and .npy readers alike."""
    a = np.zeros((40, 30), np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    tifffile.imwrite(tmp_path / "x.tif", a)
    np.save(tmp_path / "x.npy", a)
    for name in ("x.png", "x.tif", "x.npy"):  # readable at the default limit
        read_raw(tmp_path / name, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # limit 1000 < 1200 pixels
    for name in ("x.png", "x.tif", "x.npy"):
        with pytest.raises(UnreadableImageError, match=name):
            read_raw(tmp_path / name, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's way to turn the limit off
    assert images.pixel_limit() is None and read_raw(tmp_path / "x.npy", 1).shape == (40, 30)


def test_a_bomb_in_a_folder_is_skipped_and_counted(tmp_path, bombs):
    for i in range(6):
        tifffile.imwrite(tmp_path / f"ok{i}.tif", np.full((40, 48, 4), i * 10, np.uint8))
    (tmp_path / "zz_bomb.tif").write_bytes(bombs[0].read_bytes())
    src = ImageFolderSource(tmp_path, channels=4)
    masks = MaskGenerator(32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.5)
    ds = MaskedImageDataset(src, pretrain_transform(32, mean=[0.5] * 4, std=[0.5] * 4, channels=4), masks, seed=0)
    samples = [ds[(0, i)] for i in range(len(ds))]
    assert [s["skipped"] for s in samples] == [0] * 6 + [1]
    assert all(s["image"].shape == (4, 32, 32) for s in samples)
