"""Per-branch sparsification of task vectors: magnitude trim (TIES), random drop (DARE),
magnitude band without outliers (Model Breadcrumbs) and magnitude-ranked random drop (DELLA's
MagPrune).

Each function works on ONE branch delta at a time (any shape), as PEFT and mergekit do, so a
branch's mask never depends on the other branches. The count and rescale conventions of the
two libraries are both available (see :mod:`drm_lightning.methods.task_vector`).

Example:
    >>> import torch
    >>> x = torch.tensor([0.1, -3.0, 2.0, 0.5])
    >>> kept = x * magnitude_mask(x, kept_count(x.numel(), 0.5, rule="floor"))
    >>> kept
    tensor([ 0., -3.,  2.,  0.])
    >>> rescale_masked(x, kept, how="l1", density=0.5)
    tensor([ 0.0000, -3.3600,  2.2400,  0.0000])
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from drm_lightning.methods.ops import kept_count, largest_mask  # noqa: F401 - kept_count: the doctest above

"""``floor``: ``int(density * numel)`` (PEFT, may keep nothing); ``floor_min1``: at least one
entry of a non-empty tensor is kept (mergekit)."""

RescaleRule = Literal["inverse_density", "l1", "none"]
"""``inverse_density``: divide the kept entries by the density (DARE paper, PEFT);
``l1``: scale so the kept entries have the L1 norm of the whole delta (mergekit);
``none``: keep the surviving values unchanged."""

L1_RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) mergekit leaves the masked delta unscaled."""


magnitude_mask = largest_mask
"""Mask of the ``k`` largest-magnitude entries of one tensor: the set PEFT's ``torch.topk``
selects where no entry ties with the k-th; ties at the cut go to the first in flattened order."""


def outlier_mask(x: Tensor, keep: int, top: int) -> Tensor:
    """Boolean mask of the entries ranked ``top + 1`` to ``top + keep`` by magnitude
    (Model Breadcrumbs: the ``top`` largest are outliers and dropped, and so is everything
    below the band).

    Entries are ordered by magnitude, ties in flattened order (:func:`magnitude_mask`'s
    order), so the band is the ``keep + top`` largest less the ``top`` largest.

    Example:
        >>> outlier_mask(torch.tensor([5.0, -1.0, 3.0, 0.5, -4.0]), 2, 1)
        tensor([False, False,  True, False,  True])
    """
    band = largest_mask(x, keep + top)
    return band & ~largest_mask(x, top) if top > 0 else band


def magprune_probabilities(x: Tensor, density: float, epsilon: float, dtype: torch.dtype) -> Tensor:
    """Keep-probabilities of DELLA's MagPrune for one branch delta, in ``dtype``.

    Along dim 1 (a 1-D tensor is one row), entries are ranked by magnitude (0 = smallest,
    ties in index order) and kept with probability ``density - epsilon + 2·epsilon·r/(m-1)``
    (``r`` the rank, ``m`` the entries of the row): from ``density - epsilon`` for the
    smallest to ``density + epsilon`` for the largest, ``density`` on average. A row of
    one entry keeps it with probability ``density`` (mergekit fails there: 0/0). The
    arithmetic is mergekit's, step by step, so the same draws keep the same entries.

    Example:
        >>> magprune_probabilities(torch.tensor([0.1, -3.0, 2.0]), 0.5, 0.2, torch.float64)
        tensor([[0.3000, 0.7000, 0.5000]], dtype=torch.float64)
    """
    rows = x.unsqueeze(0) if x.dim() < 2 else x
    size = rows.shape[1]
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(dtype)
    if size < 2:
        return torch.full_like(ranks, density)
    rank_norm = (ranks / (size - 1)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...],
    density: float,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
) -> Tensor:
    """Random keep-mask: each entry kept with probability ``density`` (DARE).

    Drawn with ``torch.bernoulli`` on a tensor of probabilities of ``dtype`` on the
    generator's device — the same draws as PEFT (``dtype`` = the delta's dtype) and mergekit
    on CPU (``dtype=torch.float32``) when the global RNG there is seeded like ``generator``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> bernoulli_mask((2, 3), 0.5, generator=g, dtype=torch.float32).dtype
        torch.bool
    """
    probs = torch.full(tuple(shape), density, dtype=dtype, device=generator.device)
    return torch.bernoulli(probs, generator=generator).bool()


def rescale_masked(original: Tensor, masked: Tensor, *, how: RescaleRule, density: float) -> Tensor:
    """Rescale a sparsified delta so it keeps the scale of the ``original`` one.

    ``inverse_density`` divides by ``density`` (unbiased in expectation, DARE paper and
    PEFT). ``l1`` multiplies by ``‖original‖₁ / ‖masked‖₁`` — what mergekit's ``rescale:
    true`` actually does (it is not ``1/density``: the factor depends on which entries the
    mask kept) — and leaves the delta unscaled when either norm is below 1e-7, as mergekit.

    Example:
        >>> rescale_masked(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 3.0]),
        ...                how="inverse_density", density=0.5)
        tensor([0., 6.])
    """
    if how == "none":
        return masked
    if how == "inverse_density":
        return masked / density
    if how != "l1":
        raise ValueError(f"rescale must be 'inverse_density', 'l1' or 'none', got {how!r}")
    before = original.abs().sum()
    after = masked.abs().sum()
    if bool(before < L1_RESCALE_EPS) or bool(after < L1_RESCALE_EPS):
        return masked
    return masked * (before / after)
