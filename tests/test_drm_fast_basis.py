"""The refined basis route (issue 22): a float32 ``eigh`` refined by one float64 step.

``solver="refined"`` must give the float64 basis (to well below float32 rounding) where it
refines, and fall back to the float64 ``eigh`` where it cannot (dense spectra at the rank cut).
Every comparison is in float64 against ``torch.linalg.eigh`` / the float64 SVD merge. The
float32 bound is the package's: float32 DRM within 1e-2 of the float64 merge
(``tests/test_precision.py``); the refined route gives the default route's float32 merge to
1e-6 here.
"""

from __future__ import annotations

import pytest
import torch

from drm_lightning.methods import DRM
from drm_lightning.methods.basis import (
    basis_from_gram,
    count_eigenvalues_above,
    eigh_refined,
    gram_of_rows,
    shared_basis,
)
from drm_lightning.methods.drm import drm_merge

F64 = torch.float64


def _spectrum_matrix(values: torch.Tensor, seed: int) -> torch.Tensor:
    """A symmetric PSD float64 matrix with the given eigenvalues and random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(values.numel(), values.numel(), generator=g, dtype=F64))[0]
    return (q * values) @ q.mT


def _exact(gram: torch.Tensor, rtol: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    keep = int((values > rtol * rtol * values[0]).sum())
    return values[:keep], vectors[:, :keep]


def _lowrank_deltas(n: int, m: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """3 branches: a rank-``rank`` update each plus Gaussian noise (relative Frobenius)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        low = torch.randn(n, rank, generator=g, dtype=F64) @ torch.randn(
            rank, m, generator=g, dtype=F64
        )
        low /= low.norm()
        gauss = torch.randn(n, m, generator=g, dtype=F64)
        out.append(low + noise * gauss / gauss.norm())
    return torch.stack(out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def test_decaying_spectrum_matches_float64_eigh() -> None:
    """Kept eigenvalues decaying from 1 to 0.02 over a discarded bulk far below the cut."""
    kept = torch.logspace(0, -1.7, 40, dtype=F64)
    bulk = torch.logspace(-6, -9, 260, dtype=F64)
    gram = _spectrum_matrix(torch.cat([kept, bulk]), seed=1)
    refined = eigh_refined(gram, 1e-2)
    assert refined is not None
    values, vectors = refined
    exact_values, exact_vectors = _exact(gram)
    assert values.numel() == exact_values.numel() == 40
    assert float(((values - exact_values) / exact_values).abs().max()) < 1e-10
    cosines = (vectors * exact_vectors).sum(0).abs()
    assert float((1 - cosines).abs().max()) < 1e-10
    orth = vectors.mT @ vectors - torch.eye(40, dtype=F64)
    assert float(orth.abs().max()) < 1e-9


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_low_rank_deltas_merge_as_float64(direction: str) -> None:
    """Low-rank updates plus small noise (the kept rank ≪ the Gram): the refined route merges
    float64 deltas like the float64 SVD merge, and float32 ones like the default route."""
    deltas = _lowrank_deltas(96, 260, rank=8, noise=1e-4, seed=2)
    ones = torch.ones(3, dtype=F64)
    exact = drm_merge(deltas, ones, direction=direction, solver="svd")
    assert _rel(drm_merge(deltas, ones, direction=direction, solver="refined"), exact) < 1e-9
    d32 = deltas.float()
    default32 = drm_merge(d32, ones.float(), direction=direction)
    refined32 = drm_merge(d32, ones.float(), direction=direction, solver="refined")
    assert _rel(refined32, default32.double()) < 1e-6
    assert _rel(refined32, exact) < 1e-2  # the package's float32 bound


def test_rank_deficient_stack() -> None:
    """Exact rank 3·5 of a 200-wide Gram (LoRA-like): the zero eigenvalues are discarded and
    the kept basis is the float64 one."""
    deltas = _lowrank_deltas(40, 200, rank=5, noise=0.0, seed=3)
    gram = sum(d.mT @ d for d in deltas)
    refined = eigh_refined(gram, 1e-2)
    assert refined is not None
    exact_values, exact_vectors = _exact(gram)
    assert refined[0].numel() == exact_values.numel() <= 15
    cosines = (refined[1] * exact_vectors).sum(0).abs()
    assert float((1 - cosines).abs().max()) < 1e-10
    ones = torch.ones(3, dtype=F64)
    exact = drm_merge(deltas, ones, solver="svd")
    assert _rel(drm_merge(deltas, ones, solver="refined"), exact) < 1e-9


def test_full_rank_dense_spectrum_falls_back_to_float64() -> None:
    """Every direction kept (a dense spectrum over the whole Gram): the refined route gives up
    and the basis is the float64 ``eigh``'s."""
    gram = _spectrum_matrix(torch.logspace(0, -1.5, 150, dtype=F64), seed=4)
    assert eigh_refined(gram, 1e-2) is None
    refined = basis_from_gram(gram.clone(), 1e-2, refine=True)
    exact = basis_from_gram(gram.clone(), 1e-2)
    assert refined.rank == exact.rank == 150
    assert torch.equal(refined.vectors, exact.vectors)
    deltas = torch.randn(3, 64, 48, dtype=F64, generator=torch.Generator().manual_seed(4))
    ones = torch.ones(3, dtype=F64)
    assert (
        _rel(drm_merge(deltas, ones, solver="refined"), drm_merge(deltas, ones, solver="svd"))
        < 1e-10
    )


def test_clustered_eigenvalues() -> None:
    """Kept eigenvalues in close pairs (relative gap 1e-6, below float32's resolution) and one
    exactly repeated pair: the clusters are re-decomposed in float64. Close pairs give the
    float64 vectors; the repeated pair (no unique vectors) gives the same span."""
    kept = torch.logspace(0, -1.5, 12, dtype=F64).repeat_interleave(2)
    kept[1::2] *= 1 - 1e-6
    kept[-1] = kept[-2]  # an exactly repeated pair
    gram = _spectrum_matrix(torch.cat([kept, torch.full((176,), 1e-9, dtype=F64)]), seed=5)
    refined = eigh_refined(gram, 1e-2)
    assert refined is not None
    values, vectors = refined
    exact_values, exact_vectors = _exact(gram)
    assert values.numel() == exact_values.numel() == 24
    assert float(((values - exact_values) / exact_values).abs().max()) < 1e-9
    cosines = (vectors[:, :22] * exact_vectors[:, :22]).sum(0).abs()
    assert float((1 - cosines).abs().max()) < 1e-6
    span = exact_vectors[:, 22:].mT @ vectors[:, 22:]  # 2×2, orthogonal when the spans agree
    assert torch.allclose(span.mT @ span, torch.eye(2, dtype=F64), atol=1e-9)


def test_refined_is_a_solver_option() -> None:
    deltas = _lowrank_deltas(20, 50, rank=2, noise=1e-5, seed=6).float()
    method = DRM(solver="refined", direction="vertical")
    assert method.row_local("matrix", (20, 50), 3)
    merged = method.merge_matrix(deltas, torch.ones(3))
    assert merged.shape == (20, 50)
    assert shared_basis(deltas, solver="refined").vectors.dtype == F64
    with pytest.raises(ValueError, match="'refined'"):
        shared_basis(deltas, solver="eigh")


def test_gram_of_rows_block_triangle_is_the_full_product() -> None:
    """The Gram is formed from its upper block triangle and mirrored: exactly symmetric and
    equal to ``Σ Δ_iᵀΔ_i``."""
    deltas = torch.randn(3, 70, 301, generator=torch.Generator().manual_seed(7))
    gram = gram_of_rows(deltas, F64)
    full = sum(d.double().mT @ d.double() for d in deltas)
    assert torch.equal(gram, gram.mT)
    assert float((gram - full).abs().max() / full.abs().max()) < 1e-14


def test_inertia_count_matches_eigenvalues() -> None:
    """The refined route's pre-check counts the eigenvalues above a shift without computing
    them (Sylvester's inertia), exactly, rank-deficient matrices included."""
    g = torch.Generator().manual_seed(8)
    for rows in (40, 140):  # rank-deficient (40 < 120) and full rank
        a = torch.randn(rows, 120, generator=g, dtype=F64)
        gram = a.mT @ a
        values = torch.linalg.eigvalsh(gram)
        # midway between eigenvalues, and just above the (rounding-level) zero ones
        shifts = [(values[i] + values[i + 1]) / 2 for i in (85, 100, 118)] + [1e-9 * values[-1]]
        for shift in shifts:
            assert count_eigenvalues_above(gram, float(shift)) == int((values > shift).sum())
