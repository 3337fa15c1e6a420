"""benchmarks/kept_rank.py counts the rank DRM keeps, both stacking directions."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import kept_rank  # noqa: E402


def test_kept_ranks_of_known_low_rank_stacks() -> None:
    gen = torch.Generator().manual_seed(0)
    # three rank-2 deltas sharing one output direction: H (shared output basis) keeps 1 + 3
    shared = torch.randn(12, 1, generator=gen, dtype=torch.float64)
    deltas = torch.stack(
        [
            shared @ torch.randn(1, 8, generator=gen, dtype=torch.float64)
            + torch.randn(12, 1, generator=gen, dtype=torch.float64)
            @ torch.randn(1, 8, generator=gen, dtype=torch.float64)
            for _ in range(3)
        ]
    )
    row = kept_rank.kept_ranks(deltas)
    assert row["drm_h"]["gram"] == 12 and row["drm_v"]["gram"] == 8
    assert row["drm_h"]["kept@0.001"] == 4
    assert row["drm_v"]["kept@0.001"] == 6
    # a tiny direction is dropped at 1e-2 but kept at 1e-3
    deltas[0] += (
        5e-3
        * deltas[0].norm(2)
        * torch.outer(
            torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))[0][:, -1],
            torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0][:, -1],
        )
    )
    row = kept_rank.kept_ranks(deltas)
    assert row["drm_h"]["kept@0.01"] < row["drm_h"]["kept@0.001"]
