"""Merges in the singular space of each task matrix: TSV-M and Iso-C / Iso-CTS.

All three take the per-branch task vectors ``τ_i = w_i Δ_i`` (the coefficient scales each
branch's delta, as task arithmetic does) of one weight matrix, decompose them, and rebuild one
matrix with decorrelated or flattened singular structure. Specs, defaults and edge cases:
``docs/methods/tsv_m.md`` and ``docs/methods/iso.md``.

* **TSV-M** (Gargiulo et al., CVPR 2025, arXiv:2412.00081): each task keeps its top
  ``⌊r/T⌋`` singular triplets (``r = min(n, m)``); the kept ``U_i`` and ``V_i`` are
  concatenated and each replaced by its polar factor (``P Qᵀ`` of ``svd(U_cat) = P S Qᵀ``,
  the nearest matrix with orthonormal columns), and ``U⊥ diag(σ_cat) V⊥ᵀ`` is the merge.
* **Iso-C** (Marczak et al., ICML 2025, arXiv:2502.04959): the SVD of the sum ``Σ τ_i`` with
  every singular value replaced by their mean.
* **Iso-CTS**: the top ``k`` directions of the sum (the common subspace) plus, per task, the
  top directions of its residual outside it, orthogonalised like TSV-M, every singular
  value replaced by their mean. Iso-C is Iso-CTS with ``common_space_fraction = 1``.

Non-matrix tensors (and matrices too small to give every task one direction) take the
references' task arithmetic: the mean ``(1/T) Σ τ_i``. Everything is scaled by ``scaling``
(the papers' α) at the end.

Singular triplets with ``σ ≤ max(n, m)·eps·max_i ‖τ_i‖_F`` are rounding noise of a
rank-deficient matrix and are dropped (the references keep them: arbitrary directions that
Iso's flattening then weights like real ones); so are the null directions of the stacked
singular vectors before the polar factor. On full-rank inputs this changes nothing.

The SVDs run in float64 by default whatever the deltas' dtype (``basis_precision``, as DRM);
LoRA branches take an exact factored route (QR of the factors) that never forms a dense
branch delta.

Example:
    >>> import torch
    >>> d = torch.randn(3, 8, 6, dtype=torch.float64)
    >>> TSVMerge().merge_matrix(d, torch.ones(3, dtype=d.dtype)).shape
    torch.Size([8, 6])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from drm_lightning.methods.base import LowRankFactors, MergeMethod, MethodParams, Route
from drm_lightning.methods.basis import BasisPrecision, basis_dtype
from drm_lightning.methods.rowwise import DeltaRows
from drm_lightning.methods.task_vector import task_vector_merge, task_vector_merge_rows

Term = Tensor | LowRankFactors
"""One task matrix: dense (n, m), or factors ``(B, A)`` of ``B @ A``."""
TermOf = Callable[[int], Term]
"""Task index → its scaled task matrix in the working dtype (made on demand: one at a time)."""


@dataclass(frozen=True)
class Triplets:
    """Truncated SVD ``u @ diag(s) @ vh``: u (n, k), s (k,) descending, vh (k, m)."""

    u: Tensor
    s: Tensor
    vh: Tensor

    def top(self, k: int) -> Triplets:
        """The first ``k`` triplets, copied when fewer: no view keeps a full SVD alive."""
        if k >= self.s.numel():
            return self
        return Triplets(self.u[:, :k].clone(), self.s[:k].clone(), self.vh[:k].clone())


def thin_svd(term: Term, tol: float) -> Triplets:
    """The singular triplets of ``term`` with ``σ > tol``.

    Factors ``(B, A)`` go through thin QRs ``B = Q_b R_b``, ``Aᵀ = Q_a R_a`` and the SVD of
    the small ``R_b R_aᵀ``: exact, without the n×m product.

    Example:
        >>> b, a = torch.randn(6, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
        >>> t = thin_svd((b, a), 1e-12)
        >>> t.s.numel(), torch.allclose((t.u * t.s) @ t.vh, b @ a)
        (2, True)
    """
    if isinstance(term, Tensor):
        u, s, vh = torch.linalg.svd(term, full_matrices=False)
    elif term[1].shape[0] == 0:  # a rank-0 pair: a zero matrix
        b, a = term
        return Triplets(b.new_zeros(b.shape[0], 0), b.new_zeros(0), a.new_zeros(0, a.shape[1]))
    else:
        qb, rb = torch.linalg.qr(term[0])
        qa, ra = torch.linalg.qr(term[1].mT)
        x, s, yh = torch.linalg.svd(rb @ ra.mT, full_matrices=False)
        u, vh = qb @ x, yh @ qa.mT
    return Triplets(u, s, vh).top(int((s > tol).sum()))


def polar_factor(matrix: Tensor) -> Tensor:
    """``P Qᵀ`` of ``matrix = P S Qᵀ``: the nearest matrix with orthonormal columns (rows, if
    wide), over the directions with ``S`` above rounding (the rest are dropped, not completed
    by arbitrary vectors).

    Example:
        >>> q = polar_factor(torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.0, 0.0]]))
        >>> q
        tensor([[1., 0.],
                [0., 1.],
                [0., 0.]])
    """
    p, s, qh = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or not bool(s[0] > 0):
        return torch.zeros_like(matrix)
    keep = int((s > max(matrix.shape) * torch.finfo(s.dtype).eps * s[0]).sum())
    return p[:, :keep] @ qh[:keep]


def frobenius(term: Term) -> float:
    """``‖term‖_F`` (for factors: ``sqrt(Σ (BᵀB) ∘ (AAᵀ))``, no n×m product)."""
    if isinstance(term, Tensor):
        return float(torch.linalg.vector_norm(term))
    b, a = term
    return math.sqrt(max(float(((b.mT @ b) * (a @ a.mT)).sum()), 0.0))


def rank_tolerance(shape: tuple[int, int], dtype: torch.dtype, scale: float) -> float:
    """Singular values at or below this are rounding noise: ``max(n, m)·eps·scale``."""
    return max(shape) * torch.finfo(dtype).eps * scale


def term_sum(terms: Sequence[Term]) -> Term:
    """``Σ terms`` (factors stay factored: ``[B_1 … B_T] [A_1; …; A_T]``)."""
    if isinstance(terms[0], Tensor):
        total = terms[0].clone()
        for t in terms[1:]:
            total += t
        return total
    return (torch.cat([t[0] for t in terms], dim=1), torch.cat([t[1] for t in terms], dim=0))


def project_out(term: Term, u: Tensor) -> Term:
    """``(I - u uᵀ) term`` for orthonormal columns ``u``."""
    if isinstance(term, Tensor):
        return term - u @ (u.mT @ term)
    b, a = term
    return (b - u @ (u.mT @ b), a)


def recombine(blocks: Sequence[Triplets], *, isotropic: bool) -> Tensor:
    """``polar(U_cat) diag(σ) polar(Vh_cat)`` of the concatenated blocks; with ``isotropic``
    every ``σ`` is replaced by their mean. One block is already orthonormal: no polar factor."""
    u = torch.cat([b.u for b in blocks], dim=1)
    s = torch.cat([b.s for b in blocks])
    vh = torch.cat([b.vh for b in blocks], dim=0)
    if s.numel() == 0:
        return u.new_zeros(u.shape[0], vh.shape[1])
    if len(blocks) > 1:
        u, vh = polar_factor(u), polar_factor(vh)
    if isotropic:
        return (u @ vh) * s.mean()
    return (u * s) @ vh


def tsv_m_matrix(term: TermOf, n_terms: int, shape: tuple[int, int], tol: float) -> Tensor | None:
    """TSV-M of ``n_terms`` task matrices, or ``None`` when ``min(n, m) < n_terms`` (no task
    would keep a direction: the caller takes the mean instead)."""
    keep = min(shape) // n_terms
    if keep == 0:
        return None
    return recombine([thin_svd(term(i), tol).top(keep) for i in range(n_terms)], isotropic=False)


def iso_sizes(rank: int, n_terms: int, fraction: float) -> tuple[int, int]:
    """``(common, per_task)`` directions of Iso-CTS for a matrix of ``min(n, m) = rank``.

    The reference's rule (``common + T·per_task = rank``, per_task rounded half to even),
    with ``per_task`` capped so the common part is never negative.

    Example:
        >>> iso_sizes(768, 8, 0.8), iso_sizes(10, 4, 0.8), iso_sizes(2, 3, 0.2)
        ((616, 19), (10, 0), (2, 0))
    """
    per_task = min(rank // n_terms, round((rank - int(rank * fraction)) / n_terms))
    return rank - n_terms * per_task, per_task


def iso_matrix(
    term: TermOf, n_terms: int, shape: tuple[int, int], tol: float, fraction: float
) -> Tensor:
    """Iso-CTS (Iso-C for ``fraction = 1``) of ``n_terms`` task matrices."""
    common_size, per_task = iso_sizes(min(shape), n_terms, fraction)
    total = term(0)
    if isinstance(total, Tensor):  # dense: accumulated one task at a time (a fresh tensor)
        for i in range(1, n_terms):
            total += term(i)
    else:
        total = term_sum([term(i) for i in range(n_terms)])
    common = thin_svd(total, tol).top(common_size)
    del total
    blocks = [common]
    if per_task:
        blocks += [
            thin_svd(project_out(term(i), common.u), tol).top(per_task) for i in range(n_terms)
        ]
    return recombine(blocks, isotropic=True)


def _check_stack(deltas: Tensor, coefficients: Tensor) -> None:
    if deltas.dim() != 3 or deltas.shape[0] == 0:
        raise ValueError(
            f"deltas must be stacked as (N, n, m) with N >= 1, got shape {tuple(deltas.shape)}"
        )
    if coefficients.shape != (deltas.shape[0],):
        raise ValueError(
            f"coefficients must have shape ({deltas.shape[0]},) to match deltas "
            f"{tuple(deltas.shape)}, got {tuple(coefficients.shape)}"
        )


class SVDParams(MethodParams):
    """Parameters shared by TSV-M and Iso."""

    scaling: float = Field(
        1.0, allow_inf_nan=False, description="α multiplying the merged delta (the papers' α)"
    )
    basis_precision: BasisPrecision = Field(
        "float64", description="dtype of the SVDs: 'float64' (exact) or 'compute' (faster)"
    )


class IsoParams(SVDParams):
    """Parameters of Iso-CTS (``iso_c`` fixes ``common_space_fraction`` to 1)."""

    common_space_fraction: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="share of min(n, m) directions taken from the sum (the common subspace)",
    )


class _SVDMerge(MergeMethod):
    """What TSV-M and Iso share: scaled task matrices, the mean fallback, the LoRA route."""

    params: SVDParams

    def _matrix(self, term: TermOf, n_terms: int, shape: tuple[int, int], tol: float) -> Tensor:
        raise NotImplementedError

    def _merge_terms(
        self, term: TermOf, n_terms: int, shape: tuple[int, int], like: Tensor
    ) -> Tensor | None:
        """The merged matrix (unscaled) in ``like``'s dtype and device, or ``None``: use the
        mean."""
        scale = max(frobenius(term(i)) for i in range(n_terms))
        if scale == 0:
            return like.new_zeros(shape)
        return self._matrix(term, n_terms, shape, rank_tolerance(shape, like.dtype, scale))

    def merge_matrix(
        self, deltas: Tensor, coefficients: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Merge the (N, n, m) deltas of one weight matrix; the result has their dtype."""
        _check_stack(deltas, coefficients)
        dtype = basis_dtype(deltas.dtype, self.params.basis_precision)
        weights = coefficients.to(deltas.device, dtype)

        def term(i: int) -> Tensor:
            return deltas[i].to(dtype) * weights[i]

        shape = (int(deltas.shape[1]), int(deltas.shape[2]))
        merged = self._merge_terms(term, int(deltas.shape[0]), shape, weights)
        if merged is None:
            return self.merge_fallback(deltas, coefficients)
        return (merged * self.params.scaling).to(deltas.dtype)

    def merge_lowrank(
        self,
        factors: Sequence[LowRankFactors | None],
        coefficients: Tensor,
        shape: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Merge LoRA deltas ``B_i A_i`` (``None``: a zero task matrix) on their factors;
        equal to :meth:`merge_matrix` of the dense deltas. Result in the coefficients'
        dtype."""
        dtype = basis_dtype(coefficients.dtype, self.params.basis_precision)
        device = coefficients.device
        weights = coefficients.to(dtype)
        n, m = shape
        terms: list[LowRankFactors] = []
        for i, pair in enumerate(factors):
            if pair is None or pair[1].shape[0] == 0:
                terms.append((weights.new_zeros(n, 0), weights.new_zeros(0, m)))
            else:
                terms.append((pair[0].to(device, dtype) * weights[i], pair[1].to(device, dtype)))
        merged = self._merge_terms(terms.__getitem__, len(terms), (n, m), weights)
        if merged is None:
            b, a = term_sum(terms)
            merged = (b @ a) / len(terms)
        return (merged * self.params.scaling).to(coefficients.dtype)

    def merge_fallback(
        self, deltas: Tensor, coefficients: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """The references' task arithmetic for non-matrix tensors: ``α (1/T) Σ w_i Δ_i``."""
        return task_vector_merge(
            deltas, coefficients / deltas.shape[0], scaling=self.params.scaling
        )

    def merges_in_rows(self, route: Route, shape: Sequence[int], n_branches: int) -> bool:
        """The fallback mean is entry-wise: it merges in row pieces."""
        return route == "fallback"

    def merge_rows(
        self,
        route: Route,
        read: DeltaRows,
        shape: Sequence[int],
        coefficients: Tensor,
        *,
        piece_rows: int,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """The fallback mean piece by piece; matrices whole."""
        if route != "fallback":
            yield from super().merge_rows(route, read, shape, coefficients, piece_rows=piece_rows)
            return
        yield from task_vector_merge_rows(
            read,
            shape,
            coefficients / coefficients.shape[0],
            piece_rows=piece_rows,
            scaling=self.params.scaling,
        )

    def workspace_elements(self, route: Route, shape: Sequence[int], n_branches: int) -> int:
        """The float64 task matrix, its SVD factors, the stacked factors and the sum (×2: they
        are float64 against a float32 compute dtype)."""
        if route != "matrix" or len(shape) != 2:
            return 0
        n, m = int(shape[0]), int(shape[1])
        r = min(n, m)
        return 2 * (3 * n * m + 2 * (n + m) * r)

    def cost(self, route: Route, shape: Sequence[int], n_branches: int) -> float:
        """About ``14·n·m·r`` per SVD of an n×m matrix: T + 2 for TSV-M and Iso-CTS."""
        if route != "matrix" or len(shape) != 2:
            return super().cost(route, shape, n_branches)
        n, m = int(shape[0]), int(shape[1])
        return float(14 * n * m * min(n, m) * (n_branches + 2))


class TSVMerge(_SVDMerge):
    """TSV-M: per task the top ``min(n, m) // T`` singular triplets, their concatenated
    singular vectors orthogonalised (polar factors), recombined (see the module docstring).

    Example:
        >>> d = torch.randn(1, 5, 4, dtype=torch.float64)  # one task: itself
        >>> torch.allclose(TSVMerge().merge_matrix(d, torch.ones(1, dtype=d.dtype)), d[0])
        True
    """

    name = "tsv_m"
    paper = "Gargiulo et al., Task Singular Vectors (TSV-M), CVPR 2025, arXiv:2412.00081"
    Params = SVDParams

    def _matrix(self, term: TermOf, n_terms: int, shape: tuple[int, int], tol: float) -> Tensor:
        return tsv_m_matrix(term, n_terms, shape, tol)  # type: ignore[return-value]


class IsoMerge(_SVDMerge):
    """Iso-CTS, and Iso-C as its ``common_space_fraction = 1`` preset (module docstring).

    Example:
        >>> d = torch.randn(2, 6, 4, dtype=torch.float64)
        >>> s = torch.linalg.svdvals(IsoMerge(common_space_fraction=1.0).merge_matrix(
        ...     d, torch.ones(2, dtype=d.dtype)))
        >>> torch.allclose(s, s.mean().expand(4))  # a flat spectrum
        True
    """

    name = "iso_cts"
    paper = "Marczak et al., No Task Left Behind (Iso-C, Iso-CTS), ICML 2025, arXiv:2502.04959"
    Params = IsoParams
    params: IsoParams

    def __init__(self, **params: Any) -> None:
        # errors name the registered family ("iso_c.scaling: ..."), not the class
        self.name = "iso_c" if params.get("common_space_fraction") == 1.0 else "iso_cts"
        super().__init__(**params)

    def _matrix(self, term: TermOf, n_terms: int, shape: tuple[int, int], tol: float) -> Tensor:
        return iso_matrix(term, n_terms, shape, tol, self.params.common_space_fraction)
