"""Fused CPU kernels (numba) of the entry-wise task-vector recipe on stored row pieces.

:func:`~drm_lightning.methods.task_vector.task_vector_merge_rows` runs the recipe as about
thirty eager torch passes per entry: widen the stored rows, subtract the base, take
magnitudes, count radix digits, mask, vote, sum, divide, add the base back, round. Each pass
reads and writes the whole piece, so on a CPU the recipe costs ten times the disk's read
time. These kernels make the same float32 operations, in the same order, in one loop per
entry: :func:`bracket_counts` places every magnitude around a bracket of the cut guessed from a
sample (:func:`magnitude_sample`), :func:`digit_counts` is one radix round of
:class:`~drm_lightning.methods.rowwise.MagnitudeCut` where the guess missed, and
:func:`merge_piece` the trim, the election and the disjoint mean, the base added back and
the result rounded to the stored dtype. The results are the eager route's, bit for bit
(``tests/test_fused_entrywise.py``); the eager route stays the reference and the route of
every other device, dtype and option.

Inputs are the stored rows as unsigned integer bit patterns, 2-D ``(rows, inner)``: bfloat16
as ``uint16``, float32 as ``uint32``. Every kernel is serial and releases the GIL: the caller
runs pieces on threads of its own (no numba thread pool, which does not survive ``fork``).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.core import types
from numba.extending import intrinsic, overload

DIGITS = 1 << 16
"""Radix digits of one round (16 bits, as :data:`drm_lightning.methods.rowwise.DIGIT_BITS`)."""

KEEP_ALL, KEEP_NONE, KEEP_CUT = 0, 1, 2
"""Per-branch trim modes of :func:`merge_piece`: no trim, everything trimmed, trim at a cut."""


def _bitcast(source, target):  # type: ignore[no-untyped-def]
    """A numba function reinterpreting a ``source`` scalar's bits as ``target`` (same width)."""

    @intrinsic
    def bitcast(typingctx, value):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(args[0], context.get_value_type(target))

        return target(source), codegen

    return bitcast


_float_from_bits = _bitcast(types.uint32, types.float32)
_bits_of_float = _bitcast(types.float32, types.uint32)


def _load(a, r, j):  # type: ignore[no-untyped-def]
    """The stored entry ``a[r, j]`` as float32 (exact)."""
    raise NotImplementedError  # compiled through the overload below


@overload(_load, inline="always")
def _load_stored(a, r, j):  # type: ignore[no-untyped-def]
    if a.dtype == types.uint16:  # bfloat16: the high half of a float32
        return lambda a, r, j: _float_from_bits(np.uint32(a[r, j]) << np.uint32(16))
    return lambda a, r, j: _float_from_bits(a[r, j])


def _store(out, r, j, value):  # type: ignore[no-untyped-def]
    """``value`` rounded into ``out``'s stored dtype (round to nearest even, as torch)."""
    raise NotImplementedError


@overload(_store, inline="always")
def _store_stored(out, r, j, value):  # type: ignore[no-untyped-def]
    if out.dtype == types.uint16:

        def to_bfloat16(out, r, j, value):  # type: ignore[no-untyped-def]
            bits = _bits_of_float(value)
            bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
            out[r, j] = np.uint16((bits + bias) >> np.uint32(16))

        return to_bfloat16
    return lambda out, r, j, value: _set_bits(out, r, j, _bits_of_float(value))


@njit(inline="always")
def _set_bits(out, r, j, bits):  # type: ignore[no-untyped-def]
    out[r, j] = bits


EXPONENT = np.uint32(0x7F800000)
"""The exponent bits of a float32: all set for Inf and NaN, and only for them."""


@njit(inline="always")
def _magnitude_bits(x, base, r, j):  # type: ignore[no-untyped-def]
    """The bit pattern of ``|x[r, j] - base[r, j]|`` in float32 (ordered like the magnitudes)."""
    return _bits_of_float(_load(x, r, j) - _load(base, r, j)) & np.uint32(0x7FFFFFFF)


