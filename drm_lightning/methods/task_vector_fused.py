"""The task-vector recipe on stored row pieces through fused CPU kernels (TIES, task arithmetic).

:func:`task_vector_merge_stored_rows` gives what
:func:`~drm_lightning.methods.task_vector.task_vector_merge_rows` and the merge loop give
together — the base plus the merged delta of every piece, rounded to the output dtype — bit
for bit, from the stored rows themselves (bfloat16 or float32 on the CPU): the magnitude cut
by the same radix selection (:func:`~drm_lightning.methods._select.radix_select`) with counts
from :func:`~drm_lightning.methods._fused.digit_counts`, the rest in one loop per entry
(:func:`~drm_lightning.methods._fused.merge_piece`). Pieces are read and merged on
``torch.get_num_threads()`` threads (:func:`~drm_lightning.methods._pieces_pool.in_order`),
each piece's reads overlapping the others' kernels. :func:`stored_rows_supported` says when
it applies; everything else takes the eager route.

Example:
    >>> import torch
    >>> base = torch.zeros(4, 1)
    >>> d = torch.tensor([[[1.0], [-4.0], [-2.0], [0.5]], [[-1.0], [-1.5], [-0.5], [3.0]]])
    >>> read = lambda a, b: (base[a:b], [d[0, a:b], d[1, a:b]])
    >>> pieces = task_vector_merge_stored_rows(read, (4, 1), torch.ones(2), piece_rows=3,
    ...     sparsify="magnitude", density=0.5, elect_signs=True, normalize=True, out_dtype=torch.float32)
    >>> torch.cat([p.merged for p in pieces]).squeeze(1)
    tensor([ 0.0000, -2.7500, -2.0000,  3.0000])
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from drm_lightning.methods._pieces_pool import in_order
from drm_lightning.methods._select import from_ordered_bits, radix_select
from drm_lightning.methods.ops import kept_count
from drm_lightning.methods.rowwise import DIGIT_BITS, StoredPiece, StoredRows, row_spans
from drm_lightning.methods.task_vector import convention_count_rule, normalizing_weight_sum
from drm_lightning.methods.task_vector_params import Convention, Sparsify

STORED_BITS = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.int32, np.uint32)}
"""Stored dtypes the kernels read and write, with the integer views of their bit patterns."""


def stored_rows_supported(
    stored: Sequence[torch.dtype], out_dtype: torch.dtype, compute_dtype: torch.dtype, *,
    sparsify: Sparsify, rescale: str, convention: Convention,
) -> bool:
    """Whether the fused route applies: numba installed and not switched off
    (``DRM_LIGHTNING_FUSED=0``), every input stored in one dtype of :data:`STORED_BITS`, output
    in one of them, float32 maths, no random drop, no rescale."""
    return (
        os.environ.get("DRM_LIGHTNING_FUSED", "1") != "0"
        and importlib.util.find_spec("numba") is not None
        and len(set(stored)) == 1
        and stored[0] in STORED_BITS
        and out_dtype in STORED_BITS
        and compute_dtype == torch.float32
        and sparsify in ("none", "magnitude")
        and rescale == "none"
        and convention in ("peft", "mergekit")
    )


WINDOW_DIGITS = 8
"""High digits around the sample's guess whose low digits the first counting pass also counts."""

SAMPLE_PIECES = 4
"""Pieces, spread over the tensor, whose high digits guess where the cut lies."""


