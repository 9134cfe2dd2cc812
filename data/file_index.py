"""A packed index of the files under a folder, for image folders of any size (ImageNet-22K: 14M files).

A list of ``Path`` objects costs about 320 bytes a file, and every DataLoader worker forked from the main process
slowly copies those pages as it touches the objects' reference counts (PyTorch issue #13246): 14M files would be
4.5 GB per process. :class:`FileIndex` holds the relative paths as one ``uint8`` array of UTF-8 bytes (file-system
encoding, undecodable bytes kept) plus one ``int64`` array of offsets: two Python objects in all, whose data pages
are only read, so forked workers share them. A path is materialised when it is asked for.

The scan walks the tree in sorted order (each folder's entries sorted, sub-folders as ``name/``), which yields the
files sorted by relative path without holding all names at once: only one folder's listing lives as Python strings.
"""

from __future__ import annotations

import logging
import os
from array import array
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

RUN_MANIFEST = ".simmim-run.json"  # what makes a folder a simmim run directory (simmim.run_dir.MANIFEST_NAME)


def walk_sorted(root: str | Path, accept: Callable[[str], bool], prefix: str = "") -> Iterator[str]:
    """Relative paths (``prefix`` + posix path under ``root``) of the accepted files, in sorted order: recursive,
    symlinked folders followed once (loops and repeated links skipped), hidden entries skipped, and simmim run
    directories (a folder holding ``.simmim-run.json``) skipped with a warning: a run's reconstruction pictures
    are never training data."""
    seen: set[str] = set()

    def listing(folder: str) -> list[tuple[str, os.DirEntry]]:
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop or a second link to the same folder
            return []
        seen.add(real)
        try:
            with os.scandir(folder) as it:
                found = list(it)
        except OSError:  # an unreadable folder (permissions): skipped like an unreadable file
            return []
        if any(e.name == RUN_MANIFEST for e in found):
            logger.warning("skipping %s: it is a simmim run directory (it holds %s), not data", folder, RUN_MANIFEST)
            return []
        entries = [(e.name + "/" if _is_dir(e) else e.name, e) for e in found if not e.name.startswith(".")]
        entries.sort(key=lambda pair: pair[0])  # "name/" for folders: the order of the full relative paths
        return entries

    stack = [(iter(listing(os.fspath(root))), prefix)]  # one open listing per level of the current branch
    while stack:
        entries, rel = stack[-1]
        for key, entry in entries:
            if key.endswith("/"):  # descend now: its files sort before this folder's remaining entries
                stack.append((iter(listing(entry.path)), rel + key))
                break
            if accept(entry.name):
                yield rel + entry.name
        else:
            stack.pop()


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; uses the cached d_type for plain entries (no stat)
    except OSError:
        return False


class FileIndex:
    """Relative paths under ``root``, packed (see the module docstring). ``index[i] -> Path`` (absolute when
    ``root`` is), ``index.relative(i) -> str``, ``len``, iteration; ``nbytes`` is the memory it holds."""

    def __init__(self, root: str | Path, blob: np.ndarray, offsets: np.ndarray) -> None:
        self.root = Path(root)
        self._root = os.fspath(root)
        self._blob, self._offsets = blob, offsets  # uint8 (total bytes,), int64 (n + 1,)

    @classmethod
    def from_paths(cls, root: str | Path, relative_paths: Iterable[str]) -> FileIndex:
        """Pack relative paths (any iterable, consumed once) in the given order."""
        blob, offsets = bytearray(), array("q", [0])
        for rel in relative_paths:
            blob += os.fsencode(rel)
            offsets.append(len(blob))
        return cls(root, np.frombuffer(bytes(blob), dtype=np.uint8).copy(), np.frombuffer(offsets, dtype=np.int64)
                   .copy())

    @classmethod
    def scan(cls, root: str | Path, accept: Callable[[str], bool]) -> FileIndex:
        """Every file under ``root`` whose name ``accept`` takes, sorted by relative path (:func:`walk_sorted`)."""
        return cls.from_paths(root, walk_sorted(root, accept))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def relative(self, index: int) -> str:
        """The path of file ``index`` relative to the root, posix separators."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"file index {index} out of range for {n} files")
        index %= n
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        return os.fsdecode(self._blob[lo:hi].tobytes())

    def __getitem__(self, index: int) -> Path:
        return Path(os.path.join(self._root, self.relative(index)))

    def path(self, index: int) -> str:
        """``index[i]`` as a string (no Path object)."""
        return os.path.join(self._root, self.relative(index))

    def __iter__(self) -> Iterator[Path]:
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return int(self._blob.nbytes + self._offsets.nbytes)

    def __repr__(self) -> str:
        return f"FileIndex({self.root}, {len(self)} files, {self.nbytes / 2**20:.1f} MiB)"
