"""The shared basis of DRM: the truncated singular vectors of a stack of deltas.

The basis comes from an SVD of the stack or, much cheaper, from a symmetric
eigendecomposition of its Gram matrix (the same singular vectors), by default in float64
whatever the deltas' dtype (``precision``); LoRA branches use an exact factored route (QR of
the stacked factors) that never forms an n×m delta. :mod:`drm_lightning.methods.drm` uses
these; the ZeRO-3 sharded route calls :func:`gram_of_rows` on its rows and
:func:`basis_from_gram` on the summed Gram.

Example:
    >>> import torch
    >>> d = torch.randn(3, 16, 12, dtype=torch.float64)
    >>> basis = shared_basis(d, solver="svd")
    >>> torch.allclose(basis.vectors.mT @ basis.vectors, torch.eye(basis.rank, dtype=torch.float64))
    True
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from drm_lightning.methods.base import LowRankFactors

Solver = Literal["auto", "svd", "gram", "refined"]
BasisPrecision = Literal["float64", "compute"]


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
        raise ValueError(
            "DRM: the deltas hold NaN or Inf (the largest singular value is not finite)"
        )
    if sigma.numel() == 0 or not bool(sigma[0] > 0):
        return SharedBasis(vectors[:, :0], sigma[:0])
    keep = int((sigma > rank_rtol * sigma[0]).sum())
    return SharedBasis(vectors[:, :keep], sigma[:keep])


def _rayleigh_lower_bound(gram: Tensor, iterations: int = 8) -> float:
    """A lower bound on the largest eigenvalue of a PSD matrix (power-iteration Rayleigh
    quotient)."""
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


REFINE_MARGIN = 0.5
"""The refined route corrects the float32 pairs with ``λ > REFINE_MARGIN·rtol²·λ_max``: a margin
far above float32's eigenvalue error (``eps·λ_max``), so every pair the exact rule keeps is in."""

REFINE_MAX_CORRECTION = 1e-4
"""Largest first-order correction one refinement step may apply between two pairs. The step's
error is about its square (1e-8, float32's own rounding of the basis); pairs closer than that
are a cluster, decomposed together in float64 (Rayleigh–Ritz)."""

REFINE_MAX_CLUSTERED = 0.25
"""Fraction of the Gram's size that may sit in clusters before the refined route gives up."""


def count_eigenvalues_above(matrix: Tensor, shift: float) -> int:
    """How many eigenvalues of a symmetric matrix exceed ``shift`` (Sylvester's inertia of
    ``matrix − shift·I`` from an LDLᵀ factorisation: ``n³/3`` flops, no eigenvectors).

    A 2×2 pivot block of the Bunch–Kaufman factorisation has one eigenvalue of each sign.

    Example:
        >>> count_eigenvalues_above(torch.diag(torch.tensor([3.0, 1.0, 2.0])), 1.5)
        2
    """
    shifted = matrix - shift * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    factor, pivots = torch.linalg.ldl_factor(shifted)
    del shifted
    two_by_two = pivots < 0
    diagonal = factor.diagonal()
    return int((diagonal[~two_by_two] > 0).sum()) + int(two_by_two.sum()) // 2