@njit(cache=True, nogil=True)
def magnitude_sample(base, branches, stride, out, start):  # type: ignore[no-untyped-def]
    """Bit patterns of ``|branch - base|`` at every ``stride``-th entry of the piece (row-major
    order) into ``out[lane, start:]``; returns how many each lane got."""
    rows, inner = base.shape
    taken = 0
    for lane in range(len(branches)):
        x = branches[lane]
        taken = 0
        for flat in range(0, rows * inner, stride):
            r = flat // inner
            out[lane, start + taken] = _magnitude_bits(x, base, r, flat - r * inner)
            taken += 1
    return taken


@njit(cache=True, nogil=True)
def bracket_counts(base, branches, lows, highs, counts, found, filled):  # type: ignore[no-untyped-def]
    """Where the bit patterns of ``|branch - base|`` fall around a bracket ``[lows, highs]``.

    Per lane: ``counts[lane, 0]`` gets the entries above ``highs[lane]``, ``counts[lane, 1]``
    those equal to it, ``counts[lane, 2]`` those equal to ``lows[lane]`` when it is lower;
    the patterns strictly between go to ``found[lane, filled[lane]:]`` while it has room
    (``filled`` counts them all). Counting vectorises; only the few entries strictly inside
    the bracket take a second look.
    """
    rows, inner = base.shape
    room = found.shape[1]
    patterns = np.empty(inner, np.uint32)
    for r in range(rows):
        for lane in range(len(branches)):
            x = branches[lane]
            low, high = np.uint32(lows[lane]), np.uint32(highs[lane])
            first = low + np.uint32(1)  # inside: first <= bits < high, as one unsigned compare
            span = high - first if high > low else np.uint32(0)
            above, at_high, at_low, inside = np.uint32(0), np.uint32(0), np.uint32(0), np.uint32(0)
            for j in range(inner):
                bits = _magnitude_bits(x, base, r, j)
                patterns[j] = bits
                above += np.uint32(bits > high)
                at_high += np.uint32(bits == high)
                at_low += np.uint32(bits == low)
                inside += np.uint32(bits - first < span)
            counts[lane, 0] += above
            counts[lane, 1] += at_high
            if low < high:
                counts[lane, 2] += at_low
            if inside:
                fill = filled[lane]
                for j in range(inner):
                    if patterns[j] - first < span:
                        if fill < room:
                            found[lane, fill] = patterns[j]
                        fill += 1
                filled[lane] = fill


@njit(cache=True, nogil=True)
def digit_counts(base, branches, shift, prefixes, counts):  # type: ignore[no-untyped-def]
    """Add one radix round's digit counts of ``|branch - base|`` to ``counts``
    (``(lanes, DIGITS)``): ``shift`` 16 counts the high digit of every entry, ``shift`` 0 the low
    digit of entries whose high digit is ``prefixes[lane]``."""
    rows, inner = base.shape
    for r in range(rows):
        for lane in range(len(branches)):
            x = branches[lane]
            prefix = np.uint32(prefixes[lane])
            for j in range(inner):
                bits = _magnitude_bits(x, base, r, j)
                if shift == 16:
                    counts[lane, bits >> np.uint32(16)] += 1
                elif (bits >> np.uint32(16)) == prefix:
                    counts[lane, bits & np.uint32(0xFFFF)] += 1


@njit(cache=True, nogil=True)
def tie_counts(base, branches, modes, cuts, counts):  # type: ignore[no-untyped-def]
    """``counts[i]``: entries of the piece with ``|branch_i - base|`` equal to branch ``i``'s
    cut, for the branches trimmed at a cut (0 for the others)."""
    rows, inner = base.shape
    for i in range(len(branches)):
        counts[i] = 0
        if modes[i] != KEEP_CUT:
            continue
        x = branches[i]
        cut = cuts[i]
        for r in range(rows):
            equal = np.int64(0)
            for j in range(inner):
                equal += abs(_load(x, r, j) - _load(base, r, j)) == cut
            counts[i] += equal


