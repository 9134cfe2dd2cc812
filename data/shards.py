"""Data stored in files of many samples: WebDataset tar shards, parquet and arrow files, local or remote.

A ``--data`` string names such files when it is

- a brace pattern or glob: ``shards/train-{0000..1023}.tar``, ``data/*.parquet``, ``s3://bucket/train-*.tar``;
- one file: ``train.tar``, ``part-0.parquet``, ``table.arrow``;
- a folder whose top level holds ``.tar`` (or ``.parquet`` / ``.arrow``) files and no image files;
- a URL (``s3://``, ``gs://``, ``https://``, ``hf://`` ...), read through fsspec; the filesystem's package (``s3fs``,
  ``gcsfs``, ``aiohttp`` for http, ...) is the user's to install.

Tar shards follow the WebDataset layout: a sample is the files sharing a key (``KEY.jpg``, ``KEY.png``,
``KEY.webp`` ..., the key being the name up to its first dot), with ``KEY.cls`` (an integer) or ``KEY.json`` (an
integer, or an object with ``label``/``cls``) as its label. For pretraining they are streamed
(:class:`TarShardSource`): each shard read once, whole, by one reader of :class:`~data.stream.MaskedImageStream`;
a read that fails (a dropped connection, a truncated file) is retried from where it stopped, and a shard that keeps
failing gives one unreadable record for its unread rest. For fine-tuning local shards are indexed
(:class:`TarIndexSource`: member offsets, read with one seek each) and used like a folder, without a copy.

Parquet and arrow files go through ``datasets``: ``.arrow`` files are memory-mapped as they are; ``.parquet`` files
are converted once to the ``datasets`` cache (memory-mapped afterwards) or streamed with ``data.streaming=true``.

Splits: when file names start with a split name (``train-00000.tar``, ``val_0.parquet``: the Hugging Face hub
layout), a split takes the files named after it; otherwise all files are the ``train`` split. A pattern holding
``train`` gives the validation split with ``train`` replaced by ``val`` (or ``validation``, ``valid``, ``test``).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from simmim.errors import InputNotFoundError, UserError

from .images import IMAGE_EXTENSIONS, RawImage, UnreadableImageError, raw_from_bytes

logger = logging.getLogger(__name__)

SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # written by save_to_disk
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TABLE_SUFFIXES = (".parquet", ".arrow")
SPLIT_NAMES = ("train", "val", "validation", "valid", "test")
RETRY_WAIT_S = 0.5  # before the first re-open of a remote shard; doubled for each next one
READ_RETRIES = 3  # re-opens of a shard whose read failed, before its rest is given up
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
FILESYSTEM_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "'fsspec[http]'",
                       "https": "'fsspec[http]'", "az": "adlfs", "abfs": "adlfs", "hf": "huggingface_hub",
                       "sftp": "paramiko", "ssh": "paramiko"}


def is_url(spec: str) -> bool:
    """Whether ``spec`` is a URL with a scheme (``s3://``, ``https://`` ...), not a local path."""
    return bool(URL.match(spec)) and not spec.startswith("file://")


def _local(spec: str) -> str:
    return spec[len("file://"):] if spec.startswith("file://") else os.path.expanduser(spec)


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path in it; a missing filesystem package is a one-line
    :class:`UserError` naming the ``pip install``."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        protocol = url.split("://", 1)[0].lower()
        package = FILESYSTEM_PACKAGES.get(protocol, f"the fsspec filesystem for {protocol}://")
        raise UserError(f"reading {protocol}:// URLs needs a package that is not installed ({err}); "
                        f"pip install {package}") from err
    except ValueError as err:  # fsspec: "Protocol not known"
        raise UserError(f"cannot read {url}: {err}; use a local path or an fsspec URL (s3://, gs://, https://, "
                        "hf://)") from err


def _is_glob(spec: str) -> bool:
    """Whether ``spec`` holds glob characters (``?`` starts an http(s) URL's query, not a pattern)."""
    chars = "*[" if spec.lower().startswith(("http://", "https://")) else "*?["
    return any(c in spec for c in chars)


def _has_pattern(spec: str) -> bool:
    return "{" in spec or _is_glob(spec)


def _suffix(name: str) -> str:
    lower = name.lower()
    return next((s for s in (*SHARD_SUFFIXES, *TABLE_SUFFIXES) if lower.endswith(s)), "")


def expand(spec: str) -> list[str]:
    """The files ``spec`` names, in order: brace patterns expanded (``{0000..1023}``, ``{a,b}``), then globs
    matched (``*``, ``?``, ``[...]``, ``**``), locally or through fsspec for URLs. Missing files are not checked."""
    from braceexpand import braceexpand

    out: list[str] = []
    for part in braceexpand(spec):
        if not _is_glob(part):
            out.append(part if is_url(part) else _local(part))
        elif is_url(part):
            fs, path = filesystem(part)
            protocol = part.split("://", 1)[0]
            out += [m if is_url(m) else f"{protocol}://{m}" for m in sorted(fs.glob(path))]
        else:
            out += sorted(glob.glob(_local(part), recursive=True))
    return list(dict.fromkeys(out))


def files_in_folder(path: Path) -> tuple[str, list[str]] | None:
    """``(kind, files)`` when the top level of folder ``path`` holds shard (kind ``tar``) or table files
    (``parquet``, ``arrow``) and no image files; else None (an image folder, a ``save_to_disk`` folder)."""
    if any((path / m).is_file() for m in SAVED_DATASET_MARKERS):
        return None
    try:
        names = sorted(e.name for e in os.scandir(path) if e.is_file() and not e.name.startswith("."))
    except OSError:
        return None
    if any(os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS for n in names):
        return None
    for kind, suffixes in (("tar", SHARD_SUFFIXES), ("parquet", (".parquet",)), ("arrow", (".arrow",))):
        files = [str(path / n) for n in names if n.lower().endswith(suffixes)]
        if files:
            return kind, files
    return None


def _kind(files: list[str], spec: str) -> str:
    kinds = {_suffix(f) for f in files}
    other = next((f for f in files if not _suffix(f)), None)
    if other is not None:
        raise UserError(f"--data {spec} names {os.path.basename(other)}, not a .tar, .parquet or .arrow file; a "
                        "pattern or URL names shard or table files (pass a folder for image files)")
    if len(kinds) > 1:
        names = ", ".join(sorted(os.path.basename(f) for f in files)[:3])
        raise UserError(f"--data {spec} names files of different kinds ({names} ...); name only .tar shards, only "
                        ".parquet or only .arrow files")
    suffix = kinds.pop()
    return "tar" if suffix in SHARD_SUFFIXES else suffix.lstrip(".")


def resolve_files(spec: str) -> tuple[str, list[str]] | None:
    """``(kind, files)`` when ``spec`` names sample files (module docstring): kind ``tar``, ``parquet`` or
    ``arrow``; None when it is something else (an image folder, a saved dataset, ``hf:NAME``...). A pattern or URL
    that matches nothing is refused here."""
    if spec.startswith(("hf:", "embedded")) and not spec.startswith("hf://"):
        return None
    if is_url(spec):
        filesystem(spec)  # a missing filesystem package: refused now, not in a data worker
    else:
        path = Path(_local(spec))
        if path.is_dir():
            return files_in_folder(path)
        if not _has_pattern(spec) and not _suffix(spec):
            return None
    if is_url(spec) and not _has_pattern(spec) and not _suffix(spec):  # a remote folder
        fs, path = filesystem(spec)
        protocol = spec.split("://", 1)[0]
        try:
            names = sorted(m if is_url(m) else f"{protocol}://{m}" for m in fs.ls(path, detail=False))
        except (OSError, NotImplementedError) as err:
            raise InputNotFoundError(f"cannot list {spec}: {err}") from err
        files = [n for n in names if _suffix(n)]
        if not files:
            raise UserError(f"no .tar, .parquet or .arrow files in {spec}; name the files (a glob or brace pattern)")
        return _kind(files, spec), files
    files = expand(spec)
    if not files:
        raise InputNotFoundError(f"--data {spec} matches no file; check the pattern (brace ranges like "
                                 "{0000..0099} and globs like *.tar are expanded)")
    if not is_url(spec):
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise InputNotFoundError(f"{len(missing)} of the {len(files)} files --data {spec} names do not exist "
                                     f"(e.g. {missing[0]})")
    return _kind(files, spec), files


def _split_prefix(path: str) -> str | None:
    name = os.path.basename(path.rstrip("/")).lower()
    return next((s for s in SPLIT_NAMES if re.match(rf"{s}(?=[-_.])", name)), None)


def split_files(spec: str, kind: str, files: list[str], split: str, alternatives: tuple[str, ...] = (),
                split_key: str | None = None) -> list[str]:
    """The files of ``split`` (or the first of ``alternatives`` found) among ``files``, which ``spec`` named
    (module docstring: file names starting with a split name; ``train`` in a pattern)."""
    names = [split, *(a for a in alternatives if a != split)]
    prefixes = {_split_prefix(f) for f in files}
    if prefixes - {None}:
        for name in names:
            chosen = [f for f in files if _split_prefix(f) == name]
            if chosen:
                return chosen
    elif split == "train":
        return files
    if split != "train" and "train" in spec:
        for name in names:
            other = spec.replace("train", name)
            found = resolve_files(other) if (_has_pattern(other) or is_url(other) or os.path.exists(_local(other))) \
                else None
            if found and found[1]:
                return found[1]
    fix = f"; set {split_key}" if split_key else ""
    raise InputNotFoundError(f"no {split!r} files in --data {spec} (looked for file names starting with "
                             f"{', '.join(names)}){fix}")


def open_file(url: str) -> Any:
    """A binary file object for a local path or an fsspec URL."""
    if not is_url(url):
        return open(url, "rb")  # noqa: SIM115 - the caller closes it
    fs, path = filesystem(url)
    if url.lower().startswith(("http://", "https://")):  # one sequential GET, no range requests needed
        return fs.open(path, "rb", block_size=0)
    return fs.open(path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a failed read of a shard raises: OS and tar errors, and the network errors of fsspec's http
    filesystem when it is installed (aiohttp's are not ``OSError``)."""
    errors: list[type[BaseException]] = [OSError, EOFError, tarfile.TarError, TimeoutError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        errors.append(FSTimeoutError)
    except ImportError:
        pass
    return tuple(errors)


class BrokenShard:
    """The record standing for a shard's unread rest after its reads kept failing: unreadable (counted)."""

    def __init__(self, url: str, read: int, err: BaseException) -> None:
        self.url, self.read, self.err = url, read, err


def label_of(sample: dict[str, Any], where: str) -> int | None:
    """The integer label of a WebDataset sample: ``cls`` (text of an integer) or ``json`` (an integer, or an
    object with ``label``, ``cls`` or ``class``); None when it has neither."""
    if "cls" in sample:
        text = sample["cls"].decode() if isinstance(sample["cls"], bytes) else str(sample["cls"])
        try:
            return int(text.strip())
        except ValueError as err:
            raise UserError(f"{where}.cls holds {text[:20]!r}, not a class index") from err
    if "json" in sample:
        value = json.loads(sample["json"])
        if isinstance(value, dict):
            value = next((value[k] for k in ("label", "cls", "class") if k in value), None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{where}.json has no integer label (an integer, or an object with 'label' or 'cls')")
    return None


def _image_member(sample: dict[str, Any]) -> str | None:
    return next((k for k in sample if not k.startswith("__") and f".{k.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS),
                None)


class TarShardSource:
    """Samples streamed from WebDataset tar shards (local paths or fsspec URLs), shard by shard.

    ``iter_raw(shard)`` yields each sample of shard ``shard`` as a dict of member suffix -> bytes (plus ``__key__``
    and ``__url__``), read sequentially with webdataset's tar iterator. ``to_raw(sample)`` opens its image member
    (the first member with an image suffix); a sample without one, or whose image is corrupt, is unreadable.
    ``retries`` counts the re-opens done by this process (each reader keeps its own; all are logged).
    """

    is_streaming = True

    def __init__(self, urls: list[str], name: str, channels: int = 3, read_retries: int = READ_RETRIES) -> None:
        if not urls:
            raise UserError(f"no shards in {name}")
        self.urls, self.name, self.channels, self.read_retries = list(urls), name, channels, read_retries
        self.retries = 0

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def iter_raw(self, shard: int | None = None, num_shards: int | None = None) -> Iterator[Any]:
        """The samples of shard ``shard`` (all shards in order when None); ``num_shards`` must be
        :attr:`num_shards` (shards are files here)."""
        if num_shards not in (None, self.num_shards):
            raise ValueError(f"{self.name} has {self.num_shards} shards, not {num_shards}")
        for i in range(self.num_shards) if shard is None else (shard,):
            yield from self._shard(self.urls[i])

    def _samples(self, url: str) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import group_by_keys

        with open_file(url) as f:
            yield from group_by_keys(_tar_entries(f, url))

    def _shard(self, url: str) -> Iterator[Any]:
        """One shard's samples; a failed read re-opens the shard and skips the samples already given."""
        done = failures = 0
        errors = _read_errors()
        while True:
            seen = 0
            try:
                for sample in self._samples(url):
                    seen += 1
                    if seen > done:
                        done += 1
                        yield sample
                return
            except errors as err:
                failures += 1
                if failures > self.read_retries:
                    logger.warning("giving up shard %s after %d failed reads, %d samples read: %s: %s", url,
                                   failures, done, type(err).__name__, err)
                    yield BrokenShard(url, done, err)
                    return
                self.retries += 1
                logger.warning("retrying shard %s from sample %d (retry %d; %d retries in this reader): %s: %s",
                               url, done, failures, self.retries, type(err).__name__, err)
                if is_url(url):
                    time.sleep(RETRY_WAIT_S * 2 ** (failures - 1))  # a server that dropped us may need a moment

    def to_raw(self, sample: Any) -> RawImage:
        """A sample -> its image, opened, not decoded; ``UnreadableImageError`` when it has none or it is
        corrupt."""
        if isinstance(sample, BrokenShard):
            raise UnreadableImageError(f"the rest of shard {sample.url} after {sample.read} samples could not be "
                                       f"read: {type(sample.err).__name__}: {sample.err}")
        member = _image_member(sample)
        where = f"{sample.get('__url__', self.name)}:{sample.get('__key__', '?')}"
        if member is None:
            raise UnreadableImageError(f"sample {where} has no image member (members: "
                                       f"{', '.join(k for k in sample if not k.startswith('__'))})")
        return raw_from_bytes(sample[member], f"{where}.{member}", self.channels)


class _Counted(io.RawIOBase):
    """A binary stream that counts the bytes read through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.count = f, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.count += len(data)
        return data


def _tar_entries(f: Any, url: str) -> Iterator[dict[str, Any]]:
    """The regular files of the tar stream ``f`` in order, as webdataset's ``{fname, data, __url__}`` dicts, read
    sequentially (``r|*``: gzip too). Python's tar reader ends silently where a stream was cut inside a header;
    an uncompressed stream that stops before the end-of-archive block raises ``tarfile.ReadError`` here."""
    counted = _Counted(f)
    with tarfile.open(fileobj=counted, mode="r|*") as tar:
        for info in tar:
            if info.isreg() and not os.path.basename(info.name).startswith("__"):
                yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # keep no headers: a shard may hold millions of members
        while counted.read(1 << 20):  # the padding after the end-of-archive block
            pass
        complete = getattr(tar.fileobj, "comptype", "tar") != "tar" or counted.count >= tar.offset + tarfile.BLOCKSIZE
    if not complete:
        raise tarfile.ReadError(f"{url} ends after {counted.count} bytes, inside a tar entry (cut short)")


class TarIndexSource:
    """Labelled samples of local WebDataset tar shards, map-style: the member offsets are read once (tar headers
    and the small label members), then ``open(i)`` reads one image with a seek. Classes are ``"0" .. "K-1"`` for
    the largest label K-1 (or the given ``classes``). Compressed tars cannot be indexed (stream them)."""

    def __init__(self, files: list[str], name: str, channels: int = 3, classes: list[str] | None = None) -> None:
        self.name, self.channels = name, channels
        self.items: list[tuple[int, int, int, str]] = []  # (file, offset, size, member name)
        labels: list[int] = []
        self.files = list(files)
        for f, path in enumerate(self.files):
            if not path.lower().endswith(".tar"):
                raise UserError(f"{path} is compressed; fine-tuning reads uncompressed .tar shards (by offset)")
            with open(path, "rb") as fh:
                for key, members in _tar_members(path).items():
                    where = f"{path}:{key}"
                    image = next((m for m in members if f".{m.rsplit('.', 1)[-1]}" in IMAGE_EXTENSIONS), None)
                    if image is None:
                        continue
                    texts = {}
                    for ext in ("cls", "json"):
                        if ext in members:
                            fh.seek(members[ext][0])
                            texts[ext] = fh.read(members[ext][1])
                    label = label_of(texts, where)
                    if label is None:
                        raise UserError(f"sample {where} has no label ({key}.cls or {key}.json); fine-tuning needs "
                                        "one per sample")
                    off, size = members[image]
                    self.items.append((f, off, size, f"{key}.{image}"))
                    labels.append(label)
        if not self.items:
            raise UserError(f"no samples with an image member in {name}")
        import numpy as np

        self.labels = np.asarray(labels, dtype=np.int64)
        bad = np.flatnonzero(self.labels < 0)
        if len(bad):
            raise UserError(f"{name}: {len(bad)} labels are negative (e.g. {self.describe(int(bad[0]))}); "
                            "labels are class indices 0..K-1")
        top = int(self.labels.max()) + 1
        if classes is not None and top > len(classes):
            raise UserError(f"{name} has label {top - 1}, but the training data has {len(classes)} classes")
        self.classes = list(classes) if classes is not None else [str(i) for i in range(top)]

    def __len__(self) -> int:
        return len(self.items)

    def _bytes(self, index: int) -> bytes:
        f, off, size, _ = self.items[index]
        with open(self.files[f], "rb") as fh:
            fh.seek(off)
            return fh.read(size)

    def open(self, index: int) -> tuple[RawImage, int]:
        return raw_from_bytes(self._bytes(index), self.describe(index), self.channels), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from .images import decode_pil

        raw, label = self.open(index)
        return decode_pil(raw, self.channels), label

    def describe(self, index: int) -> str:
        f, _, _, member = self.items[index]
        return f"{self.files[f]}:{member}"


def _tar_members(path: str) -> dict[str, dict[str, tuple[int, int]]]:
    """key -> {suffix: (data offset, size)} of the regular files of tar ``path``, keys in file order (the
    WebDataset split: the key is the member name up to the first dot of its base name)."""
    from webdataset.tariterators import base_plus_ext

    out: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None or key.startswith("__"):
                    continue
                out.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
    except tarfile.TarError as err:
        raise UserError(f"{path} is not a readable tar file ({err}); fix or remove it") from err
    return out


def load_table(kind: str, files: list[str], streaming: bool = False) -> Any:
    """A ``datasets`` dataset of parquet or arrow ``files``: arrow files memory-mapped (never streamed: they are
    random access already), parquet converted to the cache once or streamed (``streaming``)."""
    import datasets

    if kind == "arrow":
        if any(is_url(f) for f in files):
            raise UserError("remote .arrow files cannot be memory-mapped; use parquet, or copy them locally")
        try:
            parts = [datasets.Dataset.from_file(f) for f in files]
        except Exception as err:  # pyarrow's ArrowInvalid: not an arrow stream file
            raise UserError(f"cannot read arrow file(s) {files[0]} ...: {type(err).__name__}: {err}; .arrow files "
                            "must be datasets' arrow stream files (save_to_disk/cache files)") from err
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if any(is_url(f) for f in files):
        filesystem(files[0])  # a missing filesystem package: one line, before datasets tries
    return datasets.load_dataset("parquet", data_files={"train": files}, split="train", streaming=streaming)
