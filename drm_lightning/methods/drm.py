"""DRM — Decom-Renorm-Merge (Chaichana et al., arXiv 2505.23117).

For one weight matrix: stack the N branch deltas, take one decomposition to get a basis
shared by all branches, express every branch in that basis, renormalise each
(branch, direction) block to unit length for pruning, keep one joint top-k, elect signs by
mass, take the disjoint mean, and map back. Vertical (DRM-V) shares the input space (the
right singular vectors of the row-stacked deltas); horizontal (DRM-H) is vertical applied
to the transposed deltas. Non-matrix tensors go through TIES-style elect + disjoint mean.

The implementation follows the exact projection form of the spec (§4.7): with B the
truncated basis, the coordinates are ``T_i = Δ_i B``, the pruning score of column j of
branch i is ``T_i[:, j] / ||T_i[:, j]||``, and the result is ``merge(T) @ Bᵀ``. The basis
comes from an SVD of the stack or, much cheaper, from a symmetric eigendecomposition of
its Gram matrix (the same singular vectors); LoRA branches use an exact factored path (QR
of the stacked factors) that never forms an n×m delta.

Example:
    >>> import torch
    >>> deltas = torch.randn(3, 16, 12, dtype=torch.float64)
    >>> merged = drm_merge(deltas, torch.ones(3, dtype=torch.float64), drop_rate=0.8)
    >>> merged.shape
    torch.Size([16, 12])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from drm_lightning.methods._ops import TieBreak, disjoint_mean, elect_signs, topk_mask
from drm_lightning.methods.base import LowRankFactors, MergeMethod, MethodParams, Route

Direction = Literal["vertical", "horizontal"]
Solver = Literal["auto", "svd", "gram"]


@dataclass(frozen=True)
class SharedBasis:
    """Truncated shared basis of a stack of deltas (vertical layout).

    Attributes:
        vectors: (m, r) orthonormal right singular vectors of the row-stacked deltas.
        sigma: (r,) the matching singular values, descending.
    """

    vectors: Tensor
    sigma: Tensor

    @property
    def rank(self) -> int:
        return int(self.sigma.numel())


def _truncate(vectors: Tensor, sigma: Tensor, rank_rtol: float) -> SharedBasis:
    """Keep the directions with ``sigma > rank_rtol * sigma_max`` (spec §4.2 step 3)."""
    if sigma.numel() and not bool(torch.isfinite(sigma[0])):
        raise ValueError("DRM: the deltas hold NaN or Inf (the largest singular value is not finite)")
    if sigma.numel() == 0 or not bool(sigma[0] > 0):
        return SharedBasis(vectors[:, :0], sigma[:0])
    keep = int((sigma > rank_rtol * sigma[0]).sum())
    return SharedBasis(vectors[:, :keep], sigma[:keep])


def _rayleigh_lower_bound(gram: Tensor, iterations: int = 8) -> float:
    """A lower bound on the largest eigenvalue of a PSD matrix (power-iteration Rayleigh quotient)."""
    x = gram[:, int(torch.argmax(torch.diagonal(gram)))].clone()
    for _ in range(iterations):
        norm = x.norm()
        if not bool(norm > 0):
            return 0.0
        x = gram @ (x / norm)
    norm = x.norm()
    return float((x @ (gram @ x)) / (norm * norm)) if bool(norm > 0) else 0.0


def _blas_threads(limit: int) -> Any:
    """Limit the BLAS threads of non-torch libraries (scipy) for the duration of a block."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - declared dependency; degrade to no limit
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def _top_eigenpairs_scipy(gram: Tensor, rank_rtol: float) -> tuple[Tensor, Tensor] | None:
    """Only the eigenpairs above the rank threshold, with LAPACK ``syevr`` (CPU).

    ``syevr`` computes the selected eigenvectors only, which makes it 2–3× faster than a full
    ``eigh`` when the kept rank is small. The threshold uses a lower bound of the largest
    eigenvalue, so the returned set always contains every pair the exact rule keeps; the
    exact truncation is applied afterwards by the caller.
    """
    try:
        import scipy.linalg
    except ImportError:  # pragma: no cover - scipy is a dependency, keep a torch fallback
        return None
    lower = _rayleigh_lower_bound(gram)
    if lower <= 0:
        return gram.new_zeros(0), gram.new_zeros(gram.shape[0], 0)
    cut = 0.999 * rank_rtol * rank_rtol * lower
    # scipy's LAPACK has its own BLAS thread pool: keep it to torch's thread budget, or two
    # ranks on two cores oversubscribe and the eigensolver slows down by an order of magnitude
    with _blas_threads(torch.get_num_threads()):
        evals, evecs = scipy.linalg.eigh(
            gram.numpy(), subset_by_value=(cut, float("inf")), driver="evr", check_finite=False
        )
    return torch.from_numpy(evals.copy()), torch.from_numpy(evecs.copy())


