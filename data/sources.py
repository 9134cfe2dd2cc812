"""Image sources: ``len(source)`` and ``source[i] -> PIL RGB`` (map-style), or iteration for streaming ``datasets``.

A folder of images (flat or nested), a Hugging Face ``datasets`` dataset (``save_to_disk`` folder, ``imagefolder``
folder or hub name), or the real images that ship inside scikit-image / scikit-learn. ``open_source`` turns a user
string into one. Sources only read and convert images to RGB; the datasets in :mod:`data.datasets` transform them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from simmim.errors import InputNotFoundError, UserError

from .file_index import FileIndex
from .images import (
    IMAGE_EXTENSIONS,
    RawImage,
    UnreadableImageError,
    decode_pil,
    is_image_file,
    load_image,
    raw_from_bytes,
    read_raw,
)
from .samples import photo_names, sample_digits, sample_photos
from .shards import SAVED_DATASET_MARKERS, TarShardSource, load_table, resolve_files, split_files

logger = logging.getLogger(__name__)

VAL_SPLIT_NAMES = ("val", "validation", "valid", "test")  # what a validation split is called, in that order
EMBEDDED_KINDS = ("photos", "digits", "all")


class MapSource(Protocol):
    """What :class:`MaskedImageDataset` needs from a source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Image.Image: ...


def _describe(source: Any, index: int) -> str:
    """A human name for item ``index`` of ``source`` (its file path when it has one)."""
    describe = getattr(source, "describe", None)
    return describe(index) if describe is not None else f"item {index}"


