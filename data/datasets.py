"""The SimMIM datasets built on image sources (:mod:`data.sources`).

The SimMIM datasets add the crop/flip transform and the mask, and make every sample a pure function
of ``(seed, epoch, index)``: the transform runs on a freshly seeded, forked torch generator and the mask on its own
numpy generator. Samples therefore do not depend on the number of DataLoader workers, on the order they are
requested in, or on whether training was resumed mid-epoch.

Unreadable files (truncated, empty, not images) are skipped deterministically and counted in each sample's
``skipped`` field, so a handful of bad files in a million never stops a run but is still visible in the logs.

Note for ``set_epoch``: DataLoader workers hold a copy of the dataset. With ``persistent_workers=True`` the copy
does not see a later ``set_epoch``; create the iterator after calling it with non-persistent workers (the default).

Letters: ``H, W`` pixels, ``h, w`` token grid.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .mask import MaskGenerator, sample_seed
from .sources import MapSource, _describe

logger = logging.getLogger(__name__)

Transform = Callable[[Image.Image], torch.Tensor]
Sample = dict[str, Any]  # image (3, H, W) float, mask (h, w) bool, index int, skipped int

MAX_CONSECUTIVE_FAILURES = 50  # a run of this many unreadable images means the data is broken, not a few bad files


def _transform_and_mask(
    img: Image.Image, transform: Transform, mask_generator: MaskGenerator, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded transform and mask: image (3, H, W), mask (h, w). Global RNG states are left untouched."""
    return seeded_transform(img, transform, seed), mask_generator(np.random.default_rng(seed))


def seeded_transform(img: Image.Image, transform: Transform, seed: int) -> torch.Tensor:
    """``transform(img)`` with torch, Python and NumPy global RNGs seeded from ``seed`` and restored afterwards
    (timm's RandAugment and random erasing draw from all three)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            return transform(img)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class _FailureLog:
    """Warns once per (process, item) about an unreadable item; DataLoader workers each keep their own."""

    def __init__(self) -> None:
        self.warned: set[int] = set()

    def warn(self, source: Any, index: int, err: BaseException) -> None:
        if index in self.warned:
            return
        self.warned.add(index)
        logger.warning("skipping unreadable image %s (index %d): %s", _describe(source, index), index, err)


def load_skipping(source: Any, index: int, failures: _FailureLog) -> tuple[Any, int]:
    """``source[index]``, or when that item is unreadable the next readable one (``index+1, index+2, ...`` mod
    ``len``), with the number of failures. Raises after MAX_CONSECUTIVE_FAILURES in a row."""
    n = len(source)
    skipped = 0
    for attempt in range(min(MAX_CONSECUTIVE_FAILURES, n)):
        j = (index + attempt) % n
        try:
            return source[j], skipped
        except Exception as err:  # any reader error: the file is bad, not the program
            skipped += 1
            failures.warn(source, j, err)
    raise RuntimeError(
        f"{skipped} consecutive unreadable images starting at {_describe(source, index)} "
        f"(index {index}); the data is likely broken or the format unsupported, see the warnings above"
    )


class _SeededSamples:
    """What both SimMIM datasets hold: a source, the transform, the mask generator, the seed and the epoch."""

    def __init__(self, source: Any, transform: Transform, mask_generator: MaskGenerator, seed: int = 0) -> None:
        self.source = source
        self.transform = transform
        self.mask_generator = mask_generator
        self.seed = seed
        self.epoch = 0
        self._failures = _FailureLog()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and masks come next (samples are functions of (seed, epoch, index))."""
        self.epoch = int(epoch)


class MaskedImageDataset(_SeededSamples, Dataset):
    """Map-style SimMIM dataset: ``ds[i] -> {image (3, H, W) float, mask (h, w) bool, index i, skipped k}``.

    ``ds[i]`` is a pure function of ``(seed, epoch, i)``. When item ``i`` is unreadable, items ``i+1, i+2, ...``
    (mod ``len``) are tried in order and ``skipped`` counts the failures; the crop and mask still come from ``i``.
    """

    def __init__(self, source: MapSource, transform: Transform, mask_generator: MaskGenerator, seed: int = 0) -> None:
        if getattr(source, "is_streaming", False):
            raise TypeError("MaskedImageDataset needs a map-style source; use MaskedImageStream for streaming")
        if len(source) == 0:
            raise ValueError("MaskedImageDataset got an empty source")
        _SeededSamples.__init__(self, source, transform, mask_generator, seed)

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        return load_skipping(self.source, index, self._failures)

    def __getitem__(self, index: int) -> Sample:
        n = len(self.source)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index = int(index) % n
        img, skipped = self._load(index)
        seed = sample_seed(self.seed, self.epoch, index)
        image, mask = _transform_and_mask(img, self.transform, self.mask_generator, seed)
        return {"image": image, "mask": mask, "index": index, "skipped": skipped}


def _identity(img: Image.Image) -> Image.Image:
    return img


def _lazy_items(source: Any) -> Iterator[Callable[[], Image.Image]]:
    """Items of ``source`` as zero-argument loaders, so a worker decodes only its own share and a bad item fails
    inside its loader rather than inside the iterator."""
    if not getattr(source, "is_streaming", False) and hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return (partial(source.__getitem__, i) for i in range(len(source)))
    if hasattr(source, "iter_raw") and hasattr(source, "decode"):
        return (partial(source.decode, raw) for raw in source.iter_raw())
    return (partial(_identity, img) for img in source)


class MaskedImageStream(_SeededSamples, IterableDataset):
    """Iterable SimMIM dataset for streaming sources; yields the same dicts as :class:`MaskedImageDataset`.

    ``index`` is the item's position in the stream and seeds it with ``(seed, epoch, index)``. DataLoader worker
    ``w`` of ``k`` takes positions ``w, w+k, ...``, so the samples (not their batch order) are the same for any
    worker count. Every worker reads the whole stream but decodes only its own items. Unreadable items are dropped;
    ``skipped`` on the next sample of the same worker counts them.
    """

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        skipped = 0
        for position, load in enumerate(_lazy_items(self.source)):
            if position % num_workers != worker_id:
                continue
            try:
                img = load()
            except Exception as err:  # any reader error: the item is bad, not the program
                skipped += 1
                self._failures.warn(self.source, position, err)
                if skipped >= MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(
                        f"{skipped} consecutive unreadable images in the stream up to position {position}; "
                        f"the data is likely broken or the format unsupported, see the warnings above"
                    ) from err
                continue
            seed = sample_seed(self.seed, self.epoch, position)
            image, mask = _transform_and_mask(img, self.transform, self.mask_generator, seed)
            yield {"image": image, "mask": mask, "index": position, "skipped": skipped}
            skipped = 0
        if skipped:
            logger.warning("%d unreadable images at the end of the stream were skipped (worker %d)", skipped, worker_id)