def basis_from_gram(gram: Tensor, rank_rtol: float, *, partial_eigensolver: bool = False) -> SharedBasis:
    """Eigendecomposition of a symmetric PSD Gram matrix → descending singular pairs.

    The singular values are ``sqrt(eigenvalues)``, so the rank rule ``σ_j > rtol·σ_1``
    becomes ``λ_j > rtol²·λ_1``. ``partial_eigensolver`` computes only the kept pairs with
    LAPACK ``syevr`` (scipy, CPU): 2.3× faster when the kept rank is small (LoRA-like
    deltas), but 1.9× slower than torch's full ``eigh`` when it is not — and full
    fine-tuning deltas keep most directions above 1 % of σ₁ — so it is off by default.
    """
    pairs = None
    if partial_eigensolver and gram.device.type == "cpu" and rank_rtol > 0 and gram.shape[0] >= 64:
        pairs = _top_eigenpairs_scipy(gram, rank_rtol)
    evals, evecs = pairs if pairs is not None else torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma = evals.clamp(min=0).sqrt()
    return _truncate(evecs, sigma, rank_rtol)


BasisPrecision = Literal["float64", "compute"]


def basis_dtype(compute_dtype: torch.dtype, precision: BasisPrecision) -> torch.dtype:
    """The dtype the shared basis is computed in: float64, or the merge's compute dtype."""
    if precision == "compute":
        return compute_dtype
    if precision != "float64":
        raise ValueError(f"basis_precision must be 'float64' or 'compute', got {precision!r}")
    return torch.float64


def shared_basis(
    deltas: Tensor, *, rank_rtol: float = 1e-2, solver: Solver = "auto", precision: BasisPrecision = "float64"
) -> SharedBasis:
    """Right singular vectors of the row stack ``[Δ_1; …; Δ_N]`` truncated at ``rank_rtol``.

    ``solver="svd"`` runs a thin SVD (of the transpose when the stack is wide, which LAPACK
    handles faster); ``"gram"`` runs ``eigh`` on the smaller Gram matrix — ``Σ Δ_iᵀΔ_i``
    (m×m) for a tall stack, ``D Dᵀ`` for a wide one — which gives the same vectors several
    times faster. ``"auto"`` picks ``"gram"`` except for tiny matrices.

    Precision: the Gram matrix squares the condition number, so a float32 Gram loses the
    small directions that renormalisation then makes as important as the large ones
    (2–8 % of the merged delta on 512×1408 matrices with spectra decaying to 1e-4). With
    ``precision="float64"`` (the default) the basis is computed in float64 whatever the
    deltas' dtype and returned in that dtype; the caller casts it back. Float32 DRM is then
    within 1e-2 of the float64 merge and as close as a float32 SVD route — the numbers are
    in ``benchmarks/RESULTS.md`` § Precision (``benchmarks/precision.py``).
    ``precision="compute"`` keeps the deltas' dtype (the faster, older behaviour).

    Example:
        >>> d = torch.randn(2, 5, 4, dtype=torch.float64)
        >>> shared_basis(d, solver="svd").vectors.shape[0]
        4
    """
    n_branches, n, m = deltas.shape
    dtype = basis_dtype(deltas.dtype, precision)
    rows = n_branches * n
    if solver == "auto":
        solver = "gram" if min(rows, m) >= 32 else "svd"
    if solver not in ("svd", "gram"):
        raise ValueError(f"solver must be 'auto', 'svd' or 'gram', got {solver!r}")
    if solver == "gram" and rows >= m:  # the usual case: one delta at a time in `dtype`
        return basis_from_gram(gram_of_rows(deltas, dtype), rank_rtol)
    deltas = deltas.to(dtype)
    if solver == "svd":
        stack = deltas.reshape(rows, m)
        if rows >= m:
            _, sigma, vh = torch.linalg.svd(stack, full_matrices=False)
            return _truncate(vh.mT, sigma, rank_rtol)
        u, sigma, _ = torch.linalg.svd(stack.mT, full_matrices=False)
        return _truncate(u, sigma, rank_rtol)
    # Wide stack: left singular vectors from the small Gram, then V = Dᵀ U Σ⁻¹.
    stack = deltas.reshape(rows, m)
    left = basis_from_gram(stack @ stack.mT, rank_rtol)
    vectors = (stack.mT @ left.vectors) / left.sigma
    return SharedBasis(vectors, left.sigma)


