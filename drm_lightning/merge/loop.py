"""The merge loop: the planned tensors of a model merged one at a time (whole or in row pieces)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from drm_lightning.merge.pieces import merge_in_pieces, merges_in_pieces
from drm_lightning.merge.plan import (
    PlannedTensor,
    TensorSourceLike,
    origin_label,
    plan_merge,
    validate_coefficients,
)
from drm_lightning.merge.routing import Routing
from drm_lightning.merge.tensor import branch_tensor, merge_tensor, tensor_generator
from drm_lightning.methods.base import MergeMethod
from drm_lightning.methods.rowwise import rows_per_piece
from drm_lightning.sources._shard_file import RowPieces
from drm_lightning.sources.memory import StateDictSource
from drm_lightning.sources.read_ahead import ReadAhead


def iter_merge(
    method: MergeMethod,
    base: TensorSourceLike,
    branches: Sequence[Any],
    *,
    coefficients: Sequence[float] | None = None,
    routing: Routing | None = None,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    seed: int | None = None,
    plan: Sequence[PlannedTensor] | None = None,
    progress: bool = False,
    piece_elements: int | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(name, merged tensor)`` for every base tensor, reading one tensor at a time.

    Inputs are validated with :func:`plan_merge` first (unless a ``plan`` is given); NaN/Inf
    in a tensor raise before that tensor is merged. Random methods (DARE) draw from a
    generator seeded by ``(seed, tensor name)``; ``seed=None`` uses the method's ``seed``
    parameter (or 0), so the result is the same on every rank and every run.

    With ``piece_elements`` (the disk-to-disk job sets it), a tensor whose N-branch stack is
    larger than that and that can be merged in row pieces
    (:func:`drm_lightning.merge.pieces.merges_in_pieces`) comes as a
    :class:`~drm_lightning.sources.RowPieces` instead of a tensor: memory then stays
    bounded by a piece. Without it every value is a tensor. File sources are asked to read
    the next tensor ahead while one merges (:class:`~drm_lightning.sources.read_ahead.ReadAhead`).
    """
    if seed is None:
        seed = int(getattr(method.params, "seed", 0) or 0)
    coefs = validate_coefficients(coefficients, len(branches), method)
    plan = (
        plan
        if plan is not None
        else plan_merge(base, branches, routing=routing, coefficients=coefs)
    )
    items: Any = plan
    if progress:
        items = tqdm(
            plan, desc=f"merging ({getattr(method, 'registered_name', method.name)})", unit="tensor"
        )
    origins = [origin_label(base, None), *(origin_label(b, i) for i, b in enumerate(branches))]
    with ReadAhead([base, *branches]) as ahead:
        for position, item in enumerate(items):
            if position + 1 < len(plan):  # the disk reads the next tensor while this one merges
                ahead.ask([plan[position + 1].name])
            # no local holds an input tensor while the caller has the merged one
            if item.route == "ignore":
                yield (
                    item.name,
                    merge_tensor(
                        method, "ignore", base.get(item.name), [], coefs, out_dtype=out_dtype
                    ),
                )
                continue
            generator = tensor_generator(seed, item.name) if method.uses_randomness else None
            if merges_in_pieces(method, item, base, branches, piece_elements):
                pieces = merge_in_pieces(
                    method,
                    item,
                    base,
                    branches,
                    coefs,
                    compute_dtype=compute_dtype,
                    out_dtype=out_dtype,
                    generator=generator,
                    origins=origins,
                    piece_rows=rows_per_piece(item.shape, len(branches), int(piece_elements or 0)),
                )
                dtype = out_dtype or item.dtype
                yield item.name, RowPieces(item.shape, dtype, pieces, fresh=True)  # new tensors
                continue
            yield (
                item.name,
                merge_tensor(
                    method,
                    item.route,
                    base.get(item.name),
                    [branch_tensor(branch, item.name, item.route) for branch in branches],
                    coefs,
                    compute_dtype=compute_dtype,
                    out_dtype=out_dtype,
                    generator=generator,
                    name=item.name,
                    origins=origins,
                    row_blocks=item.row_blocks,
                ),
            )


def _as_source(obj: Any, origin: str) -> Any:
    if isinstance(obj, (torch.nn.Module, Mapping)):
        return StateDictSource(obj, origin=origin)
    return obj


def merge_state_dicts(
    method: MergeMethod,
    base: Mapping[str, Tensor] | torch.nn.Module | TensorSourceLike,
    branches: Sequence[Mapping[str, Tensor] | torch.nn.Module | Any],
    *,
    coefficients: Sequence[float] | None = None,
    routing: Routing | None = None,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Merge in-memory state dicts (or modules, or sources) into a new state dict.

    Inputs are never modified. Returns full merged weights in each base tensor's dtype.
    """
    base_src = _as_source(base, "base state dict")
    branch_srcs = [_as_source(b, f"branch state dict {i}") for i, b in enumerate(branches)]
    return dict(
        iter_merge(
            method,
            base_src,
            branch_srcs,
            coefficients=coefficients,
            routing=routing,
            compute_dtype=compute_dtype,
            out_dtype=out_dtype,
            seed=seed,
            progress=progress,
        )
    )
