"""The parameters of the task-vector family and their per-preset defaults.

:class:`TaskVectorParams` validates a preset's settings (``density``, ``normalize``,
``rescale``, ``convention`` ...) and fills in the defaults each library uses for that preset
(:func:`default_normalize`, :func:`default_rescale`); :func:`family_name` names a
configuration in messages. The recipe itself is :mod:`drm_lightning.methods.task_vector`.

Example:
    >>> TaskVectorParams(sparsify="random", elect_signs=True).density
    0.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch  # noqa: F401 - the doctests use it
from pydantic import Field, ValidationInfo, field_validator, model_validator
from torch import Tensor

from drm_lightning.methods._sparsify import RescaleRule
from drm_lightning.methods.base import MethodParams
from drm_lightning.methods.ops import CountRule

Sparsify = Literal["none", "magnitude", "random", "magnitude_outliers", "magprune"]
Convention = Literal["peft", "mergekit"]
SPARSIFY_MODES: tuple[str, ...] = ("none", "magnitude", "random", "magnitude_outliers", "magprune")
MERGEKIT_ONLY: tuple[str, ...] = ("magnitude_outliers", "magprune")
"""Modes only mergekit has (breadcrumbs, della): their ``convention`` defaults to mergekit's."""

DEFAULT_DENSITY: dict[str, float] = {
    "none": 1.0,
    "magnitude": 0.2,
    "random": 0.5,
    "magnitude_outliers": 0.9,
    "magprune": 0.5,
}
"""Density used when none is given. ``magnitude`` 0.2: the TIES paper keeps the top 20 % and
PEFT's merging guide uses 0.2. ``random`` 0.5: the DARE paper sweeps drop rates 0.1–0.9 and
shared mergekit ``dare_ties`` configs cluster around 0.5. ``magnitude_outliers`` 0.9 (with
``gamma`` 0.01): the values of shared mergekit ``breadcrumbs`` configs. ``magprune`` 0.5: as
DARE, whose random drop MagPrune refines. (mergekit's own default is 1.0, no sparsification,
for every method.)"""


def default_normalize(sparsify: Sparsify, elect_signs: bool, convention: Convention) -> bool:
    """The library default of ``normalize`` for a preset under ``convention``.

    TIES normalises in both libraries; DARE-TIES normalises in PEFT (disjoint mean) but sums
    in mergekit (``normalize: false`` by default), and so does breadcrumbs_ties; della
    normalises; methods without election sum.

    Example:
        >>> default_normalize("random", True, "peft"), default_normalize("random", True, "mergekit")
        (True, False)
    """
    if not elect_signs:
        return False
    return convention == "peft" or sparsify in ("magnitude", "magprune")


def default_rescale(sparsify: Sparsify, convention: Convention) -> RescaleRule:
    """DARE rescales by ``1/density`` in PEFT and to the branch's L1 norm in mergekit; DELLA
    to the L1 norm (mergekit's ``rescale: true``); the magnitude trims do not rescale.

    Example:
        >>> default_rescale("random", "mergekit"), default_rescale("magnitude", "peft")
        ('l1', 'none')
    """
    if sparsify == "magprune":
        return "l1"
    if sparsify != "random":
        return "none"
    return "inverse_density" if convention == "peft" else "l1"


def family_name(sparsify: object, elect_signs: object, normalize: object = None) -> str:
    """The usual name of a (sparsify, elect_signs) configuration, for messages.

    Example:
        >>> family_name("random", True)
        'dare_ties'
    """
    names = {
        ("none", False): "task_arithmetic",
        ("magnitude", True): "ties",
        ("random", True): "dare_ties",
        ("random", False): "dare_linear",
        ("magnitude", False): "magnitude_prune",
        ("magnitude_outliers", False): "breadcrumbs",
        ("magnitude_outliers", True): "breadcrumbs_ties",
        ("magprune", True): "della",
        ("magprune", False): "della_linear",
    }
    if (sparsify, bool(elect_signs), normalize) == ("none", False, True):
        return "linear"
    return names.get((sparsify, bool(elect_signs)), "task_vector")  # type: ignore[call-overload]


