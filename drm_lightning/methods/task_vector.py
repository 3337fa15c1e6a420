"""Task-vector merging: task arithmetic, TIES, DARE and the weighted average as one method.

Every baseline is the same recipe on the branch deltas (task vectors) ``Δ_i`` of one tensor,
with steps switched on or off:

1. sparsify each branch on its own — ``magnitude`` (TIES: keep the largest ``density``
   fraction of ``|Δ_i|``) or ``random`` (DARE: keep each entry with probability
   ``density``), optionally rescaled;
2. elect a sign per entry by mass and drop the entries that disagree (TIES);
3. multiply branch i by its coefficient ``w_i`` and sum;
4. optionally normalise (disjoint mean, or division by the weight sum);
5. multiply by the global ``scaling`` λ.

The registered names are presets of :class:`TaskVectorMethod`:

================  ===========  =====  ==================================================
name              sparsify     elect  paper
================  ===========  =====  ==================================================
task_arithmetic   none         no     Ilharco et al., arXiv:2212.04089
ties              magnitude    yes    Yadav et al., arXiv:2306.01708
dare_ties         random       yes    Yu et al., arXiv:2311.03099 (+ TIES)
dare_linear       random       no     Yu et al., arXiv:2311.03099
linear            none         no     Wortsman et al., arXiv:2203.05482 (normalize fixed)
================  ===========  =====  ==================================================

Example:
    >>> import torch
    >>> x = torch.tensor([[1.0, -4.0, -2.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    >>> task_vector_merge(x, torch.ones(2, dtype=x.dtype), elect_signs=True, normalize=True)
    tensor([ 1.0000, -2.5000, -1.5000], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from drm_lightning.methods._sparsify import (
    RescaleRule,
    bernoulli_mask,
    magnitude_mask,
    magprune_probabilities,
    outlier_mask,
    rescale_masked,
)
from drm_lightning.methods.base import MergeMethod, Route
from drm_lightning.methods.ops import CountRule, check_merge_inputs, kept_count
from drm_lightning.methods.rowwise import (
    SERIAL,
    DeltaRows,
    MagnitudeCut,
    PieceRunner,
    StoredPiece,
    StoredRows,
    row_spans,
)
from drm_lightning.methods.task_vector_params import (  # noqa: F401 - re-exported names
    DEFAULT_DENSITY,
    SPARSIFY_MODES,
    WEIGHT_SUM_EPS,
    BreadcrumbsParams,
    Convention,
    DellaParams,
    Sparsify,
    TaskVectorParams,
    convention_count_rule,
    default_normalize,
    default_rescale,
    family_name,
    normalizing_weight_sum,
    weight_sum_problem,
)


def sparsify_branches(
    deltas: Tensor,
    *,
    sparsify: Sparsify,
    density: float,
    rescale: RescaleRule = "none",
    count_rule: CountRule = "floor",
    generator: torch.Generator | None = None,
    mask_dtype: torch.dtype | None = None,
    gamma: float = 0.0,
    epsilon: float = 0.0,
) -> Tensor:
    """Sparsify every branch of an (N, ...) stack on its own; ``density >= 1`` is a no-op.

    Random masks are drawn branch by branch, in order, from ``generator`` (required for
    ``random`` and ``magprune``) with probabilities of ``mask_dtype`` (default: the deltas'
    dtype). ``magnitude_outliers`` (Model Breadcrumbs) keeps ``int(density·numel)`` entries
    after dropping the ``int(gamma·numel)`` largest; ``magprune`` (DELLA) keeps each entry
    with a probability from ``density - epsilon`` (smallest of its row) to
    ``density + epsilon`` (largest) (:func:`~._sparsify.magprune_probabilities`).

    Example:
        >>> d = torch.tensor([[3.0, 1.0, 0.5, 2.0], [0.1, 0.2, -0.3, 0.4]])
        >>> sparsify_branches(d, sparsify="magnitude", density=0.5)
        tensor([[ 3.0000,  0.0000,  0.0000,  2.0000],
                [ 0.0000,  0.0000, -0.3000,  0.4000]])
    """
    if sparsify == "none" or density >= 1:
        return deltas
    if sparsify in ("random", "magprune") and generator is None:
        raise ValueError(f"random sparsification ({sparsify}) needs a torch.Generator")
    out = torch.empty_like(deltas)
    for i, delta in enumerate(deltas):
        if sparsify == "magnitude":
            mask = magnitude_mask(delta, kept_count(delta.numel(), density, rule=count_rule))
        elif sparsify == "random":
            assert generator is not None
            mask = bernoulli_mask(
                delta.shape, density, generator=generator, dtype=mask_dtype or delta.dtype
            ).to(delta.device)
        elif sparsify == "magnitude_outliers":
            numel = delta.numel()
            keep = int(density * numel)  # fewer outliers dropped where keep + top > numel
            mask = outlier_mask(delta, keep, min(int(gamma * numel), numel - keep))
        elif sparsify == "magprune":
            assert generator is not None
            probs = magprune_probabilities(delta, density, epsilon, mask_dtype or delta.dtype)
            draws = torch.bernoulli(probs.to(generator.device), generator=generator)
            mask = draws.to(delta.device).bool().reshape(delta.shape)
        else:
            raise ValueError(f"unknown sparsify {sparsify!r} (valid: {', '.join(SPARSIFY_MODES)})")
        torch.mul(delta, mask, out=out[i])
        if rescale != "none":
            out[i] = rescale_masked(delta, out[i], how=rescale, density=density)
    return out


def combine_branches(
    deltas: Tensor,
    coefficients: Tensor,
    *,
    elect_signs: bool,
    normalize: bool,
    convention: Convention = "peft",
) -> Tensor:
    """Weight, optionally elect signs, sum and optionally normalise an (N, ...) stack.

    With ``elect_signs`` the sign of each entry is that of the summed mass (``+1`` on an exact
    zero sum, as both libraries); ``peft`` votes with the unweighted deltas and normalises by
    the number of agreeing non-zero entries, ``mergekit`` votes with the weighted deltas and
    normalises by the sum of the agreeing weights. Without election, ``normalize`` divides by
    the sum of all weights (a weighted average).

    Example:
        >>> d = torch.tensor([[2.0, 1.0], [-4.0, 3.0]])
        >>> w = torch.tensor([3.0, 1.0])
        >>> combine_branches(d, w, elect_signs=True, normalize=True, convention="peft")
        tensor([-4.,  3.])
        >>> combine_branches(d, w, elect_signs=True, normalize=True, convention="mergekit")
        tensor([2.0000, 1.5000])
    """
    weights = coefficients.to(dtype=deltas.dtype, device=deltas.device)
    # Every sum over branches runs branch by branch, in branch order, from zero: the order of
    # torch's ``sum(dim=0)`` (and of the libraries, which call it) for N <= 4; from N = 5 torch
    # sums some columns in another order, chosen by the CPU's vector width, so a fixed order
    # keeps results the same on every CPU (and equal to the fused kernels, methods/_fused.py).
    # As torch's sum, a half-precision stack is summed in float32 and rounded once.
    n_branches = deltas.shape[0]
    acc = torch.float32 if deltas.dtype in (torch.bfloat16, torch.float16) else deltas.dtype
    if not elect_signs:
        total = torch.zeros_like(deltas[0], dtype=acc)
        for i in range(n_branches):
            total += deltas[i] * weights[i]
        total = total.to(deltas.dtype)
        weight_sum = normalizing_weight_sum(weights) if normalize else None
        return total if weight_sum is None else total / weight_sum
    if convention not in ("peft", "mergekit"):
        raise ValueError(f"convention must be 'peft' or 'mergekit', got {convention!r}")
    # Branch by branch, no N-sized temporaries.
    mass = torch.zeros_like(deltas[0], dtype=acc)
    for i in range(n_branches):
        mass += deltas[i] if convention == "peft" else deltas[i] * weights[i]
    # The elected sign (+1 on an exact zero sum, both libraries) as a ±1 factor: an entry
    # agrees when it is non-zero and has that sign.
    elected = torch.where(mass >= 0, 1.0, -1.0).to(deltas.dtype)
    del mass
    zero = torch.zeros((), dtype=deltas.dtype, device=deltas.device)
    total = torch.zeros_like(deltas[0], dtype=acc)
    divisor = torch.zeros_like(deltas[0], dtype=acc) if normalize else None
    for i in range(n_branches):
        weighted = deltas[i] * weights[i]
        voter = deltas[i] if convention == "peft" else weighted
        agree = (voter * elected) > 0
        total += torch.where(agree, weighted, zero)
        if divisor is not None:
            divisor += agree if convention == "peft" else torch.where(agree, weights[i], zero)
    total = total.to(deltas.dtype)
    if divisor is None:
        return total
    divisor = divisor.to(deltas.dtype)
    if convention == "peft":
        return total / divisor.clamp_(min=1)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def task_vector_merge(
    deltas: Tensor,
    coefficients: Tensor,
    *,
    sparsify: Sparsify = "none",
    density: float = 1.0,
    elect_signs: bool = False,
    normalize: bool = False,
    rescale: RescaleRule = "none",
    convention: Convention = "peft",
    scaling: float = 1.0,
    generator: torch.Generator | None = None,
    gamma: float = 0.0,
    epsilon: float = 0.0,
) -> Tensor:
    """Merge the (N, ...) branch deltas of one tensor into one delta (the whole recipe).

    Args:
        deltas: (N, ...) task vectors, branches on dim 0.
        coefficients: (N,) per-branch weights ``w_i``.
        sparsify: ``none``, ``magnitude`` (TIES trim), ``random`` (DARE drop),
            ``magnitude_outliers`` (Model Breadcrumbs) or ``magprune`` (DELLA).
        density: fraction of entries kept per branch, in (0, 1].
        elect_signs: TIES sign election and disjoint merge.
        normalize: disjoint mean / weight-sum division (see :func:`combine_branches`).
        rescale: rescale rule of the sparsified branches (see :mod:`._sparsify`).
        convention: ``peft`` or ``mergekit`` (see :class:`TaskVectorMethod`).
        scaling: global λ multiplying the merged delta.
        generator: random source of ``random`` and ``magprune`` sparsification.
        gamma: fraction of largest entries dropped by ``magnitude_outliers``.
        epsilon: half-width of ``magprune``'s keep-probabilities around ``density``.

    Returns:
        The merged delta, shaped like one branch, in the deltas' dtype.

    Raises:
        ValueError: non-float deltas or coefficients, NaN/Inf in them (naming the branch), or
            a normalised merge whose coefficients do not sum to > 0 (:func:`weight_sum_problem`).

    Example:
        >>> d = torch.tensor([[1.0, 2.0], [3.0, -2.0]])
        >>> task_vector_merge(d, torch.tensor([0.5, 0.5]), scaling=2.0)
        tensor([4., 0.])
    """
    if deltas.dim() < 1 or deltas.shape[0] == 0:
        raise ValueError(
            f"deltas must be stacked on dim 0 with N >= 1, got shape {tuple(deltas.shape)}"
        )
    if coefficients.shape != (deltas.shape[0],):
        raise ValueError(
            f"coefficients must have shape ({deltas.shape[0]},) to match deltas "
            f"{tuple(deltas.shape)}, got {tuple(coefficients.shape)}"
        )
    check_merge_inputs(deltas, coefficients)
    if normalize:
        problem = weight_sum_problem(
            [float(c) for c in coefficients.tolist()],
            method=family_name(sparsify, elect_signs, normalize),
            elect_signs=elect_signs,
            normalize=normalize,
            convention=convention,
        )
        if problem:
            raise ValueError(problem)
    mask_dtype = None
    if convention == "mergekit" and deltas.dtype != torch.bfloat16:
        mask_dtype = torch.float32  # mergekit draws DARE masks in float32 on CPU
    sparse = sparsify_branches(
        deltas,
        sparsify=sparsify,
        density=density,
        rescale=rescale,
        count_rule=convention_count_rule(convention),
        generator=generator,
        mask_dtype=mask_dtype,
        gamma=gamma,
        epsilon=epsilon,
    )
    merged = combine_branches(
        sparse, coefficients, elect_signs=elect_signs, normalize=normalize, convention=convention
    )
    return merged * scaling if scaling != 1 else merged


def task_vector_merge_rows(
    read: DeltaRows,
    shape: Sequence[int],
    coefficients: Tensor,
    *,
    piece_rows: int,
    sparsify: Sparsify = "none",
    density: float = 1.0,
    elect_signs: bool = False,
    normalize: bool = False,
    rescale: RescaleRule = "none",
    convention: Convention = "peft",
    scaling: float = 1.0,
) -> Iterator[Tensor]:
    """:func:`task_vector_merge` of a tensor read in row pieces, yielded piece by piece.

    Every step but the magnitude trim is entry-wise; the trim's per-branch cut over the whole
    tensor comes from :class:`~drm_lightning.methods.rowwise.MagnitudeCut` (two passes over
    the pieces in float32) with the same count and the same ties. Random sparsification and
    the ``l1`` rescale depend on the whole branch in order and are not offered here.

    Example:
        >>> d = torch.tensor([[[1.0], [-4.0], [-2.0], [0.5]], [[-1.0], [-1.5], [-0.5], [3.0]]])
        >>> pieces = task_vector_merge_rows(lambda a, b: d[:, a:b], (4, 1), torch.ones(2),
        ...     piece_rows=3, sparsify="magnitude", density=0.5, elect_signs=True, normalize=True)
        >>> torch.cat(list(pieces)).squeeze(1)
        tensor([ 0.0000, -2.7500, -2.0000,  3.0000])
    """
    if sparsify != "none" and density < 1 and (sparsify == "random" or rescale == "l1"):
        raise ValueError("random sparsification and the l1 rescale need the whole tensor")
    spans = row_spans(int(shape[0]), piece_rows)
    masks = None
    if sparsify == "magnitude" and density < 1:
        numel = math.prod(int(s) for s in shape)
        keep = kept_count(numel, density, rule=convention_count_rule(convention))
        keeps = [keep] * int(coefficients.shape[0])
        masks = MagnitudeCut(read, spans, keeps, numel, coefficients.dtype).masks()
    for start, stop in spans:
        deltas = read(start, stop)
        if masks is not None:
            deltas = deltas * masks(deltas)
            if rescale != "none":
                deltas = rescale_masked(deltas, deltas, how=rescale, density=density)
        merged = combine_branches(
            deltas,
            coefficients,
            elect_signs=elect_signs,
            normalize=normalize,
            convention=convention,
        )
        yield merged * scaling if scaling != 1 else merged


class TaskVectorMethod(MergeMethod):
    """Task arithmetic, TIES, DARE-TIES, DARE-linear and linear averaging, one class.

    Entry-wise on the branch deltas, so the 2-D route and the fallback route run the same
    recipe (:func:`task_vector_merge`); LoRA branches are densified per matrix. Runs once per
    tensor, independently, which makes it safe for any sharding: a tensor only needs its own
    N deltas. Papers: task arithmetic (Ilharco et al., arXiv:2212.04089), TIES (Yadav et al.,
    arXiv:2306.01708), DARE (Yu et al., arXiv:2311.03099), model soups / weighted average
    (Wortsman et al., arXiv:2203.05482).

    Parameters (:class:`TaskVectorParams`): ``density``, ``scaling``, ``normalize``,
    ``rescale``, ``convention``, ``seed``.

    Conventions (``convention``), measured against PEFT 0.21 ``peft.utils.merge_utils`` and
    mergekit 0.1.5 ``GeneralizedTaskArithmeticMerge``:

    =====================  ================================  ================================
    step                   ``peft`` (default)                ``mergekit``
    =====================  ================================  ================================
    magnitude keep count   ``int(density·numel)`` per        ``max(1, int(density·numel))``
                           tensor (may keep nothing)
    DARE rescale           ``/ density``                     × ``‖Δ‖₁ / ‖masked Δ‖₁`` (L1
                                                             match; none if a norm < 1e-7)
    DARE mask draw         ``bernoulli`` in delta's dtype    ``bernoulli`` in float32
    sign election          on UNWEIGHTED trimmed deltas      on WEIGHTED trimmed deltas
    divisor with           number of agreeing non-zero       sum of the agreeing weights
    ``normalize``          entries (a 0-weight branch        (a 0-weight branch takes no
                           still votes and counts)           part)
    ``normalize`` default  ties, dare_ties: on; else off     ties: on; else off
    =====================  ================================  ================================

    Shared by both: a zero mass sum elects ``+``; ``normalize=False`` sums the agreeing
    weighted entries; without election ``normalize`` divides by the weight sum (``linear``,
    where it is fixed on); ``scaling`` multiplies last (mergekit's ``lambda``). With equal
    weights of 1 the two conventions give the same TIES result. Known residual differences:
    mergekit ranks float32-rounded magnitudes on CPU and computes DARE's L1 rescale in
    float32, so float64 results agree to ~1e-7 relative there (bit-equal in float32); among
    exactly tied magnitudes at the cut mergekit's unstable sort may keep other entries.

    Randomness (DARE): masks come from the ``generator`` the caller passes (the merge loop
    seeds one per tensor name), drawn branch by branch in order on the generator's device;
    with no generator, one seeded with ``seed`` is made per call. Seeding the global RNG of
    PEFT/mergekit with the same value reproduces their masks bit for bit.

    Example:
        >>> from drm_lightning.methods import get_method
        >>> ties = get_method("ties", density=0.5)
        >>> x = torch.tensor([[1.0, -4.0, -2.0, 0.5], [-1.0, -1.5, -0.5, 3.0]])
        >>> ties.merge_fallback(x, torch.ones(2))
        tensor([ 0.0000, -2.7500, -2.0000,  3.0000])
    """

    name = "task_vector"
    paper = (
        "Ilharco et al. arXiv:2212.04089; Yadav et al. arXiv:2306.01708; "
        "Yu et al. arXiv:2311.03099; Wortsman et al. arXiv:2203.05482"
    )
    Params = TaskVectorParams

    def __init__(self, **params: Any) -> None:
        # Errors name the family the preset selects ("ties.density: ..."), not "task_vector".
        self.name = family_name(
            params.get("sparsify", "none"),
            params.get("elect_signs", False),
            params.get("normalize"),
        )
        super().__init__(**params)
        self.params: TaskVectorParams

    def coefficient_problem(self, coefficients: Sequence[float]) -> str | None:
        """A normalised merge needs a positive coefficient sum (:func:`weight_sum_problem`)."""
        p = self.params
        assert p.normalize is not None
        return weight_sum_problem(
            coefficients,
            method=getattr(self, "registered_name", self.name),
            elect_signs=p.elect_signs,
            normalize=p.normalize,
            convention=p.convention,
        )

    @property
    def uses_randomness(self) -> bool:
        """True for DARE and DELLA with ``density < 1``."""
        p = self.params
        return p.sparsify in ("random", "magprune") and p.density is not None and p.density < 1

    def merge_matrix(
        self, deltas: Tensor, coefficients: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Merge the (N, *shape) deltas of one tensor (any shape: entry-wise)."""
        p = self.params
        if self.uses_randomness and generator is None:
            generator = torch.Generator().manual_seed(p.seed)
        return task_vector_merge(
            deltas, coefficients, generator=generator, **p.recipe(), **p.sparsify_options()
        )

    merge_fallback = merge_matrix

    def merges_in_rows(self, route: Route, shape: Sequence[int], n_branches: int) -> bool:
        """Every preset but DARE and DELLA (random masks drawn over the whole branch in
        order) and breadcrumbs (its band of ranks is cut over the whole branch)."""
        p = self.params
        banded = p.sparsify == "magnitude_outliers" and p.density is not None and p.density < 1
        return route != "ignore" and not self.uses_randomness and p.rescale != "l1" and not banded

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
        """:func:`task_vector_merge_rows` with these parameters (the whole tensor at once for
        DARE)."""
        if not self.merges_in_rows(route, shape, int(coefficients.shape[0])):
            yield from super().merge_rows(
                route, read, shape, coefficients, piece_rows=piece_rows, generator=generator
            )
            return
        yield from task_vector_merge_rows(
            read, shape, coefficients, piece_rows=piece_rows, **self.params.recipe()
        )

    def merge_stored_rows(
        self,
        route: Route,
        read: StoredRows,
        shape: Sequence[int],
        coefficients: Tensor,
        *,
        piece_rows: int,
        stored: Sequence[torch.dtype],
        out_dtype: torch.dtype,
        compute_dtype: torch.dtype,
        runner: PieceRunner = SERIAL,
    ) -> Iterator[StoredPiece] | None:
        """The fused CPU route
        (:func:`~drm_lightning.methods.task_vector_fused.task_vector_merge_stored_rows`) where it
        applies: every preset that merges in rows, bfloat16 or float32 inputs, float32 maths."""
        from drm_lightning.methods.task_vector_fused import (
            stored_rows_supported,
            task_vector_merge_stored_rows,
        )

        if (
            not self.merges_in_rows(route, shape, int(coefficients.shape[0]))
            or coefficients.device.type != "cpu"
        ):
            return None
        recipe = self.params.recipe()  # the fused route takes no rescale: none is supported
        rescale = recipe.pop("rescale")
        if recipe["density"] >= 1:
            recipe["sparsify"] = "none"
        if recipe["sparsify"] == "none":
            rescale = "none"
        options = {"sparsify": recipe["sparsify"], "convention": recipe["convention"]}
        if not stored_rows_supported(stored, out_dtype, compute_dtype, rescale=rescale, **options):
            return None
        return task_vector_merge_stored_rows(
            read,
            shape,
            coefficients,
            piece_rows=piece_rows,
            out_dtype=out_dtype,
            runner=runner,
            **recipe,
        )

    def cost(self, route: Route, shape: Sequence[int], n_branches: int) -> float:
        """Entry-wise passes over the stack, plus a top-k per branch for magnitude trims."""
        if route == "ignore":
            return 0.0
        numel = math.prod(int(s) for s in shape)
        per_entry = 8.0
        if self.params.sparsify in ("magnitude", "magnitude_outliers", "magprune"):
            per_entry += math.log2(max(numel, 2))
        if self.params.sparsify in ("random", "magprune"):
            per_entry += 4.0
        return float(per_entry * numel * n_branches)


class BreadcrumbsMethod(TaskVectorMethod):
    """Model Breadcrumbs (Davari & Belilovsky, arXiv:2312.06795) as mergekit runs it: each
    branch keeps the band of ``density`` of its entries below the ``gamma`` largest
    magnitudes (``sparsify="magnitude_outliers"``), then the task-vector recipe; with
    ``elect_signs`` (``breadcrumbs_ties``) TIES's sign election. Parameters: those of
    :class:`TaskVectorMethod` plus ``gamma`` (:class:`BreadcrumbsParams`).

    Example:
        >>> from drm_lightning.methods import get_method
        >>> m = get_method("breadcrumbs", density=0.5, gamma=0.25)
        >>> m.merge_fallback(torch.tensor([[4.0, -1.0, 3.0, 0.5]]), torch.ones(1))
        tensor([ 0., -1.,  3.,  0.])
    """

    paper = "Davari & Belilovsky, arXiv:2312.06795"
    Params = BreadcrumbsParams


class DellaMethod(TaskVectorMethod):
    """DELLA (Deep et al., arXiv:2406.11617) as mergekit runs it: MagPrune keeps each entry
    with a probability rising with its magnitude rank in its row, from ``density - epsilon``
    to ``density + epsilon`` (``sparsify="magprune"``), rescales each branch to its L1 norm,
    then the task-vector recipe; ``della`` elects signs (TIES), ``della_linear`` sums.
    Parameters: those of :class:`TaskVectorMethod` plus ``epsilon`` (:class:`DellaParams`).

    Example:
        >>> from drm_lightning.methods import get_method
        >>> m = get_method("della", density=0.5, epsilon=0.1)
        >>> m.uses_randomness, m.params.rescale, m.params.convention
        (True, 'l1', 'mergekit')
    """

    paper = "Deep et al., arXiv:2406.11617"
    Params = DellaParams
