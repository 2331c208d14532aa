"""Index samplers for tasks that train from features in memory (the CoOp head)."""
from __future__ import annotations

import torch


class EpochSampler:
    """Batches of row indices from a seeded permutation per epoch; the position (rows consumed)
    is the whole resume state."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.position = 0

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def next(self) -> torch.Tensor:
        epoch, offset = divmod(self.position, self.n)
        idx = self._perm(epoch)[offset:offset + self.batch_size]
        if len(idx) < self.batch_size:  # wrap into the next epoch's order
            idx = torch.cat([idx, self._perm(epoch + 1)[:self.batch_size - len(idx)]])
        self.position += self.batch_size
        return idx