class ImageFolderSource:
    """All images under a folder, flat or nested (class sub-folders allowed, not required), in sorted order.

    The scan happens here, so an empty or mistyped folder fails before training starts. The file list is a packed
    :class:`~data.file_index.FileIndex` (about 8 bytes a file plus the relative path's bytes, no Python object per
    file), so it stays shared, not copied, in forked DataLoader workers; ``paths[i]`` gives a ``Path``.
    """

    is_streaming = False

    def __init__(self, root: str | Path, channels: int = 3) -> None:
        self.channels = channels
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise InputNotFoundError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} is a file, not a folder")
        self.paths = FileIndex.scan(self.root, is_image_file)
        if not len(self.paths):
            raise UserError(
                f"no image files under {self.root} (searched recursively for "
                f"{' '.join(sorted(IMAGE_EXTENSIONS))}, any case; hidden files and folders are ignored)"
            )
        logger.info("found %d images under %s", len(self.paths), self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        """The decoded image at ``index`` (PIL RGB, L for ``channels=1``, else a (C, H, W) tensor); raises
        ``OSError`` naming the file when it cannot be read."""
        return load_image(self.paths.path(index), self.channels)

    def open(self, index: int) -> RawImage:
        """The image at ``index`` opened but not decoded (see :func:`data.images.read_raw`)."""
        return read_raw(self.paths.path(index), self.channels)

    def describe(self, index: int) -> str:
        return self.paths.path(index)


def _looks_saved(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_DATASET_MARKERS)


def pick_split(split: str, available: list[str], where: str, split_key: str | None,
               alternatives: tuple[str, ...] = ()) -> str:
    """``split`` if ``available`` has it, else the first of ``alternatives`` it has; else a :class:`UserError`
    naming the splits there are and ``split_key``, the setting that chose ``split`` (``data.val_split``, ...)."""
    names = [split, *(a for a in alternatives if a != split)]
    for name in names:
        if name in available:
            return name
    looked = f" (looked for {', '.join(names)})" if len(names) > 1 else ""
    fix = f"; set {split_key} to one of them" if split_key else ""
    raise UserError(f"split {split!r} not found in {where}{looked}; available splits: {available}{fix}")


def _unknown_split(err: ValueError) -> bool:
    """The error ``datasets.load_dataset`` raises for a split the dataset does not have."""
    return str(err).startswith(("Unknown split", "Bad split"))


def load_hf_dataset(name_or_path: str, split: str = "train", streaming: bool = False,
                    split_key: str | None = "data.split") -> Any:
    """One split of a ``datasets`` dataset: a ``save_to_disk`` folder, a folder of images (``imagefolder``) or a
    hub name. Returns a ``datasets.Dataset`` (or ``IterableDataset`` when ``streaming``). A missing split is
    refused naming ``split_key``, the setting that chose it (None: no setting to name)."""
    return load_hf_split(name_or_path, split, streaming, split_key)[0]


def load_hf_split(name_or_path: str, split: str = "train", streaming: bool = False,
                  split_key: str | None = "data.split", alternatives: tuple[str, ...] = ()) -> tuple[Any, str]:
    """:func:`load_hf_dataset`, where a missing ``split`` is also looked for under the names in ``alternatives``
    (``validation`` for ``val``...). Returns the dataset and the name of the split it is."""
    import datasets

    path = Path(name_or_path).expanduser()
    if path.is_dir() and _looks_saved(path):
        ds = datasets.load_from_disk(str(path))
        picked = split
        if isinstance(ds, datasets.DatasetDict | datasets.IterableDatasetDict):
            picked = pick_split(split, list(ds), str(path), split_key, alternatives)
            ds = ds[picked]
        if streaming and isinstance(ds, datasets.Dataset):
            # one shard per file, at least 64 when there are that many rows: shards are what readers take whole
            ds = ds.to_iterable_dataset(num_shards=max(len(ds.cache_files), min(len(ds), 64), 1))
        return ds, picked
    args, kwargs = (("imagefolder",), {"data_dir": str(path)}) if path.is_dir() else ((name_or_path,), {})
    try:
        return datasets.load_dataset(*args, split=split, streaming=streaming, **kwargs), split
    except ValueError as err:  # only an unknown split is the user's to fix; anything else stays what it is
        if not _unknown_split(err):
            raise
        available = list(datasets.get_dataset_split_names(*args, **kwargs))
    picked = pick_split(split, available, name_or_path, split_key, alternatives)
    return datasets.load_dataset(*args, split=picked, streaming=streaming, **kwargs), picked


class HFImageSource:
    """Images from a Hugging Face ``datasets`` dataset: a ``save_to_disk`` folder, a folder of images (loaded with
    the ``imagefolder`` builder) or a hub name.

    Image bytes are decoded here, not by ``datasets`` (the image column is cast to ``Image(decode=False)``), so a
    corrupt image raises in :meth:`decode` for that item only; inside a streaming iterator it would end the stream.

    Map-style: ``len``, ``source.open(i)`` (raw) and ``source[i]`` (decoded). Streaming (``is_streaming``): iterate
    :meth:`iter_raw`, shard by shard (:attr:`num_shards`).
    """

    def __init__(self, name_or_path: str, split: str = "train", image_column: str | None = None,
                 streaming: bool = False, channels: int = 3) -> None:
        ds = load_hf_dataset(name_or_path, split=split, streaming=streaming)
        self._setup(ds, f"{name_or_path}[{split}]", image_column, channels)

    @classmethod
    def from_dataset(cls, dataset: Any, image_column: str | None = None, name: str = "in-memory",
                     channels: int = 3) -> HFImageSource:
        """Wrap an already loaded ``datasets.Dataset`` or ``datasets.IterableDataset``."""
        self = cls.__new__(cls)
        self._setup(dataset, name, image_column, channels)
        return self

    def _setup(self, ds: Any, name: str, image_column: str | None, channels: int) -> None:
        import datasets

        self.channels = channels

        if not isinstance(ds, datasets.Dataset | datasets.IterableDataset):
            raise TypeError(f"expected a datasets.Dataset or IterableDataset for {name}, got {type(ds).__name__}")
        self.name = name
        self.is_streaming = isinstance(ds, datasets.IterableDataset)
        features = ds.features
        columns = list(features) if features is not None else list(ds.column_names or [])
        self.image_column = _pick_image_column(features, columns, image_column, name)
        ds = ds.select_columns([self.image_column])  # never decode or copy the other columns
        if features is not None and isinstance(features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset = ds
        if not self.is_streaming and len(ds) == 0:
            raise UserError(f"dataset {name} is empty (0 rows)")

    def __len__(self) -> int:
        if self.is_streaming:
            raise TypeError(f"streaming dataset {self.name} has no length; iterate it (MaskedImageStream)")
        return len(self.dataset)

    def __getitem__(self, index: int) -> Image.Image:
        """The decoded image of row ``index`` (PIL RGB, L for ``channels=1``, else a (C, H, W) tensor)."""
        return self.decode(self._row(index))

    def open(self, index: int) -> RawImage:
        """Row ``index``'s image opened but not decoded (see :func:`data.images.read_raw`)."""
        return self.to_raw(self._row(index))

    def _row(self, index: int) -> Any:
        if self.is_streaming:
            raise TypeError(f"streaming dataset {self.name} cannot be indexed; iterate it (MaskedImageStream)")
        return self.dataset[int(index)][self.image_column]

    @property
    def num_shards(self) -> int:
        """How many shards (files) the dataset is stored in: the unit a streaming reader can take whole."""
        return int(getattr(self.dataset, "num_shards", 1) or 1)

    def iter_raw(self, shard: int | None = None, num_shards: int | None = None) -> Iterator[Any]:
        """The undecoded image values in order (bytes/path dicts, paths, arrays or PIL images); see :meth:`to_raw`.

        ``shard``: only that shard of the ``num_shards`` (default :attr:`num_shards`) contiguous shards.
        Iterates with ``.iter(batch_size=...)``, which (unlike ``iter(dataset)``) does not split the stream across
        DataLoader workers behind our back: :class:`MaskedImageStream` assigns shards and positions itself.
        """
        ds = self.dataset
        if not self.is_streaming:
            lo, hi = 0, len(ds)
            if shard is not None:
                n = num_shards or 1
                lo, hi = len(ds) * shard // n, len(ds) * (shard + 1) // n
            for i in range(lo, hi):
                yield ds[i][self.image_column]
            return
        if shard is not None:
            ds = ds.shard(num_shards=num_shards or self.num_shards, index=shard, contiguous=True)
        for batch in ds.iter(batch_size=16):
            yield from batch[self.image_column]

    def to_raw(self, value: Any) -> RawImage:
        """One value of the image column -> a raw image (opened, not decoded where the format allows)."""
        if isinstance(value, Image.Image | np.ndarray):
            return value
        if isinstance(value, str | os.PathLike):
            return read_raw(value, self.channels)
        if isinstance(value, dict):
            data, path = value.get("bytes"), value.get("path")
            if data is not None:
                return raw_from_bytes(data, str(path or ""), self.channels)
            if path and Path(path).is_file():
                return read_raw(path, self.channels)
            import datasets

            try:  # a remote path: let datasets fetch it
                return datasets.Image().decode_example(value)
            except Exception as err:
                raise UnreadableImageError(f"cannot read image ({path}) in {self.name}: {type(err).__name__}: "
                                           f"{err}") from err
        if isinstance(value, list):
            return np.asarray(value)
        raise UserError(f"column {self.image_column!r} of {self.name} holds {type(value).__name__}, not images")

    def decode(self, value: Any) -> Image.Image:
        """One value of the image column -> PIL RGB (L for ``channels=1``; a (C, H, W) tensor for other counts),
        with the conversion rules of :mod:`data.images`."""
        from .images import decode_tensor

        raw = self.to_raw(value)
        return decode_pil(raw, self.channels) if self.channels in (1, 3) else decode_tensor(raw, self.channels)[0]

    def __iter__(self) -> Iterator[Image.Image]:
        for value in self.iter_raw():
            yield self.decode(value)

    def describe(self, index: int) -> str:
        return f"{self.name} row {index}"


def _pick_image_column(features: Any, columns: list[str], image_column: str | None, name: str) -> str:
    """The requested column, else the first ``datasets.Image`` column, else one named ``image`` or ``img``."""
    import datasets

    if image_column is not None:
        if image_column not in columns:
            raise UserError(f"image_column {image_column!r} is not a column of {name}; columns: {columns}")
        return image_column
    if features is not None:
        for col, feature in features.items():
            if isinstance(feature, datasets.Image):
                return col
    for col in ("image", "img"):
        if col in columns:
            return col
    raise UserError(
        f"{name} has no image column (no column of type datasets.Image, none named 'image' or 'img'); "
        f"columns: {columns}. Pass image_column=NAME (data.image_column)"
    )


class EmbeddedSource:
    """The images shipped inside scikit-image / scikit-learn: ``photos`` (21 photos), ``digits`` (1797 labelled
    digits, ``digit_size`` px) or ``all`` (both). ``labels`` holds the digit labels for ``digits``, else None.

    ``channels=1`` gives grayscale images (the digits are gray already; the photos are converted to luminance), for
    tests and demos of one-channel models; other counts than 1 and 3 are refused.
    """

    is_streaming = False

    def __init__(self, kind: str = "photos", digit_size: int = 32, channels: int = 3) -> None:
        if kind not in EMBEDDED_KINDS:
            raise UserError(f"unknown embedded kind {kind!r}; choose one of {', '.join(EMBEDDED_KINDS)}")
        if channels not in (1, 3):
            raise UserError(f"embedded images have 1 or 3 channels, not model.in_chans {channels}")
        self.kind, self.channels = kind, channels
        self.images: list[Image.Image] = []
        self.names: list[str] = []
        self.labels: list[int] | None = None
        if kind in ("photos", "all"):
            self.images += sample_photos()
            self.names += photo_names()
        if kind in ("digits", "all"):
            digits, labels = sample_digits(digit_size)
            self.images += digits
            self.names += [f"digits:{i}" for i in range(len(digits))]
            if kind == "digits":
                self.labels = labels
        if channels == 1:
            self.images = [img.convert("L") for img in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        return self.images[index].copy()  # a copy: callers may draw on it without changing the source

    def open(self, index: int) -> Image.Image:
        """The stored image itself (no copy): for transforms, which never modify their input."""
        return self.images[index]

    def describe(self, index: int) -> str:
        return self.names[index]


Source = ImageFolderSource | HFImageSource | EmbeddedSource | TarShardSource


def open_source(spec: str, split: str = "train", streaming: bool = False, image_column: str | None = None,
                channels: int = 3) -> Source:
    """Resolve a user string to a source.

    ``embedded`` / ``embedded:photos|digits|all`` -> :class:`EmbeddedSource`; ``hf:NAME`` -> hub dataset; a folder
    written by ``save_to_disk`` -> :class:`HFImageSource`; tar shards (patterns, a folder of ``.tar`` files, URLs)
    -> :class:`~data.shards.TarShardSource` (streamed); parquet / arrow files -> :class:`HFImageSource` (see
    :mod:`data.shards`); any other folder -> :class:`ImageFolderSource`.
    ``split``, ``streaming`` and ``image_column`` apply to ``datasets`` sources only; ``channels`` (the model's
    ``model.in_chans``) to all.
    """
    if spec == "embedded" or spec.startswith("embedded:"):
        return EmbeddedSource(spec.partition(":")[2] or "photos", channels=channels)
    if spec.startswith("hf:") and not spec.startswith("hf://"):
        name = spec[len("hf:") :]
        if not name:
            raise UserError("hf: needs a dataset name, e.g. hf:user/dataset")
        return HFImageSource(name, split=split, image_column=image_column, streaming=streaming, channels=channels)
    found = resolve_files(spec)
    if found is not None:
        kind, files = found
        files = split_files(spec, kind, files, split, split_key="data.split")
        if kind == "tar":
            return TarShardSource(files, spec, channels=channels)
        return HFImageSource.from_dataset(load_table(kind, files, streaming), image_column=image_column,
                                          name=spec, channels=channels)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _looks_saved(path):
            return HFImageSource(str(path), split=split, image_column=image_column, streaming=streaming,
                                 channels=channels)
        return ImageFolderSource(path, channels=channels)
    what = "is not a folder" if path.exists() else "does not exist"
    raise InputNotFoundError(
        f"data path {spec} {what}; pass a folder of images, tar shards (a pattern like shards/{{0000..0099}}.tar), "
        "parquet/arrow files, a datasets save_to_disk folder, hf:NAME or embedded"
    )
