"""Per-branch density for the task-vector family (mergekit's per-model ``density``).

Example:
    >>> from drm_lightning.methods import get_method
    >>> m = PerBranchDensity(get_method("ties", convention="mergekit"), [0.5, 1.0])
    >>> m.merge_fallback(torch.tensor([[4.0, 1.0], [1.0, 1.0]]), torch.ones(2))
    tensor([2.5000, 1.0000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from drm_lightning.methods.base import MergeMethod, Route
from drm_lightning.methods.task_vector import TaskVectorMethod, task_vector_merge

__all__ = ["PerBranchDensity"]


class PerBranchDensity(MergeMethod):
    """A task-vector method whose branches keep their own ``density`` (mergekit's per-model one).

    Each branch is sparsified alone with its density (in branch order, from one generator),
    then the sparse deltas are combined by the same recipe without sparsification:
    :func:`~drm_lightning.methods.task_vector_merge` twice, no math of its own.

    Example:
        >>> from drm_lightning.methods import get_method
        >>> m = PerBranchDensity(get_method("dare_linear", convention="mergekit"), [0.5, 1.0])
        >>> m.uses_randomness, m.merge_fallback(torch.ones(2, 3), torch.ones(2)).shape
        (True, torch.Size([3]))
    """

    name = "task_vector"
    paper = TaskVectorMethod.paper
    Params = TaskVectorMethod.Params

    def __init__(self, inner: MergeMethod, densities: Sequence[float]) -> None:
        self.inner, self.densities = inner, [float(d) for d in densities]
        self.params = inner.params
        self.registered_name = getattr(inner, "registered_name", inner.name)

    def __repr__(self) -> str:
        return f"PerBranchDensity({self.inner!r}, densities={self.densities})"

    def coefficient_problem(self, coefficients: Sequence[float]) -> str | None:
        """The wrapped method's."""
        return self.inner.coefficient_problem(coefficients)

    @property
    def uses_randomness(self) -> bool:
        """True for DARE and DELLA when some branch keeps less than everything."""
        return self.params.sparsify in ("random", "magprune") and min(self.densities) < 1

    def merge_matrix(
        self, deltas: Tensor, coefficients: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Merge the (N, *shape) deltas of one tensor (any shape: entry-wise)."""
        p = self.params
        if len(self.densities) != deltas.shape[0]:
            raise ValueError(f"{len(self.densities)} densities for {deltas.shape[0]} branches")
        if self.uses_randomness and generator is None:
            generator = torch.Generator().manual_seed(p.seed)
        one = torch.ones(1, dtype=deltas.dtype, device=deltas.device)
        sparse = torch.empty_like(deltas)
        for i, density in enumerate(self.densities):
            sparse[i] = task_vector_merge(
                deltas[i : i + 1],
                one,
                sparsify=p.sparsify,
                density=density,
                rescale=p.rescale,
                convention=p.convention,
                generator=generator,
                **p.sparsify_options(),
            )
        return task_vector_merge(
            sparse,
            coefficients,
            elect_signs=p.elect_signs,
            normalize=p.normalize,
            convention=p.convention,
            scaling=p.scaling,
        )

    merge_fallback = merge_matrix

    def cost(self, route: Route, shape: Sequence[int], n_branches: int) -> float:
        """The wrapped method's cost."""
        return self.inner.cost(route, shape, n_branches)

    def workspace_elements(self, route: Route, shape: Sequence[int], n_branches: int) -> int:
        """The wrapped method's workspace plus the stack of sparsified deltas."""
        numel = math.prod(int(s) for s in shape)
        return self.inner.workspace_elements(route, shape, n_branches) + n_branches * numel
