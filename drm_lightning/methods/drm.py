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

import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from drm_lightning.methods.base import LowRankFactors, MergeMethod, MethodParams, Route
from drm_lightning.methods.basis import (  # noqa: F401 - re-exported: the basis is part of DRM's API
    BasisPrecision,
    SharedBasis,
    Solver,
    basis_dtype,
    basis_from_gram,
    gram_of_rows,
    lowrank_shared_basis,
    shared_basis,
    working_dtype,
)
from drm_lightning.methods.ops import (
    LOCAL,
    MASK_BLOCK,
    Reductions,
    TieBreak,
    break_ties,
    check_merge_inputs,
    disjoint_mean,
    elect_signs,
    kept_count,
    majority_count,
    mass_signs,
    safe_divide,
    trim_per_branch,
)
from drm_lightning.methods.rowwise import (
    DeltaRows,
    MagnitudeCut,
    majority_over_pieces,
    prune_scaled_in_place,
    row_spans,
    signs_need_majority,
)

Direction = Literal["vertical", "horizontal"]


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


def column_is_noise(col_sq: Tensor, reduced_dim: int, dtype: torch.dtype) -> Tensor:
    """(N, r) mask of the columns at or below :func:`column_noise_floor` of their branch.

    Args:
        col_sq: (N, r) squared column norms of the coordinates (over every row).
        reduced_dim: length of one projection (``m``).
        dtype: the dtype the projection was computed in.
    """
    floor = column_noise_floor(col_sq.sum(dim=1).sqrt(), reduced_dim, dtype)
    return col_sq.sqrt() <= floor.reshape(-1, 1)


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
    noise = column_is_noise((coords * coords).sum(dim=1), reduced_dim, coords.dtype)
    return coords.masked_fill(noise.unsqueeze(1), 0)


