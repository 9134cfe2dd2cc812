"""The fast pretraining transform keeps the official recipe's semantics: torchvision's crop boxes and flips from the
same seeds, the same pixels within a grey level when nothing is reduced, reduced JPEG decoding that never drops
below the output resolution, EXIF orientation; and the input-pipeline benchmark runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from simmim.data import IMAGENET_MEAN, IMAGENET_STD, decode_tensor, pretrain_transform, read_raw
from simmim.data.images import oriented_size
from simmim.data.transforms import random_resized_crop_box

GREY_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one uint8 step after normalisation


def _photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A smooth RGB image (W, H): random low-frequency content upsampled, like a photo rather than noise."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def _official(img_size: int) -> T.Compose:
    return T.Compose([T.RandomResizedCrop(img_size, scale=(0.67, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (64, 64), (1000, 40), (40, 1000), (193, 192)])
def test_crop_box_and_flip_are_torchvisions(size: tuple[int, int]) -> None:
    """A generator seeded with s gives the box and flip torchvision draws after torch.manual_seed(s); the tall and
    wide shapes reach torchvision's centre-crop fallback."""
    W, H = size
    t = pretrain_transform(32)
    dummy = torch.empty(0, H, W)  # get_params only reads the size
    flips = set()
    for seed in range(200):
        torch.manual_seed(seed)
        expected_box = T.RandomResizedCrop.get_params(dummy, [0.67, 1.0], [3 / 4, 4 / 3])
        expected_flip = bool(torch.rand(1) < 0.5)
        box, flip = t.draw(W, H, torch.Generator().manual_seed(seed))
        assert box == tuple(expected_box) and flip == expected_flip, seed
        flips.add(flip)
    assert flips == {True, False}
    g = torch.Generator().manual_seed(0)
    for scale in ((0.08, 1.0), (0.3, 0.5)):  # the fine-tuning scale too
        torch.manual_seed(1)
        assert random_resized_crop_box(H, W, scale, (3 / 4, 4 / 3), g.manual_seed(1)) == tuple(
            T.RandomResizedCrop.get_params(dummy, list(scale), [3 / 4, 4 / 3]))


def test_same_pixels_as_the_official_recipe_without_reduction() -> None:
    """On a decoded image (no reduced decoding possible) the output equals torchvision's within one grey level."""
    img = _photo((120, 90))
    ours = pretrain_transform(64)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = _official(64)(img)
        got = ours(img, torch.Generator().manual_seed(seed))
        assert got.shape == expected.shape == (3, 64, 64) and got.is_contiguous()
        assert (got - expected).abs().max() <= GREY_LEVEL + 1e-5, seed


def _jpeg(tmp_path: Path, img: Image.Image, name: str = "photo.jpg", **kwargs) -> Path:
    path = tmp_path / name
    img.save(path, quality=95, **kwargs)
    return path


def test_reduced_jpeg_decoding_keeps_the_output_resolution(tmp_path: Path) -> None:
    """A large JPEG decodes at 1/2, 1/4 or 1/8 scale only while the crop keeps at least the output size, and the
    result stays close to the full-resolution official output."""
    path = _jpeg(tmp_path, _photo((1600, 1200)))
    for max_reduction in (1.0, 1.9, 2.0, 3.9, 4.0, 7.5, 8.0, 20.0):
        x, (sy, sx) = decode_tensor(read_raw(path), 3, max_reduction=max_reduction)
        assert sy <= max(max_reduction, 1.0) and sx <= max(max_reduction, 1.0)
        assert x.shape[1:] == (round(1200 / sy), round(1600 / sx)) and x.dtype == torch.uint8
    assert decode_tensor(read_raw(path), 3, max_reduction=8.0)[1] == (8.0, 8.0)
    assert decode_tensor(read_raw(path), 3, max_reduction=5.0)[1] == (4.0, 4.0)

    ours, official = pretrain_transform(96), _official(96)
    full = Image.open(path).convert("RGB")
    for seed in range(10):
        torch.manual_seed(seed)
        expected = official(full)
        box, _ = ours.draw(1600, 1200, torch.Generator().manual_seed(seed))
        assert min(box[2], box[3]) / 96 >= 8  # every crop here allows 1/8 decoding ...
        got = ours(read_raw(path), torch.Generator().manual_seed(seed))
        diff = (got - expected).abs()  # ... which changes only the resampling filter
        assert diff.mean() < 3 * GREY_LEVEL and diff.max() < 40 * GREY_LEVEL, seed


def test_exif_orientation_is_applied_before_the_crop(tmp_path: Path) -> None:
    upright = _photo((90, 120))  # portrait as displayed
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # landscape as stored; orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _jpeg(tmp_path, stored, exif=exif.tobytes())
    raw = read_raw(path)
    assert raw.size == (120, 90) and oriented_size(raw) == (90, 120)
    x, _ = decode_tensor(read_raw(path), 3)
    assert x.shape == (3, 120, 90)
    plain = _jpeg(tmp_path, upright, name="upright.jpg")
    ours = pretrain_transform(48)
    for seed in range(5):
        a = ours(read_raw(path), torch.Generator().manual_seed(seed))
        b = ours(read_raw(plain), torch.Generator().manual_seed(seed))
        assert (a - b).abs().mean() < 4 * GREY_LEVEL  # same crop of the same picture (two JPEG encodings)


def test_pipeline_benchmark_runs(tmp_path: Path) -> None:
    from simmim.benchmarks.pipeline import format_pipeline_results, official_pipeline, run_pipeline_benchmark

    results = run_pipeline_benchmark(sizes=[(96, 72)], images=3, rounds=1, img_size=64)
    (r,) = results
    assert r.name == "96x72" and r.images == 3 and r.official_ips > 0 and r.ours_ips > 0
    assert r.ratio == pytest.approx(r.ours_ips / r.official_ips) and r.bytes_per_image > 0
    table = format_pipeline_results(results)
    assert "96x72" in table and f"{r.ratio:.2f}x" in table
    image, mask = official_pipeline(64)(_jpeg(tmp_path, _photo((80, 60))))
    assert image.shape == (3, 64, 64) and mask.shape == (16, 16) and int(mask[::8, ::8].sum()) == 3
