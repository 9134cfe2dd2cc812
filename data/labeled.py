"""Labelled image sources for fine-tuning and evaluation, and the dataset that transforms them.

Sources: a class-folder tree (the ImageNet layout ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` or any
``<class>/<images>`` folder), ``datasets`` datasets with image and label columns (the HF ``imagenet-1k`` layout
included), and the 8x8 digits that ship with scikit-learn (split 80/20 by index). Each gives ``source[i] ->
(PIL RGB, label)`` and ``classes``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import Transform, _FailureLog, load_skipping, seeded_transform
from .images import load_rgb
from .mask import sample_seed
from .samples import sample_digits
from .sources import HFImageSource, _looks_saved, _scan_images, load_hf_dataset

logger = logging.getLogger(__name__)

VAL_SPLIT_NAMES = ("val", "validation", "valid", "test")


class ClassFolderSource:
    """Images under ``root/<class>/...`` (nested below the class folder is fine); classes sorted by name."""

    def __init__(self, root: str | Path, classes: list[str] | None = None) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"labelled image folder {self.root} does not exist")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.classes = classes if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise ValueError(f"{self.root} has class folders not in the training classes: {unknown[:5]}")
        self.samples = [(p, index[c]) for c in found for p in _scan_images(self.root / c)]
        if not self.samples:
            raise ValueError(f"no images in class sub-folders of {self.root}; expected {self.root}/<class>/<image>")
        self.labels = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_rgb(path), label

    def describe(self, index: int) -> str:
        return str(self.samples[index][0])


class HFLabeledSource:
    """A ``datasets`` split with an image column and an integer label column (``label``/``labels`` by default);
    class names come from a ``ClassLabel`` feature when there is one."""

    def __init__(self, name_or_path: str, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None) -> None:
        import datasets

        ds = load_hf_dataset(name_or_path, split=split)
        columns = list(ds.column_names)
        label_column = label_column or next((c for c in ("label", "labels", "target") if c in columns), None)
        if label_column is None or label_column not in columns:
            raise ValueError(f"{name_or_path}[{split}] has no label column (columns: {columns}); "
                             "set data.label_column")
        self.labels = [int(v) for v in ds[label_column]]
        feature = ds.features[label_column]
        n = max(self.labels) + 1 if self.labels else 0
        self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else [str(i) for i in range(n)]
        self.images = HFImageSource.from_dataset(ds, image_column=image_column, name=f"{name_or_path}[{split}]")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.labels[index]

    def describe(self, index: int) -> str:
        return self.images.describe(index)


class DigitsSource:
    """scikit-learn's 1797 handwritten digits (8x8, upsampled to ``size`` px): every 5th image is validation."""

    def __init__(self, split: str = "train", size: int = 32) -> None:
        images, labels = sample_digits(size)
        keep = [i for i in range(len(images)) if (i % 5 == 0) == (split in VAL_SPLIT_NAMES)]
        self.images = [images[i] for i in keep]
        self.labels = [labels[i] for i in keep]
        self.classes = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index].copy(), self.labels[index]

    def describe(self, index: int) -> str:
        return f"digits[{index}]"


def open_labeled(spec: str, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None, classes: list[str] | None = None) -> Any:
    """Resolve a labelled data spec for one split.

    ``embedded:digits`` -> :class:`DigitsSource`; ``hf:NAME`` or a ``save_to_disk`` folder -> :class:`HFLabeledSource`;
    a folder with a ``<split>`` sub-folder (``train``, ``val``...) -> :class:`ClassFolderSource` of it (the
    ImageNet layout); any other folder -> :class:`ClassFolderSource` of the folder itself for the train split.
    """
    if spec in ("embedded:digits", "digits"):
        return DigitsSource(split)
    if spec.startswith("hf:"):
        return HFLabeledSource(spec[3:], split, image_column, label_column)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data path {spec} does not exist; pass an ImageNet-style folder (train/<class>/..., "
                                "val/<class>/...), a datasets save_to_disk folder, hf:NAME or embedded:digits")
    if _looks_saved(path):
        return HFLabeledSource(str(path), split, image_column, label_column)
    names = [split] + (list(VAL_SPLIT_NAMES) if split in VAL_SPLIT_NAMES else [])
    for name in names:
        if (path / name).is_dir():
            return ClassFolderSource(path / name, classes)
    if split == "train":
        return ClassFolderSource(path, classes)
    raise FileNotFoundError(f"{path} has no {split!r} sub-folder (looked for {', '.join(names)}); use the ImageNet "
                            "layout train/<class>/... and val/<class>/...")


class LabeledDataset(Dataset):
    """``ds[i] -> {image (3, H, W), label, index, skipped}``, a pure function of (seed, epoch, i) like the SimMIM
    datasets; unreadable items are replaced by the next readable one and counted in ``skipped``."""

    def __init__(self, source: Any, transform: Transform, seed: int = 0) -> None:
        if len(source) == 0:
            raise ValueError("the labelled data source is empty")
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0
        self._failures = _FailureLog()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        (img, label), skipped = load_skipping(self.source, int(index), self._failures)
        image = seeded_transform(img, self.transform, sample_seed(self.seed, self.epoch, int(index)))
        return {"image": image, "label": torch.tensor(label), "index": int(index), "skipped": skipped}
