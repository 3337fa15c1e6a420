"""The task-vector recipe on stored row pieces through fused CPU kernels (TIES, task arithmetic).

:func:`task_vector_merge_stored_rows` gives what
:func:`~drm_lightning.methods.task_vector.task_vector_merge_rows` and the merge loop give
together — the base plus the merged delta of every piece, rounded to the output dtype — bit
for bit, from the stored rows themselves (bfloat16 or float32 on the CPU): the magnitude cut
by the same radix selection (:func:`~drm_lightning.methods.selection.radix_select`) with counts
from :func:`~drm_lightning.methods._fused.digit_counts`, the rest in one loop per entry
(:func:`~drm_lightning.methods._fused.merge_piece`). Pieces are read and merged on
the caller's :class:`~drm_lightning.methods.rowwise.PieceRunner` (the engine's runner),
each piece's reads overlapping the others' kernels. :func:`stored_rows_supported` says when
it applies; everything else takes the eager route.

Example:
    >>> import torch
    >>> base = torch.zeros(4, 1)
    >>> d = torch.tensor([[[1.0], [-4.0], [-2.0], [0.5]], [[-1.0], [-1.5], [-0.5], [3.0]]])
    >>> read = lambda a, b: (base[a:b], [d[0, a:b], d[1, a:b]])
    >>> pieces = task_vector_merge_stored_rows(read, (4, 1), torch.ones(2), piece_rows=3,
    ...     sparsify="magnitude", density=0.5, elect_signs=True, normalize=True,
    ...     out_dtype=torch.float32)
    >>> torch.cat([p.merged for p in pieces]).squeeze(1)
    tensor([ 0.0000, -2.7500, -2.0000,  3.0000])
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from drm_lightning.methods.ops import kept_count
from drm_lightning.methods.rowwise import (
    DIGIT_BITS,
    SERIAL,
    PieceRunner,
    StoredPiece,
    StoredRows,
    row_spans,
)
from drm_lightning.methods.selection import from_ordered_bits, radix_select
from drm_lightning.methods.task_vector_params import (
    Convention,
    Sparsify,
    convention_count_rule,
    normalizing_weight_sum,
)

STORED_BITS = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.int32, np.uint32)}
"""Stored dtypes the kernels read and write, with the integer views of their bit patterns."""


def stored_rows_supported(
    stored: Sequence[torch.dtype],
    out_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    *,
    sparsify: Sparsify,
    rescale: str,
    convention: Convention,
) -> bool:
    """Whether the fused route applies: numba installed, every input stored in one dtype of
    :data:`STORED_BITS`, output in one of them, float32 maths, no random drop, no rescale."""
    return (
        importlib.util.find_spec("numba") is not None
        and len(set(stored)) == 1
        and stored[0] in STORED_BITS
        and out_dtype in STORED_BITS
        and compute_dtype == torch.float32
        and sparsify in ("none", "magnitude")
        and rescale == "none"
        and convention in ("peft", "mergekit")
    )


SAMPLE_PIECES = 4
"""Pieces, spread over the tensor, whose magnitudes guess where the cut lies."""

SAMPLE_ENTRIES = 1 << 16
"""Magnitudes a branch's sample holds (taken at a stride from the sampled pieces)."""

BRACKET_MARGIN = 0.005
"""Half the width of the guessed bracket, as a fraction of the sample (at least six of the
sample quantile's standard errors): the entries it holds are the ones kept aside."""

FOUND_ROOM = 1 / 32
"""Entries strictly inside the bracket kept aside per branch (shared out among the runner), as
a fraction of the tensor's entries; more than that and the radix passes decide (nothing wrong,
just slower)."""


