"""Fault injection on the data side (issue 15 items 6-10 and 12's ``eval --stage``): decompression bombs in every
reader, fine-tuning data that would be silently wrong (other classes on resume, empty class folders, labels out of
range), split keys named right, and probe stages checked up front. Each refusal is one line naming the fix and
leaves the output directory as it was."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from test_faults import PRETRAIN, one_line_error, snapshot
from test_finetune import QUICK, pretrain_checkpoint

from simmim.cli import main
from simmim.data import ImageFolderSource, MaskedImageDataset, MaskGenerator, images
from simmim.data.images import UnreadableImageError, raw_from_bytes, read_raw
from simmim.data.labeled import check_class_count, check_classes, open_labeled
from simmim.data.transforms import pretrain_transform
from simmim.errors import UserError

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
        tifffile.imwrite(tmp_path / f"ok{i}.tif", np.full((40, 48), i * 10, np.uint8))
    (tmp_path / "zz_bomb.tif").write_bytes(bombs[0].read_bytes())
    src = ImageFolderSource(tmp_path, channels=1)  # model.in_chans=1: TIFFs go through tifffile
    masks = MaskGenerator(32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.5)
    ds = MaskedImageDataset(src, pretrain_transform(32, mean=[0.5], std=[0.5], channels=1), masks, seed=0)
    samples = [ds[(0, i)] for i in range(len(ds))]
    assert [s["skipped"] for s in samples] == [0] * 6 + [1]
    assert all(s["image"].shape == (1, 32, 32) for s in samples)


# ----------------------------------------------------------------------------------------------------------------
# fine-tuning data that would be silently wrong (items 7-9)

FT = ["finetune", "demo/finetune", *QUICK, "model.img_size=32", "model.window_size=4", "data.batch_size=4"]


def _tree(root: Path, classes: list[str], per_class: int = 4) -> None:
    """``root/<class>/img_i.png``: a colour per class, a little noise."""
    rng = np.random.default_rng(len(classes))
    for c_i, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 40, (36, 36, 3), dtype=np.uint8)
            a[..., c_i % 3] += 200
            Image.fromarray(a).save(root / c / f"img_{i}.png")


def _hf(path: Path, splits: dict[str, list[int]], names: list[str] | None = None) -> Path:
    """A ``save_to_disk`` DatasetDict of 24 px images with these labels per split (a ClassLabel of ``names``, or
    plain integers)."""
    import datasets

    rng = np.random.default_rng(0)
    label = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({"image": datasets.Image(), "label": label})
    dd = datasets.DatasetDict({
        split: datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in labels],
             "label": labels}, features=features)
        for split, labels in splits.items()})
    dd.save_to_disk(str(path))
    return path


def test_resuming_a_finetune_on_other_classes_is_refused_before_anything_is_written(tmp_path, capsys):
    _tree(tmp_path / "pets" / "train", ["cat", "dog"])
    _tree(tmp_path / "pets" / "val", ["cat", "dog"], 2)
    _tree(tmp_path / "bugs" / "train", ["ant", "bee", "cow"])
    _tree(tmp_path / "bugs" / "val", ["ant", "bee", "cow"], 2)
    out = tmp_path / "run"
    assert main([*FT, "--data", str(tmp_path / "pets"), "--output", str(out), "schedule.max_steps=2"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert main([*FT, "--data", str(tmp_path / "bugs"), "--output", str(out), "schedule.max_steps=4",
                 "--resume", "auto"]) == 2
    line = one_line_error(capsys)
    assert "new here ['ant', 'bee', 'cow']" in line and "missing here ['cat', 'dog']" in line, line
    assert "ckpt-00000002.pt" in line and "--output" in line
    assert snapshot(out) == before

    # the same check as eval's, now for datasets sources too: a checkpoint is never scored on other classes
    hf = _hf(tmp_path / "hf", {"train": [0, 1, 2], "validation": [0, 1, 2]}, names=["ant", "bee", "cow"])
    assert main(["eval", str(out / "checkpoints" / "ckpt-00000002.pt"), "--data", str(hf)]) == 2
    assert "missing here ['cat', 'dog']" in one_line_error(capsys)


def test_the_class_check_names_what_differs_and_the_order():
    with pytest.raises(UserError, match=r"label 0 is 'dog' here, 'cat' there\); fix"):
        check_classes(["dog", "cat"], ["cat", "dog"], "D", "checkpoint C", "fix")  # labels are indices: refused
    with pytest.raises(UserError, match=r"new here \['ant'\], missing here \['dog'\] \(checkpoint C has 2"):
        check_classes(["ant", "cat"], ["cat", "dog"], "D", "checkpoint C", "fix")
    check_classes(["dog"], ["cat", "dog"], "D", "checkpoint C", "fix", subset=True)  # a folder may lack classes
    with pytest.raises(UserError, match=r"new here \['ant'\] \("):
        check_classes(["ant"], ["cat", "dog"], "D", "checkpoint C", "fix", subset=True)


def test_empty_class_folders_are_skipped_with_a_warning(tmp_path, caplog):
    _tree(tmp_path / "train", ["cat", "dog"])
    (tmp_path / "train" / "empty").mkdir()
    (tmp_path / "train" / "notes").mkdir()
    (tmp_path / "train" / "notes" / "readme.txt").write_text("not an image")
    (tmp_path / "train" / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "__MACOSX" / "cat" / "._img_0.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble
    _tree(tmp_path / "val", ["cat", "dog"], 2)
    (tmp_path / "val" / "dog_unused").mkdir()  # an empty folder in val is no unknown class either
    with caplog.at_level(logging.WARNING, logger="simmim.data.labeled"):
        train = open_labeled(str(tmp_path), "train")
        val = open_labeled(str(tmp_path), "val", classes=train.classes)
    assert train.classes == ["cat", "dog"] and len(train) == 8 and set(train.labels) == {0, 1}
    assert val.classes == ["cat", "dog"] and len(val) == 4
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "['empty', 'notes']" in warned[0] and "['dog_unused']" in warned[1]
    assert not any("__MACOSX" in w for w in warned)


def test_fewer_than_two_classes_are_refused_in_one_line(tmp_path, capsys):
    _tree(tmp_path / "data" / "train", ["cat"])
    (tmp_path / "data" / "train" / "__MACOSX").mkdir()
    (tmp_path / "data" / "train" / "empty").mkdir()
    _tree(tmp_path / "data" / "val", ["cat"], 2)
    out = tmp_path / "run"
    assert main([*FT, "--data", str(tmp_path / "data"), "--output", str(out), "schedule.max_steps=2"]) == 2
    line = one_line_error(capsys)
    assert "1 class ['cat']" in line and "at least 2" in line, line
    assert not out.exists()
    with pytest.raises(UserError, match=r"0 classes \[\]"):
        check_class_count([], "x")


def test_labels_outside_the_classes_are_refused_before_training(tmp_path, capsys):
    # ImageNet-1K's test split has no labels (-1): here it is the validation data
    hf = _hf(tmp_path / "inet", {"train": [0, 1, 0, 1, 0, 1, 0, 1], "validation": [-1] * 5}, names=["cat", "dog"])
    out = tmp_path / "run"
    assert main([*FT, "--data", str(hf), "--output", str(out), "schedule.max_steps=2",
                 "data.val_split=validation"]) == 2
    line = one_line_error(capsys)
    assert "[validation]: 5 of 5 labels in the 'validation' split (data.val_split)" in line, line
    assert "e.g. -1 at row 0" in line and "no label" in line
    assert not out.exists()

    plain = _hf(tmp_path / "plain", {"train": [0, 1, 2, 0], "validation": [0, 2, 7, 1, 9]})  # int labels
    with pytest.raises(UserError, match=r"2 of 5 labels .* not class indices 0..2 \(e.g. 7 at row 2\)"):
        open_labeled(str(plain), "validation", classes=["0", "1", "2"], split_key="data.val_split")
    with pytest.raises(UserError, match=r"'train' split \(data.train_split\).*e.g. -3"):
        open_labeled(str(_hf(tmp_path / "neg", {"train": [0, -3, 1]})), "train", split_key="data.train_split")


# ----------------------------------------------------------------------------------------------------------------
# item 10: the split key a message names is the one that chose the split


def test_a_missing_split_names_the_key_that_chose_it(tmp_path, capsys):
    hf = _hf(tmp_path / "hf", {"train": [0, 1, 0, 1, 0, 1, 0, 1], "holdout": [0, 1]}, names=["cat", "dog"])
    out = tmp_path / "run"
    assert main([*FT, "--data", str(hf), "--output", str(out), "schedule.max_steps=2"]) == 2
    line = one_line_error(capsys)
    assert "split 'val' not found" in line and "['train', 'holdout']" in line and "data.val_split" in line, line
    assert "data.split" not in line and not out.exists()
    assert main([*FT, "--data", str(hf), "--output", str(out), "data.train_split=training"]) == 2
    assert "data.train_split" in one_line_error(capsys)
    assert main(["pretrain", "demo/pretrain", "--data", str(hf), "--output", str(out), "data.split=nope"]) == 2
    assert "set data.split to one of them" in one_line_error(capsys)

    # a "validation" (or "test") split is found for data.val_split=val, as the folder layout's val/ is for
    # "validation"; the split found is the one messages name
    both = _hf(tmp_path / "both", {"train": [0, 1], "validation": [1, 0, 1]}, names=["cat", "dog"])
    assert len(open_labeled(str(both), "val", classes=["cat", "dog"])) == 3
    unlabelled = _hf(tmp_path / "test", {"train": [0, 1], "test": [-1, -1]}, names=["cat", "dog"])
    with pytest.raises(UserError, match=r"\[test\]: 2 of 2 labels in the 'test' split \(data.val_split\)"):
        open_labeled(str(unlabelled), "val", classes=["cat", "dog"], split_key="data.val_split")


def test_every_split_key_passed_to_a_message_is_a_real_key():
    """The message scan of test_config reads string literals inside messages; a key handed to a message at run
    time (``split_key="data.val_split"``) is a keyword argument: every ``*_key=`` string literal, and every
    ``*_key`` parameter default, in simmim/, models/ and data/ must be a config key or a command-line option."""
    import ast
    import dataclasses

    from simmim.config import FinetuneConfig, PretrainConfig

    schema: dict[str, set[str]] = {}
    for cfg in (PretrainConfig(), FinetuneConfig()):
        for f in dataclasses.fields(cfg):
            section = getattr(cfg, f.name)
            if dataclasses.is_dataclass(section):
                schema.setdefault(f.name, set()).update(g.name for g in dataclasses.fields(section))
    root = Path(__file__).resolve().parents[1]
    found, wrong = [], []
    for folder in ("simmim", "models", "data"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                pairs = []
                if isinstance(node, ast.keyword) and node.arg and node.arg.endswith("_key"):
                    pairs.append(node.value)
                elif isinstance(node, ast.arguments):
                    named = [*node.posonlyargs, *node.args][-len(node.defaults):] if node.defaults else []
                    pairs += [d for a, d in zip(named, node.defaults, strict=True) if a.arg.endswith("_key")]
                    pairs += [d for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)
                              if d is not None and a.arg.endswith("_key")]
                for value in pairs:
                    if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                        continue
                    key = value.value
                    found.append(key)
                    section, _, name = key.partition(".")
                    if not (key.startswith("--") or name in schema.get(section, ())):
                        wrong.append(f"{path.relative_to(root)}:{value.lineno}: {key}")
    assert not wrong, "messages are handed keys that do not exist:\n" + "\n".join(wrong)
    assert {"data.split", "data.train_split", "data.val_split", "--split"} <= set(found)  # the scan works


# ----------------------------------------------------------------------------------------------------------------
# item 12: a probe stage is checked against the encoder up front


@pytest.mark.parametrize("stage", ["9", "-9", "4", "-5"])
def test_eval_knn_with_a_stage_the_encoder_lacks_is_one_line(tmp_path, capsys, stage):
    ckpt = pretrain_checkpoint(tmp_path)
    assert main(["eval", str(ckpt), "--data", "embedded:digits", "--knn", "--stage", stage]) == 2
    line = one_line_error(capsys)
    assert f"--stage {stage} is not a stage of swinv2_pico, which has 4: use 0..3, or -1 for the last" in line


@pytest.mark.parametrize("stage", ["9", "-9"])
def test_monitor_stage_is_checked_with_the_config(tmp_path, capsys, stage):
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--output", str(out), "monitor.data=embedded:digits", f"monitor.stage={stage}"]) == 2
    assert "monitor.stage" in one_line_error(capsys)
    assert not out.exists()
