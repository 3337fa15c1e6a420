"""Spherical interpolation of two models: mergekit's ``slerp`` and ``nuslerp``.

``slerp`` (Shoemake 1985, as mergekit runs it) interpolates the base and ONE branch along the
great circle through them, each tensor flattened to one vector: with ``a`` the base, ``b``
the branch and ``θ`` the angle between them,

    slerp(t; a, b) = sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b,

and the straight line ``(1-t)·a + t·b`` where ``|cos θ| > 0.9995`` (nearly colinear or
opposite). It needs the base tensor itself (:attr:`~.base.MergeMethod.needs_base`). The
merged delta is computed as ``(c_a + c_b - 1)·a + c_b·Δ`` (``Δ = b - a``), so ``t = 0`` gives
the base and ``t = 1`` the branch exactly, and the colinear case is ``t·Δ``.

``nuslerp`` (mergekit's "new" slerp) interpolates TWO branches with ``t = w_1 / (w_0 + w_1)``
from their coefficients (0.5 when they sum to ~0): their deltas (mergekit with a
``base_model``), or with ``interpolate="weights"`` the whole weights ``base + Δ_i`` (mergekit
without one). Vectors are the flattened tensor (``nuslerp_flatten``, default), else its rows,
or with ``nuslerp_row_wise`` its columns; the straight line only where the vectors are
exactly colinear.

Example:
    >>> import torch
    >>> base = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    >>> delta = torch.tensor([[[-1.0, 1.0]]], dtype=torch.float64)  # branch = [0, 1]
    >>> merged = Slerp(t=0.5).merge_matrix(delta, torch.ones(1, dtype=torch.float64), base=base)
    >>> base + merged  # halfway along the quarter circle
    tensor([[0.7071, 0.7071]], dtype=torch.float64)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from drm_lightning.methods.base import MergeMethod, MethodParams

DOT_THRESHOLD = 0.9995
"""``slerp``: above this ``|cos θ|`` the vectors count as colinear and are mixed linearly."""
NORM_EPS = 1e-8
"""``slerp``: a vector whose norm is at most this is not normalised (divided by 1)."""
NUSLERP_NORM_EPS = 1e-7
"""``nuslerp``: norms are clamped to at least this before normalising."""
NUSLERP_COLINEAR_EPS = 1e-8
"""``nuslerp``: vectors with ``1 - cos²θ <= eps²`` are mixed linearly."""
WEIGHT_SUM_EPS = 1e-6
"""``nuslerp``: coefficients summing to less than this in magnitude give ``t = 0.5``."""


def slerp_delta(t: float, base: Tensor, delta: Tensor) -> Tensor:
    """``slerp(t; base, base + delta) - base`` of one tensor, flattened to one vector.

    Computed in ``delta``'s dtype. A vector of norm at most :data:`NORM_EPS` is left
    unnormalised (a zero vector makes ``θ = π/2``), as mergekit.

    Example:
        >>> a = torch.tensor([2.0, 0.0], dtype=torch.float64)
        >>> slerp_delta(0.25, a, torch.tensor([2.0, 0.0], dtype=torch.float64))  # colinear
        tensor([0.5000, 0.0000], dtype=torch.float64)
    """
    base = base.to(delta.dtype)
    a = base.reshape(-1)
    b = (base + delta).reshape(-1)
    if a.numel() == 0:
        return delta * t
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, torch.ones_like(norm_b))
    dot = float(torch.dot(a / norm_a, b / norm_b).clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return delta * t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    coef_a = math.sin((1 - t) * theta) / sin_theta
    coef_b = math.sin(t * theta) / sin_theta
    return base * (coef_a + coef_b - 1) + delta * coef_b


def nuslerp(
    t: float, v0: Tensor, v1: Tensor, *, row_wise: bool = False, flatten: bool = True
) -> Tensor:
    """mergekit's ``nuslerp`` of two tensors: slerp of the flattened tensors (``flatten``),
    else of their rows (vectors along the last dim) or, with ``row_wise``, of the vectors
    along dim 0; the straight line where a pair is exactly colinear.

    Example:
        >>> v0 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
        >>> v1 = torch.tensor([[0.0, 1.0], [4.0, 0.0]], dtype=torch.float64)
        >>> nuslerp(0.5, v0, v1, flatten=False)  # row 2 is colinear: the mean
        tensor([[0.7071, 0.7071],
                [3.0000, 0.0000]], dtype=torch.float64)
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos_theta = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos_theta.square()) <= NUSLERP_COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos_theta), cos_theta))
    sin_theta = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def _needs(method: str, base: Tensor | None) -> Tensor:
    if base is None:
        raise ValueError(
            f"{method} interpolates whole weights and needs the base tensor: pass base= "
            "(merge_tensor does)"
        )
    return base


