"""Any channel count, data side (issue 11 item 5): grayscale, RGB and N-band images (.npy arrays, multi-band
TIFFs) through the sources, the pretraining dataset and the fine-tuning / evaluation transforms; value scaling;
a source with another channel count than model.in_chans is refused before training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from simmim.data import (
    ChannelMismatchError,
    ImageFolderSource,
    MaskedImageDataset,
    MaskGenerator,
    decode_pil,
    decode_tensor,
    open_source,
    pretrain_transform,
    read_raw,
)
from simmim.data.labeled import LabeledDataset, open_labeled
from simmim.data.transforms import eval_transform, finetune_transform

MASKS = MaskGenerator(32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.5)


def _bands(root: Path, n: int, channels: int, kind: str = "npy", dtype: type = np.uint16) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        if dtype is np.float32:
            a = rng.random((40, 48, channels), dtype=np.float32)
        else:
            a = rng.integers(0, np.iinfo(dtype).max, (40, 48, channels), dtype=dtype)
        if kind == "npy":
            np.save(root / f"{i}.npy", a)
        else:
            import tifffile

            planar = i % 2 == 1  # both TIFF layouts: samples interleaved and planar (bands first)
            tifffile.imwrite(root / f"{i}.tif", np.moveaxis(a, -1, 0) if planar else a,
                             planarconfig="separate" if planar else "contig", photometric="minisblack")


def test_grayscale_source_through_the_pretraining_dataset() -> None:
    src = open_source("embedded:digits", channels=1)
    assert src[0].mode == "L" and src.open(0).mode == "L"
    ds = MaskedImageDataset(src, pretrain_transform(32, mean=(0.5,), std=(0.25,), channels=1), MASKS, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["mask"].shape == (4, 8, 8)
    assert batch["image"].min() >= -2.0 - 1e-6 and batch["image"].max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25, x in [0, 1]
    rgb = MaskedImageDataset(open_source("embedded:digits"), pretrain_transform(32), MASKS, seed=0)[(0, 0)]
    assert rgb["image"].shape == (3, 32, 32)


@pytest.mark.parametrize("kind", ["npy", "tif"])
def test_four_band_folder_through_the_pretraining_dataset(tmp_path: Path, kind: str) -> None:
    _bands(tmp_path, 4, 4, kind)
    src = ImageFolderSource(tmp_path, channels=4)
    raw = src.open(1)
    assert isinstance(raw, np.ndarray) and raw.shape == (40, 48, 4)  # planar TIFF: bands moved last
    ds = MaskedImageDataset(src, pretrain_transform(32, mean=(0.5,) * 4, std=(0.5,) * 4, channels=4), MASKS)
    batch = next(iter(DataLoader(ds, batch_size=4, num_workers=2)))
    assert batch["image"].shape == (4, 4, 32, 32) and torch.isfinite(batch["image"]).all()
    assert batch["image"].min() >= -1.0 - 1e-6 and batch["image"].max() <= 1.0 + 1e-6  # uint16 / 65535 in [0, 1]
    again = ds[(0, 2)]
    assert torch.equal(again["image"], ds[(0, 2)]["image"]) and not torch.equal(again["image"], ds[(1, 2)]["image"])


def test_value_scaling(tmp_path: Path) -> None:
    """uint8 / 255, uint16 / 65535, float as is (the transform then normalises with mean 0, std 1)."""
    t = pretrain_transform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), mean=(0.0,) * 2, std=(1.0,) * 2, channels=2)
    for a, expected in ((np.full((16, 16, 2), 51, np.uint8), 0.2), (np.full((16, 16, 2), 65535, np.uint16), 1.0),
                        (np.full((16, 16, 2), 7.5, np.float32), 7.5), (np.ones((16, 16, 2), bool), 1.0)):
        out = t(a, torch.Generator().manual_seed(0))
        assert out.shape == (2, 16, 16) and torch.allclose(out, torch.full_like(out, expected)), a.dtype
    with pytest.raises(OSError, match="int32 are not supported"):
        decode_tensor(np.zeros((4, 4, 2), np.int32), 2)
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    x, _ = decode_tensor(gray, 3)  # (H, W) arrays are grayscale: replicated for RGB models
    assert x.shape == (3, 3, 4) and torch.equal(x[0], x[2])
    assert decode_pil(np.full((4, 4, 3), 0.5, np.float32)).getpixel((0, 0)) == (128, 128, 128)


def test_channel_mismatch_is_refused_before_training(tmp_path: Path) -> None:
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (i, 100, 200)).save(rgb / f"{i}.jpg")
    for channels, masks in ((4, MaskGenerator(32, 8, 4, 0.5)), (1, MaskGenerator(32, 8, 4, 0.5))):
        src = ImageFolderSource(rgb, channels=channels)
        tf = pretrain_transform(32, mean=(0.5,) * channels, std=(0.5,) * channels, channels=channels)
        with pytest.raises(ValueError, match=rf"model.in_chans={channels}.*{rgb}") as info:
            MaskedImageDataset(src, tf, masks)
        assert "\n" not in str(info.value) and "model.in_chans" in str(info.value)
    bands = tmp_path / "bands"
    _bands(bands, 2, 3, "npy")
    with pytest.raises(ValueError, match="has 3 channels but model.in_chans is 4"):
        MaskedImageDataset(ImageFolderSource(bands, channels=4),
                           pretrain_transform(32, mean=(0.5,) * 4, std=(0.5,) * 4, channels=4), MASKS)
    np.save(tmp_path / "chw.npy", np.zeros((4, 20, 30), np.float32))
    with pytest.raises(ChannelMismatchError, match=r"looks like \(C, H, W\)"):
        decode_tensor(read_raw(tmp_path / "chw.npy", 4), 4)
    with pytest.raises(ValueError, match="one value per channel: model.in_chans is 4, got 3 mean"):
        pretrain_transform(32, channels=4)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        open_source("embedded:digits", channels=4)


def test_grayscale_images_from_every_reader(tmp_path: Path) -> None:
    Image.new("L", (20, 10), 77).save(tmp_path / "gray.png")
    Image.fromarray(np.full((10, 20), 1000, np.uint16)).save(tmp_path / "deep.png")
    np.save(tmp_path / "gray.npy", np.full((10, 20), 0.5, np.float32))
    src = ImageFolderSource(tmp_path, channels=1)
    values = {}
    for i in range(len(src)):
        x, _ = decode_tensor(src.open(i), 1)
        assert x.shape == (1, 10, 20)
        values[src.paths[i].name] = float(x.float().mean()) / (255.0 if x.dtype == torch.uint8 else 1.0)
    assert values["gray.png"] == pytest.approx(77 / 255) and values["gray.npy"] == pytest.approx(0.5)
    assert values["deep.png"] == pytest.approx(4 / 255)  # 16-bit PNG through Pillow: / 257, as for RGB


def test_hf_source_with_gray_images_and_band_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    gray = datasets.Dataset.from_dict({"image": [Image.new("L", (24, 20), v) for v in (10, 200)]},
                                      features=datasets.Features({"image": datasets.Image()}))
    gray.save_to_disk(str(tmp_path / "gray"))
    src = open_source(str(tmp_path / "gray"), channels=1)
    ds = MaskedImageDataset(src, pretrain_transform(32, mean=(0.5,), std=(0.5,), channels=1), MASKS)
    assert ds[1]["image"].shape == (1, 32, 32)
    bands = np.random.default_rng(0).random((3, 20, 24, 5), dtype=np.float32)
    arr = datasets.Dataset.from_dict({"img": list(bands)},
                                     features=datasets.Features({"img": datasets.Array3D((20, 24, 5), "float32")}))
    arr.save_to_disk(str(tmp_path / "bands"))
    src = open_source(str(tmp_path / "bands"), image_column="img", channels=5)
    ds = MaskedImageDataset(src, pretrain_transform(16, mean=(0.0,) * 5, std=(1.0,) * 5, channels=5),
                            MaskGenerator(16, 8, 4, 0.5))
    x = ds[2]["image"]
    assert x.shape == (5, 16, 16) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_finetune_and_eval_transforms_for_other_channel_counts(tmp_path: Path) -> None:
    train = open_labeled("embedded:digits", "train", channels=1)
    tf = finetune_transform(32, auto_augment=None, color_jitter=0, mean=(0.5,), std=(0.5,), channels=1)
    ds = LabeledDataset(train, tf, seed=0)
    s = ds[(0, 3)]
    assert s["image"].shape == (1, 32, 32) and torch.equal(ds[(0, 3)]["image"], s["image"])
    val = LabeledDataset(open_labeled("embedded:digits", "val", channels=1),
                         eval_transform(24, mean=(0.5,), std=(0.5,), channels=1))
    assert val[0]["image"].shape == (1, 24, 24)
    with pytest.raises(ValueError, match="RandAugment and colour jitter work on RGB images only.*data.auto_augment"):
        finetune_transform(32, mean=(0.5,), std=(0.5,), channels=1)
    for c in ("a", "b"):
        _bands(tmp_path / "train" / c, 2, 4, "npy", np.float32)
    src = open_labeled(str(tmp_path), "train", channels=4)
    tf4 = finetune_transform(32, auto_augment=None, color_jitter=0, mean=(0.5,) * 4, std=(0.5,) * 4, channels=4)
    assert LabeledDataset(src, tf4)[3]["image"].shape == (4, 32, 32)


def test_tensor_eval_transform_matches_timms_geometry() -> None:
    """The tensor evaluation transform (used for non-RGB images) crops and resizes like timm's, on RGB."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((160, 120), Image.BICUBIC)
    from simmim.data.transforms import ResizeCenterCrop

    ours = ResizeCenterCrop(64, crop_pct=0.875)(img)
    timm = eval_transform(64, crop_pct=0.875)(img)
    assert ours.shape == timm.shape == (3, 64, 64)
    assert (ours - timm).abs().mean() < 0.02 and (ours - timm).abs().max() < 0.1
