"""Tests for the SimMIM data pipeline (simmim.data): masks, transforms, image reading, sources and datasets."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from simmim.data import (
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EmbeddedSource,
    HFImageSource,
    ImageFolderSource,
    MaskedImageDataset,
    MaskedImageStream,
    MaskGenerator,
    denormalize,
    load_rgb,
    open_source,
    pretrain_transform,
    sample_digits,
    sample_photos,
    sample_seed,
)

SIZE = (40, 30)  # (W, H) of every generated test image


def _noise(size: tuple[int, int] = SIZE, seed: int = 0) -> Image.Image:
    """A random RGB PIL image of size (W, H)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _small_pipeline() -> tuple:
    """64 px crops, 8 px mask cells on 4 px tokens: 8x8 = 64 cells (39 masked), a 16x16 token grid."""
    return pretrain_transform(64), MaskGenerator(64, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6)


# ------------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    "input_size, mask_patch, model_patch, ratio, grid, masked, cells",
    [
        (192, 32, 4, 0.6, (48, 48), 22, 36),
        (224, 32, 4, 0.6, (56, 56), 30, 49),
        (256, 32, 4, 0.75, (64, 64), 48, 64),
        ((192, 256), 32, 4, 0.5, (48, 64), 24, 48),
        (96, 16, 2, 0.4, (48, 48), 15, 36),
        (32, 32, 4, 0.6, (8, 8), 1, 1),
    ],
)
def test_mask_exact_cell_count(input_size, mask_patch, model_patch, ratio, grid, masked, cells) -> None:
    gen = MaskGenerator(input_size, mask_patch, model_patch, ratio)
    assert gen.token_grid == grid and gen.num_masked_cells == masked == math.ceil(cells * ratio)
    scale = mask_patch // model_patch
    for seed in range(5):
        mask = gen(seed)
        assert mask.dtype == torch.bool and tuple(mask.shape) == grid
        assert int(mask[::scale, ::scale].sum()) == masked  # one token per cell
        assert int(mask.sum()) == masked * scale * scale


def test_mask_is_constant_within_each_cell() -> None:
    gen = MaskGenerator(192, 32, 4, 0.6)
    for seed in range(10):
        blocks = gen(seed).view(6, 8, 6, 8).permute(0, 2, 1, 3).reshape(36, 64)  # (cells, tokens per cell)
        assert bool((blocks.all(dim=1) | ~blocks.any(dim=1)).all())


def test_mask_seeding() -> None:
    gen = MaskGenerator()
    assert torch.equal(gen(7), gen(7))
    assert torch.equal(gen(np.random.default_rng(7)), gen(7))
    assert not torch.equal(gen(7), gen(8))
    rng = np.random.default_rng(0)
    first, second = gen(rng), gen(rng)  # a Generator is advanced: consecutive draws differ
    assert not torch.equal(first, second)
    masks = {tuple(gen().flatten().tolist()) for _ in range(20)}  # None: unseeded
    assert len(masks) == 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_size=200), r"input_size 200 is not a multiple of mask_patch_size 32 \(model.img_size\)"),
        (dict(mask_patch_size=30), "mask_patch_size 30 is not a multiple of model_patch_size 4"),
        (dict(input_size=192, mask_patch_size=48, model_patch_size=5), "not a multiple of model_patch_size 5"),
        (dict(mask_ratio=0.0), r"mask_ratio 0.0 must be in \(0, 1\)"),
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(input_size=(192, 190)), "input_size 190"),
        (dict(model_patch_size=0), "must all be positive"),
    ],
)
def test_mask_validation_errors_name_the_fix(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MaskGenerator(**kwargs)


def test_sample_seed() -> None:
    assert sample_seed(0, 1, 2) == sample_seed(0, 1, 2)
    seeds = {sample_seed(b, e, i) for b in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450  # no collisions among nearby triples
    assert all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, 0, -1) != sample_seed(0, 0, 0)  # negative indices are valid and distinct


# -------------------------------------------------------------------------------------------------- transforms


def test_pretrain_transform_shape_and_seeding() -> None:
    t = pretrain_transform(48)
    img = _noise((80, 60))
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, t(img))  # called like torchvision (no generator): draws from torch's global one
    assert a.min() < -1.0 and a.max() > 1.5  # normalised with the ImageNet statistics, not in [0, 1]