class SlerpParams(MethodParams):
    """Parameters of ``slerp`` (mergekit's name; mergekit requires ``t``)."""

    t: float = Field(
        0.5,
        allow_inf_nan=False,
        description="interpolation factor: 0 keeps the base, 1 takes the branch",
    )


class Slerp(MergeMethod):
    """Spherical interpolation of the base and one branch (mergekit's ``slerp``; see the
    module docstring). The branch coefficient must be 1: ``t`` sets the mix.

    Example:
        >>> from drm_lightning.methods import get_method
        >>> get_method("slerp", t=0.3).coefficient_problem([1.0, 1.0])
        'slerp interpolates the base and one branch; got 2 branches'
    """

    name = "slerp"
    paper = "Shoemake, SIGGRAPH 1985; mergekit (Goddard et al., arXiv:2403.13257)"
    Params = SlerpParams

    @property
    def needs_base(self) -> bool:
        """Always: slerp interpolates whole weights."""
        return True

    def coefficient_problem(self, coefficients: Sequence[float]) -> str | None:
        """One branch, coefficient 1."""
        if len(coefficients) != 1:
            return f"slerp interpolates the base and one branch; got {len(coefficients)} branches"
        if coefficients[0] != 1:
            return (
                f"slerp does not weight its branch (t sets the mix): its coefficient must be 1, "
                f"got {coefficients[0]:g}"
            )
        return None

    def merge_matrix(
        self,
        deltas: Tensor,
        coefficients: Tensor,
        *,
        generator: torch.Generator | None = None,
        base: Tensor | None = None,
    ) -> Tensor:
        """``slerp(t; base, base + Δ) - base`` of one tensor, flattened (as mergekit)."""
        return slerp_delta(self.params.t, _needs("slerp", base), deltas[0])

    merge_fallback = merge_matrix


class NuSlerpParams(MethodParams):
    """Parameters of ``nuslerp`` (mergekit's names and defaults, plus ``interpolate``)."""

    nuslerp_flatten: bool = Field(True, description="one vector per tensor (else per row)")
    nuslerp_row_wise: bool = Field(
        False, description="without flatten: vectors along dim 0 instead of the last dim"
    )
    interpolate: Literal["deltas", "weights"] = Field(
        "deltas",
        description="interpolate the branches' deltas (mergekit with base_model) or their "
        "whole weights (mergekit without base_model)",
    )


class NuSlerp(MergeMethod):
    """Spherical interpolation of two branches, ``t = w_1 / (w_0 + w_1)`` (mergekit's
    ``nuslerp``; see the module docstring).

    Example:
        >>> from drm_lightning.methods import get_method
        >>> m = get_method("nuslerp")
        >>> d = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
        >>> m.merge_fallback(d, torch.tensor([1.0, 3.0], dtype=torch.float64))
        tensor([0.3827, 0.9239], dtype=torch.float64)
    """

    name = "nuslerp"
    paper = "mergekit (Goddard et al., arXiv:2403.13257)"
    Params = NuSlerpParams

    @property
    def needs_base(self) -> bool:
        """With ``interpolate="weights"``."""
        return bool(self.params.interpolate == "weights")

    def coefficient_problem(self, coefficients: Sequence[float]) -> str | None:
        """Two branches."""
        if len(coefficients) != 2:
            return f"nuslerp interpolates two branches; got {len(coefficients)}"
        return None

    def merge_matrix(
        self,
        deltas: Tensor,
        coefficients: Tensor,
        *,
        generator: torch.Generator | None = None,
        base: Tensor | None = None,
    ) -> Tensor:
        """The nuslerp of the two branches of one tensor."""
        p = self.params
        w0, w1 = (float(c) for c in coefficients)
        t = 0.5 if abs(w0 + w1) < WEIGHT_SUM_EPS else w1 / (w0 + w1)
        options = {"row_wise": p.nuslerp_row_wise, "flatten": p.nuslerp_flatten}
        if p.interpolate == "deltas":
            return nuslerp(t, deltas[0], deltas[1], **options)
        whole = _needs("nuslerp", base).to(deltas.dtype)
        return nuslerp(t, whole + deltas[0], whole + deltas[1], **options) - whole

    merge_fallback = merge_matrix