def pruning_scores(
    coords: Tensor, sigma: Tensor, *, renormalize: bool = True, col_norms: Tensor | None = None
) -> Tensor:
    """Scores whose magnitudes decide which coordinates survive (spec §4.4).

    With ``renormalize`` every (branch, direction) column is scaled to unit length, so no
    branch or direction can take the budget by its scale; without it the score is the raw
    split block ``U_i = T_i / σ`` of the SVD (the paper's "no renorm" ablation).
    ``col_norms`` (N, r): the column norms over every row, when ``coords`` holds only some.
    """
    if renormalize:
        norms = coords.norm(dim=1, keepdim=True) if col_norms is None else col_norms.unsqueeze(1)
        return safe_divide(coords, norms)
    return safe_divide(coords, sigma.reshape(1, 1, -1))


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
    reductions: Reductions = LOCAL,
    overwrite: bool = False,
) -> Tensor:
    """Prune, elect and merge branch coordinates in a shared basis (spec §4.2 steps 5–8).

    Every step is row-local except three reductions, taken through ``reductions``: the
    column norms (renormalisation and the rounding floor), the pruning top-k and the
    majority sign count. The ZeRO-3 sharded route calls this on its rows with collective
    reductions; everything else uses the local default.

    Args:
        coords: (N, n, r) coordinates ``T_i = Δ_i B`` (column j belongs to basis vector j).
        sigma: (r,) singular values of the basis (used only when ``renormalize=False``).
        coefficients: (N,) per-branch λ, applied after the election.
        reduced_dim: length of one projection ``Δ_i b_j`` (``m``), for the noise floor.
        reference_compat: the reference's pruning rule and no noise floor (bit-matching).
        reductions: how sums and the top-k reach rows held elsewhere.
        overwrite: ``coords`` is scratch: large ones are pruned in place, with no score or
            mask tensor of their size
            (:func:`~drm_lightning.methods.rowwise.prune_scaled_in_place`).

    Returns:
        (n, r) merged coordinates.
    """
    col_sq = reductions.sum(
        torch.stack([(c * c).sum(dim=0) for c in coords])
    )  # (N, r), over every row
    if not reference_compat:
        noise = column_is_noise(col_sq, reduced_dim, coords.dtype)
        if bool(noise.any()):
            coords = coords.masked_fill(noise.unsqueeze(1), 0)
            col_sq = col_sq.masked_fill(noise, 0)
    if (
        drop_rate > 0
        and reductions is LOCAL
        and not reference_compat
        and coords.numel() > MASK_BLOCK
    ):
        # large: the scores a block at a time, the pruning in place (in a copy unless `overwrite`)
        scale = col_sq.sqrt() if renormalize else sigma.reshape(1, -1).expand_as(col_sq)
        coords = prune_scaled_in_place(
            coords if overwrite else coords.clone(), scale, 1.0 - drop_rate
        )
    elif drop_rate > 0:
        scores = pruning_scores(coords, sigma, renormalize=renormalize, col_norms=col_sq.sqrt())
        mask = reductions.topk_mask(scores, 1.0 - drop_rate, reference_compat=reference_compat)
        del scores
        coords = coords * mask  # the caller's coordinates are freed here if it kept no reference
        del mask
    signs = mass_signs(coords)
    majority = reductions.sum(majority_count(signs)) if tie_break == "majority" else 0
    signs = break_ties(signs, tie_break=tie_break, majority=majority)
    return disjoint_mean(
        coords, signs, coefficients, disjoint=disjoint, overwrite=drop_rate > 0 or overwrite
    )


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
    (see :func:`shared_basis`), the coordinates in at least float32 (:func:`working_dtype`:
    half-precision deltas are widened one branch at a time). NaN/Inf raise ``ValueError``
    naming the branch.

    Example:
        >>> d = torch.randn(2, 6, 4, dtype=torch.float64)
        >>> torch.allclose(drm_merge(d, torch.ones(2, dtype=d.dtype), direction="horizontal"),
        ...                drm_merge(d.mT, torch.ones(2, dtype=d.dtype), direction="vertical").mT)
        True
    """
    check_merge_inputs(deltas, coefficients)
    flip = direction == "horizontal"  # merge the transposes (vertical layout), transpose back
    if flip:
        deltas = deltas.mT
    _, n, m = deltas.shape
    work = working_dtype(deltas.dtype)
    basis = shared_basis(
        deltas, rank_rtol=rank_rtol, solver=solver, precision=basis_precision, vectors_dtype=work
    )
    if basis.rank == 0:
        merged = deltas.new_zeros(n, m)
    else:
        vectors, sigma = basis.vectors.to(work), basis.sigma.to(work)
        del basis  # the float64 basis, before the coordinates are made
        coords = merge_coordinates(  # no reference kept to the coordinates: freed once pruned
            project(deltas, vectors),
            sigma,
            coefficients,
            reduced_dim=m,
            drop_rate=drop_rate,
            renormalize=renormalize,
            reference_compat=reference_compat,
            tie_break=tie_break,
            disjoint=disjoint,
            overwrite=True,
        )
        merged = (coords @ vectors.mT).to(deltas.dtype)
    return merged.mT if flip else merged


def project(deltas: Tensor, vectors: Tensor) -> Tensor:
    """The coordinates ``T_i = Δ_i B`` (N, n, r) in the basis' dtype; deltas of a narrower dtype
    are widened one branch at a time (no wide copy of the stack).

    Example:
        >>> project(torch.ones(2, 3, 4, dtype=torch.bfloat16), torch.eye(4, 2)).dtype
        torch.float32
    """
    if deltas.dtype == vectors.dtype:
        return deltas @ vectors
    coords = vectors.new_empty(deltas.shape[0], deltas.shape[1], vectors.shape[1])
    for i, delta in enumerate(deltas):
        torch.matmul(delta.to(vectors.dtype), vectors, out=coords[i])
    return coords


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
    :func:`drm_merge` on the dense deltas (singular-vector signs do not matter to DRM). The
    result has the coefficients' dtype, computed in at least float32 (:func:`working_dtype`).
    """
    check_merge_inputs(factors, coefficients)
    flip = direction == "horizontal"  # merge the transposes (vertical layout), transpose back
    if flip:
        factors = [None if f is None else (f[1].mT, f[0].mT) for f in factors]
        shape = (shape[1], shape[0])
    n, m = shape
    out_dtype, dtype = coefficients.dtype, working_dtype(coefficients.dtype)
    coefficients = coefficients.to(dtype)
    present = [
        (b.to(coefficients.device, dtype), a.to(coefficients.device, dtype))
        for f in factors
        if f is not None
        for b, a in [f]
    ]
    present = [(b, a) for b, a in present if a.shape[0] > 0]
    basis = (
        lowrank_shared_basis(present, rank_rtol=rank_rtol, precision=basis_precision)
        if present
        else None
    )
    if basis is None or basis.rank == 0:
        merged = coefficients.new_zeros(n, m, dtype=out_dtype)
    else:
        basis = SharedBasis(basis.vectors.to(dtype), basis.sigma.to(dtype))
        coords = coefficients.new_zeros(len(factors), n, basis.rank)
        for i, f in enumerate(factors):
            if f is not None and f[1].shape[0] > 0:
                b, a = f[0].to(coefficients.device, dtype), f[1].to(coefficients.device, dtype)
                coords[i] = b @ (a @ basis.vectors)
        merged = merge_coordinates(
            coords,
            basis.sigma,
            coefficients,
            reduced_dim=m,
            drop_rate=drop_rate,
            renormalize=renormalize,
            reference_compat=reference_compat,
            tie_break=tie_break,
            disjoint=disjoint,
        )
        merged = (merged @ basis.vectors.mT).to(out_dtype)
    return merged.mT if flip else merged


