"""Small merge operations on branch-stacked tensors (dim 0 = branch).

Every function here is pure tensor math: no I/O, no process groups, no framework.
The methods in this package are recipes composed from these calls.

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, -4.0, -2.0], [-1.0, -1.0, -1.0]])
    >>> signs = elect_signs(x, tie_break="majority")
    >>> disjoint_mean(x, signs, torch.ones(2))
    tensor([-1.0000, -2.5000, -1.5000])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from drm_lightning.methods.selection import MagnitudeCut, add_ties, row_spans

TieBreak = Literal["majority", "positive"]


def _sum_is_finite(tensor: Tensor) -> bool:
    """True when the sum is finite, which proves every entry finite: one vectorised pass, no
    boolean temporary. Only a non-finite sum (a real NaN/Inf, or huge values overflowing)
    needs the exact check."""
    acc = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype
    return bool(torch.isfinite(tensor.sum(dtype=acc)))


def check_finite(name: str, tensor: Tensor, origin: str, hint: str = "") -> None:
    """Raise ``ValueError`` naming the tensor and its origin if it holds NaN or Inf.

    The one finiteness check of the package: the merge loop (:mod:`drm_lightning.merge`), the
    method entry points (:func:`check_merge_inputs`) and the alignment merges call it.

    Example:
        >>> check_finite("w", torch.tensor([1.0, float("nan")]), "branch 1")
        Traceback (most recent call last):
        ...
        ValueError: 'w' in branch 1 contains 1 NaN and 0 Inf value(s)
    """
    if not tensor.is_floating_point() or _sum_is_finite(tensor):
        return
    if not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise ValueError(f"{name!r} in {origin} contains {nan} NaN and {inf} Inf value(s){hint}")


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes a merge reads and computes in."""


def dtype_problem(name: str, origin: str, dtype: torch.dtype) -> str | None:
    """Why a tensor of ``dtype`` cannot be merged (``None`` if it can): integer and bool tensors
    would be truncated, other float formats are not supported.

    Example:
        >>> dtype_problem("w", "branch 0", torch.int64)
        "'w' in branch 0 has non-float dtype torch.int64; only floating tensors can be merged"
    """
    if not dtype.is_floating_point:
        return (
            f"{name!r} in {origin} has non-float dtype {dtype}; only floating tensors can be merged"
        )
    if dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        return f"{name!r} in {origin} has unsupported dtype {dtype}; supported: {supported}"
    return None


_INPUTS_CHECKED: ContextVar[bool] = ContextVar("drm_lightning_inputs_checked", default=False)


@contextmanager
def finite_inputs_checked() -> Iterator[None]:
    """Inside this block the merge entry points skip their input check: the caller made it.

    The merge loop checks every tensor as it reads it; the methods it calls (and the functions
    they call) would otherwise pass over the same stack again. Never hold it across a ``yield``.
    """
    token = _INPUTS_CHECKED.set(True)
    try:
        yield
    finally:
        _INPUTS_CHECKED.reset(token)


def inputs_checked() -> bool:
    """True inside :func:`finite_inputs_checked`."""
    return _INPUTS_CHECKED.get()


def check_merge_inputs(
    deltas: Tensor | Sequence[tuple[Tensor, Tensor] | None], coefficients: Tensor | None = None
) -> None:
    """Refuse the inputs of a merge entry point, unless the caller checked them: a dtype
    :func:`dtype_problem` names (an integer stack would be truncated), then NaN/Inf
    (:func:`check_finite`).

    ``deltas``: the (N, ...) branch stack, or LoRA factors ``(B, A)`` / ``None`` per branch.
    Errors name the branch (``'deltas' in branch 1 contains 1 NaN ...``). One pass over a
    finite stack; the per-branch search runs only to name a non-finite one.

    Example:
        >>> check_merge_inputs(torch.tensor([[1.0], [float("inf")]]))
        Traceback (most recent call last):
        ...
        ValueError: 'deltas' in branch 1 contains 0 NaN and 1 Inf value(s)
    """
    if _INPUTS_CHECKED.get():
        return
    if isinstance(deltas, Tensor):
        parts = [("deltas", deltas, "the merge call")]
    else:
        parts = [
            (f"factor {name}", part, f"branch {i}")
            for i, pair in enumerate(deltas)
            for name, part in zip(("B", "A"), pair or ())
        ]
    if isinstance(coefficients, Tensor):
        parts.insert(0, ("coefficients", coefficients, "the merge call"))
    for name, tensor, origin in parts:
        problem = dtype_problem(name, origin, tensor.dtype)
        if problem:
            raise ValueError(problem)
    for name, tensor, origin in parts:
        if name != "deltas":
            check_finite(name, tensor, origin)
        elif not _sum_is_finite(tensor):  # name the branch
            for i, delta in enumerate(tensor):
                check_finite(name, delta, f"branch {i}")


