"""Labelled image sources for fine-tuning and evaluation, and the dataset that transforms them.

Sources: a class-folder tree (the ImageNet layout ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` or any
``<class>/<images>`` folder), ``datasets`` datasets with image and label columns (the HF ``imagenet-1k`` layout
included), and the 8x8 digits that ship with scikit-learn (split 80/20 by index). Each gives ``source[i] ->
(decoded image, label)``, ``source.open(i) -> (raw image, label)`` (see :mod:`data.images`) and ``classes``;
``channels`` (``model.in_chans``) selects how images are read, as for the unlabelled sources.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from simmim.errors import InputNotFoundError, UserError

from .datasets import BadItems, Transform, fill_unreadable, probe_source, seeded_transform, split_key, try_item
from .file_index import FileIndex, walk_sorted
from .images import RawImage, decode_pil, is_image_file, load_image, read_raw
from .mask import sample_seed
from .samples import sample_digits
from .sources import HFImageSource, _looks_saved, load_hf_dataset
from .transforms import TensorTransform

logger = logging.getLogger(__name__)

VAL_SPLIT_NAMES = ("val", "validation", "valid", "test")


class ClassFolderSource:
    """Images under ``root/<class>/...`` (nested below the class folder is fine); classes sorted by name.

    Files are held in a packed :class:`~data.file_index.FileIndex` and labels in one ``int32`` array (no Python
    object per file: see :mod:`data.file_index`); ``samples[i] -> (Path, label)``.
    """

    def __init__(self, root: str | Path, classes: list[str] | None = None, channels: int = 3) -> None:
        self.channels = channels
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise InputNotFoundError(f"labelled image folder {self.root} does not exist")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        self.classes = classes if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(found) - set(index))
        if unknown:
            raise UserError(f"{self.root} has class folders not in the training classes: {unknown[:5]}")
        counts: list[int] = []

        def relative_paths() -> Iterator[str]:
            for c in found:  # class by class, so the labels are runs of equal values
                counts.append(0)
                for rel in walk_sorted(self.root / c, is_image_file, prefix=c + "/"):
                    counts[-1] += 1
                    yield rel

        self.files = FileIndex.from_paths(self.root, relative_paths())
        self.labels = np.repeat(np.array([index[c] for c in found], dtype=np.int32), counts)
        if not len(self.files):
            raise UserError(f"no images in class sub-folders of {self.root}; expected {self.root}/<class>/<image>")
        self.samples = _Samples(self.files, self.labels)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return load_image(self.files.path(index), self.channels), int(self.labels[index])

    def open(self, index: int) -> tuple[RawImage, int]:
        return read_raw(self.files.path(index), self.channels), int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.files.path(index)


class _Samples:
    """``samples[i] -> (Path, label)`` over a packed index, like torchvision's ``ImageFolder.samples``."""

    def __init__(self, files: FileIndex, labels: np.ndarray) -> None:
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Path, int]:
        return self.files[index], int(self.labels[index])


