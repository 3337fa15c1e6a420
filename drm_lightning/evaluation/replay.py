"""Validation batches read once and replayed: one pass over a task's dataloader per merge.

A merge is scored on every task, and so is each task's own branch. Both scorings see the same
validation batches; reading them from the user's dataloader twice (dataset items, collate)
costs as much as the forwards themselves on small models. :class:`ReplayBatches` keeps the
batches of the first pass, up to a byte budget, and yields them again for the second; past the
budget it keeps nothing and the second pass reads the dataloader again.

Example:
    >>> import torch
    >>> batches = ReplayBatches([(torch.ones(2), torch.zeros(2))], max_bytes=1024)
    >>> [x.sum().item() for x, _ in batches], batches.replayable
    ([2.0], True)
    >>> [x.sum().item() for x, _ in batches]  # the kept batch, the dataloader is not read again
    [2.0]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor

REPLAY_BYTES = 256 * 2**20
"""Default budget of the batches kept for replay, per scoring of a merge (all tasks together)."""


def batch_nbytes(batch: Any) -> int:
    """Bytes of the tensors in a batch (tensors, mappings, sequences; other objects count 0).

    Example:
        >>> import torch
        >>> batch_nbytes({"x": torch.zeros(4), "y": [torch.zeros(2, dtype=torch.int64), "label"]})
        32
    """
    if isinstance(batch, Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, Mapping):
        return sum(batch_nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(batch_nbytes(v) for v in batch)
    return 0


class ReplayBudget:
    """Bytes left for replayable batches, shared by the tasks of one scoring."""

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes

    def take(self, nbytes: int) -> bool:
        """Reserve ``nbytes``; ``False`` (and nothing reserved) when they do not fit."""
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.left += nbytes


class ReplayBatches:
    """An iterable over a dataloader's batches that reads the dataloader once if the batches fit.

    The first complete iteration reads ``loader`` and keeps its batches while they fit in the
    budget; every later iteration yields the kept batches. When they do not fit (or the first
    iteration stops early), nothing is kept and each iteration reads ``loader`` again.
    ``len()`` is the dataloader's (``TypeError`` when it has none).

    Args:
        loader: The task's batches (a ``DataLoader`` or any iterable).
        max_bytes: Byte budget of the kept batches, or a :class:`ReplayBudget` shared with
            other tasks.
    """

    def __init__(self, loader: Iterable[Any], max_bytes: int | ReplayBudget = REPLAY_BYTES) -> None:
        self.loader = loader
        self.budget = max_bytes if isinstance(max_bytes, ReplayBudget) else ReplayBudget(max_bytes)
        self.kept: list[Any] | None = None
        self.overflowed = False

    @property
    def replayable(self) -> bool:
        """Whether the next iteration yields kept batches instead of reading the dataloader."""
        return self.kept is not None

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        if self.kept is not None:
            return iter(self.kept)
        if self.overflowed:
            return iter(self.loader)
        return self._read_and_keep()

    def _read_and_keep(self) -> Iterator[Any]:
        kept: list[Any] | None = []
        taken = 0
        try:
            for batch in self.loader:
                if kept is not None:
                    nbytes = batch_nbytes(batch)
                    if self.budget.take(nbytes):
                        kept.append(batch)
                        taken += nbytes
                    else:
                        kept, self.overflowed = None, True
                yield batch
            if kept is not None:
                self.kept, taken = kept, 0
        finally:
            self.budget.give_back(taken)  # nothing kept: an overflow, or an iteration stopped early
