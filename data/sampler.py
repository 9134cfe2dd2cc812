"""A shuffling sampler whose order is a pure function of (seed, epoch), so resumed runs see the same order."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .mask import sample_seed


class EpochSampler(Sampler[int]):
    """Yields a permutation of ``range(n)`` drawn from (seed, epoch); ``set_epoch`` moves to the next order.

    accelerate shards its batches across processes, so one process with batch B x P sees the same samples per
    step as P processes with batch B.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
