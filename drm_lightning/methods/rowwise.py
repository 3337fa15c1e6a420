"""One tensor merged in row pieces, so that memory does not grow with the tensor.

Entry-wise methods (task arithmetic, TIES, DRM's fallback) merge every entry on its own,
given a few numbers that depend on the whole tensor: each branch's magnitude cut (TIES trim,
DRM's fallback trim) and the majority sign count (DRM's tie-break). A caller that cannot or
will not hold the whole (N, rows, ...) stack — a 128256×2048 embedding of three branches is
3 GiB in float32 — passes a reader of row pieces instead (:data:`DeltaRows`); the method
makes a few passes over the pieces for those numbers (:class:`MagnitudeCut`,
:func:`majority_over_pieces`), then merges piece by piece. The result equals the merge of
the whole tensor: the cut is exact (:mod:`drm_lightning.methods.selection`) and gives its ties
to the first entries in flattened order, as :func:`~drm_lightning.methods.ops.largest_mask`.

Example:
    >>> import torch
    >>> deltas = torch.tensor([[[3.0], [1.0], [2.0], [1.0]], [[0.5], [0.0], [-4.0], [1.0]]])
    >>> read = lambda start, stop: deltas[:, start:stop]
    >>> cut = MagnitudeCut(read, row_spans(4, 1), [2, 2], 4, torch.float32)
    >>> apply = cut.masks()
    >>> torch.cat([apply(read(a, b)) for a, b in row_spans(4, 1)], dim=1).squeeze(-1)
    tensor([[ True, False,  True, False],
            [False, False,  True,  True]])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch  # noqa: F401 - the doctests use it
from torch import Tensor

from drm_lightning.methods.ops import (
    MASK_BLOCK,
    kept_count,
    majority_count,
    mass_signs,
    safe_divide,
)
from drm_lightning.methods.selection import (  # noqa: F401 - DIGIT_BITS, MagnitudeCut, row_spans re-exported
    DIGIT_BITS,
    DeltaRows,
    MagnitudeCut,
    row_spans,
)

Item = TypeVar("Item")
Result = TypeVar("Result")


class PieceRunner(Protocol):
    """How a method's piece work is run: ``map(work, items)`` yields ``work(item)`` in the
    items' order, up to ``threads`` items at a time. Methods never start threads: the engine
    passes its runner (:class:`drm_lightning.merge.pieces_pool.ThreadedPieces`); the default
    is :data:`SERIAL`. ``work`` must be safe to call from several threads at once.
    """

    threads: int

    def map(self, work: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        """``work(item)`` of each item, in order."""
        ...


@dataclass(frozen=True)
class SerialPieces:
    """Pieces one after another in the caller's thread.

    Example:
        >>> list(SERIAL.map(lambda x: x * x, range(4)))
        [0, 1, 4, 9]
    """

    threads: int = 1

    def map(self, work: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        for item in items:
            yield work(item)


SERIAL = SerialPieces()
"""The default :class:`PieceRunner`: no threads."""

StoredRows = Callable[[int, int], tuple[Tensor, Sequence[Tensor]]]
"""``read(start, stop)``: the base's rows ``start:stop`` and each branch's, as stored (CPU)."""


@dataclass
class StoredPiece:
    """One merged piece of :meth:`~drm_lightning.methods.MergeMethod.merge_stored_rows`: rows
    ``start:stop``, ``base + merged delta`` in the output dtype, whether every input entry
    was finite (if not, ``merged`` is meaningless and the caller reports the input) and
    whether every entry of ``merged`` is."""

    start: int
    stop: int
    merged: Tensor
    inputs_finite: bool
    merged_finite: bool


def rows_per_piece(shape: Sequence[int], n_branches: int, piece_elements: int) -> int:
    """Rows of a piece whose (N, rows, ...) stack holds at most ``piece_elements`` entries
    (at least one row).

    Example:
        >>> rows_per_piece((1000, 64), 4, 4096)
        16
    """
    per_row = n_branches
    for s in shape[1:]:
        per_row *= int(s)
    return max(1, piece_elements // max(per_row, 1))


def majority_over_pieces(
    read: DeltaRows,
    spans: Sequence[tuple[int, int]],
    masks: Callable[[], Callable[[Tensor], Tensor]] | None,
) -> int:
    """:func:`~drm_lightning.methods.ops.majority_count` of the whole tensor's mass signs, one
    pass over the pieces (each trimmed by a fresh ``masks()`` when given)."""
    apply = masks() if masks is not None else None
    total = 0
    for start, stop in spans:
        deltas = read(start, stop)
        if apply is not None:
            deltas = deltas * apply(deltas)
        total += int(majority_count(mass_signs(deltas)))
    return total


def signs_need_majority(signs: Tensor, deltas: Tensor) -> bool:
    """Whether a tie-break changes this piece: an entry with an exactly zero mass sum where
    some branch is non-zero (where all are zero the merged entry is zero whatever its sign)."""
    return bool(((signs == 0) & (deltas != 0).any(dim=0)).any())


def prune_scaled_in_place(coords: Tensor, scale: Tensor, density: float) -> Tensor:
    """Zero all but the ``density`` share of largest ``|coords / scale|`` entries, in ``coords``.

    ``coords`` is (N, n, r) and ``scale`` (N, r): one divisor per (branch, column), and a zero
    divisor gives a zero score. The same entries survive as with
    :func:`~drm_lightning.methods.ops.topk_mask` of the full score tensor (same count, ties
    at the cut to the first in flattened order), but the scores are computed a block of rows
    at a time: no score, magnitude or mask tensor of the coordinates' size is held.

    Example:
        >>> c = torch.tensor([[[4.0, 1.0], [2.0, 3.0]]])
        >>> prune_scaled_in_place(c, torch.tensor([[2.0, 1.0]]), 0.5)
        tensor([[[4., 0.],
                 [0., 3.]]])
    """
    n_branches, n, r = coords.shape
    numel = coords.numel()
    keep = kept_count(numel, density)
    if keep >= numel:
        return coords
    rows = coords.view(n_branches * n, r)
    if keep <= 0:
        return coords.mul_(0)  # as a mask of zeros would: negative entries become -0.0
    step = max(1, MASK_BLOCK // max(r, 1))
    spans = [(i * n + a, i * n + b) for i in range(n_branches) for a, b in row_spans(n, step)]

    def read(start: int, stop: int) -> Tensor:
        return safe_divide(rows[start:stop], scale[start // n]).unsqueeze(0)

    apply = MagnitudeCut(read, spans, [keep], numel, coords.dtype).masks()
    for start, stop in spans:
        rows[start:stop].mul_(apply(read(start, stop))[0])
    return coords