def eigh_refined(gram: Tensor, rank_rtol: float) -> tuple[Tensor, Tensor] | None:
    """The kept eigenpairs of a symmetric PSD float64 matrix from a float32 ``eigh`` refined by
    one float64 Ogita–Aishima step; ``None`` where float32 cannot resolve them.

    An inertia count (:func:`count_eigenvalues_above`) first rules out, for a few percent of
    the decomposition's cost, Grams that keep more than half their directions.
    Float32 eigenvectors are off by about ``eps32·λ_max / gap`` along each other pair. One
    Ogita–Aishima step (Ogita & Aishima, Japan J. Indust. Appl. Math. 35, 2018), run on the
    kept candidates only (``8n²k`` float64 flops for ``k`` of ``n`` pairs), removes those
    errors to second order; pairs whose correction would exceed :data:`REFINE_MAX_CORRECTION`
    form clusters, re-decomposed in float64 inside their (corrected) span. Returns descending
    eigenvalues and their vectors (``n × k'``), or ``None`` — the caller then runs a float64
    ``eigh`` — when a kept candidate is that close to a discarded pair or the clusters exceed
    :data:`REFINE_MAX_CLUSTERED` of the matrix: dense spectra around the rank cut, where a
    float32 start is too far off and a float64 ``eigh`` is the cheaper exact answer.
    """
    n = gram.shape[0]
    lower = _rayleigh_lower_bound(gram) if n else 0.0
    if not (math.isfinite(lower) and lower > 0):
        return None  # zero or non-finite: the exact route decides (and raises on NaN/Inf)
    if count_eigenvalues_above(gram, REFINE_MARGIN * rank_rtol * rank_rtol * lower) > n // 2:
        return None  # the step costs 8n²k: from k ≈ n/2 on, a float64 eigh is cheaper
    evals32, evecs32 = torch.linalg.eigh(gram.to(torch.float32))
    evals = evals32.flip(0).to(gram.dtype)
    top = float(evals[0]) if n else 0.0
    if not (math.isfinite(top) and top > 0):
        return None  # zero or non-finite: the exact route decides (and raises on NaN/Inf)
    keep = int((evals > REFINE_MARGIN * rank_rtol * rank_rtol * top).sum())
    if keep > n // 2:
        return None  # the step costs 8n²k: from k ≈ n/2 on, a float64 eigh is cheaper
    basis = evecs32.flip(1).to(gram.dtype)
    del evecs32, evals32
    kept = basis[:, :keep]
    products = basis.mT @ torch.cat([gram @ kept, kept], dim=1)  # (n, 2k): XᵀAX_K, XᵀX_K
    rayleigh, overlap = products[:, :keep], products[:, keep:]
    values = torch.cat([rayleigh[:keep].diagonal() / overlap[:keep].diagonal(), evals[keep:]])
    residual = -overlap  # R = I − XᵀX_K
    residual[:keep].diagonal().add_(1.0)
    gaps = values[:keep].unsqueeze(0) - values.unsqueeze(1)  # (n, k): λ_j − λ_i
    first_order = (rayleigh + residual * values[:keep]) / gaps.masked_fill(gaps == 0, 1.0)
    first_order.masked_fill_(gaps == 0, 0.0)
    close = first_order.abs() > REFINE_MAX_CORRECTION
    if bool(close[keep:].any()):
        return None  # a kept candidate nearly degenerate with a discarded pair
    close[:keep] |= close[:keep].mT.clone()
    close[:keep].fill_diagonal_(True)
    correction = torch.where(close, residual / 2, first_order)
    del products, rayleigh, overlap, first_order, gaps
    kept = kept + basis @ correction
    del basis, correction, residual
    # clusters: intervals of indices joined by close pairs (the pairs are sorted by value)
    index = torch.arange(keep)
    reach = torch.where(close[:keep], index, -1).amax(dim=1)
    ends = torch.cummax(reach, dim=0).values.tolist()
    starts = [0] + [i for i in range(1, keep) if ends[i - 1] < i]
    spans = list(zip(starts, starts[1:] + [keep], strict=True))
    clustered = sum(b - a for a, b in spans if b - a > 1)
    if clustered > REFINE_MAX_CLUSTERED * n:
        return None
    values = values[:keep].clone()
    for a, b in spans:
        if b - a > 1:
            block = kept[:, a:b]
            small = block.mT @ (gram @ block)
            cluster_values, rotation = torch.linalg.eigh((small + small.mT) / 2)
            kept[:, a:b] = block @ rotation
            values[a:b] = cluster_values
    order = torch.argsort(values, descending=True)
    kept = kept[:, order]
    kept /= kept.norm(dim=0)  # the step leaves the norms off by its own (second-order) error
    return values[order], kept