def sample(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """:data:`SAMPLE_PIECES` pieces spread evenly over ``spans``.

    Example:
        >>> sample([(i, i + 1) for i in range(8)])
        [(1, 2), (3, 4), (5, 6), (7, 8)]
    """
    step = len(spans) / SAMPLE_PIECES
    return [spans[int(step * (i + 0.5))] for i in range(SAMPLE_PIECES)]


def bracket(magnitudes: np.ndarray, keep: int, numel: int) -> tuple[int, int]:
    """Bit patterns ``(low, high)`` that likely enclose the ``keep``-th largest of ``numel``
    magnitudes, from a sample of their bit patterns (1-D ``uint32``).

    The sample's own ``keep * m / numel``-th largest, widened by :data:`BRACKET_MARGIN` of the
    sample on each side; beyond the sample's ends, ``0`` and ``+inf``. A bracket that misses
    costs time, never exactness.

    Example:
        >>> bits = np.arange(1000, dtype=np.uint32)
        >>> bracket(bits, keep=100, numel=1000)  # the 100th largest of 0..999 is 900
        (843, 957)
    """
    m = magnitudes.size
    rank = keep * m / numel  # the cut's expected rank among the sample, from the top
    margin = max(6 * math.sqrt(m * (keep / numel) * (1 - keep / numel)), BRACKET_MARGIN * m, 4)
    top, bottom = math.floor(rank - margin), math.ceil(rank + margin)  # ranks, 1 = largest
    positions = [p for p in (m - top, m - bottom) if 0 <= p < m]
    ordered = np.partition(magnitudes, positions) if positions else magnitudes
    high = int(ordered[m - top]) if top >= 1 else INF_BITS
    low = int(ordered[m - bottom]) if bottom <= m else 0
    return low, high


INF_BITS = 0x7F800000
"""The bit pattern of float32 +inf: above every finite magnitude."""


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
    runner: PieceRunner = SERIAL,
) -> Iterator[StoredPiece]:
    """``base + task_vector_merge(...)`` of a tensor read as stored row pieces, piece by piece.

    The arguments are :func:`~drm_lightning.methods.task_vector.task_vector_merge_rows`'s
    (no ``rescale``: none is supported). Inputs must satisfy :func:`stored_rows_supported`.
    ``read`` is called from several threads at once when ``runner.threads > 1``.
    """
    from drm_lightning.methods import _fused  # numba compiles on first use

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
            for i, (pattern, ties) in enumerate(
                _magnitude_cuts(read, spans, n, keep, numel, runner)
            ):
                modes[i] = _fused.KEEP_CUT
                cuts[i] = float(from_ordered_bits(pattern, 32, torch.float32))
                budgets[i] = ties
    weights = coefficients.detach().to(torch.float32).cpu().numpy()
    divisor = (
        normalizing_weight_sum(torch.from_numpy(weights)) if normalize and not elect_signs else None
    )
    weight_sum = np.float32(0.0 if divisor is None else divisor.item())  # 0: no division
    trims_at_cut = modes == _fused.KEEP_CUT
    # Ties at a cut go to the first entries: a piece keeps its ties only once it knows how many
    # the pieces before it met. Each piece counts its own (while the budget lasts) and passes
    # the running total on, before merging; merges still overlap.
    seen_before = [np.zeros(n, np.int64) for _ in range(len(spans) + 1)]  # ties before each piece
    known = [threading.Event() for _ in range(len(spans) + 1)]
    known[0].set()

    def merge(index: int) -> StoredPiece:
        start, stop = spans[index]
        count = stop - start
        try:  # the next piece waits for this one's tie total: it is passed on whatever happens
            base, branches = _read_bits(read, start, stop)
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
            base,
            branches,
            weights,
            modes,
            cuts,
            budgets,
            seen,
            elect_signs,
            normalize,
            convention == "peft",
            weight_sum,
            np.float32(scaling),
            _bits(merged, count),
        )
        return StoredPiece(start, stop, merged, bool(inputs_finite), bool(merged_finite))

    yield from runner.map(merge, range(len(spans)))


def _magnitude_cuts(
    read: StoredRows,
    spans: Sequence[tuple[int, int]],
    n: int,
    keep: int,
    numel: int,
    runner: PieceRunner,
) -> list[tuple[int, int]]:
    """Per branch: the bit pattern of the ``keep``-th largest ``|branch - base|`` and how many
    entries equal to it are among the ``keep`` largest.

    One pass places every magnitude around a bracket guessed from a sample
    (:func:`bracketed_cuts`); where the bracket misses, two radix passes
    (:func:`~drm_lightning.methods.selection.radix_select`) find it, as for tensors too
    small to sample.
    """
    if len(spans) >= 2 * SAMPLE_PIECES:
        found = bracketed_cuts(read, spans, n, keep, numel, runner)
        if found is not None:
            return found
    return _radix_cuts(read, spans, n, keep, runner)