class TaskVectorParams(MethodParams):
    """Parameters of the task-vector family; ``None`` means "the default for this name".

    ``sparsify`` and ``elect_signs`` (and ``normalize`` for ``linear``) are fixed by the
    registered name; the others are user settings.
    """

    sparsify: Sparsify = Field("none", description="per-branch sparsification (fixed per name)")
    elect_signs: bool = Field(False, description="TIES sign election (fixed per name)")
    density: float | None = Field(
        None,
        description="fraction of entries kept per branch, in (0, 1]; default 0.2 for ties, "
        "0.5 for dare_* and della*, 0.9 for breadcrumbs*, unused by task_arithmetic/linear",
    )
    scaling: float = Field(1.0, allow_inf_nan=False, description="global λ on the merged delta")
    normalize: bool | None = Field(
        None,
        description="divide by the agreeing count (peft) / agreeing weight sum (mergekit) "
        "when electing signs, else by the weight sum; default: the library's for this name",
    )
    rescale: RescaleRule | None = Field(
        None,
        description="rescale of sparsified branches: inverse_density | l1 | none; "
        "default: inverse_density (peft) or l1 (mergekit) for DARE, l1 for della*, "
        "none otherwise",
    )
    convention: Convention = Field(
        "peft",
        description="whose TIES/DARE arithmetic: peft | mergekit (default: peft; mergekit "
        "for breadcrumbs*/della*, which only mergekit has)",
    )
    seed: int = Field(0, description="DARE/DELLA seed when the caller passes no generator")

    def recipe(self) -> dict[str, Any]:
        """The resolved settings as keywords of :func:`~.task_vector.task_vector_merge` and of
        its row-piece form (``sparsify``, ``density``, ``elect_signs``, ``normalize``,
        ``rescale``, ``convention``, ``scaling``)."""
        assert self.density is not None and self.normalize is not None and self.rescale is not None
        return {
            "sparsify": self.sparsify,
            "density": self.density,
            "elect_signs": self.elect_signs,
            "normalize": self.normalize,
            "rescale": self.rescale,
            "convention": self.convention,
            "scaling": self.scaling,
        }

    def sparsify_options(self) -> dict[str, float]:
        """Settings of this mode's sparsification beyond ``density`` (breadcrumbs' ``gamma``,
        DELLA's ``epsilon``), as keywords of :func:`~.task_vector.task_vector_merge`."""
        return {}

    @field_validator("density")
    @classmethod
    def _density_in_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(
                f"density is the fraction of entries kept and must be in (0, 1]; got {v} "
                "(use 1.0 to keep everything)"
            )
        if v not in (None, 1.0) and info.data.get("sparsify") == "none":
            raise ValueError(
                "density has no effect without sparsification (task_arithmetic, linear); "
                "use ties, dare_ties or dare_linear to sparsify"
            )
        return v

    @field_validator("rescale")
    @classmethod
    def _rescale_needs_sparsify(cls, v: RescaleRule | None, info: ValidationInfo) -> Any:
        if v not in (None, "none") and info.data.get("sparsify") == "none":
            raise ValueError("rescale has no effect without sparsification")
        return v

    @model_validator(mode="before")
    @classmethod
    def _resolve_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        sparsify = data.get("sparsify", "none")
        elect = bool(data.get("elect_signs", False))
        convention = data.setdefault(
            "convention", "mergekit" if sparsify in MERGEKIT_ONLY else "peft"
        )
        if sparsify not in DEFAULT_DENSITY or convention not in ("peft", "mergekit"):
            return data  # the field validators report it
        if data.get("density") is None:
            data["density"] = DEFAULT_DENSITY[sparsify]
        if data.get("normalize") is None:
            data["normalize"] = default_normalize(sparsify, elect, convention)
        if data.get("rescale") is None:
            data["rescale"] = default_rescale(sparsify, convention)
        return data