def basis_from_gram(
    gram: Tensor,
    rank_rtol: float,
    *,
    partial_eigensolver: bool = False,
    overwrite: bool = False,
    refine: bool = False,
) -> SharedBasis:
    """Eigendecomposition of a symmetric PSD Gram matrix → descending singular pairs.

    The singular values are ``sqrt(eigenvalues)``, so the rank rule ``σ_j > rtol·σ_1``
    becomes ``λ_j > rtol²·λ_1``. ``partial_eigensolver`` computes only the kept pairs with
    LAPACK ``syevr`` (scipy, CPU): 2.3× faster when the kept rank is small (LoRA-like
    deltas), but 1.9× slower than torch's full ``eigh`` when it is not — and full
    fine-tuning deltas keep most directions above 1 % of σ₁ — so it is off by default.
    Large Grams on CPU (``n >= LOW_MEMORY_EIGH_N``) go through :func:`eigh_low_memory`;
    ``overwrite``: the caller's ``gram`` is scratch and may be destroyed there. ``refine``
    (float64 Grams): :func:`eigh_refined` first, the exact solvers where it gives up.
    """
    if refine and gram.dtype == torch.float64 and rank_rtol > 0:
        refined = eigh_refined(gram, rank_rtol)
        if refined is not None:
            return _truncate(refined[1], refined[0].clamp(min=0).sqrt(), rank_rtol)
    pairs, low_memory = None, False
    if partial_eigensolver and gram.device.type == "cpu" and rank_rtol > 0 and gram.shape[0] >= 64:
        pairs = _top_eigenpairs_scipy(gram, rank_rtol)
    if pairs is None and gram.device.type == "cpu" and gram.shape[0] >= LOW_MEMORY_EIGH_N:
        pairs = eigh_low_memory(gram, overwrite=overwrite)
        low_memory = pairs is not None
    evals, evecs = pairs if pairs is not None else torch.linalg.eigh(gram)
    # descending order; in place for large ones (a flip would copy them)
    evals, evecs = evals.flip(0), reverse_columns_(evecs) if low_memory else evecs.flip(1)
    sigma = evals.clamp(min=0).sqrt()
    return _truncate(evecs, sigma, rank_rtol)


LOW_MEMORY_EIGH_N = 2048
"""Gram size from which the CPU eigensolver is :func:`eigh_low_memory` (2.5× less memory)."""


def eigh_low_memory(gram: Tensor, *, overwrite: bool = False) -> tuple[Tensor, Tensor] | None:
    """Ascending eigenpairs of a symmetric float64 CPU matrix with LAPACK ``syevr`` on the matrix
    itself.

    torch's ``eigh`` (``syevd``) copies the matrix and takes ``2n²`` of workspace: with the
    eigenvectors, 4n² doubles besides the caller's matrix. ``syevr`` (scipy, ``overwrite_a``)
    works in the matrix and needs ``O(n)`` workspace: n² doubles besides it (2n² without
    ``overwrite``). At n = 6144 (DRM of an 8192×2048 matrix, 3 branches) that is 0.3 GB
    instead of 1.2 GB; it is 1.2–1.35× slower on one thread (``benchmarks/RESULTS.md`` § 6).
    Reads the lower triangle, as torch does. ``None`` without scipy.

    Example:
        >>> g = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> evals, evecs = eigh_low_memory(g)
        >>> evals
        tensor([1., 3.], dtype=torch.float64)
    """
    try:
        import scipy.linalg
    except ImportError:  # pragma: no cover - scipy is a dependency, keep torch's solver
        return None
    # The transposed view of a C-ordered matrix is Fortran-ordered: LAPACK works in it without
    # a copy, and its upper triangle is the matrix's lower one.
    fortran = gram.detach().numpy().T
    with _blas_threads(torch.get_num_threads()):
        evals, evecs = scipy.linalg.eigh(
            fortran, lower=False, driver="evr", overwrite_a=overwrite, check_finite=False
        )
    return torch.from_numpy(evals), torch.from_numpy(evecs)


