"""Align branches before each in-loop merge: activations from a dataloader, then permutations.

:class:`BranchAligner` is an option of :class:`~drm_lightning.inloop.MergeCore`
(``aligner=``): before each merge it loads every branch into a copy of the merge target,
runs them on ``loader`` (forward hooks; :mod:`drm_lightning.alignment`), and hands the
merge method every branch permuted into the anchor's unit order (same function, other
coordinates). Use it when branches do not share an init (branches of a
:class:`~drm_lightning.inloop.BranchedModel` started from different inits, or checkpoints
of separately trained models); branches that share one come back essentially unchanged.

Only permutations keep the per-task heads valid and can be handed to a merge method, so the
method must be an Align one (``mudsc_align``, ``activation_align``, ``weight_matching``) or
``weight_average``; Zip methods merge units within a model. Weights held as ZeRO-3
partitions are refused (alignment needs whole tensors). Under DDP every rank aligns the same
branches on the same batches and gets the same permutations: give every rank the same
``loader`` (not a distributed sampler).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from drm_lightning.inloop import BranchedModel, LiveBranches, MergeCore, method_from
    >>> model = BranchedModel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)),
    ...                       {"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})
    >>> aligner = BranchAligner("mudsc_align", [torch.randn(32, 4) for _ in range(2)])
    >>> core = MergeCore(method_from("drm", None), LiveBranches(), aligner=aligner)
    >>> core.start(model, core.make_backend(partitioned=False))
    >>> core.merge(model, step=1, epoch=0)["branches"]
    ['a', 'b']
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from drm_lightning.sources import StateDictSource

if TYPE_CHECKING:
    from drm_lightning.alignment import PermSpec
    from drm_lightning.alignment.activations import Forward

__all__ = ["BranchAligner"]


def _on_device(model: nn.Module, batch: Any) -> Any:
    """``default_forward`` with the batch's tensors moved to the model's device."""
    from drm_lightning.alignment import default_forward

    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def move(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if isinstance(x, (tuple, list)):
            return type(x)(move(v) for v in x)
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        return x

    return default_forward(model, move(batch))


class BranchAligner:
    """Permute every branch into the anchor's unit order before a merge.

    Args:
        method: A permuting alignment method (``mudsc_align``, ``activation_align``,
            ``weight_matching``, ``weight_average``).
        loader: Re-iterable unlabelled batches (a DataLoader or a list); required by methods
            that read activations. Batches are ``x``, ``(x, ...)`` or keyword dicts.
        anchor: Index of the branch (in merge order) whose unit order is kept.
        spec: The permutation groups; derived with ``torch.fx`` from the first batch when omitted.
        forward: ``forward(model, batch)`` (default: the batch moved to the model's device).
        **params: Alignment parameters (``fix_rate``, ``seed``, ...).

    Raises:
        ValueError: a Zip method, an unknown method or parameter, or no ``loader`` for a
            method that reads activations.
    """

    def __init__(
        self,
        method: str = "mudsc_align",
        loader: Iterable[Any] | None = None,
        *,
        anchor: int = 0,
        spec: PermSpec | None = None,
        forward: Forward = _on_device,
        **params: Any,
    ) -> None:
        from drm_lightning.alignment import get_alignment  # scipy only when aligning

        self.method = get_alignment(method, **params)
        p = self.method.params
        if p.solver == "zip" and p.similarity != "none":
            raise ValueError(
                f"aligner method {method!r} merges units within a model (Zip), which is not a "
                "permutation; use 'mudsc_align', 'activation_align' or 'weight_matching'"
            )
        if self.method.needs_activations and loader is None:
            raise ValueError(
                f"aligner method {method!r} reads activations: pass loader= (unlabelled batches)"
            )
        if anchor < 0:
            raise ValueError(f"anchor must be >= 0, got {anchor}")
        self.loader = loader
        self.anchor = anchor
        self.spec = spec
        self.forward = forward

    def __repr__(self) -> str:
        return f"BranchAligner({self.method.name!r}, anchor={self.anchor})"

    def _spec(self, model: nn.Module) -> PermSpec:
        from drm_lightning.alignment import derive_spec

        if self.spec is None:
            if self.loader is None:
                raise ValueError(
                    "BranchAligner without loader= needs spec= (the spec is traced on a batch)"
                )
            first = next(iter(self.loader))
            x = first[0] if isinstance(first, (tuple, list)) else first
            self.spec = derive_spec(model, x.to(next(model.parameters()).device))
        return self.spec

    def permute(self, target: nn.Module, sources: Sequence[Any], backend: Any) -> list[Any]:
        """``sources`` (merge inputs keyed by ``target``'s names) in the anchor's unit order.

        Raises:
            NotImplementedError: the backend holds ZeRO-3 partitions.
            ValueError: ``anchor`` is out of range.
        """
        from drm_lightning.alignment import align_models

        if getattr(backend, "partitioned", False):
            raise NotImplementedError(
                "aligner= needs whole tensors: not supported under DeepSpeed ZeRO-3"
            )
        if not 0 <= self.anchor < len(sources):
            raise ValueError(
                f"aligner anchor {self.anchor} is out of range for {len(sources)} branches"
            )
        models = []
        for source in sources:
            model = copy.deepcopy(target)
            with torch.no_grad():
                model.load_state_dict({k: source.get(k) for k in source.keys()}, strict=False)  # noqa: SIM118
            models.append(model.eval())
        states = align_models(
            models,
            self.loader,
            method=self.method,
            anchor=self.anchor,
            spec=self._spec(models[0]),
            forward=self.forward,
        )
        out = []
        for i, (source, state) in enumerate(zip(sources, states, strict=True)):
            names = list(source.keys())
            tensors = {k: state[k].detach().to(source.meta(k).dtype) for k in names}
            out.append(
                StateDictSource(
                    tensors, origin=f"{getattr(source, 'origin', f'branch {i}')} (aligned)"
                )
            )
        return out
