"""The streaming SimMIM dataset: read once across processes and DataLoader workers, resumable by position.

A stream is read by ``R = world_size x num_workers`` readers; reader ``g = rank x num_workers + worker`` reads only
its share, so no record is read (or downloaded) twice:

- a map-style source (folder, saved dataset): reader ``g`` takes indices ``g, g + R, ...``;
- a sharded source (a streaming ``datasets`` dataset stored in ``num_shards`` files): with at least ``R`` shards,
  reader ``g`` takes whole shards ``g, g + R, ...``; with at least ``world_size`` shards each process takes whole
  shards ``rank, rank + world_size, ...`` and its workers take every ``num_workers``-th record of them; with fewer,
  every reader reads all shards and keeps every ``R``-th record (as ``datasets.distributed.split_dataset_by_node``
  does in its "examples" mode). A shard count that is a multiple of ``R`` balances the readers.

Every record has a global key that does not depend on the layout: its index for map-style sources, and
``shard * 2**40 + position in shard`` for sharded ones. A sample is a pure function of ``(seed, epoch, key)``.

Every record gives exactly one sample (an unreadable record's slot is filled by the next readable record of the same
reader, with the unreadable record's crop, mask and key, and ``skipped=1``). So after ``k`` batches of
``batch_size`` on one process, worker ``w`` has produced batches ``w, w + num_workers, ...`` (the DataLoader takes
batches from its workers in turn), which tells each reader how many of its records were used: resuming is
``set_start(k)``: each reader skips that many records without decoding them, and the workers of the new DataLoader
take over the readers' roles rotated by ``k``, so batch ``k + j`` comes from the same reader as in an uninterrupted
run. A stream resumes exactly with the same ``world_size``, ``num_workers`` and ``batch_size``.

``shuffle_buffer=N`` (sharded sources): each epoch visits the shards in an order drawn from ``(seed, epoch)``
(the same in every process, so the shares above still cover every record once), and each reader passes its records
through a buffer of ``N``: once full, every new record replaces a randomly drawn one, which is given out (the
WebDataset/tf.data shuffle buffer), drawing from a generator seeded with ``(seed, epoch, rank, reader)``. The order
is a pure function of the seed, so resuming still skips records by position (read again, not decoded).

``endless=True`` (training): each reader starts its share's next epoch when it runs out, so the DataLoader never
stops and no epoch boundary has to be agreed between processes. ``endless=False``: one pass over epoch
``self.epoch`` (``set_epoch``), for tests and evaluation.

Letters: ``R`` readers, ``P`` processes (``world_size``), ``W`` DataLoader workers per process.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from simmim.errors import UserError

from .datasets import PROBE_ITEMS, PROBE_SEARCH, BadItems, Sample, Transform, _SeededSamples, probe_source
from .images import decode_tensor
from .mask import MaskGenerator

logger = logging.getLogger(__name__)

SHARD_KEY_BITS = 40  # key = shard << 40 | position: up to 10^12 records per shard


def _is_map_style(source: Any) -> bool:
    return not getattr(source, "is_streaming", False) and hasattr(source, "__len__") and hasattr(source, "open")


def _num_shards(source: Any) -> int:
    return int(getattr(source, "num_shards", 1) or 1) if hasattr(source, "iter_raw") else 1


def reader_share(num_shards: int, rank: int, world_size: int, worker: int, num_workers: int
                 ) -> tuple[list[int], int, int]:
    """Which records of a sharded stream one reader takes: ``(shards, step, offset)`` = iterate ``shards`` in
    order, keeping records ``offset, offset + step, ...`` of that sequence (layout in the module docstring)."""
    readers, g = world_size * num_workers, rank * num_workers + worker
    if num_shards >= readers:
        return list(range(g, num_shards, readers)), 1, 0
    if num_shards >= world_size:
        return list(range(rank, num_shards, world_size)), num_workers, worker
    return list(range(num_shards)), readers, g


class MaskedImageStream(_SeededSamples, IterableDataset):
    """Iterable SimMIM dataset, sharded across ``world_size`` processes and the DataLoader workers of each (module
    docstring); yields the same dicts as :class:`~data.datasets.MaskedImageDataset` with ``index`` = the record's
    global key.

    Args:
        rank, world_size: this process and the number of processes (``accelerator.process_index`` /
            ``accelerator.num_processes``, or ``torch.distributed``'s rank and world size), passed explicitly.
        batch_size: the DataLoader's batch size; only used to turn ``set_start(batches)`` into records per reader.
        endless: start the next epoch when a reader's share runs out (training) instead of stopping.
        probe: decode the first records now, so a stream without a readable image fails before training.
        shuffle_buffer: records held by each reader's shuffle buffer (module docstring); 0 or 1: read order.
    """

    def __init__(self, source: Any, transform: Transform, mask_generator: MaskGenerator, seed: int = 0, *,
                 rank: int = 0, world_size: int = 1, batch_size: int = 1, endless: bool = False,
                 probe: bool = True, shuffle_buffer: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size {world_size})")
        if batch_size <= 0:
            raise UserError(f"batch_size must be positive, got {batch_size} (data.batch_size)")
        _SeededSamples.__init__(self, source, transform, mask_generator, seed)
        self.rank, self.world_size, self.batch_size, self.endless = rank, world_size, batch_size, endless
        self.start_batches = 0
        if shuffle_buffer < 0:
            raise UserError(f"shuffle_buffer must be >= 0, got {shuffle_buffer} (data.shuffle_buffer)")
        self.shuffle_buffer = int(shuffle_buffer)
        if probe:
            self._probe()

    def set_start(self, batches: int) -> None:
        """Resume: this process already consumed ``batches`` batches (``step x accumulation_steps``) of this
        stream; the next iteration continues after them. Call before creating the DataLoader iterator."""
        if batches < 0:
            raise ValueError(f"batches must be >= 0, got {batches}")
        self.start_batches = int(batches)

    # -- records ---------------------------------------------------------------------------------------------

    def _records(self, worker: int, num_workers: int, epoch: int | None = None) -> Iterator[tuple[int, Any]]:
        """One pass over this reader's share: ``(key, value)`` pairs; ``value`` opens with :meth:`_open`. With a
        shuffle buffer and an ``epoch``, the shards are visited in that epoch's order (module docstring)."""
        src = self.source
        if _is_map_style(src):
            readers = self.world_size * num_workers
            yield from ((i, i) for i in range(self.rank * num_workers + worker, len(src), readers))
            return
        n = _num_shards(src)
        shards, step, offset = reader_share(n, self.rank, self.world_size, worker, num_workers)
        if self.shuffle_buffer > 1 and epoch is not None and n > 1:
            order = list(range(n))
            random.Random(f"{self.seed}:{epoch}:shards").shuffle(order)  # the same in every process and reader
            shards = [order[i] for i in shards]
        position = 0  # in this reader's concatenation of its shards
        for shard in shards:
            values = src.iter_raw(shard=shard, num_shards=n) if n > 1 else _values(src)
            for i, value in enumerate(values):
                if position % step == offset:
                    yield (shard << SHARD_KEY_BITS) | i, value
                position += 1

    def describe(self, key: int) -> str:
        """A human name for the record with global ``key``."""
        if _is_map_style(self.source):
            describe = getattr(self.source, "describe", None)
            return describe(key) if describe is not None else f"item {key}"
        shard, position = key >> SHARD_KEY_BITS, key & ((1 << SHARD_KEY_BITS) - 1)
        return f"{getattr(self.source, 'name', 'stream')} shard {shard} record {position}"

    def _open(self, value: Any) -> Any:
        src = self.source
        if _is_map_style(src):
            return src.open(value)
        to_raw = getattr(src, "to_raw", None)
        return to_raw(value) if to_raw is not None else value

    def _try(self, value: Any, key: int, epoch: int, skipped: int) -> Sample | BaseException:
        """The sample of record ``value`` with ``key``'s seed, or the error that makes ``value`` unreadable."""
        try:
            raw = self._open(value)
        except Exception as err:  # any reader error: the record is bad, not the program
            return err
        try:
            return self.sample(raw, key, epoch, skipped)
        except OSError as err:  # UnreadableImageError while decoding; other errors are bugs and propagate
            return err

    def _probe(self) -> None:
        if _is_map_style(self.source):
            probe_source(self.source, self.channels)
            return
        failures = []
        for count, (key, value) in enumerate(self._records(0, 1)):
            try:
                decode_tensor(self._open(value), self.channels, max_reduction=8.0)
                return
            except Exception as err:
                failures.append((key, err))
            if count + 1 >= PROBE_ITEMS + PROBE_SEARCH:
                break
        if not failures:
            raise UserError(f"stream {getattr(self.source, 'name', '')} is empty")
        raise UserError(f"no readable image in the first {len(failures)} records of stream "
                         f"{getattr(self.source, 'name', type(self.source).__name__)} (e.g. record "
                         f"{failures[0][0]}: {failures[0][1]}); check data.path and data.image_column")

    # -- iteration -------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        num_workers, loader_worker = (1, 0) if info is None else (info.num_workers, info.id)
        # a fresh DataLoader asks worker 0 first, but batch start_batches was due from worker start % W: rotate the
        # roles so that the resumed run's batches come from the same readers as the uninterrupted run's
        worker = (loader_worker + self.start_batches) % num_workers
        skip = len(range(worker, self.start_batches, num_workers)) * self.batch_size  # records already used
        bad = BadItems()
        pending: list[tuple[int, int]] = []  # (key, epoch) of unreadable records waiting for a readable one
        epochs = itertools.count(self.epoch) if self.endless else (self.epoch,)
        for epoch in epochs:
            seen = tried = 0
            for key, value in self._shuffled(self._records(worker, num_workers, epoch), epoch, worker):
                seen += 1
                if skip:
                    skip -= 1
                    continue
                tried += 1
                sample = self._try(value, key, epoch, 0)
                if isinstance(sample, BaseException):
                    bad.add(self.source, key, sample, self.describe(key))
                    pending.append((key, epoch))
                    continue
                yield from self._fills(value, pending)
                pending.clear()
                yield sample
            if seen == 0:
                return  # an empty share (more readers than records): this worker has nothing to give
            if pending and tried == seen and len(pending) >= seen:
                raise UserError(f"every record of reader {self.rank}:{worker}'s share of the stream is "
                                "unreadable; see the warnings above")
        if pending:  # a finite pass that ended on unreadable records: fill them from the share's first readable one
            for key, value in self._records(worker, num_workers):
                if not isinstance(self._try(value, key, self.epoch, 0), BaseException):
                    yield from self._fills(value, pending)
                    return

    def _shuffled(self, records: Iterator[tuple[int, Any]], epoch: int, worker: int) -> Iterator[tuple[int, Any]]:
        """``records`` through this reader's seeded shuffle buffer (as they are without one)."""
        size = self.shuffle_buffer
        if size <= 1 or _is_map_style(self.source):
            yield from records
            return
        rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}")
        buffer: list[tuple[int, Any]] = []
        for record in records:
            if len(buffer) < size:
                buffer.append(record)
                continue
            j = rng.randrange(size)
            yield buffer[j]
            buffer[j] = record
        rng.shuffle(buffer)
        yield from buffer

    def _fills(self, value: Any, pending: list[tuple[int, int]]) -> Iterator[Sample]:
        """Samples for the unreadable ``pending`` slots, made from the readable record ``value``."""
        for key, epoch in pending:
            sample = self._try(value, key, epoch, 1)
            if isinstance(sample, BaseException):
                raise OSError(f"a record of the stream could be read once but not twice: {sample}") from sample
            yield sample


def _values(source: Any) -> Iterator[Any]:
    """The record values of an unsharded source: raw values when it has ``iter_raw``, else its items."""
    if hasattr(source, "iter_raw"):
        return source.iter_raw()
    return iter(source)
