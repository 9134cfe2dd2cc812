"""A shuffling sampler whose order is a pure function of (seed, epoch), so resumed runs see the same order."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .mask import sample_seed


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for a permutation of ``range(n)`` drawn from (seed, epoch); ``set_epoch`` moves to
    the next order.

    The epoch travels with every index, so datasets that accept ``(epoch, index)`` keys (the SimMIM and labelled
    datasets) draw the right epoch's crops even in DataLoader workers kept alive between epochs
    (``persistent_workers=True``): the sampler runs in the main process, the dataset copies in the workers never
    need a ``set_epoch``. ``with_epoch=False`` yields plain indices.

    accelerate shards its batches across processes, so one process with batch B x P sees the same samples per
    step as P processes with batch B.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, with_epoch: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.with_epoch, self.epoch = n, seed, shuffle, with_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if not self.with_epoch:
            return iter(order)
        epoch = self.epoch
        return ((epoch, i) for i in order)

    def __len__(self) -> int:
        return self.n
