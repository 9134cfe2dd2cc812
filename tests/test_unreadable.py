"""Unreadable files never stop a run while readable images exist, a source with none is refused before training,
and the skip count counts each unreadable file once (issue 8 item 8)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CPU_ENV
from PIL import Image
from torch.utils.data import DataLoader

from simmim.data import ImageFolderSource, MaskedImageDataset, MaskedImageStream, MaskGenerator, pretrain_transform
from simmim.data.labeled import ClassFolderSource, LabeledDataset
from simmim.data.sampler import EpochSampler
from simmim.data.transforms import eval_transform

JUNK = 60  # more than the old limit of 50 consecutive failures


def _pipeline() -> tuple:
    return pretrain_transform(32), MaskGenerator(32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.5)


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


def _healthy_with_junk(root: Path, good: int = 20) -> list[str]:
    """``good`` readable PNGs around a sub-folder of JUNK unreadable ones (sorted in the middle)."""
    for i in range(good // 2):
        _image(root / f"a{i:02d}.png", i)
        _image(root / f"z{i:02d}.png", 100 + i)
    for i in range(JUNK):
        (root / "m_junk" / f"{i:03d}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (root / "m_junk" / f"{i:03d}.jpg").write_bytes(b"not a jpeg" * (i % 3))  # empty or garbage
    return [f"m_junk/{i:03d}.jpg" for i in range(JUNK)]


class Recording:
    """A source proxy that records which items were opened."""

    def __init__(self, source) -> None:
        self.source, self.opened = source, []

    def __len__(self) -> int:
        return len(self.source)

    def open(self, index: int):
        self.opened.append(index)
        return self.source.open(index)

    def describe(self, index: int) -> str:
        return self.source.describe(index)


def test_a_junk_subfolder_does_not_stop_a_healthy_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    junk = _healthy_with_junk(tmp_path)
    src = Recording(ImageFolderSource(tmp_path))
    names = [src.source.paths[i].relative_to(tmp_path).as_posix() for i in range(len(src))]
    bad_indices = {names.index(j) for j in junk}
    ds = MaskedImageDataset(src, *_pipeline(), seed=1)
    src.opened.clear()
    with caplog.at_level(logging.WARNING, logger="simmim.data.datasets"):
        samples = [ds[(0, i)] for i in range(len(ds))]
    assert len(samples) == 80 and all(s["image"].shape == (3, 32, 32) for s in samples)
    assert {s["index"] for s in samples if s["skipped"]} == bad_indices  # each unreadable file counted once
    assert sum(s["skipped"] for s in samples) == JUNK
    # each bad file is read once per process, then remembered
    opened_bad = [i for i in src.opened if i in bad_indices]
    assert sorted(opened_bad) == sorted(bad_indices)
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == JUNK and all(sum(j in w for w in warned) == 1 for j in junk)
    # replacements come from many readable files, not from the one after the junk folder
    fills = []
    for i in sorted(bad_indices):
        src.opened.clear()
        ds[(1, i)]
        fills.append(src.opened[-1])
    assert not set(fills) & bad_indices and len(set(fills)) >= 10
    # a second epoch, through DataLoader workers: still one count per bad file
    loader = DataLoader(ds, batch_size=8, sampler=EpochSampler(len(ds), seed=1), num_workers=2)
    loader.sampler.set_epoch(1)
    assert int(sum(b["skipped"].sum() for b in loader)) == JUNK


def test_folder_where_every_file_is_unreadable_is_refused_up_front(tmp_path: Path) -> None:
    for i in range(300):  # more than the probe looks at: the message still names the folder and the fix
        (tmp_path / "sub" / f"{i:03d}.jpg").parent.mkdir(exist_ok=True)
        (tmp_path / "sub" / f"{i:03d}.jpg").write_bytes(b"")
    src = ImageFolderSource(tmp_path)
    with pytest.raises(ValueError) as info:
        MaskedImageDataset(src, *_pipeline())
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg and "no readable image" in msg and "data.path" in msg
    with pytest.raises(ValueError, match="no readable image"):
        MaskedImageStream(src, *_pipeline())
    classes = tmp_path / "classes"
    for c in ("cat", "dog"):
        (classes / c).mkdir(parents=True)
        (classes / c / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=f"no readable image in {classes}"):
        LabeledDataset(ClassFolderSource(classes), eval_transform(32))


def test_probe_passes_when_most_probes_fail_but_some_image_is_readable(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    for i in range(40):
        (tmp_path / f"{i:02d}_bad.jpg").write_bytes(b"")
    _image(tmp_path / "99_good.png", 0)  # not among the evenly spaced probes, found by the search after them
    with caplog.at_level(logging.WARNING, logger="simmim.data.datasets"):
        ds = MaskedImageDataset(ImageFolderSource(tmp_path), *_pipeline())
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert all(ds[i]["image"].shape == (3, 32, 32) for i in range(len(ds)))  # every slot filled by the good one


def test_labelled_slots_take_the_replacements_label(tmp_path: Path) -> None:
    for c in ("cat", "dog"):
        for i in range(3):
            _image(tmp_path / c / f"{i}.png", hash((c, i)) % 1000)
    (tmp_path / "cat" / "9_bad.png").write_bytes(b"")
    src = ClassFolderSource(tmp_path)
    ds = LabeledDataset(src, eval_transform(32, crop_pct=1.0))
    bad = next(i for i in range(len(src)) if src.samples[i][0].name == "9_bad.png")
    s = ds[bad]
    assert s["skipped"] == 1 and s["index"] == bad
    filled = [i for i in range(len(src)) if i != bad and torch.equal(ds[i]["image"], s["image"])]
    assert len(filled) == 1 and int(s["label"]) == src.samples[filled[0]][1]  # image and label agree
    assert sum(ds[i]["skipped"] for i in range(len(ds))) == 1


def test_stream_skips_a_long_run_of_bad_records(tmp_path: Path) -> None:
    _healthy_with_junk(tmp_path)
    stream = MaskedImageStream(ImageFolderSource(tmp_path), *_pipeline(), seed=3)
    out = list(stream)
    assert [s["index"] for s in out] == list(range(80)) and sum(s["skipped"] for s in out) == JUNK


def test_cli_refuses_unreadable_data_before_writing_anything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(5):
        (data / f"{i}.jpg").parent.mkdir(exist_ok=True)
        (data / f"{i}.jpg").write_bytes(b"\x00" * 10)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "simmim", "pretrain", "demo/pretrain", "--data", str(data),
                           "--output", str(out), "schedule.max_steps=1"], capture_output=True, text=True,
                          env=CPU_ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no readable image" in lines[0] and str(data) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "config.yaml").exists()
