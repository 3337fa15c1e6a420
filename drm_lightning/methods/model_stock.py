"""Model Stock (Jang et al., arXiv:2403.19522) as mergekit runs it (``model_stock``).

With ``cos θ`` the mean pairwise cosine between the N ≥ 2 branch deltas, the merged weight
is ``t·mean(w_i) + (1 - t)·w_0``, ``t = N·cos θ / (1 + (N - 1)·cos θ)``: the base moved
toward the branches' average by ``t``, so the merged DELTA is ``t·mean(Δ_i)`` and only the
deltas are needed. Cosines are of the flattened tensors, or with ``filter_wise`` of each
row (vectors along the last dim; a 1-D tensor is one row). Norm products are clamped to
at least 1e-6 and cosines to [-1, 1]; where ``|1 + (N - 1)·cos θ| < 1e-6`` there is no
finite ``t`` and the base is kept (``t = 0``), as mergekit.

Example:
    >>> import torch
    >>> d = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # orthogonal
    >>> ModelStock().merge_fallback(d, torch.ones(2, dtype=torch.float64))  # cos 0: t = 0
    tensor([0., 0.], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from drm_lightning.methods.base import MergeMethod, MethodParams

NORM_PRODUCT_EPS = 1e-6
"""Norm products below this are taken as this (a zero delta has cosine 0)."""
SINGULAR_EPS = 1e-6
"""``|1 + (N - 1)·cos θ|`` below this keeps the base."""


def model_stock_delta(deltas: Tensor, *, filter_wise: bool = False) -> Tensor:
    """The merged delta ``t·mean(Δ_i)`` of an (N, ...) stack (see the module docstring).

    Example:
        >>> d = torch.tensor([[3.0, 4.0], [3.0, 4.0]], dtype=torch.float64)  # cos 1: t = 1
        >>> model_stock_delta(d)
        tensor([3., 4.], dtype=torch.float64)
    """
    n, shape = deltas.shape[0], deltas.shape[1:]
    if filter_wise and len(shape) >= 1:
        rows = deltas.reshape(n, -1, shape[-1])
    else:
        rows = deltas.reshape(n, 1, -1)
    norms = torch.linalg.vector_norm(rows, dim=-1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            product = (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_EPS)
            cosines.append(((rows[i] * rows[j]).sum(dim=-1) / product).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < SINGULAR_EPS
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / safe)
    return (t * (rows.sum(dim=0) / n)).reshape(shape)


class ModelStockParams(MethodParams):
    """Parameters of ``model_stock`` (mergekit's name and default)."""

    filter_wise: bool = Field(False, description="one t per row instead of one per tensor")


class ModelStock(MergeMethod):
    """Model Stock: the branches' mean delta scaled by ``t`` from their mean cosine (see
    the module docstring). Needs N ≥ 2 branches; coefficients must be 1 (the method weighs
    the branches itself, as mergekit, which takes no ``weight``).

    Example:
        >>> from drm_lightning.methods import get_method
        >>> get_method("model_stock").coefficient_problem([1.0])
        'model_stock needs at least 2 branches (their angle sets t); got 1'
    """

    name = "model_stock"
    paper = "Jang et al., arXiv:2403.19522"
    Params = ModelStockParams

    def coefficient_problem(self, coefficients: Sequence[float]) -> str | None:
        """At least two branches, coefficients 1."""
        if len(coefficients) < 2:
            return (
                f"model_stock needs at least 2 branches (their angle sets t); "
                f"got {len(coefficients)}"
            )
        if any(c != 1 for c in coefficients):
            shown = ", ".join(f"{c:g}" for c in coefficients)
            return (
                f"model_stock weighs the branches itself (t from their angle): coefficients "
                f"must be 1, got [{shown}]"
            )
        return None

    def merge_matrix(
        self, deltas: Tensor, coefficients: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """``t·mean(Δ_i)`` of one tensor."""
        return model_stock_delta(deltas, filter_wise=self.params.filter_wise)

    merge_fallback = merge_matrix
