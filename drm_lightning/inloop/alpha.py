r"""The in-loop α search: one merge, scored at several scales of its delta, the best one kept.

Task arithmetic, TIES, TSV-M and Iso-C scale the merged task vector by a coefficient α that
their papers choose on validation data. With ``alpha_grid=`` the in-loop core merges once,
keeps the merged delta :math:`\Delta = \text{merged} - \text{base}`, and scores
:math:`\text{base} + \alpha\Delta` for every α of the grid on the tasks' validation batches.
It keeps the α with the best ``merged/average`` (the mean of each task's primary metric; the
highest, or the lowest when every primary metric is lower-is-better); on a tie the smaller α.

α is *the* global scale of the merged delta: for a method that has one (``scaling``, the λ of
the task-vector family, applied last) it is that parameter, which must stay at 1.0 so that
the merge computed once is :math:`\Delta` itself; other methods (DRM, ...) get it on top.
The grid and scaling checks are ``drm-merge``'s too (``alpha_search:``,
:mod:`drm_lightning.config.alpha_search`).

Example:
    >>> check_alpha_grid("default")
    (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    >>> best_alpha({0.5: 0.9, 0.2: 0.9, 1.0: 0.7}, higher=True)
    0.2
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from drm_lightning.config.alpha_search import (  # noqa: F401 - re-exported
    DEFAULT_ALPHA_GRID,
    best_alpha,
    check_alpha_grid,
    check_alpha_scaling,
    rescaled,
)
from drm_lightning.evaluation import TaskSpec
from drm_lightning.inloop.backends import Merged
from drm_lightning.methods import MergeMethod

AlphaGridArg = Sequence[float] | Literal["default"] | None


def check_alpha_search(
    grid: Sequence[float] | None, method: MergeMethod, tasks: Mapping[str, TaskSpec], name: str
) -> bool:
    """Refuse a search that cannot run; returns whether higher ``merged/average`` is better.

    A search needs tasks to score each α with, a method whose own global scale (``scaling``)
    is left at 1.0, and primary metrics that agree on the direction of "better"
    (torchmetrics' ``higher_is_better``). ``name`` (the front end) starts the messages.
    """
    if grid is None:
        return True
    if not tasks:
        raise ValueError(
            f"{name}: alpha_grid= scores every α on the tasks' validation batches, but no "
            "tasks= are given; pass tasks={task: TaskSpec(dataloader, metric)} or drop alpha_grid"
        )
    check_alpha_scaling(method, name=name)
    lower = [t for t, spec in tasks.items() if _higher_is_better(spec) is False]
    if lower and len(lower) < len(tasks):
        others = [t for t in tasks if t not in lower]
        raise ValueError(
            f"{name}: alpha_grid= keeps the α with the best merged/average, but the tasks' "
            f"primary metrics disagree on what is better: lower for {lower}, higher for "
            f"{others}; give every task a primary metric of the same direction "
            "(TaskSpec(primary=...))"
        )
    return not lower


def _higher_is_better(spec: TaskSpec) -> bool | None:
    return getattr(spec.collection[spec.primary_name], "higher_is_better", None)


def alpha_key(alpha: float) -> str:
    """The log-key prefix of one α's scores: ``alpha/<α>/``.

    Example:
        >>> alpha_key(0.3) + "merged/average"
        'alpha/0.3/merged/average'
    """
    return f"alpha/{alpha!r}/"


class ScaledDelta:
    """A merge held as its delta to the base, to build ``base + α·Δ`` for any α.

    Takes the tensors out of ``merged`` one at a time (it is emptied), so that at most the
    delta and one scaled merge exist beside the base. :meth:`at` builds a new merge;
    :meth:`finish` turns the delta itself into the final one (no further copy) — both with the
    same arithmetic (:func:`rescaled`), so the merge kept is bit for bit the one scored.

    Args:
        merged: The merge (its values are taken).
        base: ``name -> base tensor`` in the form of ``merged.values`` (a lookup).
        dtype: dtype of the delta (the merge's compute dtype).
    """

    def __init__(self, merged: Merged, base: Callable[[str], Tensor], dtype: torch.dtype) -> None:
        self.template = merged
        self.base = base
        self.dtypes: dict[str, torch.dtype] = {}
        self.delta: dict[str, Tensor] = {}
        for name in list(merged.values):
            value = merged.values.pop(name)
            self.dtypes[name] = value.dtype
            self.delta[name] = value.to(dtype) - base(name).to(device=value.device, dtype=dtype)

    def _merged(self, values: dict[str, Tensor]) -> Merged:
        return Merged(values, self.template.stats, self.template.engine, self.template.shards)

    def at(self, alpha: float) -> Merged:
        """``base + α·Δ`` (a new merge; the delta is kept)."""
        return self._merged(
            {
                k: rescaled(d.clone(), alpha, self.base(k), self.dtypes[k])
                for k, d in self.delta.items()
            }
        )

    def finish(self, alpha: float) -> Merged:
        """``base + α·Δ`` written over the delta, which is gone afterwards."""
        return self._merged(
            {
                k: rescaled(self.delta.pop(k), alpha, self.base(k), self.dtypes[k])
                for k in list(self.delta)
            }
        )