def bracketed_cuts(
    read: StoredRows,
    spans: Sequence[tuple[int, int]],
    n: int,
    keep: int,
    numel: int,
    runner: PieceRunner,
) -> list[tuple[int, int]] | None:
    """:func:`_magnitude_cuts` from one pass over a guessed bracket, or None where it missed.

    Every entry above the bracket is counted, as are those equal to its ends; those strictly
    inside are kept aside (few: the bracket is narrow) and the cut picked among them exactly.
    With quantised deltas (bf16 weights moved by a few units in the last place) both ends
    are often one value holding the cut and its ties, and nothing is kept aside.
    """
    from drm_lightning.methods import _fused

    pieces = sample(spans)
    per_row = numel // spans[-1][1]
    entries = sum((stop - start) * per_row for start, stop in pieces)
    stride = max(1, entries // SAMPLE_ENTRIES)
    while (
        math.gcd(stride, per_row) > 1
    ):  # a stride sharing a factor with the row would see few columns
        stride += 1
    magnitudes = np.empty((n, entries // stride + len(pieces)), np.uint32)
    taken = 0
    for start, stop in pieces:
        taken += _fused.magnitude_sample(*_read_bits(read, start, stop), stride, magnitudes, taken)
    lows, highs = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for lane in range(n):
        lows[lane], highs[lane] = bracket(magnitudes[lane, :taken], keep, numel)
    room = max(SAMPLE_ENTRIES, int(numel * FOUND_ROOM / runner.threads))
    slabs = _pass_over(  # (counts, found, filled) of each thread
        read,
        spans,
        runner,
        lambda: (np.zeros((n, 3), np.int64), np.empty((n, room), np.uint32), np.zeros(n, np.int64)),
        lambda base, branches, *slab: _fused.bracket_counts(base, branches, lows, highs, *slab),
    )
    if any(int(filled.max()) > room for _, _, filled in slabs):
        return None
    counts = sum(c for c, _, _ in slabs)
    cuts = []
    for lane in range(n):
        above, at_high, at_low = (int(c) for c in counts[lane])
        inside = np.concatenate([found[lane, : filled[lane]] for _, found, filled in slabs])
        through_high = above + at_high
        through_inside = through_high + inside.size
        if above < keep <= through_high:
            cuts.append((int(highs[lane]), keep - above))
        elif through_high < keep <= through_inside:
            rank = keep - through_high  # among those inside, from the top
            pattern = int(np.partition(inside, inside.size - rank)[inside.size - rank])
            cuts.append((pattern, rank - int((inside > pattern).sum())))
        elif lows[lane] < highs[lane] and through_inside < keep <= through_inside + at_low:
            cuts.append((int(lows[lane]), keep - through_inside))
        else:
            return None
    return cuts


def _radix_cuts(
    read: StoredRows, spans: Sequence[tuple[int, int]], n: int, keep: int, runner: PieceRunner
) -> list[tuple[int, int]]:
    """:func:`_magnitude_cuts` by :func:`radix_select`: two passes of digit counts."""
    from drm_lightning.methods import _fused

    def count(shift: int, prefixes: Sequence[int]) -> Tensor:
        prefix_array = np.asarray(prefixes, np.int64)
        slabs = _pass_over(
            read,
            spans,
            runner,
            lambda: (np.zeros((n, _fused.DIGITS), np.int64),),
            lambda base, branches, counts: _fused.digit_counts(
                base, branches, shift, prefix_array, counts
            ),
        )
        return torch.from_numpy(sum(counts for (counts,) in slabs))

    return radix_select([keep] * n, 32, count, digit_bits=DIGIT_BITS)


def _read_bits(
    read: StoredRows, start: int, stop: int
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Rows ``start:stop`` of the base and the branches as the kernels' bit-pattern views."""
    base, branches = read(start, stop)
    return _bits(base, stop - start), tuple(_bits(b, stop - start) for b in branches)


def _pass_over(
    read: StoredRows,
    spans: Sequence[tuple[int, int]],
    runner: PieceRunner,
    new_slab: Callable[[], tuple[np.ndarray, ...]],
    kernel: Callable[..., object],
) -> list[tuple[np.ndarray, ...]]:
    """One pass over the pieces on ``runner``'s threads: ``kernel(base, branches, *slab)`` with
    each thread's own accumulators (``new_slab()``); returns every thread's slab."""
    slabs: list[tuple[np.ndarray, ...]] = []
    local = threading.local()

    def work(span: tuple[int, int]) -> None:
        if not hasattr(local, "slab"):
            local.slab = new_slab()
            slabs.append(local.slab)
        kernel(*_read_bits(read, *span), *local.slab)

    for _ in runner.map(work, spans):
        pass
    return slabs