CountRule = Literal["round", "floor", "floor_min1"]
"""How many entries a top-k keeps: ``round`` — ``round(numel·density)`` (the DRM spec);
``floor`` — ``int(density·numel)`` (PEFT's and mergekit's TIES/DARE); ``floor_min1`` — the
same, at least one."""


def kept_count(numel: int, density: float, *, rule: CountRule = "round") -> int:
    """Number of entries a magnitude top-k of ``numel`` entries keeps at ``density``.

    ``floor`` uses the same float expression as PEFT and mergekit, ``int(density * numel)``,
    so it also matches them where rounding bites (``int(0.29 * 100) == 28``).

    Example:
        >>> (kept_count(10, 0.25), kept_count(10, 0.25, rule="floor"),
        ...  kept_count(10, 0.05, rule="floor_min1"))
        (2, 2, 1)
    """
    if rule == "round":
        return int(round(numel * density))
    if rule not in ("floor", "floor_min1"):
        raise ValueError(f"count rule must be 'round', 'floor' or 'floor_min1', got {rule!r}")
    if density >= 1:
        return numel
    count = int(density * numel)
    return max(1, count) if rule == "floor_min1" and numel > 0 else count


def topk_mask(scores: Tensor, density: float, *, reference_compat: bool = False) -> Tensor:
    """Boolean mask of the largest-magnitude entries of ``scores``, one joint threshold.

    Exact mode keeps exactly ``round(L * density)`` entries; ties at the cut are broken by
    flattened position (first wins), so the result is deterministic. ``reference_compat``
    reproduces the DRM reference: with ``k = L - round(L * density)`` it keeps every entry
    with ``|s| >= kthvalue(|s|, k)`` (one extra entry plus all ties), and keeps everything
    when ``k == 0`` (where the reference would crash).

    Example:
        >>> topk_mask(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5)
        tensor([False,  True,  True, False])
    """
    numel = scores.numel()
    if numel == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    keep = kept_count(numel, density)
    if reference_compat:
        drop = numel - keep
        if drop <= 0:
            return torch.ones_like(scores, dtype=torch.bool)
        flat = scores.detach().abs().reshape(-1)
        threshold = kth_smallest(flat, drop)
        return (flat >= threshold).reshape(scores.shape)
    return largest_mask(scores, keep)


def kth_smallest(magnitudes: Tensor, k: int) -> Tensor:
    """The exact ``k``-th smallest (1-based) of a 1-D tensor of magnitudes (>= 0), as a 0-d tensor.

    On CPU this is numpy's introselect (``np.partition``), 4-10x faster than
    ``torch.kthvalue`` on CPU for million-entry tensors; elsewhere ``torch.kthvalue``. Exact
    zeros, common in pruning scores, are counted and left out first: introselect slows down
    badly on masses of equal values. Half precision is selected in float32 (exact).

    Example:
        >>> kth_smallest(torch.tensor([3.0, 0.0, 1.0, 0.0, 2.0]), 4)
        tensor(2.)
    """
    if magnitudes.device.type != "cpu":
        return torch.kthvalue(magnitudes, k).values
    exact = (
        magnitudes
        if magnitudes.dtype in (torch.float32, torch.float64)
        else magnitudes.to(torch.float32)
    )
    values = exact.numpy()
    zeros = values.size - np.count_nonzero(values)
    if k <= zeros:
        return magnitudes.new_zeros(())
    if zeros:
        values, k = values[values != 0], k - zeros
    value = np.partition(values, k - 1)[k - 1]
    return torch.tensor(value, dtype=exact.dtype).to(magnitudes.dtype)


