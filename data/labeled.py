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
from .shards import TarIndexSource, is_url, load_table, resolve_files, split_files
from .sources import VAL_SPLIT_NAMES, HFImageSource, _looks_saved, load_hf_split
from .transforms import TensorTransform

logger = logging.getLogger(__name__)

__all__ = ["VAL_SPLIT_NAMES", "ClassFolderSource", "DigitsSource", "HFLabeledSource", "LabeledDataset",
           "check_class_count", "check_classes", "open_labeled"]

IGNORED_FOLDERS = frozenset({"__MACOSX"})  # macOS zip resource forks: never a class (hidden folders neither)


def _few(names: list[str], n: int = 5) -> str:
    """``['a', 'b', ...]``: at most ``n`` names, and how many there are in all when there are more."""
    shown = ", ".join(repr(x) for x in names[:n])
    return f"[{shown}, ... {len(names)} in all]" if len(names) > n else f"[{shown}]"


def check_classes(found: list[str], trained: list[str], where: str, against: str, fix: str,
                  subset: bool = False) -> None:
    """Refuse labelled data whose class names are not the ones a model was trained on (its head's order), naming
    the classes that differ: ``found`` in the data at ``where``, ``trained`` recorded by ``against`` (a
    checkpoint). ``subset``: the data may lack some classes (an evaluation folder; labels are mapped by name);
    otherwise the lists must be equal, order included (labels are indices into them)."""
    known, present = set(trained), set(found)
    extra = [c for c in found if c not in known]
    missing = [] if subset else [c for c in trained if c not in present]
    if extra or missing:
        differ = ([f"new here {_few(extra)}"] if extra else []) + ([f"missing here {_few(missing)}"] if missing else [])
        raise UserError(f"the classes of {where} differ from those of {against}: {', '.join(differ)} ({against} "
                        f"has {len(trained)}: {_few(trained)}); {fix}")
    if not subset and list(found) != list(trained):
        first = next((i for i, (a, b) in enumerate(zip(found, trained, strict=False)) if a != b), 0)
        raise UserError(f"the classes of {where} are those of {against} in another order (label {first} is "
                        f"{found[first]!r} here, {trained[first]!r} there); {fix}")


def check_class_count(classes: list[str], where: str) -> None:
    """Refuse a classification task of fewer than 2 classes: one class trains to top-1 100% and learns nothing."""
    if len(classes) < 2:
        raise UserError(f"{where} has {len(classes)} class{'' if len(classes) == 1 else 'es'} {_few(classes)}; a "
                        "classifier needs at least 2: put each class's images in its own sub-folder "
                        "(<class>/<image>) or use a dataset with a label column of 2 or more classes")


