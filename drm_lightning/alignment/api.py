"""The alignment entry points: align N models, merge them, or align then hand to a merge method.

* :func:`align` — spec (derived or given) + activations + an alignment method → matchings;
* :func:`merge_models` — the merged module (MuDSC / ZipIt / Re-Basin / averaging), BatchNorm
  statistics reset from a few batches;
* :func:`align_then_merge` — permute every branch into the anchor's unit order, then merge
  with any :mod:`drm_lightning.methods` method (DRM, TIES, …) against a chosen base.

Calibration ``batches`` must be re-iterable (a list or a DataLoader): they are read once for
the activations and once more for the BatchNorm reset.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> nets = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    ...         for _ in range(2)]
    >>> batches = [torch.randn(64, 4) for _ in range(2)]
    >>> merged = merge_models(nets, batches, method="mudsc_zip")
    >>> merged(batches[0]).shape
    torch.Size([64, 3])
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from drm_lightning.alignment.activations import (
    Forward,
    activation_similarity,
    default_forward,
    reset_batchnorm,
)
from drm_lightning.alignment.core import (
    AlignmentMethod,
    AlignmentResult,
    check_models_finite,
    get_alignment,
)
from drm_lightning.alignment.spec import PermSpec
from drm_lightning.alignment.trace import derive_spec
from drm_lightning.merge.loop import merge_state_dicts
from drm_lightning.methods import get_method
from drm_lightning.methods.ops import finite_inputs_checked


def _example(batches: Sequence[Any] | None) -> tuple[Any, ...]:
    if not batches:
        raise ValueError(
            "no spec and no batches: pass spec=... or example_inputs=(...) to derive one"
        )
    first = next(iter(batches))
    return (first[0],) if isinstance(first, (tuple, list)) else (first,)


def _method(method: str | AlignmentMethod, params: Mapping[str, Any]) -> AlignmentMethod:
    if isinstance(method, AlignmentMethod):
        if params:
            raise ValueError("pass parameters to get_alignment(...) when giving an AlignmentMethod")
        return method
    return get_alignment(method, **params)


def align(
    models: Sequence[nn.Module],
    batches: Sequence[Any] | None = None,
    *,
    method: str | AlignmentMethod = "mudsc_zip",
    spec: PermSpec | None = None,
    example_inputs: tuple[Any, ...] | None = None,
    forward: Forward = default_forward,
    **params: Any,
) -> AlignmentResult:
    """Match the hidden units of N ≥ 2 same-architecture models (model 0 is the anchor).

    Args:
        models: The models (any init); not modified.
        batches: Unlabelled calibration batches (tensors or ``(x, y)`` pairs) for the
            activation similarity; required by activation and dual methods.
        method: A name from :func:`~drm_lightning.alignment.available_alignments` or an
            :class:`AlignmentMethod`.
        spec: The permutation groups; derived with ``torch.fx`` when omitted.
        example_inputs: Inputs for the derivation (default: the first batch).
        forward: ``forward(model, batch)`` (default: ``model(batch[0])`` / ``model(batch)``).
        **params: Method parameters (``fix_rate``, ``seed``, ``max_sweeps``, …).

    Raises:
        ValueError: fewer than 2 models, no groups, NaN/Inf in a model's weights (naming the
            tensor and the model, before any activation is computed).
    """
    algo = _method(method, params)
    if len(models) < 2:
        raise ValueError(f"alignment needs at least 2 models, got {len(models)}")
    if spec is None:
        spec = derive_spec(models[0], *(example_inputs or _example(batches)))
    if not spec.groups:
        raise ValueError(
            "the permutation spec has no groups: nothing to align"
            + (f" ({'; '.join(spec.notes)})" if spec.notes else "")
        )
    state_dicts = [m.state_dict() for m in models]
    spec.check(state_dicts)
    check_models_finite(state_dicts)  # before the activations, which NaN weights would poison
    sims = None
    if algo.needs_activations:
        if batches is None:
            raise ValueError(f"method {algo.name!r} reads activations: pass calibration batches")
        sims = activation_similarity(models, spec, batches, forward=forward)
    with finite_inputs_checked():
        return algo.solve(state_dicts, spec, sims)


def merge_models(
    models: Sequence[nn.Module],
    batches: Sequence[Any] | None = None,
    *,
    method: str | AlignmentMethod = "mudsc_zip",
    spec: PermSpec | None = None,
    reset_batches: Sequence[Any] | None = None,
    forward: Forward = default_forward,
    example_inputs: tuple[Any, ...] | None = None,
    **params: Any,
) -> nn.Module:
    """Merge N ≥ 2 models of one architecture, whatever their inits, into one of the same width.

    Aligns (see :func:`align`), builds the merged weights (unit means, consumers through the
    unmerge matrices, uncovered parameters averaged) into a copy of ``models[0]`` and, when
    the model has BatchNorm, recomputes its statistics on ``reset_batches`` (default:
    ``batches``). The result is in eval mode.
    """
    result = align(
        models,
        batches,
        method=method,
        spec=spec,
        example_inputs=example_inputs,
        forward=forward,
        **params,
    )
    merged = copy.deepcopy(models[0])
    with finite_inputs_checked():  # by align
        merged.load_state_dict(result.merged_state_dict([m.state_dict() for m in models]))
    reset = reset_batches if reset_batches is not None else batches
    if reset is not None:
        reset_batchnorm(merged, reset, forward=forward)
    return merged.eval()


def align_models(
    models: Sequence[nn.Module],
    batches: Sequence[Any] | None = None,
    *,
    method: str | AlignmentMethod = "mudsc_align",
    anchor: int = 0,
    spec: PermSpec | None = None,
    forward: Forward = default_forward,
    example_inputs: tuple[Any, ...] | None = None,
    **params: Any,
) -> list[dict[str, Tensor]]:
    """Every model's state dict permuted into ``models[anchor]``'s unit order (same function).

    Only Align methods give permutations (``mudsc_align``, ``activation_align``,
    ``weight_matching``); the anchor's weights are returned unchanged.
    """
    if not 0 <= anchor < len(models):
        raise ValueError(f"anchor {anchor} is out of range for {len(models)} models")
    order = [anchor] + [i for i in range(len(models)) if i != anchor]
    result = align(
        [models[i] for i in order],
        batches,
        method=method,
        spec=spec,
        example_inputs=example_inputs,
        forward=forward,
        **params,
    )
    aligned = result.aligned_state_dicts([models[i].state_dict() for i in order])
    out: list[dict[str, Tensor]] = [{}] * len(models)
    for pos, i in enumerate(order):
        out[i] = aligned[pos]
    return out


def align_then_merge(
    merge_method: Any,
    base: Mapping[str, Tensor] | nn.Module | str,
    branches: Sequence[nn.Module],
    batches: Sequence[Any] | None = None,
    *,
    alignment: str | AlignmentMethod = "mudsc_align",
    anchor: int = 0,
    spec: PermSpec | None = None,
    coefficients: Sequence[float] | None = None,
    forward: Forward = default_forward,
    merge_kwargs: Mapping[str, Any] | None = None,
    **params: Any,
) -> dict[str, Tensor]:
    """Align the branches into the anchor's coordinates, then merge them with any method.

    Args:
        merge_method: A :class:`~drm_lightning.methods.MergeMethod` (``get_method("drm")``)
            or its registered name.
        base: The base the deltas are taken against, in the anchor's coordinates (a shared
            pretrained model, or the anchor itself), or ``"anchor"`` (the anchor branch) or
            ``"average"`` (the mean of the aligned branches).
        branches: The models to merge.
        batches: Calibration batches for the alignment.
        alignment: An Align method (permutations only).
        anchor: Index of the branch whose unit order is kept.
        merge_kwargs: Extra arguments of
            :func:`drm_lightning.merge.merge_state_dicts` (``routing``, ``compute_dtype``,
            ``seed``).
        **params: Alignment parameters.

    Returns:
        The merged state dict (in the anchor's unit order).
    """
    method = get_method(merge_method) if isinstance(merge_method, str) else merge_method
    aligned = align_models(
        branches, batches, method=alignment, anchor=anchor, spec=spec, forward=forward, **params
    )
    if isinstance(base, str):
        if base == "anchor":
            base_sd: Any = aligned[anchor]
        elif base == "average":
            base_sd = {
                k: (sum(a[k].double() for a in aligned) / len(aligned)).to(v.dtype)
                if v.is_floating_point()
                else v
                for k, v in aligned[anchor].items()
            }
        else:
            raise ValueError(
                f"base must be a state dict, a module, 'anchor' or 'average', got {base!r}"
            )
    else:
        base_sd = base
    return merge_state_dicts(
        method, base_sd, aligned, coefficients=coefficients, **dict(merge_kwargs or {})
    )


__all__ = ["align", "align_models", "align_then_merge", "merge_models"]
