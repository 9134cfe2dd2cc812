"""DataLoader behaviour (issue 10 item 5, data side): persistent workers stay exact across epochs (the epoch travels
with the sampler's indices), through accelerate's prepare, set_epoch and skip_first_batches; pinned memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simmim.data import ImageFolderSource, MaskedImageDataset, MaskGenerator, pretrain_transform
from simmim.data.labeled import LabeledDataset, open_labeled
from simmim.data.loader import make_loader
from simmim.data.transforms import eval_transform


@pytest.fixture
def dataset(tmp_path: Path) -> MaskedImageDataset:
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    return MaskedImageDataset(ImageFolderSource(tmp_path), pretrain_transform(32), MaskGenerator(32, 8, 4, 0.5),
                              seed=3)


def _reference(ds: MaskedImageDataset, loader, epoch: int) -> list[torch.Tensor]:
    """The batches of ``epoch`` computed in this process, straight from the sampler's keys."""
    loader.sampler.set_epoch(epoch)
    order = [k[1] if isinstance(k, tuple) else k for k in loader.sampler]
    return [torch.stack([ds[(epoch, k)]["image"] for k in order[i:i + 4]]) for i in range(0, len(order), 4)]


def test_persistent_workers_see_every_epoch(dataset: MaskedImageDataset) -> None:
    loader = make_loader(dataset, batch_size=4, num_workers=2, seed=3)
    assert loader.persistent_workers
    seen = {}
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)  # the dataset copies in the workers are never told
        seen[epoch] = [b["image"] for b in loader]
    for epoch in range(3):
        expected = _reference(dataset, loader, epoch)
        assert all(torch.equal(a, b) for a, b in zip(seen[epoch], expected, strict=True)), epoch
    assert not torch.equal(seen[0][0], seen[1][0])


def test_through_accelerate_prepare_set_epoch_and_resume(dataset: MaskedImageDataset) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    loader = acc.prepare(make_loader(dataset, batch_size=4, num_workers=2, seed=3))
    loader.set_epoch(2)
    full = [b["image"] for b in loader]
    loader.set_epoch(2)
    resumed = [b["image"] for b in acc.skip_first_batches(loader, 1)]
    expected = _reference(dataset, make_loader(dataset, batch_size=4, seed=3), 2)
    assert len(full) == 3 and all(torch.equal(a, b) for a, b in zip(full, expected, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[1:], strict=True)) and len(resumed) == 2


def test_labelled_dataset_with_persistent_workers() -> None:
    ds = LabeledDataset(open_labeled("embedded:digits", "val"), eval_transform(16, crop_pct=1.0))
    loader = make_loader(ds, batch_size=64, num_workers=2, shuffle=False, drop_last=False)
    first = [b["label"] for b in loader]
    again = [b["label"] for b in loader]  # a second epoch on the same workers
    assert sum(len(x) for x in first) == len(ds) and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.cat(first).tolist() == [int(ds.source.labels[i]) for i in range(len(ds))]  # index order


def test_pinned_batches(dataset: MaskedImageDataset) -> None:
    loader = make_loader(dataset, batch_size=4, num_workers=0, pin_memory=torch.cuda.is_available())
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["mask"].dtype == torch.bool
    if torch.cuda.is_available():
        assert batch["image"].is_pinned() and batch["mask"].is_pinned()
    with pytest.raises(ValueError, match="data.num_workers"):
        make_loader(dataset, batch_size=4, num_workers=-1)
