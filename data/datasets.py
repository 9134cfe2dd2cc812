"""The SimMIM datasets built on image sources (:mod:`data.sources`).

The SimMIM datasets add the crop/flip transform and the mask, and make every sample a pure function of
``(seed, epoch, index)``: the crop and flip come from a ``torch.Generator`` seeded for the sample (transforms that
draw from global RNGs, such as timm's, run with the global RNGs seeded and restored around them), the mask from a
numpy generator seeded the same way. Samples therefore do not depend on the number of DataLoader workers or
processes, on the order they are requested in, or on whether training was resumed mid-epoch.

The epoch travels with the index: :class:`~data.sampler.EpochSampler` yields ``(epoch, index)`` pairs, so
DataLoader workers kept alive between epochs (``persistent_workers=True``) see every epoch change without any
shared state. A plain integer index uses the epoch last given to ``set_epoch``.

Unreadable files (truncated, empty, not images, wrong channel count) never stop a run while readable images exist:

- a source with no readable image is refused when the dataset is built (:func:`probe_source`), naming the source;
- an unreadable item's slot is filled by another readable item, found by searching from a pseudo-random start
  drawn from the sample's seed (so replacements spread over the data instead of piling up after a junk folder).
  The replacement image then appears twice in that epoch, with its own crop and mask the second time (drawn from
  the unreadable item's seed). Items found unreadable are remembered per process and not read again;
- a sample's ``skipped`` is 1 when its own item was unreadable, else 0: summed over an epoch (over every process
  and worker) it counts each unreadable file exactly once.

Letters: ``C`` channels, ``H, W`` pixels, ``h, w`` token grid.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from simmim.errors import UserError

from .images import ChannelMismatchError, RawImage, decode_pil, decode_tensor
from .mask import MaskGenerator, sample_seed
from .sources import MapSource, _describe
from .transforms import TensorTransform

logger = logging.getLogger(__name__)

Transform = Callable[..., torch.Tensor]
Sample = dict[str, Any]  # image (C, H, W) float, mask (h, w) bool, index int, skipped int (0 or 1)

PROBE_ITEMS = 16  # items spread over the source that are decoded before training
PROBE_SEARCH = 256  # further items tried in order when none of those is readable


def seeded_transform(img: Any, transform: Transform, seed: int) -> torch.Tensor:
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


def split_key(key: Any, default_epoch: int) -> tuple[int, int]:
    """A dataset key -> ``(epoch, index)``: an ``(epoch, index)`` pair from :class:`EpochSampler`, or a plain
    index (with ``default_epoch``)."""
    if isinstance(key, tuple | list):
        epoch, index = key
        return int(epoch), int(index)
    return int(default_epoch), int(key)


def open_item(source: Any, index: int) -> Any:
    """Item ``index`` of ``source`` opened but not decoded when the source supports it (``source.open``), else
    ``source[index]`` (a decoded image, or an (image, label) pair for labelled sources)."""
    opener = getattr(source, "open", None)
    return opener(index) if opener is not None else source[index]


def _source_name(source: Any) -> str:
    for attr in ("root", "name"):
        if getattr(source, attr, None):
            return str(getattr(source, attr))
    return type(source).__name__


def probe_source(source: Any, channels: int = 3, items: int = PROBE_ITEMS, search: int = PROBE_SEARCH) -> int:
    """Refuse, before training, a map-style source with no readable image; returns how many probes failed.

    Decodes ``items`` items spread evenly over the source (JPEGs at 1/8 scale: cheap); when none is readable,
    tries up to ``search`` more in order. Raises ``ValueError`` naming the source and the fix when every try failed
    (with the channel-count message when the images were readable but had the wrong channel count).
    """
    n = len(source)
    if n == 0:
        raise UserError(f"{_source_name(source)} is empty; point data.path at a folder of images")
    probes = sorted({i * n // min(n, items) for i in range(min(n, items))})
    tries = probes + [i for i in range(min(n, search + len(probes))) if i not in set(probes)][:search]
    failures: list[tuple[int, BaseException]] = []
    for count, i in enumerate(tries):
        try:
            item = open_item(source, i)
            raw = item[0] if isinstance(item, tuple) else item
            decode_tensor(raw, channels, max_reduction=8.0)
        except Exception as err:  # any reader error counts as unreadable
            failures.append((i, err))
            continue
        if count >= len(probes) or failures:  # a readable one, but some probes failed
            logger.warning("%d of the %d images probed in %s are unreadable (e.g. %s: %s)", len(failures),
                           count + 1, _source_name(source), _describe(source, failures[0][0]), failures[0][1])
        return len(failures)
    err = failures[0][1]
    if all(isinstance(e, ChannelMismatchError) for _, e in failures):
        raise UserError(f"no image with model.in_chans={channels} channels in {_source_name(source)} ({err})")
    raise UserError(f"no readable image in {_source_name(source)}: all {len(failures)} tried are unreadable "
                     f"(first: {err}); point data.path at a folder of images or remove the unreadable files")


class BadItems:
    """The items this process found unreadable (each DataLoader worker keeps its own): not read twice, warned
    about once."""

    def __init__(self) -> None:
        self.known: set[int] = set()

    def add(self, source: Any, index: int, err: BaseException, where: str | None = None) -> None:
        """Remember item ``index`` as unreadable; warn the first time (``where`` names it, else the source does)."""
        if index not in self.known:
            self.known.add(index)
            logger.warning("skipping unreadable image %s (index %d): %s", where or _describe(source, index), index,
                           err)


class _SeededSamples:
    """What the SimMIM datasets hold: a source, the transform, the mask generator, the seed and the epoch."""

    def __init__(self, source: Any, transform: Transform, mask_generator: MaskGenerator, seed: int = 0,
                 channels: int | None = None) -> None:
        self.source = source
        self.transform = transform
        self.mask_generator = mask_generator
        self.seed = seed
        self.channels = channels or getattr(transform, "channels", None) or getattr(source, "channels", 3)
        self.epoch = 0
        self.bad = BadItems()

    def set_epoch(self, epoch: int) -> None:
        """The epoch of plain integer keys (``(epoch, index)`` keys carry their own)."""
        self.epoch = int(epoch)

    def image(self, raw: RawImage, seed: int) -> torch.Tensor:
        """The transformed image (C, H, W) of one raw item: our transforms draw from a generator seeded with
        ``seed``; others get a decoded PIL image under seeded global RNGs."""
        if isinstance(self.transform, TensorTransform):
            return self.transform(raw, torch.Generator().manual_seed(seed))
        img = raw if isinstance(raw, torch.Tensor) else decode_pil(raw, self.channels)
        return seeded_transform(img, self.transform, seed)

    def sample(self, raw: RawImage, key: int, epoch: int, skipped: int) -> Sample:
        seed = sample_seed(self.seed, epoch, key)
        image = self.image(raw, seed)
        return {"image": image, "mask": self.mask_generator(np.random.default_rng(seed)), "index": key,
                "skipped": skipped}


def try_item(source: Any, index: int, bad: BadItems, make: Callable[[Any], Any]) -> Any | None:
    """``make(open_item(source, index))``, or None (and ``index`` remembered in ``bad``) when the item is
    unreadable: any error while opening it, an ``OSError`` (:class:`~data.images.UnreadableImageError`) while
    decoding it inside ``make``. Other errors from ``make`` are bugs and propagate."""
    try:
        raw = open_item(source, index)
    except Exception as err:  # Pillow, numpy, datasets or a foreign source: the file is bad, not the program
        bad.add(source, index, err)
        return None
    try:
        return make(raw)
    except OSError as err:
        bad.add(source, index, err)
        return None


def fill_unreadable(source: Any, index: int, seed: int, bad: BadItems, make: Callable[[Any], Any]) -> Any:
    """``make(...)`` of the first readable item at or after a start drawn from ``seed`` (wrapping around),
    skipping ``index`` and the items ``bad`` knows. Raises ``RuntimeError`` when there is none."""
    n = len(source)
    start = seed % n
    for step in range(n):
        j = (start + step) % n
        if j == index or j in bad.known:
            continue
        out = try_item(source, j, bad, make)
        if out is not None:
            return out
    raise UserError(f"every item of {_source_name(source)} is unreadable; see the warnings above, and point "
                    "data.path at readable images")


class MaskedImageDataset(_SeededSamples, Dataset):
    """Map-style SimMIM dataset: ``ds[i]`` or ``ds[(epoch, i)]`` -> ``{image (C, H, W) float, mask (h, w) bool,
    index i, skipped 0|1}``, a pure function of ``(seed, epoch, i)`` (unreadable items: module docstring).

    ``probe`` decodes a few items now, so a source without a readable image fails here, not mid-training.
    """

    def __init__(self, source: MapSource, transform: Transform, mask_generator: MaskGenerator, seed: int = 0,
                 probe: bool = True) -> None:
        if getattr(source, "is_streaming", False):
            raise TypeError("MaskedImageDataset needs a map-style source; use MaskedImageStream for streaming")
        if len(source) == 0:
            raise ValueError("MaskedImageDataset got an empty source")
        _SeededSamples.__init__(self, source, transform, mask_generator, seed)
        if probe:
            probe_source(source, self.channels)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        epoch, index = split_key(key, self.epoch)
        n = len(self.source)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        if index not in self.bad.known:
            out = try_item(self.source, index, self.bad, lambda raw: self.sample(raw, index, epoch, 0))
            if out is not None:
                return out
        seed = sample_seed(self.seed, epoch, index)
        return fill_unreadable(self.source, index, seed, self.bad, lambda raw: self.sample(raw, index, epoch, 1))