def gram_of_rows(deltas: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``Σ_i Δ_iᵀΔ_i`` (m×m) of (N, rows, m) deltas, accumulated in ``dtype`` (default: theirs).

    The sharded route calls it on each rank's rows and sums the partial Grams.
    """
    dtype = dtype or deltas.dtype
    gram = deltas.new_zeros(deltas.shape[-1], deltas.shape[-1], dtype=dtype)
    for delta in deltas:
        delta = delta.to(dtype)
        gram.addmm_(delta.mT, delta)
    return gram


def _safe_divide(values: Tensor, scale: Tensor) -> Tensor:
    """``values / scale`` with zero where the scale is zero."""
    safe = torch.where(scale > 0, scale, scale.new_ones(()))
    return torch.where(scale > 0, values / safe, values.new_zeros(()))


NOISE_FLOOR_FACTOR = 4.0
"""Safety factor over the rounding bound of one projection (see :func:`column_noise_floor`)."""


def column_noise_floor(branch_norms: Tensor, reduced_dim: int, dtype: torch.dtype) -> Tensor:
    """Largest norm a (branch, direction) column can get from rounding alone, per branch.

    A coordinate column is one projection ``Δ_i b_j`` (a length-``reduced_dim`` dot product
    per row, ``||b_j|| = 1``). Its rounding error is bounded, in the usual probabilistic
    model, by ``eps·sqrt(reduced_dim)·||Δ_i||_F``; the floor is ``NOISE_FLOOR_FACTOR`` times
    that. It depends on the length of one projection, not on how many rows or directions
    the matrix has: a real column's norm shrinks like ``||T_i||/sqrt(r)``, and a floor that
    grew with ``n·r`` would erase real coordinates of large matrices.

    Args:
        branch_norms: (N,) Frobenius norms of the branches' coordinates ``||T_i||_F``.
        reduced_dim: length of the projection (``m`` of the (n, m) delta in vertical layout).
        dtype: the dtype the projection was computed in.

    Example:
        >>> column_noise_floor(torch.tensor([1.0]), 100, torch.float32)
        tensor([4.7684e-06])
    """
    eps = torch.finfo(dtype).eps
    return NOISE_FLOOR_FACTOR * eps * math.sqrt(max(reduced_dim, 1)) * branch_norms


def drop_numerical_zeros(coords: Tensor, reduced_dim: int) -> Tensor:
    """Zero the (branch, direction) columns whose norm is within rounding of zero.

    A branch with no component along a shared direction (a zero branch, a LoRA branch
    orthogonal to another's subspace, disjoint supports) gets coordinates of rounding size
    instead of exact zeros. Renormalisation would blow that noise up to unit scores that
    compete for the pruning budget and count in the disjoint mean. A column is treated as
    exactly zero when its norm is at most :func:`column_noise_floor` of its branch — the
    rounding error of one projection — and kept otherwise, however small.

    Args:
        coords: (N, n, r) coordinates ``T_i = Δ_i B``.
        reduced_dim: the length of each projection (``m``, the rows of ``B``).

    Example:
        >>> t = torch.tensor([[[1.0, 1e-9], [2.0, -1e-9]]])
        >>> drop_numerical_zeros(t, reduced_dim=2)
        tensor([[[1., 0.],
                 [2., 0.]]])
    """
    branch_norms = coords.flatten(1).norm(dim=1)
    floor = column_noise_floor(branch_norms, reduced_dim, coords.dtype).reshape(-1, 1, 1)
    return coords.masked_fill(coords.norm(dim=1, keepdim=True) <= floor, 0)


def pruning_scores(coords: Tensor, sigma: Tensor, *, renormalize: bool = True) -> Tensor:
    """Scores whose magnitudes decide which coordinates survive (spec §4.4).

    With ``renormalize`` every (branch, direction) column is scaled to unit length, so no
    branch or direction can take the budget by its scale; without it the score is the raw
    split block ``U_i = T_i / σ`` of the SVD (the paper's "no renorm" ablation).
    """
    if renormalize:
        return _safe_divide(coords, coords.norm(dim=1, keepdim=True))
    return _safe_divide(coords, sigma.reshape(1, 1, -1))


def merge_coordinates(
    coords: Tensor,
    sigma: Tensor,
    coefficients: Tensor,
    *,
    reduced_dim: int,
    drop_rate: float = 0.8,
    renormalize: bool = True,
    reference_compat: bool = False,
    tie_break: TieBreak = "majority",
    disjoint: bool = True,
) -> Tensor:
    """Prune, elect and merge branch coordinates in a shared basis (spec §4.2 steps 5–8).

    Args:
        coords: (N, n, r) coordinates ``T_i = Δ_i B`` (column j belongs to basis vector j).
        sigma: (r,) singular values of the basis (used only when ``renormalize=False``).
        coefficients: (N,) per-branch λ, applied after the election.
        reduced_dim: length of one projection ``Δ_i b_j`` (``m``), for the noise floor.
        reference_compat: the reference's pruning rule and no noise floor (bit-matching).

    Returns:
        (n, r) merged coordinates.
    """
    if not reference_compat:
        coords = drop_numerical_zeros(coords, reduced_dim)
    if drop_rate > 0:
        scores = pruning_scores(coords, sigma, renormalize=renormalize)
        mask = topk_mask(scores, 1.0 - drop_rate, reference_compat=reference_compat)
        coords = coords * mask
    signs = elect_signs(coords, tie_break=tie_break)
    return disjoint_mean(coords, signs, coefficients, disjoint=disjoint)


def drm_merge(
    deltas: Tensor,
    coefficients: Tensor,
    *,
    drop_rate: float = 0.8,
    direction: Direction = "horizontal",
    renormalize: bool = True,
    rank_rtol: float = 1e-2,
    reference_compat: bool = False,
    tie_break: TieBreak = "majority",
    disjoint: bool = True,
    solver: Solver = "auto",
    basis_precision: BasisPrecision = "float64",
) -> Tensor:
    """Merge the (N, n, m) deltas of one weight matrix with DRM; returns the (n, m) delta.

    The result has the deltas' dtype; the shared basis is computed in ``basis_precision``
    (see :func:`shared_basis`).

    Example:
        >>> d = torch.randn(2, 6, 4, dtype=torch.float64)
        >>> torch.allclose(drm_merge(d, torch.ones(2, dtype=d.dtype), direction="horizontal"),
        ...                drm_merge(d.mT, torch.ones(2, dtype=d.dtype), direction="vertical").mT)
        True
    """
    if direction == "horizontal":
        return drm_merge(
            deltas.mT, coefficients, drop_rate=drop_rate, direction="vertical",
            renormalize=renormalize, rank_rtol=rank_rtol, reference_compat=reference_compat,
            tie_break=tie_break, disjoint=disjoint, solver=solver, basis_precision=basis_precision,
        ).mT
    _, n, m = deltas.shape
    basis = shared_basis(deltas, rank_rtol=rank_rtol, solver=solver, precision=basis_precision)
    if basis.rank == 0:
        return deltas.new_zeros(n, m)
    vectors, sigma = basis.vectors.to(deltas.dtype), basis.sigma.to(deltas.dtype)
    coords = deltas @ vectors
    merged = merge_coordinates(
        coords, sigma, coefficients, reduced_dim=m, drop_rate=drop_rate, renormalize=renormalize,
        reference_compat=reference_compat, tie_break=tie_break, disjoint=disjoint,
    )
    return merged @ vectors.mT


def lowrank_shared_basis(
    factors: Sequence[LowRankFactors], *, rank_rtol: float = 1e-2, precision: BasisPrecision = "float64"
) -> SharedBasis:
    """Exact shared basis of ``[B_1A_1; …; B_NA_N]`` from the factors (spec §7).

    With the stacked ``A = [A_1; …; A_N]`` and a thin QR ``Aᵀ = QR``, the stack equals
    ``blockdiag(B) Rᵀ Qᵀ``; the right singular vectors are ``Q W`` where W are those of the
    small ``blockdiag(B) Rᵀ``, obtained from its (Σρ × Σρ) Gram ``Σ_i R_iᵀ B_iᵀB_i R_i``.
    The basis is computed in ``precision`` (see :func:`shared_basis`).
    """
    dtype = basis_dtype(factors[0][1].dtype, precision)
    factors = [(b.to(dtype), a.to(dtype)) for b, a in factors]
    a_stack = torch.cat([a for _, a in factors], dim=0)  # (Σρ, m)
    q, r = torch.linalg.qr(a_stack.mT)  # q: (m, Σρ), r: (Σρ, Σρ)
    rt = r.mT
    gram = a_stack.new_zeros(rt.shape[1], rt.shape[1])
    offset = 0
    for b, a in factors:
        rows = rt[offset : offset + a.shape[0]]  # (ρ_i, Σρ)
        offset += a.shape[0]
        bt_b = b.mT @ b
        gram += rows.mT @ bt_b @ rows
    small = basis_from_gram(gram, rank_rtol)
    return SharedBasis(q @ small.vectors, small.sigma)


def drm_merge_lowrank(
    factors: Sequence[LowRankFactors | None],
    coefficients: Tensor,
    shape: tuple[int, int],
    *,
    drop_rate: float = 0.8,
    direction: Direction = "horizontal",
    renormalize: bool = True,
    rank_rtol: float = 1e-2,
    reference_compat: bool = False,
    tie_break: TieBreak = "majority",
    disjoint: bool = True,
    basis_precision: BasisPrecision = "float64",
) -> Tensor:
    """DRM on LoRA deltas ``Δ_i = B_i A_i`` without forming the stacked dense deltas.

    ``None`` marks a branch that did not touch this matrix (zero delta). Equal to
    :func:`drm_merge` on the dense deltas (singular-vector signs do not matter to DRM).
    """
    n, m = shape
    dtype = coefficients.dtype
    if direction == "horizontal":
        swapped = [None if f is None else (f[1].mT, f[0].mT) for f in factors]
        return drm_merge_lowrank(
            swapped, coefficients, (m, n), drop_rate=drop_rate, direction="vertical",
            renormalize=renormalize, rank_rtol=rank_rtol, reference_compat=reference_compat,
            tie_break=tie_break, disjoint=disjoint, basis_precision=basis_precision,
        ).mT
    present = [(b.to(coefficients.device, dtype), a.to(coefficients.device, dtype)) for f in factors if f is not None for b, a in [f]]
    present = [(b, a) for b, a in present if a.shape[0] > 0]
    if not present:
        return coefficients.new_zeros(n, m)
    basis = lowrank_shared_basis(present, rank_rtol=rank_rtol, precision=basis_precision)
    if basis.rank == 0:
        return coefficients.new_zeros(n, m)
    basis = SharedBasis(basis.vectors.to(dtype), basis.sigma.to(dtype))
    coords = coefficients.new_zeros(len(factors), n, basis.rank)
    for i, f in enumerate(factors):
        if f is not None and f[1].shape[0] > 0:
            b, a = f[0].to(coefficients.device, dtype), f[1].to(coefficients.device, dtype)
            coords[i] = b @ (a @ basis.vectors)
    merged = merge_coordinates(
        coords, basis.sigma, coefficients, reduced_dim=m, drop_rate=drop_rate, renormalize=renormalize,
        reference_compat=reference_compat, tie_break=tie_break, disjoint=disjoint,
    )
    return merged @ basis.vectors.mT


class DRMParams(MethodParams):
    """Parameters of DRM (defaults from the spec, §8).

    ``direction`` defaults to horizontal (DRM-H), the reference code's default: the paper
    does not say which direction it used where, so the spec's rule (take the reference-code
    default) applies. Because of the reference CLI's config bug (spec B8) every reference
    run took its horizontal fallback, whatever its YAML asked for.

    Measured on the demo's ``--large`` suite (``benchmarks/direction_probe.py``): DRM-V with
    renormalisation lost up to 30 points on some tasks, all of it from the MLP output
    projections; DRM-H did not.
    """

    drop_rate: float = Field(0.8, ge=0.0, lt=1.0, description="fraction of basis coordinates pruned")
    direction: Direction = Field("horizontal", description="horizontal (DRM-H) or vertical (DRM-V)")
    renormalize: bool = Field(True, description="prune on unit-normalised blocks (the 'Renorm')")
    rank_rtol: float = Field(1e-2, ge=0.0, lt=1.0, description="keep σ_j > rank_rtol·σ_1")
    reference_compat: bool = Field(
        False, description="reference pruning (k-th value, ties kept) and majority tie-break"
    )
    tie_break: TieBreak = Field("majority", description="sign of entries whose mass is exactly 0")
    disjoint_mean: bool = Field(True, description="divide by agreeing branches (else by N)")
    elect_signs: bool = Field(True, description="sign election on the fallback path")
    fallback_trim_rate: float = Field(
        0.0, ge=0.0, lt=1.0,
        description=(
            "magnitude trim on the fallback path, per branch and per TENSOR (spec §5 trims one "
            "vector per branch over all fallback tensors together; that variant is not offered)"
        ),
    )
    solver: Solver = Field("auto", description="basis from 'svd', 'gram' (eigh), or 'auto'")
    basis_precision: BasisPrecision = Field(
        "float64", description="dtype of the shared basis: 'float64' (exact) or 'compute' (faster)"
    )

    @field_validator("direction", mode="before")
    @classmethod
    def _short_direction(cls, v: object) -> object:
        return {"v": "vertical", "h": "horizontal"}.get(v, v) if isinstance(v, str) else v


class DRM(MergeMethod):
    """Decom-Renorm-Merge: TIES-style merging in a joint SVD basis with renormalisation.

    Example:
        >>> m = DRM(drop_rate=0.8, direction="horizontal")
        >>> m.merge_matrix(torch.randn(2, 4, 5), torch.ones(2)).shape
        torch.Size([4, 5])
    """

    name = "drm"
    paper = "Chaichana et al., Decom-Renorm-Merge, arXiv:2505.23117"
    Params = DRMParams

    def _kwargs(self) -> dict:
        p = self.params
        return dict(
            drop_rate=p.drop_rate, direction=p.direction, renormalize=p.renormalize,
            rank_rtol=p.rank_rtol, reference_compat=p.reference_compat,
            tie_break=p.tie_break, disjoint=p.disjoint_mean, basis_precision=p.basis_precision,
        )

    def merge_matrix(self, deltas, coefficients, *, generator=None):  # noqa: D102
        return drm_merge(deltas, coefficients, solver=self.params.solver, **self._kwargs())

    def merge_lowrank(self, factors, coefficients, shape, *, generator=None):  # noqa: D102
        return drm_merge_lowrank(factors, coefficients, shape, **self._kwargs())

    def merge_fallback(self, deltas, coefficients, *, generator=None):  # noqa: D102
        p = self.params
        if p.fallback_trim_rate > 0:
            flat = deltas.reshape(deltas.shape[0], -1)
            mask = torch.stack([topk_mask(row, 1.0 - p.fallback_trim_rate) for row in flat])
            deltas = (flat * mask).reshape(deltas.shape)
        signs = elect_signs(deltas, tie_break=p.tie_break) if p.elect_signs else None
        return disjoint_mean(deltas, signs, coefficients, disjoint=p.disjoint_mean)

    def cost(self, route: Route, shape, n_branches: int) -> float:  # noqa: D102
        if route != "matrix" or len(shape) != 2:
            return super().cost(route, shape, n_branches)
        n, m = int(shape[0]), int(shape[1])
        if self.params.direction == "horizontal":
            n, m = m, n
        rows = n_branches * n
        small, big = min(rows, m), max(rows, m)
        gram = big * small * small  # forming the Gram
        eig = 9 * small**3  # symmetric tridiagonalisation + vectors
        project = 2 * 2 * rows * m * small  # coordinates and reconstruction (rank ≤ small)
        return float(gram + eig + project)
