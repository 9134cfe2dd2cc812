"""DataLoaders for the datasets of this package: epoch-exact with persistent workers, pinned memory on request.

Map-style datasets get an :class:`~data.sampler.EpochSampler`, whose ``(epoch, index)`` keys carry the epoch to the
workers, so ``persistent_workers=True`` (workers kept between epochs instead of re-forked, saving their start-up
and the dataset's pickling every epoch) keeps every sample a pure function of (seed, epoch, index). Streams
(:class:`~data.stream.MaskedImageStream`) are iterated as they are: they shard themselves across processes and
workers and never end when ``endless``.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from simmim.errors import UserError
from simmim.signals import ignore_in_worker

from .sampler import EpochSampler


def make_loader(dataset: Any, batch_size: int, num_workers: int = 0, seed: int = 0, shuffle: bool = True,
                drop_last: bool = True, pin_memory: bool = False, prefetch_factor: int | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` with workers kept between epochs (when ``num_workers > 0``).

    Args:
        shuffle: a (seed, epoch)-seeded permutation per epoch (``set_epoch`` on the loader's sampler, or through
            accelerate's ``loader.set_epoch``); False: index order (evaluation).
        pin_memory: page-locked batches for faster host-to-GPU copies; pass ``device.type == "cuda"``.
        prefetch_factor: batches each worker prepares ahead (DataLoader default 2); only with workers.
    """
    if batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {batch_size} (data.batch_size)")
    if num_workers < 0:
        raise UserError(f"num_workers must be >= 0, got {num_workers} (data.num_workers)")
    sampler = None if isinstance(dataset, IterableDataset) else EpochSampler(len(dataset), seed, shuffle)
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
    if num_workers > 0:  # a stop signal is the main process's to handle (simmim.signals), not the workers'
        extra["worker_init_fn"] = ignore_in_worker
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0, **extra)