class BreadcrumbsParams(TaskVectorParams):
    """:class:`TaskVectorParams` plus Model Breadcrumbs' ``gamma`` (mergekit's name)."""

    gamma: float = Field(
        0.01,
        ge=0.0,
        lt=1.0,
        description="fraction of the largest-magnitude entries dropped as outliers, in [0, 1)",
    )

    def sparsify_options(self) -> dict[str, float]:
        return {"gamma": self.gamma}


class DellaParams(TaskVectorParams):
    """:class:`TaskVectorParams` plus DELLA's ``epsilon`` (mergekit's name)."""

    epsilon: float = Field(
        0.15,
        gt=0.0,
        lt=0.5,
        description="half-width of the keep-probabilities around density: the smallest "
        "entry of a row is kept with density - epsilon, the largest with density + epsilon",
    )

    @model_validator(mode="after")
    def _band_inside(self) -> DellaParams:
        d = self.density
        if d is not None and d < 1 and not (0 < d - self.epsilon and d + self.epsilon < 1):
            raise ValueError(
                f"density - epsilon and density + epsilon must be in (0, 1) (they are keep "
                f"probabilities); got density {d}, epsilon {self.epsilon}"
            )
        return self

    def sparsify_options(self) -> dict[str, float]:
        return {"epsilon": self.epsilon}


WEIGHT_SUM_EPS = 1e-8
"""Without sign election, a weight sum below this is treated as 1 (as mergekit does)."""


def normalizing_weight_sum(weights: Tensor) -> Tensor | None:
    """The divisor of a normalised merge without sign election: the sum of the weights, or
    ``None`` (no division) when it is within :data:`WEIGHT_SUM_EPS` of zero.

    Example:
        >>> (normalizing_weight_sum(torch.tensor([1.0, 3.0])),
        ...  normalizing_weight_sum(torch.tensor([1.0, -1.0])))
        (tensor(4.), None)
    """
    weight_sum = weights.sum()
    return None if bool(weight_sum.abs() < WEIGHT_SUM_EPS) else weight_sum


def weight_sum_problem(
    coefficients: Sequence[float],
    *,
    method: str,
    elect_signs: bool,
    normalize: bool,
    convention: Convention,
) -> str | None:
    """Why a merge that divides by a sum of the coefficients cannot use these (``None``: it can).

    ``normalize`` divides by the sum of the weights (without election, e.g. ``linear``) or of
    the agreeing weights (``mergekit`` TIES). Coefficients that are all 0 would leave nothing
    to divide by — the merge silently wrote the base — and a negative sum flips the average's
    sign back, so the sum must be above :data:`WEIGHT_SUM_EPS`. The ``peft`` disjoint mean
    divides by counts, not weights: any coefficients.

    Example:
        >>> weight_sum_problem([0.0, 0.0], method="linear", elect_signs=False, normalize=True,
        ...                    convention="peft")  # doctest: +ELLIPSIS
        "method 'linear' normalises by the sum of the coefficients, which must be > 0; got 0 ..."
    """
    if not normalize or (elect_signs and convention != "mergekit"):
        return None
    total = math.fsum(coefficients)
    if total > WEIGHT_SUM_EPS:
        return None
    shown = ", ".join(f"{c:g}" for c in coefficients)
    return (
        f"method {method!r} normalises by the sum of the coefficients, which must be > 0; got "
        f"{total:g} (coefficients [{shown}]): give at least one branch a coefficient > 0"
    )


def convention_count_rule(convention: Convention) -> CountRule:
    """How many entries a magnitude trim keeps: ``int(density·numel)`` (PEFT) or at least one
    (mergekit).

    Example:
        >>> convention_count_rule("mergekit")
        'floor_min1'
    """
    return "floor" if convention == "peft" else "floor_min1"
