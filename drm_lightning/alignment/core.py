"""Alignment methods by name, the MuDSC coordinate ascent, and what a matching produces.

Every method of MuDSC's comparison is one :class:`AlignmentMethod` configuration: a
similarity (none / weight / activation / dual) and a solver (Align / Zip).

=================== ============ ====== ============================================
name                similarity   solver paper
=================== ============ ====== ============================================
``weight_average``  none         —      identity matching (plain averaging)
``weight_matching`` weight       align  Git Re-Basin weight matching (Ainsworth 2023)
``weight_zip``      weight       zip    "W. Zip" (MuDSC's ablation)
``activation_align`` activation  align  activation Re-Basin / "A. Align"
``zipit``           activation   zip    ZipIt! without partial zip (Stoica 2024)
``mudsc_align``     dual         align  MuDSC-Align (Xu et al., CVPR 2024)
``mudsc_zip``       dual         zip    MuDSC-Zip (Xu et al., CVPR 2024)
=================== ============ ====== ============================================

Example:
    >>> import torch
    >>> from drm_lightning.alignment.spec import PermSpec
    >>> spec = PermSpec.declare({"h": {"out": ["0.weight", "0.bias"], "in": ["2.weight"]}})
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    ...         for _ in range(2)]
    >>> result = get_alignment("weight_matching").solve([n.state_dict() for n in nets], spec)
    >>> result.matchings["h"].assign.shape
    torch.Size([8, 4])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from drm_lightning.alignment.similarity import mix, weight_similarity
from drm_lightning.alignment.solvers import Matching, align_match, identity_matching, zip_match
from drm_lightning.alignment.spec import PermSpec
from drm_lightning.alignment.transforms import transform_state_dict
from drm_lightning.methods.base import MethodParams, build_params, closest_names
from drm_lightning.methods.ops import check_finite, inputs_checked

Similarity = Literal["none", "weight", "activation", "dual"]
Solver = Literal["align", "zip"]


class AlignmentParams(MethodParams):
    """Parameters of every alignment method (frozen; unknown names rejected)."""

    similarity: Similarity = "dual"
    solver: Solver = "zip"
    fix_rate: float = Field(
        0.5, ge=0.0, le=1.0, description="alpha: weight of the weight-space similarity"
    )
    max_sweeps: int = Field(100, ge=1, description="coordinate-ascent sweeps at most")
    patience: int = Field(5, ge=1, description="stop after this many sweeps without improvement")
    seed: int = Field(0, description="seed of the random group order")
    zip_decay: float = Field(
        0.5, description="ZipIt alpha: similarity decay of a merged unit (<= 0: forbid)"
    )
    zip_budget: float = Field(
        1.0, ge=0.0, description="ZipIt beta: within-model merges, fraction of R/N"
    )
    cosine: bool = Field(False, description="cosine instead of Pearson for the weight similarity")
    merge_eps: float = Field(
        0.0, ge=0.0, description="1e-5 reproduces the reference's colsum + 1e-5"
    )


def check_models_finite(state_dicts: Sequence[Mapping[str, Tensor]]) -> None:
    """Raise ``ValueError`` naming the tensor and the model (``'0.weight' in model 1 contains 1
    NaN ...``) if a model's weights hold NaN or Inf, unless the caller checked them
    (:func:`~drm_lightning.methods.ops.finite_inputs_checked`). The solvers would fail on them
    with unrelated errors, and averaging would return NaN weights."""
    if inputs_checked():
        return
    for i, sd in enumerate(state_dicts):
        for key, value in sd.items():
            if isinstance(value, Tensor):
                check_finite(key, value.detach(), f"model {i}")


@dataclass
class AlignmentResult:
    """The matchings of every group, the objective reached and the sweeps it took."""

    spec: PermSpec
    matchings: dict[str, Matching]
    objective: float = 0.0
    sweeps: int = 0
    history: list[float] = field(default_factory=list)
    merge_eps: float = 0.0

    def merged_state_dict(self, state_dicts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """The merged weights: unit means, consumers through the unmerge matrices (spec §7).

        Parameters in no group are averaged (non-float ones taken from model 0). Results
        have model 0's dtypes. NaN/Inf in a model raise ``ValueError``
        (:func:`check_models_finite`).
        """
        check_models_finite(state_dicts)
        n = len(state_dicts)
        acc: dict[str, Tensor] = {}
        for i, sd in enumerate(state_dicts):

            def pick(m, g, _i=i):
                match = self.matchings[g]
                return match.merge(_i, self.merge_eps) if m.role == "out" else match.unmerge(_i)

            mapped = transform_state_dict(sd, self.spec, pick, dtype=torch.float64)
            for k, v in mapped.items():
                if v.is_floating_point():
                    acc[k] = acc[k] + v.double() if k in acc else v.double()
        ref = state_dicts[0]
        return {k: (acc[k] / n).to(v.dtype) if k in acc else v.clone() for k, v in ref.items()}

    def is_permutation(self) -> bool:
        """True when every merged unit holds exactly one unit of every model (Align)."""
        for m in self.matchings.values():
            for i in range(m.n_models):
                u = m.unmerge(i)
                if not (torch.all(u.sum(0) == 1) and torch.all(u.sum(1) == 1)):
                    return False
        return True

    def aligned_state_dicts(
        self, state_dicts: Sequence[Mapping[str, Tensor]]
    ) -> list[dict[str, Tensor]]:
        """Every model permuted into model 0's unit order (exact; Align matchings only).

        Raises:
            ValueError: a matching is not a permutation (a Zip solver merged units within a
                model): use an Align method (``mudsc_align``, ``activation_align``,
                ``weight_matching``) to align before another merge method.
        """
        if not self.is_permutation():
            raise ValueError(
                "these matchings are not permutations (a Zip solver merged units within a model); "
                "align with 'mudsc_align', 'activation_align' or 'weight_matching' instead"
            )
        return [
            transform_state_dict(sd, self.spec, lambda m, g, _i=i: self.matchings[g].unmerge(_i))
            for i, sd in enumerate(state_dicts)
        ]


class AlignmentMethod:
    """One configuration of the MuDSC machinery (see the table in the module docstring).

    :meth:`solve` runs Algorithm 1 of the paper: activation similarities are fixed; the
    matchings start from them (or from nothing, weight-only); then groups are visited in a
    seeded random order, each re-solved on ``α·S_weight + (1 − α)·S_act`` with its
    neighbours' current matchings, for at most ``max_sweeps`` sweeps, stopping after
    ``patience`` sweeps without improvement and returning the best matchings seen (a sweep
    without improvement restarts from the best).
    """

    paper: ClassVar[str] = (
        "Xu et al., Training-Free Pretrained Model Merging, CVPR 2024 (arXiv 2403.01753)"
    )

    def __init__(self, name: str = "mudsc_zip", **params: Any) -> None:
        self.name = name
        self.params: AlignmentParams = build_params(name, AlignmentParams, params)

    def __repr__(self) -> str:
        return f"AlignmentMethod({self.name!r}, {self.params!r})"

    @property
    def needs_activations(self) -> bool:
        """True when the method reads activations (calibration batches are required)."""
        return self.params.similarity in ("activation", "dual")

    def _units(self, spec: PermSpec) -> list[list[str]]:
        units: dict[str, list[str]] = {}
        for g in spec.groups:
            units.setdefault(g.link or f"\0{g.name}", []).append(g.name)
        return list(units.values())

    def _solve(
        self, spec: PermSpec, unit: list[str], sims: list[Tensor], n: int, sizes: Mapping[str, int]
    ) -> dict[str, Matching]:
        heads = spec[unit[0]].num_groups
        c = sizes[unit[0]]
        if self.params.solver == "align":
            found = align_match(sims, n, c, heads)
        else:
            found = zip_match(
                sims, n, c, heads, decay=self.params.zip_decay, budget=self.params.zip_budget
            )
        return dict(zip(unit, found))

    def solve(
        self,
        state_dicts: Sequence[Mapping[str, Tensor]],
        spec: PermSpec,
        activation_sims: Mapping[str, Tensor] | None = None,
    ) -> AlignmentResult:
        """Match the units of N ≥ 2 models (model 0 is the anchor of Align).

        Args:
            state_dicts: The models' weights (same keys and shapes).
            spec: The permutation groups.
            activation_sims: ``{group: (N·C, N·C)}`` from
                :func:`~drm_lightning.alignment.activations.activation_similarity`; required
                by activation and dual methods.

        Raises:
            ValueError: fewer than 2 models, a spec that does not fit them, NaN/Inf in a
                model's weights (:func:`check_models_finite`), missing similarities.
        """
        p = self.params
        n = len(state_dicts)
        if n < 2:
            raise ValueError(f"alignment needs at least 2 models, got {n}")
        sizes = spec.check(state_dicts)
        check_models_finite(state_dicts)
        sds = [{k: v.detach().cpu() for k, v in sd.items()} for sd in state_dicts]
        eps = p.merge_eps
        if p.similarity == "none":
            match = {g: identity_matching(n, sizes[g]) for g in sizes}
            return AlignmentResult(spec, match, merge_eps=eps)
        act = dict(activation_sims or {})
        if self.needs_activations:
            missing = [g for g in sizes if g not in act]
            if missing:
                raise ValueError(
                    f"method {self.name!r} needs activation similarities for groups {missing}"
                )
        units = self._units(spec)
        match: dict[str, Matching] = {}
        if self.needs_activations:
            for unit in units:
                match.update(self._solve(spec, unit, [act[g] for g in unit], n, sizes))
            if p.similarity == "activation":
                return AlignmentResult(spec, match, _objective(match), 0, [], eps)
        rng = np.random.default_rng(p.seed)
        best: dict[str, Matching] | None = None
        best_obj, stall, history, sweeps = -np.inf, 0, [], 0
        for sweeps in range(1, p.max_sweeps + 1):
            for k in rng.permutation(len(units)):
                unit = units[k]
                sims = []
                for g in unit:
                    w = weight_similarity(sds, spec, spec[g], match, cosine=p.cosine, merge_eps=eps)
                    sims.append(mix(w, act.get(g), p.fix_rate) if self.needs_activations else w)
                match.update(self._solve(spec, unit, sims, n, sizes))
            obj = _objective(match)
            history.append(obj)
            if best is not None and obj <= best_obj:
                stall += 1
                if stall >= p.patience:
                    break
                match = dict(best)
            else:
                stall, best, best_obj = 0, dict(match), obj
        assert best is not None
        return AlignmentResult(spec, best, float(best_obj), sweeps, history, eps)


def _objective(match: Mapping[str, Matching]) -> float:
    return float(np.mean([m.value for m in match.values()])) if match else 0.0


_PRESETS: dict[str, dict[str, Any]] = {}


def register_alignment(name: str, **preset: Any) -> None:
    """Register an alignment method: a name for fixed ``similarity`` / ``solver`` settings."""
    if name in _PRESETS:
        raise ValueError(f"alignment method {name!r} is already registered")
    build_params(name, AlignmentParams, preset)
    _PRESETS[name] = preset


def available_alignments() -> list[str]:
    """Names accepted by :func:`get_alignment`.

    Example:
        >>> available_alignments()  # doctest: +NORMALIZE_WHITESPACE
        ['activation_align', 'mudsc_align', 'mudsc_zip', 'weight_average', 'weight_matching',
         'weight_zip', 'zipit']
    """
    return sorted(_PRESETS)


def get_alignment(name: str, **params: Any) -> AlignmentMethod:
    """The registered alignment method ``name`` with ``params`` (``ValueError`` with close names).

    Example:
        >>> get_alignment("mudsc_zip", fix_rate=0.3).params.fix_rate
        0.3
    """
    if name not in _PRESETS:
        raise ValueError(
            f"unknown alignment method {name!r} ({closest_names(name, list(_PRESETS))})"
        )
    preset = _PRESETS[name]
    fixed = sorted(set(params) & set(preset))
    if fixed:
        raise ValueError(f"parameter(s) {fixed} are fixed by alignment method {name!r}")
    return AlignmentMethod(name, **preset, **params)


register_alignment("weight_average", similarity="none", solver="align")
register_alignment("weight_matching", similarity="weight", solver="align")
register_alignment("weight_zip", similarity="weight", solver="zip")
register_alignment("activation_align", similarity="activation", solver="align")
register_alignment("zipit", similarity="activation", solver="zip")
register_alignment("mudsc_align", similarity="dual", solver="align")
register_alignment("mudsc_zip", similarity="dual", solver="zip")

__all__ = [
    "AlignmentMethod",
    "AlignmentParams",
    "AlignmentResult",
    "available_alignments",
    "check_models_finite",
    "get_alignment",
    "register_alignment",
]