@njit(cache=True, nogil=True)
def merge_piece(  # type: ignore[no-untyped-def]
    base,
    branches,
    weights,
    modes,
    cuts,
    budgets,
    seen,
    elect,
    normalize,
    peft,
    weight_sum,
    scaling,
    out,
):
    """``base + merged delta`` of one piece into ``out``; returns whether every input entry is
    finite and whether every result entry is.

    Per entry, as :func:`~drm_lightning.methods.task_vector.combine_branches` after the trim:
    ``delta_i * keep_i``; with ``elect``: the sign of the unweighted (``peft``) or weighted sum,
    the agreeing weighted entries summed and divided by their count (``peft``) or weight sum;
    without it: the weighted sum, divided by ``weight_sum`` when it is not 0; times
    ``scaling``; plus the base, rounded to ``out``'s dtype. ``keep_i``: ``modes[i]``, and at a
    cut the entries above it and, of those equal to it, the first ``budgets[i] - seen[i]``
    in the piece (``seen[i]``: ties of earlier pieces, updated in place). Loops run over a row
    at a time so that they vectorise.
    """
    rows, inner = base.shape
    n = len(branches)
    zero, one = np.float32(0.0), np.float32(1.0)
    b = np.empty(inner, np.float32)
    trimmed = np.empty((n, inner), np.float32)
    total = np.empty(inner, np.float32)
    mass = np.empty(inner, np.float32)
    divisor = np.empty(inner, np.float32)
    inputs = np.uint32(0)  # the largest exponent field seen: EXPONENT once one is Inf or NaN
    results = np.uint32(0)
    for r in range(rows):
        for j in range(inner):
            b[j] = _load(base, r, j)
        for i in range(n):
            x = branches[i]
            mode = modes[i]
            cut = cuts[i]
            for j in range(inner):
                d = _load(x, r, j) - b[j]
                inputs = max(inputs, _bits_of_float(d) & EXPONENT)
                if mode == KEEP_ALL:
                    trimmed[i, j] = d * one
                elif mode == KEEP_NONE:
                    trimmed[i, j] = d * zero
                else:
                    trimmed[i, j] = d * (one if abs(d) > cut else zero)
            if mode == KEEP_CUT and seen[i] < budgets[i]:
                count = seen[i]
                for j in range(inner):
                    d = _load(x, r, j) - b[j]
                    if abs(d) == cut:
                        if count < budgets[i]:
                            trimmed[i, j] = d * one
                        count += 1
                seen[i] = count
        total[:] = zero
        if elect:
            mass[:] = zero
            for i in range(n):
                for j in range(inner):
                    mass[j] += trimmed[i, j] if peft else trimmed[i, j] * weights[i]
            divisor[:] = zero
            for i in range(n):
                w = weights[i]
                for j in range(inner):
                    weighted = trimmed[i, j] * w
                    voter = trimmed[i, j] if peft else weighted
                    elected = one if mass[j] >= zero else -one
                    agree = voter * elected > zero
                    total[j] += weighted if agree else zero
                    divisor[j] += (one if peft else w) if agree else zero
            if normalize:
                for j in range(inner):
                    if peft:
                        total[j] = total[j] / max(divisor[j], one)
                    else:
                        total[j] = total[j] / (one if divisor[j] == zero else divisor[j])
        else:
            for i in range(n):
                w = weights[i]
                for j in range(inner):
                    total[j] += trimmed[i, j] * w
            if weight_sum != zero:
                for j in range(inner):
                    total[j] = total[j] / weight_sum
        for j in range(inner):
            value = total[j] * scaling if scaling != one else total[j]
            _store(out, r, j, b[j] + value)
        for j in range(inner):
            results = max(results, _bits_of_float(_load(out, r, j)) & EXPONENT)
    return inputs != EXPONENT, results != EXPONENT