def sample(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """:data:`SAMPLE_PIECES` pieces spread evenly over ``spans``.

    Example:
        >>> sample([(i, i + 1) for i in range(8)])
        [(1, 2), (3, 4), (5, 6), (7, 8)]
    """
    step = len(spans) / SAMPLE_PIECES
    return [spans[int(step * (i + 0.5))] for i in range(SAMPLE_PIECES)]


def likely_high_digits(hist: np.ndarray, keep: int, numel: int) -> np.ndarray:
    """Per lane, the first high digit of a :data:`WINDOW_DIGITS` window centred on the digit
    holding the ``keep``-th largest of ``numel`` entries, guessed from a sample's ``hist``.

    The first counting pass also counts the low digits of the window's high digits; when the
    exact high digit falls inside, the second pass over the tensor is not needed (outside,
    it runs as before: the guess changes how fast, never what).
    """
    lows = np.zeros(hist.shape[0], np.int64)
    for lane, counts in enumerate(hist):
        target = keep * counts.sum() / numel
        at_least = np.cumsum(counts[::-1])[::-1]  # entries with a high digit >= d
        hits = np.nonzero(at_least >= max(target, 1))[0]
        guess = int(hits.max()) if hits.size else 0
        lows[lane] = max(0, guess - WINDOW_DIGITS // 2)
    return lows


def _bits(rows: Tensor, count: int) -> np.ndarray:
    """The (count, inner) integer view of stored rows (a copy only if they are not contiguous)."""
    view, np_dtype = STORED_BITS[rows.dtype]
    return rows.detach().reshape(count, -1).contiguous().view(view).numpy().view(np_dtype)


def task_vector_merge_stored_rows(
    read: StoredRows,
    shape: Sequence[int],
    coefficients: Tensor,
    *,
    piece_rows: int,
    sparsify: Sparsify = "none",
    density: float = 1.0,
    elect_signs: bool = False,
    normalize: bool = False,
    convention: Convention = "peft",
    scaling: float = 1.0,
    out_dtype: torch.dtype,
) -> Iterator[StoredPiece]:
    """``base + task_vector_merge(...)`` of a tensor read as stored row pieces, piece by piece.

    The arguments are :func:`~drm_lightning.methods.task_vector.task_vector_merge_rows`'s
    (no ``rescale``: none is supported). Inputs must satisfy :func:`stored_rows_supported`.
    ``read`` is called from several threads at once when ``torch.get_num_threads() > 1``.
    """
    from drm_lightning.methods import _fused  # numba compiles on first use

    threads = torch.get_num_threads()
    n = int(coefficients.shape[0])
    spans = row_spans(int(shape[0]), piece_rows)
    numel = math.prod(int(s) for s in shape)
    modes = np.full(n, _fused.KEEP_ALL, np.int64)
    cuts = np.zeros(n, np.float32)
    budgets = np.zeros(n, np.int64)  # ties at the cut to keep, first ones first
    if sparsify == "magnitude" and density < 1:
        keep = kept_count(numel, density, rule=convention_count_rule(convention))
        if keep <= 0:
            modes[:] = _fused.KEEP_NONE
        elif keep < numel:
            for i, (pattern, ties) in enumerate(_magnitude_cuts(read, spans, n, keep, numel, threads)):
                modes[i] = _fused.KEEP_CUT
                cuts[i] = float(from_ordered_bits(pattern, 32, torch.float32))
                budgets[i] = ties
    weights = coefficients.detach().to(torch.float32).cpu().numpy()
    divisor = normalizing_weight_sum(torch.from_numpy(weights)) if normalize and not elect_signs else None
    weight_sum = np.float32(0.0 if divisor is None else divisor.item())  # 0: no division
    trims_at_cut = modes == _fused.KEEP_CUT
    # Ties at a cut go to the first entries: a piece keeps its ties only once it knows how many
    # the pieces before it met. Each piece counts its own (while the budget lasts) and passes
    # the running total on, before merging; merges still overlap.
    seen_before = [np.zeros(n, np.int64)] + [np.zeros(n, np.int64) for _ in spans]
    known = [threading.Event() for _ in range(len(spans) + 1)]
    known[0].set()

    def merge(index: int) -> StoredPiece:
        start, stop = spans[index]
        count = stop - start
        try:  # the next piece waits for this one's tie total: it is passed on whatever happens
            base_rows, branch_rows = read(start, stop)
            base, branches = _bits(base_rows, count), tuple(_bits(b, count) for b in branch_rows)
            known[index].wait()
            seen = seen_before[index].copy()
            seen_before[index + 1][:] = seen
            if bool((trims_at_cut & (seen < budgets)).any()):
                ties = np.zeros(n, np.int64)
                _fused.tie_counts(base, branches, modes, cuts, ties)
                seen_before[index + 1] += ties
        finally:
            known[index + 1].set()
        merged = torch.empty((count, *(int(s) for s in shape[1:])), dtype=out_dtype)
        inputs_finite, merged_finite = _fused.merge_piece(
            base, branches, weights, modes, cuts, budgets, seen, elect_signs, normalize,
            convention == "peft", weight_sum, np.float32(scaling), _bits(merged, count),
        )
        return StoredPiece(start, stop, merged, bool(inputs_finite), bool(merged_finite))

    yield from in_order(merge, range(len(spans)), threads)


def _magnitude_cuts(
    read: StoredRows, spans: Sequence[tuple[int, int]], n: int, keep: int, numel: int, threads: int
) -> list[tuple[int, int]]:
    """Per branch: the bit pattern of the ``keep``-th largest ``|branch - base|`` and how many
    entries equal to it are among the ``keep`` largest (:func:`radix_select`)."""
    from drm_lightning.methods import _fused

    no_window = np.zeros((n, 0, _fused.DIGITS), np.int64)
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def counts_over(pieces: Sequence[tuple[int, int]], shift: int, prefixes: Sequence[int],
                    lows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        slabs: list[tuple[np.ndarray, np.ndarray]] = []  # one (counts, window) per thread
        local = threading.local()
        prefix_array = np.asarray(prefixes, np.int64)

        def count_piece(span: tuple[int, int]) -> None:
            if not hasattr(local, "slab"):
                local.slab = (np.zeros((n, _fused.DIGITS), np.int64),
                              np.zeros((n, width, _fused.DIGITS), np.int64) if width else no_window)
                slabs.append(local.slab)
            start, stop = span
            base, branches = read(start, stop)
            _fused.digit_counts(_bits(base, stop - start), tuple(_bits(b, stop - start) for b in branches),
                                shift, prefix_array, local.slab[0], lows, local.slab[1])

        for _ in in_order(count_piece, pieces, threads):
            pass
        return sum(s[0] for s in slabs), sum(s[1] for s in slabs)

    def count(shift: int, prefixes: Sequence[int]) -> Tensor:
        if shift == 0 and "window" in kept:  # the second round, counted in the first pass?
            lows, window = kept.pop("window")
            offsets = [int(p) - int(lows[i]) for i, p in enumerate(prefixes)]
            if all(0 <= o < window.shape[1] for o in offsets):
                return torch.from_numpy(np.stack([window[i, o] for i, o in enumerate(offsets)]))
        lows = np.zeros(n, np.int64)
        width = 0
        if shift == 16 and len(spans) >= 2 * SAMPLE_PIECES:
            guess, _ = counts_over(sample(spans), 16, [0] * n, lows, 0)
            lows, width = likely_high_digits(guess, keep, numel), WINDOW_DIGITS
        hist, window = counts_over(spans, shift, prefixes, lows, width)
        if width:
            kept["window"] = (lows, window)
        return torch.from_numpy(hist)

    return radix_select([keep] * n, 32, count, digit_bits=DIGIT_BITS)