class ClassFolderSource:
    """Images under ``root/<class>/...`` (nested below the class folder is fine); classes sorted by name.

    Class folders without any image file are skipped with a warning naming them (an empty folder as a class would
    train a head on a class that never appears), ``__MACOSX`` and hidden folders silently. With ``classes`` (the
    training classes, for validation/evaluation data) every class folder here must be one of them (some may be
    missing), and labels are indices into ``classes``.

    Files are held in a packed :class:`~data.file_index.FileIndex` and labels in one ``int32`` array (no Python
    object per file: see :mod:`data.file_index`); ``samples[i] -> (Path, label)``.
    """

    def __init__(self, root: str | Path, classes: list[str] | None = None, channels: int = 3,
                 against: str = "the training data") -> None:
        self.channels = channels
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise InputNotFoundError(f"labelled image folder {self.root} does not exist")
        folders = sorted(d.name for d in self.root.iterdir()
                         if d.is_dir() and not d.name.startswith(".") and d.name not in IGNORED_FOLDERS)
        counts: list[int] = []

        def relative_paths() -> Iterator[str]:
            for c in folders:  # class by class, so the labels are runs of equal values
                counts.append(0)
                for rel in walk_sorted(self.root / c, is_image_file, prefix=c + "/"):
                    counts[-1] += 1
                    yield rel

        self.files = FileIndex.from_paths(self.root, relative_paths())
        if not len(self.files):
            raise UserError(f"no images in class sub-folders of {self.root}; expected {self.root}/<class>/<image>")
        empty = [c for c, n in zip(folders, counts, strict=True) if n == 0]
        if empty:
            logger.warning("skipping %d class folder(s) of %s without image files: %s", len(empty), self.root,
                           _few(empty))
        found = [c for c, n in zip(folders, counts, strict=True) if n]
        if classes is not None:
            check_classes(found, list(classes), str(self.root), against, "use the same class folders",
                          subset=True)
        self.classes = list(classes) if classes is not None else found
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = np.repeat(np.array([index[c] for c in found], dtype=np.int32), [n for n in counts if n])
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
    class names come from a ``ClassLabel`` feature when there is one.

    Labels are read as one arrow column (no Python object per row) and checked here, before any training: every
    label must be a class index, ``0 <= label < len(classes)`` (ImageNet-1K's test split has ``-1``, "no label",
    everywhere). With ``classes`` (the training classes) the label range is theirs, and a ``ClassLabel``'s names
    must be them, in order. ``split_key`` names the setting that chose ``split`` in messages. ``loaded``: the
    ``(dataset, split name)`` already loaded (parquet/arrow files), instead of loading ``name_or_path``.
    """

    def __init__(self, name_or_path: str, split: str = "train", image_column: str | None = None,
                 label_column: str | None = None, channels: int = 3, classes: list[str] | None = None,
                 split_key: str | None = None, alternatives: tuple[str, ...] = (),
                 against: str = "the training data", loaded: tuple[Any, str] | None = None) -> None:
        import datasets
        import pyarrow as pa

        self.channels = channels

        ds, picked = loaded or load_hf_split(name_or_path, split, split_key=split_key, alternatives=alternatives)
        name = f"{name_or_path}[{picked}]"
        columns = list(ds.column_names)
        label_column = label_column or next((c for c in ("label", "labels", "target") if c in columns), None)
        if label_column is None or label_column not in columns:
            raise UserError(f"{name} has no label column (columns: {columns}); set data.label_column")
        column = ds.with_format("arrow")[label_column]  # a pyarrow ChunkedArray, row order as the dataset's
        if not pa.types.is_integer(column.type):
            raise UserError(f"column {label_column!r} of {name} holds {column.type} values, not class indices; "
                            "set data.label_column to the integer label column")
        labels = np.asarray(column.fill_null(-1))  # (N,) a missing label is as bad as -1
        feature = ds.features[label_column]
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        if classes is not None and names is not None:
            check_classes(names, list(classes), name, against, "evaluate on data labelled like it", subset=False)
        if classes is not None:
            self.classes = list(classes)
        else:
            self.classes = names if names is not None else [str(i) for i in range(int(labels.max(initial=-1)) + 1)]
        bad = np.flatnonzero((labels < 0) | (labels >= len(self.classes)))
        if len(bad):
            where = f"the {picked!r} split ({split_key})" if split_key else f"the {picked!r} split"
            unlabelled = " (-1 means 'no label', as in a test split)" if (labels[bad] == -1).any() else ""
            example = f"e.g. {int(labels[bad[0]])} at row {int(bad[0])}"
            raise UserError(f"{name}: {len(bad)} of {len(labels)} labels in {where} are not class indices "
                            f"0..{len(self.classes) - 1} ({example}){unlabelled}; use a labelled split, or fix the "
                            "labels")
        self.labels = labels
        self.images = HFImageSource.from_dataset(ds, image_column=image_column, name=name, channels=channels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], int(self.labels[index])

    def open(self, index: int) -> tuple[RawImage, int]:
        return self.images.open(index), int(self.labels[index])

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
                 label_column: str | None = None, classes: list[str] | None = None, channels: int = 3,
                 split_key: str | None = None, against: str = "the training data") -> Any:
    """Resolve a labelled data spec for one split.

    ``embedded:digits`` -> :class:`DigitsSource`; ``hf:NAME`` or a ``save_to_disk`` folder -> :class:`HFLabeledSource`;
    local tar shards -> :class:`~data.shards.TarIndexSource`; parquet / arrow files -> :class:`HFLabeledSource`
    (splits by file name: :mod:`data.shards`);
    a folder with a ``<split>`` sub-folder (``train``, ``val``...) -> :class:`ClassFolderSource` of it (the
    ImageNet layout); any other folder -> :class:`ClassFolderSource` of the folder itself for the train split.
    A validation split is also found under its other usual names (``val``, ``validation``, ``valid``, ``test``).
    ``channels`` is the model's ``model.in_chans``. ``classes``: the classes a model was trained on (recorded by
    ``against``); data with other classes is refused (:func:`check_classes`). ``split_key``: the setting that
    chose ``split`` (``data.val_split``...), named in messages.
    """
    alternatives = VAL_SPLIT_NAMES if split in VAL_SPLIT_NAMES else ()
    if spec in ("embedded:digits", "digits"):
        source = DigitsSource(split, channels=channels)
        if classes is not None:
            check_classes(source.classes, list(classes), spec, against, "evaluate on data labelled like it")
        return source
    hf_args = dict(image_column=image_column, label_column=label_column, channels=channels, classes=classes,
                   split_key=split_key, alternatives=alternatives, against=against)
    if spec.startswith("hf:") and not spec.startswith("hf://"):
        return HFLabeledSource(spec[3:], split, **hf_args)
    found = resolve_files(spec)
    if found is not None:
        kind, files = found
        files = split_files(spec, kind, files, split, alternatives, split_key)
        name = f"{spec}[{split}]"
        if kind == "tar":
            if any(is_url(f) for f in files):
                raise UserError(f"fine-tuning reads local tar shards (by offset), not URLs ({files[0]}); copy the "
                                "shards to a local folder, or use parquet files")
            source = TarIndexSource(files, name, channels=channels, classes=classes)
            if classes is None:
                check_class_count(source.classes, f"the training data {spec}")
            return source
        return HFLabeledSource(spec, split, **hf_args, loaded=(load_table(kind, files), split))
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise InputNotFoundError(f"data path {spec} does not exist; pass an ImageNet-style folder (train/<class>/..., "
                                "val/<class>/...), a datasets save_to_disk folder, hf:NAME or embedded:digits")
    if _looks_saved(path):
        return HFLabeledSource(str(path), split, **hf_args)
    names = [split, *(a for a in alternatives if a != split)]
    for name in names:
        if (path / name).is_dir():
            return ClassFolderSource(path / name, classes, channels, against)
    if split == "train":
        return ClassFolderSource(path, classes, channels, against)
    fix = f" or set {split_key}" if split_key else ""
    raise InputNotFoundError(f"{path} has no {split!r} sub-folder (looked for {', '.join(names)}); use the ImageNet "
                             f"layout train/<class>/... and val/<class>/...{fix}")


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