def largest_mask(scores: Tensor, keep: int) -> Tensor:
    """Mask of exactly ``keep`` largest-magnitude entries; ties at the cut go to the first.

    One linear-time selection (:func:`kth_smallest`) and a pass for ties, which are common:
    deltas of float32/bf16 checkpoints are quantised, so equal magnitudes happen.

    Example:
        >>> largest_mask(torch.tensor([2.0, -2.0, 1.0, 3.0]), 2)
        tensor([ True, False, False,  True])
    """
    numel = scores.numel()
    if keep >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.detach().reshape(-1)
    if numel <= MASK_BLOCK:
        magnitudes = flat.abs()
        threshold = kth_smallest(magnitudes, numel - keep + 1)  # the keep-th largest
        mask = magnitudes > threshold
        add_ties(mask, magnitudes, threshold, keep - int(mask.sum()))
        return mask.reshape(scores.shape)

    # Large: the same cut by radix selection over blocks (rowwise.MagnitudeCut), with no
    # full-size copy of the magnitudes (the selection above copies them twice).
    def read(start: int, stop: int) -> Tensor:
        return flat[start:stop].unsqueeze(0)

    spans = row_spans(numel, MASK_BLOCK)
    apply = MagnitudeCut(read, spans, [keep], numel, flat.dtype).masks()
    mask = torch.empty(numel, dtype=torch.bool, device=scores.device)
    for start, stop in spans:
        mask[start:stop] = apply(read(start, stop))[0]
    return mask.reshape(scores.shape)


MASK_BLOCK = 1 << 20
"""Tensors above this many entries get their top-k mask a block of entries at a time
(:func:`largest_mask`)."""


def safe_divide(values: Tensor, scale: Tensor) -> Tensor:
    """``values / scale`` with zero where the scale is zero.

    Example:
        >>> safe_divide(torch.tensor([2.0, 3.0]), torch.tensor([4.0, 0.0]))
        tensor([0.5000, 0.0000])
    """
    if bool((scale > 0).all()):  # the usual case: one division, no masked copies
        return values / scale
    safe = torch.where(scale > 0, scale, scale.new_ones(()))
    return torch.where(scale > 0, values / safe, values.new_zeros(()))


def mass_signs(x: Tensor) -> Tensor:
    """Per-entry sign of the branch sum ``sign(sum_i x_i)`` (0 where the sum is exactly 0).

    Example:
        >>> mass_signs(torch.tensor([[1.0, -4.0, 1.0], [-1.0, -1.0, 2.0]]))
        tensor([ 0., -1.,  1.])
    """
    return torch.sign(x.sum(dim=0))


def majority_count(signs: Tensor) -> Tensor:
    """``#positive - #negative`` entries of ``signs`` (an int64 0-d tensor).

    Its sign is the majority of :func:`break_ties`; a caller holding only part of a tensor
    sums the counts of all parts first (one all-reduce), then breaks the ties.
    """
    return (signs > 0).sum(dtype=torch.int64) - (signs < 0).sum(dtype=torch.int64)


def break_ties(
    signs: Tensor, *, tie_break: TieBreak = "majority", majority: int | Tensor = 0
) -> Tensor:
    """Give the entries with sign 0 the majority sign (``"majority"``) or ``+1`` (``"positive"``).

    ``majority`` is :func:`majority_count` of the whole tensor; with no majority (0) the
    tied entries keep sign 0 and are dropped by the merge.
    """
    if tie_break == "positive":
        return _fill_zero_signs(signs, 1.0)
    if tie_break != "majority":
        raise ValueError(f"tie_break must be 'majority' or 'positive', got {tie_break!r}")
    total = int(majority)
    return _fill_zero_signs(signs, float((total > 0) - (total < 0)))


def _fill_zero_signs(signs: Tensor, fill: float) -> Tensor:
    # signs are -1, 0 or 1, so 1 - |s| marks the zeros: float arithmetic, exact, and several
    # times faster on CPU than a comparison and a where (boolean kernels are not vectorised)
    return signs + fill * (1 - signs.abs())


def elect_signs(x: Tensor, *, tie_break: TieBreak = "majority") -> Tensor:
    """TIES sign election by mass: ``sign(sum_i x_i)`` per entry.

    Entries whose sum is exactly zero get the matrix's majority sign ``sign(sum(signs))``
    (``tie_break="majority"``, the DRM reference) or ``+1`` (``"positive"``, PEFT's
    convention). With ``"majority"`` and no majority, those entries get sign 0 and are dropped.
    The steps are :func:`mass_signs`, :func:`majority_count` and :func:`break_ties`.

    Example:
        >>> elect_signs(torch.tensor([[1.0, -4.0], [-1.0, -1.0]]), tie_break="positive")
        tensor([ 1., -1.])
    """
    signs = mass_signs(x)
    majority = majority_count(signs) if tie_break == "majority" else 0
    return break_ties(signs, tie_break=tie_break, majority=majority)