def drm_fallback_rows(
    read: DeltaRows,
    shape: Sequence[int],
    coefficients: Tensor,
    *,
    piece_rows: int,
    trim_rate: float = 0.0,
    elect: bool = True,
    tie_break: TieBreak = "majority",
    disjoint: bool = True,
) -> Iterator[Tensor]:
    """DRM's fallback (trim, elect, disjoint mean) of a tensor read in row pieces.

    The per-branch trim cut comes from :class:`~drm_lightning.methods.rowwise.MagnitudeCut`;
    the majority sign count of ``tie_break="majority"`` costs one more pass over the pieces,
    taken only when some entry has an exactly zero mass sum with a non-zero branch (where
    every branch is zero the merged entry is zero whatever the sign).

    Example:
        >>> d = torch.tensor([[[1.0], [-4.0], [-1.0]], [[-1.0], [-1.0], [-2.0]]])
        >>> pieces = drm_fallback_rows(lambda a, b: d[:, a:b], (3, 1), torch.ones(2), piece_rows=1)
        >>> torch.cat(list(pieces)).squeeze(1)  # entry 0 ties: the majority sign (-) decides
        tensor([-1.0000, -2.5000, -1.5000])
    """
    spans = row_spans(int(shape[0]), piece_rows)
    cut = None
    if trim_rate > 0:
        numel = math.prod(int(s) for s in shape)
        keeps = [kept_count(numel, 1.0 - trim_rate)] * int(coefficients.shape[0])
        cut = MagnitudeCut(read, spans, keeps, numel, coefficients.dtype)
    masks = cut.masks() if cut is not None else None
    majority: int | None = None if tie_break == "majority" else 0
    for start, stop in spans:
        deltas = read(start, stop)
        if masks is not None:
            deltas = deltas * masks(deltas)
        signs = None
        if elect:
            signs = mass_signs(deltas)
            if majority is None and signs_need_majority(signs, deltas):
                majority = majority_over_pieces(read, spans, cut.masks if cut is not None else None)
            signs = break_ties(signs, tie_break=tie_break, majority=majority or 0)
        yield disjoint_mean(deltas, signs, coefficients, disjoint=disjoint)


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

    drop_rate: float = Field(
        0.8, ge=0.0, lt=1.0, description="fraction of basis coordinates pruned"
    )
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
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "magnitude trim on the fallback path, per branch and per TENSOR (spec §5 trims one "
            "vector per branch over all fallback tensors together; that variant is not offered)"
        ),
    )
    solver: Solver = Field(
        "auto",
        description="basis from 'svd', 'gram' (eigh), 'refined' (float32 eigh refined in "
        "float64: faster at low kept rank), or 'auto'",
    )
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
            self.coordinate_kwargs(),
            direction=p.direction,
            rank_rtol=p.rank_rtol,
            basis_precision=p.basis_precision,
        )

    def merge_matrix(self, deltas, coefficients, *, generator=None):  # noqa: D102
        return drm_merge(deltas, coefficients, solver=self.params.solver, **self._kwargs())

    def merge_lowrank(self, factors, coefficients, shape, *, generator=None):  # noqa: D102
        return drm_merge_lowrank(factors, coefficients, shape, **self._kwargs())

    def merge_fallback(self, deltas, coefficients, *, generator=None):  # noqa: D102
        p = self.params
        if p.fallback_trim_rate > 0:
            deltas = trim_per_branch(deltas, 1.0 - p.fallback_trim_rate)
        signs = elect_signs(deltas, tie_break=p.tie_break) if p.elect_signs else None
        return disjoint_mean(deltas, signs, coefficients, disjoint=p.disjoint_mean)

    def merges_in_rows(self, route: Route, shape, n_branches: int) -> bool:  # noqa: D102
        return route == "fallback"

    def merge_rows(self, route, read, shape, coefficients, *, piece_rows, generator=None):  # noqa: D102
        if route != "fallback":
            yield from super().merge_rows(route, read, shape, coefficients, piece_rows=piece_rows)
            return
        p = self.params
        yield from drm_fallback_rows(
            read,
            shape,
            coefficients,
            piece_rows=piece_rows,
            trim_rate=p.fallback_trim_rate,
            elect=p.elect_signs,
            tie_break=p.tie_break,
            disjoint=p.disjoint_mean,
        )

    def coordinate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`merge_coordinates` these parameters set."""
        p = self.params
        return dict(
            drop_rate=p.drop_rate,
            renormalize=p.renormalize,
            reference_compat=p.reference_compat,
            tie_break=p.tie_break,
            disjoint=p.disjoint_mean,
        )

    def row_local(self, route: Route, shape, n_branches: int) -> bool:  # noqa: D102
        # Fallback tensors merge entry by entry. A matrix is row-local in the vertical layout
        # with the Gram solver: Σ Δ_iᵀΔ_i is a sum over rows, and merge_coordinates takes its
        # other reductions as arguments. Exactly when drm_merge itself builds that m×m Gram.
        if route == "fallback":
            return True
        if route != "matrix" or len(shape) != 2:
            return False
        p = self.params
        if p.direction != "vertical" or p.solver == "svd":
            return False
        rows, m = n_branches * int(shape[0]), int(shape[1])
        return rows >= m and (p.solver in ("gram", "refined") or min(rows, m) >= 32)

    def workspace_elements(self, route: Route, shape, n_branches: int) -> int:  # noqa: D102
        if route != "matrix" or len(shape) != 2:
            return 0
        rows, cols = int(shape[0]), int(shape[1])
        if self.params.direction == "horizontal":
            rows, cols = cols, rows
        rank = min(n_branches * rows, cols)
        return 2 * n_branches * rows * rank + cols * rank + rank * rank  # coordinates, basis, Gram

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
