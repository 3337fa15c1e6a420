"""Unit similarities: streaming activation correlation, weight correlation, their α mix.

Pure tensor math (float64). Rows of every similarity are the ``N·C`` units of all models,
model ``i`` at rows ``i·C … (i+1)·C − 1`` (spec §4 of ``shared/spec/mudsc.md``).

Example:
    >>> import torch
    >>> acc = CorrelationAccumulator(3)
    >>> x = torch.randn(50, 3, dtype=torch.float64)
    >>> acc.update(x[:20]); acc.update(x[20:])
    >>> ref = torch.corrcoef(x.T)
    >>> bool(torch.allclose(acc.correlation(), ref, atol=1e-12))
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from drm_lightning.alignment.solvers import Matching
from drm_lightning.alignment.spec import PermGroup, PermSpec
from drm_lightning.alignment.transforms import map_param

STD_FLOOR = 1e-7
"""Smallest denominator of a correlation: dead (zero-variance) units get correlation 0."""


class CorrelationAccumulator:
    """Pearson correlation of ``features`` columns over samples, streamed batch by batch.

    Holds the running mean, the centred co-moment and the count in float64: memory is
    ``O(features²)`` whatever the number of batches (a constant unit stays exactly 0). Variances
    are clamped at 0 and the denominator at :data:`STD_FLOOR`, so constant features give 0, never
    NaN.
    """

    def __init__(self, features: int) -> None:
        self.features = features
        self.count = 0
        self.mean = torch.zeros(features, dtype=torch.float64)
        self.comoment = torch.zeros(features, features, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Add ``x`` of shape ``(samples, features)`` (Chan et al.'s pairwise update)."""
        x = x.detach().to("cpu", torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(dim=0)
        centred = x - mean_b
        delta = mean_b - self.mean
        total = self.count + n_b
        self.comoment += centred.T @ centred + torch.outer(delta, delta) * (
            self.count * n_b / total
        )
        self.mean += delta * (n_b / total)
        self.count = total

    def correlation(self) -> Tensor:
        """The ``(features, features)`` correlation matrix."""
        if self.count == 0:
            raise ValueError("no activation samples were collected (empty batches?)")
        cov = self.comoment / self.count
        std = cov.diagonal().clamp_min(0).sqrt()
        return cov / torch.outer(std, std).clamp_min(STD_FLOOR)


def row_correlation(x: Tensor, *, cosine: bool = False) -> Tensor:
    """Pearson (or cosine) correlation between the rows of ``x`` (rows centred by their own mean).

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 2.0, 1.0]])
        >>> row_correlation(x).round(decimals=6)
        tensor([[ 1.,  1., -1.],
                [ 1.,  1., -1.],
                [-1., -1.,  1.]], dtype=torch.float64)
    """
    x = x.to(torch.float64)
    if not cosine:
        x = x - x.mean(dim=1, keepdim=True)
    norms = x.norm(dim=1)
    return (x @ x.T) / torch.outer(norms, norms).clamp_min(STD_FLOOR)


def weight_features(
    state_dict: Mapping[str, Tensor],
    spec: PermSpec,
    group: PermGroup,
    model: int,
    matchings: Mapping[str, Matching],
    *,
    merge_eps: float = 0.0,
) -> Tensor:
    """Model ``model``'s ``(C, D)`` weight feature rows of ``group`` (spec §4.2).

    For each non-ignored member, every OTHER grouped axis whose group already has a matching
    is mapped into merged coordinates (consumer axes with the merge block, producer axes with
    the unmerge block, as the reference does); the member's own axis goes first and the rest
    is flattened; members are concatenated along the features.
    """
    index = spec.axes()
    rows = []
    for member in group.members:
        if member.ignore:
            continue
        t = state_dict[member.param]
        ax = member.axis % t.dim()
        others = {a: entries for a, entries in index[member.param].items() if a % t.dim() != ax}

        def pick(m, g, _i=model):
            match = matchings.get(g)
            if match is None:
                return None
            return match.merge(_i, merge_eps) if m.role == "in" else match.unmerge(_i)

        mapped = map_param(t.to(torch.float64), others, pick)
        k, n = member.block
        block = torch.chunk(mapped, n, dim=ax)[k]
        rows.append(torch.movedim(block, ax, 0).reshape(block.shape[ax], -1))
    if not rows:
        raise ValueError(
            f"group {group.name!r} has no member for the weight similarity (all ignored)"
        )
    return torch.cat(rows, dim=1)


def weight_similarity(
    state_dicts: Sequence[Mapping[str, Tensor]],
    spec: PermSpec,
    group: PermGroup,
    matchings: Mapping[str, Matching],
    *,
    cosine: bool = False,
    merge_eps: float = 0.0,
) -> Tensor:
    """``(N·C, N·C)`` correlation of the weight feature rows of all models (spec §4.2)."""
    feats = [
        weight_features(sd, spec, group, i, matchings, merge_eps=merge_eps)
        for i, sd in enumerate(state_dicts)
    ]
    return row_correlation(torch.cat(feats, dim=0), cosine=cosine)


def mix(weight: Tensor | None, activation: Tensor | None, fix_rate: float) -> Tensor:
    """``fix_rate · S_weight + (1 − fix_rate) · S_act``; a missing side means that side only.

    Example:
        >>> mix(torch.ones(1, 1), torch.zeros(1, 1), 0.25)
        tensor([[0.2500]])
    """
    if weight is None and activation is None:
        raise ValueError("no similarity to mix: give weight and/or activation similarities")
    if weight is None:
        return activation  # type: ignore[return-value]
    if activation is None:
        return weight
    return fix_rate * weight + (1.0 - fix_rate) * activation