def trim_per_branch(
    deltas: Tensor, density: float, mask: Callable[[Tensor, float], Tensor] | None = None
) -> Tensor:
    """Keep each branch's ``density`` share of largest-magnitude entries (zero the rest).

    ``mask(row, density)`` selects within one branch's flattened row; default
    :func:`topk_mask`. A caller holding only part of each branch passes a collective one.

    Example:
        >>> trim_per_branch(torch.tensor([[1.0, -3.0], [2.0, 0.5]]), 0.5)
        tensor([[ 0., -3.],
                [ 2.,  0.]])
    """
    mask = mask or topk_mask
    flat = deltas.reshape(deltas.shape[0], -1)
    keep = torch.stack([mask(row, density) for row in flat])
    return (flat * keep).reshape(deltas.shape)


class Reductions:
    """How a merge step reduces over a tensor: here, held in full by one process.

    Steps that need a sum over every row (column norms, the majority sign count) or a
    selection over every entry (the pruning top-k) call these instead of reducing locally.
    The ZeRO-3 sharded route passes a subclass whose reductions are collectives
    (:class:`drm_lightning.distributed.comm.CollectiveReductions`), so the same code merges
    row slices held on different ranks.
    """

    def sum(self, t: Tensor) -> Tensor:
        """Sum of ``t`` over every holder of the tensor (here: ``t`` itself)."""
        return t

    def topk_mask(
        self, scores: Tensor, density: float, *, reference_compat: bool = False
    ) -> Tensor:
        """:func:`topk_mask` over the whole tensor."""
        return topk_mask(scores, density, reference_compat=reference_compat)


LOCAL = Reductions()


def broadcast_coefficients(coefficients: Tensor, like: Tensor) -> Tensor:
    """Reshape a length-N coefficient vector so it broadcasts over ``like`` (N, ...)."""
    return coefficients.to(device=like.device, dtype=like.dtype).reshape(
        (-1,) + (1,) * (like.dim() - 1)
    )


def disjoint_mean(
    x: Tensor,
    signs: Tensor | None,
    coefficients: Tensor,
    *,
    disjoint: bool = True,
    overwrite: bool = False,
) -> Tensor:
    """Scale branches by their coefficients and average the entries that agree with ``signs``.

    Entries whose sign differs from the elected one are dropped; every branch is multiplied
    by its coefficient (coefficients do not vote); each entry is divided by the number of
    non-zero contributions (``disjoint=True``) or by N. ``signs=None`` skips the election.
    ``overwrite``: ``x`` is scratch and is scaled in place (one full-size buffer fewer).

    Example:
        >>> x = torch.tensor([[2.0, 1.0], [4.0, -1.0]])
        >>> disjoint_mean(x, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]))
        tensor([3., 1.])
    """
    if overwrite and signs is not None and disjoint:
        return _disjoint_mean_in_place(x, signs, coefficients)
    factors = broadcast_coefficients(coefficients, x)
    if signs is not None:  # the coefficient where x has the elected sign, else 0
        factors = torch.sign(x).mul_(signs).clamp_(min=0).mul_(factors)
    weighted = x.mul_(factors) if overwrite else x * factors
    total = weighted.sum(dim=0)
    if not disjoint:
        return (total / x.shape[0]).add_(0.0)
    count = (
        torch.sign(weighted, out=factors if signs is not None else None)
        .abs_()
        .sum(dim=0)
        .clamp_(min=1)
    )
    return (total / count).add_(0.0)  # -0.0 + 0.0 = +0.0: entries no branch kept are +0 as before


def _disjoint_mean_in_place(x: Tensor, signs: Tensor, coefficients: Tensor) -> Tensor:
    """:func:`disjoint_mean` one branch at a time in ``x`` itself: temporaries of one branch's
    size instead of the stack's. Same bits: ``sum(dim=0)`` also adds the branches in order."""
    coefficients = coefficients.to(device=x.device, dtype=x.dtype)
    # half precision sums accumulate in float32 and round once, as sum(dim=0) does
    wide = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    total = torch.zeros_like(x[0], dtype=wide)
    count = torch.zeros_like(x[0])
    for branch, coefficient in zip(x, coefficients, strict=True):
        factor = torch.sign(branch).mul_(signs).clamp_(min=0).mul_(coefficient)
        total += branch.mul_(factor)
        count += torch.sign(branch, out=factor).abs_()
    return (total.to(x.dtype) / count.clamp_(min=1)).add_(0.0)