def reverse_columns_(matrix: Tensor, block: int | None = None) -> Tensor:
    """Reverse the column order of ``matrix`` in place (a ``flip(1)`` without a full copy).

    ``block`` columns are swapped at a time (default: about 1 MiB of them, so the temporaries
    are reused from the heap rather than left in it).

    Example:
        >>> reverse_columns_(torch.arange(6.0).reshape(2, 3))
        tensor([[2., 1., 0.],
                [5., 4., 3.]])
    """
    n = matrix.shape[1]
    block = block or max(1, 2**20 // (matrix.shape[0] * matrix.element_size()))
    for start in range(0, n // 2, block):
        stop = min(start + block, n // 2)
        left = matrix[:, start:stop].clone()
        matrix[:, start:stop] = matrix[:, n - stop : n - start].flip(1)
        matrix[:, n - stop : n - start] = left.flip(1)
    return matrix


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype DRM computes coordinates in for deltas of ``dtype``: float32 for half precision.

    Half precision cannot hold DRM's maths: its rounding floor (``4·eps·√m`` of a branch's
    norm) reaches the whole norm for bfloat16 at m ≈ 1000, which would drop every column, and
    squared norms overflow float16. Half inputs are widened and the result rounded back.

    Example:
        >>> working_dtype(torch.bfloat16), working_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def basis_dtype(compute_dtype: torch.dtype, precision: BasisPrecision) -> torch.dtype:
    """The dtype the shared basis is computed in: float64, or the merge's compute dtype (at
    least float32, :func:`working_dtype`)."""
    if precision == "compute":
        return working_dtype(compute_dtype)
    if precision != "float64":
        raise ValueError(f"basis_precision must be 'float64' or 'compute', got {precision!r}")
    return torch.float64


def shared_basis(
    deltas: Tensor,
    *,
    rank_rtol: float = 1e-2,
    solver: Solver = "auto",
    precision: BasisPrecision = "float64",
    vectors_dtype: torch.dtype | None = None,
) -> SharedBasis:
    """Right singular vectors of the row stack ``[Δ_1; …; Δ_N]`` truncated at ``rank_rtol``.

    ``solver="svd"`` runs a thin SVD (of the transpose when the stack is wide, which LAPACK
    handles faster); ``"gram"`` runs ``eigh`` on the smaller Gram matrix — ``Σ Δ_iᵀΔ_i``
    (m×m) for a tall stack, ``D Dᵀ`` for a wide one — which gives the same vectors several
    times faster. ``"auto"`` picks ``"gram"`` except for tiny matrices. ``"refined"`` is the
    Gram route with the float64 basis from a float32 ``eigh`` and one float64 refinement step
    (:func:`eigh_refined`): the same basis (to float32 rounding) about 2× faster where the kept
    rank is well below the Gram's size (low-rank or LoRA-like deltas); where it is not
    (dense spectra around the rank cut, full fine-tunes) it falls back to the float64
    ``eigh`` after a wasted float32 one, so it is not the default.

    Precision: the Gram matrix squares the condition number, so a float32 Gram loses the
    small directions that renormalisation then makes as important as the large ones (up to
    2 % of the merged delta on 512×1408 … 2816×1024 matrices with decaying spectra). With
    ``precision="float64"`` (the default) the basis is computed in float64 whatever the
    deltas' dtype and returned in float64; the caller casts it to its compute dtype. Float32
    DRM is then within 1e-2 of the float64 merge (measured ≤ 4e-3) and closer than a float32
    SVD route, at 1.5–1.7× the time of the float32 Gram — the numbers are in
    ``benchmarks/RESULTS.md`` § 4 (``benchmarks/precision.py``).
    ``precision="compute"`` keeps the deltas' dtype (the faster, older behaviour).
    ``vectors_dtype``: the dtype the caller wants the vectors in; the wide-stack route then
    writes them in it block by block, without a full-size copy in the basis dtype.

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
    if solver not in ("svd", "gram", "refined"):
        raise ValueError(f"solver must be 'auto', 'svd', 'gram' or 'refined', got {solver!r}")
    refine = solver == "refined"
    if solver != "svd" and rows >= m:  # the usual case: one delta at a time in `dtype`
        return basis_from_gram(gram_of_rows(deltas, dtype), rank_rtol, refine=refine)
    if solver == "svd":
        stack = deltas.to(dtype).reshape(rows, m)
        if rows >= m:
            _, sigma, vh = torch.linalg.svd(stack, full_matrices=False)
            return _truncate(vh.mT, sigma, rank_rtol)
        u, sigma, _ = torch.linalg.svd(stack.mT, full_matrices=False)
        return _truncate(u, sigma, rank_rtol)
    # Wide stack: left singular vectors from the small Gram D Dᵀ, then V = Dᵀ U Σ⁻¹. Both
    # products run over column blocks of D, converted to `dtype` one block at a time: no
    # copy of the whole stack (a transposed one is not contiguous) and no float64 one.
    width = max(1, BLOCK_BYTES // (rows * torch.finfo(dtype).bits // 8))
    blocks = [slice(start, start + width) for start in range(0, m, width)]

    def column_block(block: slice) -> Tensor:
        return deltas[:, :, block].to(dtype).reshape(rows, -1)

    gram = deltas.new_zeros(rows, rows, dtype=dtype)
    for block in blocks:
        part = column_block(block)
        gram.addmm_(part, part.mT)
    del part
    left = basis_from_gram(gram, rank_rtol, overwrite=True, refine=refine)
    del gram
    vectors = deltas.new_empty(m, left.rank, dtype=vectors_dtype or dtype)
    for block in blocks:
        part = column_block(block).mT @ left.vectors
        part /= left.sigma
        vectors[block] = part
    del part
    return SharedBasis(vectors, left.sigma)


BLOCK_BYTES = 64 * 2**20
"""Bytes of one column block of the wide stack in the basis dtype (:func:`shared_basis`): far
below the Gram of a large stack, and above glibc's largest mmap threshold (32 MiB), so that a
freed block goes back to the system instead of staying in the heap (smaller blocks left up to
two stacks of retained heap in the process's RSS)."""


def gram_of_rows(deltas: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``Σ_i Δ_iᵀΔ_i`` (m×m) of (N, rows, m) deltas, accumulated in ``dtype`` (default: theirs).

    The sharded route calls it on each rank's rows and sums the partial Grams.
    """
    dtype = dtype or deltas.dtype
    m = deltas.shape[-1]
    gram = deltas.new_zeros(m, m, dtype=dtype)
    # the upper block triangle only, then mirrored: 5/8 of the full product's flops
    parts = GRAM_BLOCKS if m >= 256 else 1
    edges = [round(i * m / parts) for i in range(parts + 1)]
    for delta in deltas:
        delta = delta.to(dtype)
        for start, stop in zip(edges, edges[1:], strict=False):
            gram[start:stop, start:].addmm_(delta[:, start:stop].mT, delta[:, start:])
    for start, stop in zip(edges, edges[1:], strict=False):
        gram[stop:, start:stop] = gram[start:stop, stop:].mT
    return gram


GRAM_BLOCKS = 4
"""Column blocks of :func:`gram_of_rows`: the 4×4 block triangle costs 10/16 of the full
product (measured 0.46 s against 0.68 s for a 2816² float64 Gram of 3072 rows, one thread)."""


def lowrank_shared_basis(
    factors: Sequence[LowRankFactors],
    *,
    rank_rtol: float = 1e-2,
    precision: BasisPrecision = "float64",
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