class HFLabeledSource:
    """A ``datasets`` split with an image column and an integer label column (``label``/``labels`` by default);
    class names come from a ``ClassLabel`` feature when there is one."""

    def __init__(self, name_or_path: str, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None, channels: int = 3) -> None:
        import datasets

        self.channels = channels

        ds = load_hf_dataset(name_or_path, split=split)
        columns = list(ds.column_names)
        label_column = label_column or next((c for c in ("label", "labels", "target") if c in columns), None)
        if label_column is None or label_column not in columns:
            raise UserError(f"{name_or_path}[{split}] has no label column (columns: {columns}); "
                             "set data.label_column")
        self.labels = [int(v) for v in ds[label_column]]
        feature = ds.features[label_column]
        n = max(self.labels) + 1 if self.labels else 0
        self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else [str(i) for i in range(n)]
        self.images = HFImageSource.from_dataset(ds, image_column=image_column, name=f"{name_or_path}[{split}]",
                                                 channels=channels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.labels[index]

    def open(self, index: int) -> tuple[RawImage, int]:
        return self.images.open(index), self.labels[index]

    def describe(self, index: int) -> str:
        return self.images.describe(index)


class DigitsSource:
    """scikit-learn's 1797 handwritten digits (8x8, upsampled to ``size`` px): every 5th image is validation."""

    def __init__(self, split: str = "train", size: int = 32, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise UserError(f"embedded:digits has 1 or 3 channels, not model.in_chans {channels}")
        self.channels = channels
        images, labels = sample_digits(size)
        keep = [i for i in range(len(images)) if (i % 5 == 0) == (split in VAL_SPLIT_NAMES)]
        self.images = [images[i] if channels == 3 else images[i].convert("L") for i in keep]
        self.labels = [labels[i] for i in keep]
        self.classes = [str(d) for d in range(10)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index].copy(), self.labels[index]

    def open(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], self.labels[index]  # no copy: transforms never modify their input

    def describe(self, index: int) -> str:
        return f"digits[{index}]"


def open_labeled(spec: str, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None, classes: list[str] | None = None, channels: int = 3) -> Any:
    """Resolve a labelled data spec for one split.

    ``embedded:digits`` -> :class:`DigitsSource`; ``hf:NAME`` or a ``save_to_disk`` folder -> :class:`HFLabeledSource`;
    a folder with a ``<split>`` sub-folder (``train``, ``val``...) -> :class:`ClassFolderSource` of it (the
    ImageNet layout); any other folder -> :class:`ClassFolderSource` of the folder itself for the train split.
    ``channels`` is the model's ``model.in_chans``.
    """
    if spec in ("embedded:digits", "digits"):
        return DigitsSource(split, channels=channels)
    if spec.startswith("hf:"):
        return HFLabeledSource(spec[3:], split, image_column, label_column, channels)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise InputNotFoundError(f"data path {spec} does not exist; pass an ImageNet-style folder (train/<class>/..., "
                                "val/<class>/...), a datasets save_to_disk folder, hf:NAME or embedded:digits")
    if _looks_saved(path):
        return HFLabeledSource(str(path), split, image_column, label_column, channels)
    names = [split] + (list(VAL_SPLIT_NAMES) if split in VAL_SPLIT_NAMES else [])
    for name in names:
        if (path / name).is_dir():
            return ClassFolderSource(path / name, classes, channels)
    if split == "train":
        return ClassFolderSource(path, classes, channels)
    raise InputNotFoundError(f"{path} has no {split!r} sub-folder (looked for {', '.join(names)}); use the ImageNet "
                            "layout train/<class>/... and val/<class>/...")


class LabeledDataset(Dataset):
    """``ds[i]`` or ``ds[(epoch, i)]`` -> ``{image (C, H, W), label, index, skipped}``, a pure function of
    (seed, epoch, i) like the SimMIM datasets (transforms run with the global RNGs seeded per sample: timm's
    RandAugment and random erasing draw from them). Unreadable items are handled as in :mod:`data.datasets`: the
    slot is filled by another readable item (with that item's label), ``skipped`` is 1 for the slot's own bad item.

    ``channels`` defaults to the transform's (our tensor transforms) or the source's channel count.
    """

    def __init__(self, source: Any, transform: Transform, seed: int = 0, probe: bool = True,
                 channels: int | None = None) -> None:
        if len(source) == 0:
            raise UserError("the labelled data source is empty")
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0
        self.channels = channels or getattr(transform, "channels", None) or getattr(source, "channels", 3)
        self.bad = BadItems()
        if probe:
            probe_source(source, self.channels)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer keys (``(epoch, index)`` keys carry their own)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def _sample(self, item: tuple[Any, int], index: int, seed: int, skipped: int) -> dict[str, Any]:
        raw, label = item
        if not isinstance(self.transform, TensorTransform):
            raw = decode_pil(raw, self.channels)
        image = seeded_transform(raw, self.transform, seed)
        return {"image": image, "label": torch.tensor(label), "index": index, "skipped": skipped}

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = split_key(key, self.epoch)
        seed = sample_seed(self.seed, epoch, index)
        if index not in self.bad.known:
            out = try_item(self.source, index, self.bad, lambda item: self._sample(item, index, seed, 0))
            if out is not None:
                return out
        return fill_unreadable(self.source, index, seed, self.bad, lambda item: self._sample(item, index, seed, 1))