def test_denormalize_inverts_normalize() -> None:
    x = torch.rand(2, 3, 5, 7)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normed = (x - mean) / std
    assert torch.allclose(denormalize(normed), x, atol=1e-6)  # (B, 3, H, W)
    assert torch.allclose(denormalize(normed[0]), x[0], atol=1e-6)  # (3, H, W)
    extreme = denormalize(torch.full((3, 2, 2), 100.0))
    assert float(extreme.max()) == 1.0
    with pytest.raises(ValueError, match="expected"):
        denormalize(torch.zeros(4, 2, 2))


# -------------------------------------------------------------------------------------------------- image files


def _frames(colors: list[tuple[int, int, int]]) -> list[Image.Image]:
    return [Image.new("RGB", SIZE, c) for c in colors]


def _write_messy_folder(root: Path) -> dict[str, Path]:
    """A nested folder with every format and mode the reader must handle, plus entries it must ignore."""
    files: dict[str, Path] = {}

    def path(rel: str) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        files[rel] = p
        return p

    _noise(seed=1).save(path("a/photo.jpg"), quality=90)
    _noise(seed=2).save(path("a/b/photo.png"))
    _noise(seed=3).save(path("a/b/c/photo.webp"))
    _noise(seed=4).save(path("UPPER.BMP"))
    red, blue = _frames([(255, 0, 0), (0, 0, 255)])
    red.save(path("anim.gif"), save_all=True, append_images=[blue], duration=50)
    red.save(path("pages.tiff"), save_all=True, append_images=[blue])
    Image.new("L", SIZE, 128).save(path("gray.png"))
    Image.new("CMYK", SIZE, (0, 255, 255, 0)).save(path("cmyk.jpg"))
    Image.new("RGBA", SIZE, (0, 0, 0, 0)).save(path("transparent.png"))  # fully transparent black
    Image.new("LA", SIZE, (0, 255)).save(path("gray_alpha.png"))
    ramp = np.tile(np.linspace(0, 65535, SIZE[0]).round().astype(np.uint16), (SIZE[1], 1))  # (H, W) 16-bit
    Image.fromarray(ramp).save(path("deep16.png"))
    Image.fromarray(np.full((SIZE[1], SIZE[0]), 0.5, dtype=np.float32)).save(path("float.tif"))
    Image.new("1", SIZE, 1).save(path("bits.pbm"))
    Image.new("L", SIZE, 200).save(path("gray.pgm"))
    _noise(seed=5).save(path("x/color.ppm"))
    pal = Image.new("P", SIZE, 0)
    pal.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    pal.save(path("palette_transparent.png"), transparency=0)
    # ignored: hidden files and folders, other extensions
    for rel in (".hidden.png", ".cache/x.png", "notes.txt", "a/readme.md"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        _noise().save(p, format="PNG") if p.suffix == ".png" else p.write_text("not an image")
    return files


def test_folder_source_reads_every_format_as_rgb(tmp_path: Path) -> None:
    files = _write_messy_folder(tmp_path)
    src = ImageFolderSource(tmp_path)
    assert len(src) == len(files) == 16
    paths = list(src.paths)
    assert paths == sorted(paths, key=lambda p: p.relative_to(tmp_path).as_posix())
    assert {p.relative_to(tmp_path).as_posix() for p in paths} == set(files)
    for i in range(len(src)):
        img = src[i]
        assert img.mode == "RGB" and img.size == SIZE, src.paths[i]


def test_pixel_conversions(tmp_path: Path) -> None:
    files = _write_messy_folder(tmp_path)

    def px(rel: str, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
        return load_rgb(files[rel]).getpixel(xy)

    with Image.open(files["deep16.png"]) as deep16, Image.open(files["cmyk.jpg"]) as cmyk:
        assert deep16.mode == "I;16" and cmyk.mode == "CMYK"  # the files exercise the paths they claim to
    with Image.open(files["anim.gif"]) as gif, Image.open(files["pages.tiff"]) as tiff:
        assert gif.n_frames == 2 and tiff.n_frames == 2
    assert px("anim.gif") == (255, 0, 0) and px("pages.tiff") == (255, 0, 0)  # first frame
    assert px("gray.png") == (128, 128, 128)
    r, g, b = px("cmyk.jpg")
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert px("transparent.png") == (255, 255, 255)  # composited on white, not black
    assert px("gray_alpha.png") == (0, 0, 0)  # opaque black stays black
    assert px("palette_transparent.png") == (255, 255, 255)
    assert px("float.tif") == (128, 128, 128)  # float in [0, 1] scaled by 255
    assert px("bits.pbm") == (255, 255, 255)
    # 16-bit: scaled by 1/257, a ramp from black to white, not clipped to white
    deep = np.asarray(load_rgb(files["deep16.png"]))[0, :, 0]
    expected = np.round(np.linspace(0, 65535, SIZE[0]).round() / 257)
    assert np.abs(deep.astype(int) - expected).max() <= 1
    assert deep[0] == 0 and deep[-1] == 255 and 120 <= deep[SIZE[0] // 2] <= 135


def _write_bad_folder(root: Path) -> list[str]:
    """img0 good, img1 truncated, img2 good, img3 zero bytes, img4 good, img5 text, img6 good (sorted order)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in (0, 2, 4, 6):
        _noise(seed=i).save(root / f"img{i}.png")
    buf = io.BytesIO()
    _noise((96, 96), seed=9).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    (root / "img1_truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "img3_empty.jpg").write_bytes(b"")
    (root / "img5_text.jpg").write_text("this is a text file renamed to .jpg\n")
    return ["img1_truncated.jpg", "img3_empty.jpg", "img5_text.jpg"]


def test_load_rgb_raises_on_unreadable_files(tmp_path: Path) -> None:
    for name in _write_bad_folder(tmp_path):
        with pytest.raises(OSError, match=name):
            load_rgb(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        load_rgb(tmp_path / "missing.png")


def test_dataset_skips_unreadable_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _write_bad_folder(tmp_path)
    src = ImageFolderSource(tmp_path)
    ds = MaskedImageDataset(src, *_small_pipeline())
    with caplog.at_level(logging.WARNING, logger="simmim.data.datasets"):
        samples = [ds[i] for i in range(len(ds))]
        samples_again = [ds[i] for i in range(len(ds))]
    assert len(samples) == 7
    for s, again in zip(samples, samples_again, strict=True):
        assert s["image"].shape == (3, 64, 64) and torch.isfinite(s["image"]).all()
        assert s["mask"].shape == (16, 16) and int(s["mask"].sum()) == 39 * 4
        assert torch.equal(s["image"], again["image"]) and s["skipped"] == again["skipped"]
    assert [s["skipped"] for s in samples] == [0, 1, 0, 1, 0, 1, 0]
    assert sum(s["skipped"] for s in samples) == len(bad)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(bad)  # once per bad file, not once per attempt
    for name in bad:
        assert sum(name in w for w in warnings) == 1


def test_dataset_refuses_a_source_without_readable_images(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"bad{i}.png").write_bytes(b"")
    src = ImageFolderSource(tmp_path)  # the names look like images: the scan accepts them
    with pytest.raises(ValueError, match=rf"no readable image in {tmp_path}: all 3 tried are unreadable.*data.path"):
        MaskedImageDataset(src, *_small_pipeline())


def test_folder_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderSource(missing)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("x")
    (empty / ".hidden.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"no image files under .*empty.*\.jpg"):
        ImageFolderSource(empty)
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass a folder of images.*hf:NAME or embedded"):
        open_source(str(missing))
    assert ".tiff" in IMAGE_EXTENSIONS and ".pbm" in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------- dataset determinism


@pytest.fixture
def noise_folder(tmp_path: Path) -> Path:
    root = tmp_path / "noise"
    root.mkdir()
    for i in range(8):
        _noise((72, 80), seed=100 + i).save(root / f"{i:02d}.png")
    return root


def test_samples_are_pure_functions_of_seed_epoch_index(noise_folder: Path) -> None:
    src = ImageFolderSource(noise_folder)
    ds = MaskedImageDataset(src, *_small_pipeline(), seed=3)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = ds[5]
    assert torch.equal(torch.random.get_rng_state(), before)  # global generator untouched
    ds[2]  # order does not matter
    b = MaskedImageDataset(src, *_small_pipeline(), seed=3)[5]  # nor the instance
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"]) and a["index"] == 5
    ds.set_epoch(1)
    c = ds[5]
    assert not torch.equal(a["image"], c["image"]) and not torch.equal(a["mask"], c["mask"])
    ds.set_epoch(0)
    assert torch.equal(ds[5]["image"], a["image"])  # resuming epoch 0 reproduces it
    other_seed = MaskedImageDataset(src, *_small_pipeline(), seed=4)[5]
    assert not torch.equal(a["mask"], other_seed["mask"])


def test_dataloader_workers_do_not_change_batches(noise_folder: Path) -> None:
    ds = MaskedImageDataset(ImageFolderSource(noise_folder), *_small_pipeline(), seed=1)
    serial = list(DataLoader(ds, batch_size=4, num_workers=0))
    parallel = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert len(serial) == len(parallel) == 2
    masks = []
    for s, p in zip(serial, parallel, strict=True):
        assert torch.equal(s["image"], p["image"]) and torch.equal(s["mask"], p["mask"])
        assert torch.equal(s["index"], p["index"]) and s["mask"].dtype == torch.bool
        masks += [tuple(m.flatten().tolist()) for m in p["mask"]]
    assert len(set(masks)) == len(masks) == 8  # every sample, across both workers, has its own mask


def test_stream_over_folder_matches_map_dataset(tmp_path: Path) -> None:
    bad = _write_bad_folder(tmp_path)
    src = ImageFolderSource(tmp_path)
    ds = MaskedImageDataset(src, *_small_pipeline(), seed=2)
    stream = MaskedImageStream(src, *_small_pipeline(), seed=2)
    out = list(stream)
    assert [s["index"] for s in out] == list(range(7))  # one sample per record: unreadable slots are filled
    assert [s["skipped"] for s in out] == [0, 1, 0, 1, 0, 1, 0] and sum(s["skipped"] for s in out) == len(bad)
    for s in out:
        assert torch.equal(s["mask"], ds[s["index"]]["mask"])  # masks come from the slot's own seed
        if not s["skipped"]:
            assert torch.equal(s["image"], ds[s["index"]]["image"])


# ----------------------------------------------------------------------------------------------- embedded sets


def test_embedded_photos_and_digits() -> None:
    photos = sample_photos()
    assert len(photos) >= 15 and all(p.mode == "RGB" and min(p.size) >= 100 for p in photos)
    original = np.asarray(photos[0]).copy()
    photos[0].paste((1, 2, 3), (0, 0, 50, 50))  # copies: changing one does not change the cache
    assert np.array_equal(np.asarray(sample_photos()[0]), original)
    digits, labels = sample_digits()
    assert len(digits) == len(labels) == 1797 and set(labels) == set(range(10))
    assert all(d.mode == "RGB" and d.size == (32, 32) for d in digits[:50])
    assert max(np.asarray(d).max() for d in digits[:50]) > 200  # 0..16 rescaled to 0..255
    small, _ = sample_digits(16)
    assert small[0].size == (16, 16)


def test_embedded_source_and_open_source() -> None:
    photos = open_source("embedded")
    assert isinstance(photos, EmbeddedSource) and photos.labels is None and len(photos) >= 15
    digits = open_source("embedded:digits")
    assert len(digits) == 1797 and len(digits.labels) == 1797 and digits[0].mode == "RGB"
    assert len(open_source("embedded:all")) == len(photos) + 1797
    with pytest.raises(ValueError, match="photos, digits, all"):
        open_source("embedded:cats")
    ds = MaskedImageDataset(photos, pretrain_transform(192), MaskGenerator(192))
    s = ds[0]
    assert s["image"].shape == (3, 192, 192) and s["mask"].shape == (48, 48) and int(s["mask"][::8, ::8].sum()) == 22


# ---------------------------------------------------------------------------------------------- HF datasets


def _hf_dataset(hf, n: int = 5, column: str = "image"):
    images = [_noise(seed=i) for i in range(n)]
    images[1:3] = [im.convert(mode) for im, mode in zip(images[1:3], ("L", "RGBA"), strict=False)]
    features = hf.Features({column: hf.Image(), "label": hf.Value("int64")})
    return hf.Dataset.from_dict({column: images, "label": list(range(n))}, features=features)


def test_hf_save_to_disk_through_open_source(hf, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    _hf_dataset(hf, column="picture").save_to_disk(str(saved))  # found by type, not by name
    src = open_source(str(saved))
    assert isinstance(src, HFImageSource) and not src.is_streaming and src.image_column == "picture"
    assert len(src) == 5 and all(src[i].mode == "RGB" and src[i].size == SIZE for i in range(5))
    assert np.array_equal(np.asarray(src[0]), np.asarray(_noise(seed=0)))
    sample = MaskedImageDataset(src, *_small_pipeline())[3]
    assert sample["image"].shape == (3, 64, 64)

    splits = tmp_path / "splits"
    hf.DatasetDict({"train": _hf_dataset(hf, 3), "test": _hf_dataset(hf, 2)}).save_to_disk(str(splits))
    assert len(open_source(str(splits), split="test")) == 2
    with pytest.raises(ValueError, match="split 'validation' not found.*'train', 'test'"):
        open_source(str(splits), split="validation")

    streamed = open_source(str(saved), streaming=True)
    assert streamed.is_streaming and [im.size for im in streamed] == [SIZE] * 5


def test_hf_column_and_empty_errors(hf) -> None:
    with pytest.raises(ValueError, match=r"no image column.*\['text'\].*image_column"):
        HFImageSource.from_dataset(hf.Dataset.from_dict({"text": ["a", "b"]}))
    with pytest.raises(ValueError, match="image_column 'pixels' is not a column"):
        HFImageSource.from_dataset(_hf_dataset(hf), image_column="pixels")
    empty = hf.Dataset.from_dict({"image": []}, features=hf.Features({"image": hf.Image()}))
    with pytest.raises(ValueError, match="empty"):
        HFImageSource.from_dataset(empty)


def test_hf_imagefolder(hf, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    for i in range(3):
        _noise(seed=i).save(root / "cats" / f"{i}.png")
        _noise(seed=10 + i).convert("L").save(root / "dogs" / f"{i}.jpg")
    src = HFImageSource(str(root))
    assert len(src) == 6 and src.image_column == "image"
    assert all(src[i].mode == "RGB" and src[i].size == SIZE for i in range(6))
    assert isinstance(open_source(str(root)), ImageFolderSource)  # plain folders do not need datasets


def test_hf_streaming_with_a_corrupt_row(hf) -> None:
    images = [{"bytes": _png_bytes(seed=i), "path": None} for i in range(6)]
    images[2] = {"bytes": b"definitely not an image", "path": None}
    ds = hf.Dataset.from_dict({"image": images}, features=hf.Features({"image": hf.Image()}))
    src = HFImageSource.from_dataset(ds.to_iterable_dataset())
    assert src.is_streaming
    with pytest.raises(TypeError, match="no length"):
        len(src)
    raws = list(src.iter_raw())
    assert len(raws) == 6
    with pytest.raises(OSError, match="cannot read image"):
        src.decode(raws[2])

    stream = MaskedImageStream(src, *_small_pipeline(), seed=5)
    by_workers = {}
    for workers in (0, 2):
        out = list(DataLoader(stream, batch_size=None, num_workers=workers))
        assert sum(s["skipped"] for s in out) == 1
        by_workers[workers] = {int(s["index"]): s for s in out}
    assert sorted(by_workers[0]) == sorted(by_workers[2]) == [0, 1, 2, 3, 4, 5]  # row 2's slot filled
    masks = set()
    for i, s in by_workers[0].items():
        p = by_workers[2][i]
        assert torch.equal(s["mask"], p["mask"]) and int(s["skipped"]) == int(p["skipped"]) == (i == 2)
        if i != 2:  # a readable row's sample does not depend on the worker count (a filled slot's image may)
            assert torch.equal(s["image"], p["image"])
        masks.add(tuple(s["mask"].flatten().tolist()))
    assert len(masks) == 6
    stream.set_epoch(1)
    assert not torch.equal(next(iter(stream))["image"], by_workers[0][0]["image"])


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    _noise(seed=seed).save(buf, format="PNG")
    return buf.getvalue()
