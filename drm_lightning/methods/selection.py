"""Exact order statistics of magnitudes seen in parts: row pieces of a tensor, or ranks.

A magnitude top-k over a whole tensor needs one number first, the k-th largest magnitude;
when no process holds the whole tensor at once (it is merged in row pieces, or its rows
sit on different ranks) that number is found by radix selection on the IEEE-754 bit
patterns, which order non-negative floats like integers: each round counts the entries per
digit (``digit_bits`` bits, from the top), and the digit holding the k-th largest becomes
part of the answer. The caller says how to count (:data:`DigitCounter`): over pieces read
one after another, or over local entries followed by an all-reduce. The answer is exact,
in ``width / digit_bits`` rounds, with memory that does not depend on the tensor's size.

Ties at the cut go to the first entries in flattened order (:func:`keep_largest`), like
:func:`drm_lightning.methods.ops.largest_mask` on the whole tensor.

Example:
    >>> import torch
    >>> values = torch.tensor([0.5, 3.0, 1.0, 3.0, 2.0])
    >>> bits, width = ordered_bits(values)
    >>> (cut, ties), = radix_select([2], width, lambda shift, prefixes: count_digits(
    ...     bits, shift, prefixes[0], width).unsqueeze(0))
    >>> from_ordered_bits(cut, width, values.dtype), ties
    (tensor(3.), 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

DigitCounter = Callable[[int, Sequence[int]], Tensor]
"""``count(shift, prefixes)``: an ``(L, 2**digit_bits)`` int64 tensor whose row ``l`` counts,
among the entries of lane ``l`` whose bits above ``shift + digit_bits`` equal
``prefixes[l]``, how many have each digit ``(bits >> shift) & (2**digit_bits - 1)``."""


def ordered_bits(values: Tensor) -> tuple[Tensor, int]:
    """Non-negative floats as integer bit patterns with the same order, and the pattern width.

    float64 gives int64 patterns; float32 int32 ones (non-negative: the sign bit is 0);
    half precision is widened to float32 first (exactly). No copy for float32/float64.

    Example:
        >>> ordered_bits(torch.tensor([0.0, 1.0]))
        (tensor([         0, 1065353216], dtype=torch.int32), 32)
    """
    flat = values.detach().reshape(-1).contiguous()
    if flat.dtype == torch.float64:
        return flat.view(torch.int64), 64
    if flat.dtype != torch.float32:
        flat = flat.to(torch.float32)
    return flat.view(torch.int32), 32


def from_ordered_bits(pattern: int, width: int, dtype: torch.dtype) -> Tensor:
    """The 0-d tensor of ``dtype`` whose :func:`ordered_bits` pattern is ``pattern``.

    Example:
        >>> from_ordered_bits(1065353216, 32, torch.bfloat16)
        tensor(1., dtype=torch.bfloat16)
    """
    if width == 64:
        value = torch.tensor([pattern], dtype=torch.int64).view(torch.float64)[0]
    else:
        value = torch.tensor([pattern], dtype=torch.int32).view(torch.float32)[0]
    return value.to(dtype)


def count_digits(bits: Tensor, shift: int, prefix: int, width: int, digit_bits: int = 16) -> Tensor:
    """Counts of the digit at ``shift`` among ``bits`` whose higher bits equal ``prefix``.

    Example:
        >>> count_digits(torch.tensor([1, 2, 2, 7]), 0, 0, 16, digit_bits=16)[:4].tolist()
        [0, 1, 2, 0]
    """
    if shift + digit_bits < width:
        bits = bits[(bits >> (shift + digit_bits)) == prefix]
    return torch.bincount((bits >> shift) & ((1 << digit_bits) - 1), minlength=1 << digit_bits)


def radix_select(
    ks: Sequence[int], width: int, count: DigitCounter, *, digit_bits: int = 16
) -> list[tuple[int, int]]:
    """For each lane ``l``: the bit pattern of its ``ks[l]``-th largest entry (1-based) and
    how many entries equal to it are among its ``ks[l]`` largest.

    ``count`` is called ``width / digit_bits`` times, once per digit from the top, for all
    lanes at once (one pass over the data per round). Every ``ks[l]`` must lie in
    ``1..numel`` of its lane.
    """
    if width % digit_bits:
        raise ValueError(f"digit_bits={digit_bits} must divide the pattern width {width}")
    lanes = len(ks)
    prefixes = [0] * lanes
    remaining = [int(k) for k in ks]
    for shift in range(width - digit_bits, -1, -digit_bits):
        hist = count(shift, list(prefixes)).to(torch.int64).reshape(lanes, -1)
        at_least = torch.flip(torch.cumsum(torch.flip(hist, [1]), 1), [1])  # count(digit >= d)
        for lane in range(lanes):
            # The largest digit d with count(digit >= d) >= remaining holds the k-th largest.
            hits = torch.nonzero(at_least[lane] >= remaining[lane])
            if hits.numel() == 0:
                raise ValueError(f"lane {lane}: k={ks[lane]} exceeds the number of entries")
            digit = int(hits.max())
            if digit + 1 < at_least.shape[1]:
                remaining[lane] -= int(at_least[lane, digit + 1])
            prefixes[lane] = (prefixes[lane] << digit_bits) | digit
    return list(zip(prefixes, remaining, strict=True))


def keep_largest(magnitudes: Tensor, threshold: Tensor, ties: int) -> tuple[Tensor, int]:
    """Mask of the entries above ``threshold`` and of the first ``ties`` equal to it.

    "First" is flattened order; returns the mask and how many ties are still to be kept, for
    the next piece of the same tensor when it is processed in pieces.

    Example:
        >>> keep_largest(torch.tensor([2.0, 1.0, 2.0, 3.0]), torch.tensor(2.0), 1)
        (tensor([ True, False, False,  True]), 0)
    """
    mask = magnitudes > threshold
    return mask, add_ties(mask, magnitudes, threshold, ties)


def add_ties(mask: Tensor, magnitudes: Tensor, threshold: Tensor, ties: int) -> int:
    """Set ``mask`` (contiguous, in place) on the first ``ties`` entries equal to
    ``threshold``, in flattened order; returns how many ties are still to be kept."""
    if ties <= 0:
        return ties
    at_threshold = torch.nonzero(magnitudes.reshape(-1) == threshold).squeeze(1)[:ties]
    mask.view(-1)[at_threshold] = True
    return ties - int(at_threshold.numel())


DeltaRows = Callable[[int, int], Tensor]
"""``read(start, stop)``: the (N, stop - start, ...) branch deltas of rows ``start:stop`` of
one tensor, in the compute dtype. Called several times per piece (once per pass)."""


DIGIT_BITS = 16
"""Radix digits of the cut: 2 passes over the pieces in float32, 4 in float64."""


def row_spans(rows: int, step: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive pieces of ``step`` rows (the last may be shorter).

    Example:
        >>> row_spans(5, 2)
        [(0, 2), (2, 4), (4, 5)]
    """
    if step < 1:
        raise ValueError(f"a piece needs at least one row, got step={step}")
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class MagnitudeCut:
    """Each branch's ``keeps[i]`` largest-magnitude entries over the whole tensor.

    Built from :data:`DeltaRows` with ``width / 16`` passes over ``spans`` (none for a branch
    that keeps everything or nothing); :meth:`masks` then gives the keep-masks piece by piece.

    Args:
        read: the row reader.
        spans: the pieces, in row order, covering the tensor.
        keeps: entries to keep per branch.
        numel: entries of one branch's tensor.
        dtype: the compute dtype of the deltas.
    """

    def __init__(
        self,
        read: DeltaRows,
        spans: Sequence[tuple[int, int]],
        keeps: Sequence[int],
        numel: int,
        dtype: torch.dtype,
    ) -> None:
        self.keeps = [int(k) for k in keeps]
        self.numel = int(numel)
        self.cuts: list[tuple[Tensor, int] | None] = [None] * len(self.keeps)
        lanes = [i for i, k in enumerate(self.keeps) if 0 < k < self.numel]
        if not lanes:
            return
        width = 64 if dtype == torch.float64 else 32

        def count(shift: int, prefixes: Sequence[int]) -> Tensor:
            hist = torch.zeros(len(lanes), 1 << DIGIT_BITS, dtype=torch.int64)
            for start, stop in spans:
                deltas = read(start, stop)
                for row, lane in enumerate(lanes):
                    bits, _ = ordered_bits(deltas[lane].abs())
                    hist[row] += count_digits(bits, shift, prefixes[row], width, DIGIT_BITS).cpu()
            return hist

        selected = radix_select([self.keeps[i] for i in lanes], width, count, digit_bits=DIGIT_BITS)
        for lane, (pattern, ties) in zip(lanes, selected, strict=True):
            self.cuts[lane] = (from_ordered_bits(pattern, width, dtype), ties)

    def masks(self) -> Callable[[Tensor], Tensor]:
        """A function of the (N, rows, ...) deltas of consecutive pieces, from the first, giving
        their keep-masks (ties at the cut: first in flattened order). One per pass."""
        ties_left = [0 if cut is None else cut[1] for cut in self.cuts]

        def apply(deltas: Tensor) -> Tensor:
            out = torch.empty_like(deltas, dtype=torch.bool)
            for i, cut in enumerate(self.cuts):
                if cut is None:
                    out[i] = self.keeps[i] >= self.numel
                    continue
                mask, ties_left[i] = keep_largest(
                    deltas[i].abs(), cut[0].to(deltas.device), ties_left[i]
                )
                out[i] = mask
            return out

        return apply
