"""Large tensors merged in row pieces: memory bounded by a piece, not by the tensor.

A 128256×2048 vocabulary matrix of a 1B model is 1 GiB in float32 per branch; merged whole,
its N deltas and the method's temporaries take 10–20× that. When every input reads row
slices cheaply (safetensors, tensors in memory:
:meth:`~drm_lightning.sources.WeightSource.reads_rows`) and the method merges entry by entry
(:meth:`~drm_lightning.methods.MergeMethod.merges_in_rows`:
task arithmetic, TIES, DRM's fallback), :func:`merge_in_pieces` reads the tensor a piece of
rows at a time, lets the method make its passes (its whole-tensor cut, its majority count)
and yields the merged rows piece by piece; the writer streams them to disk
(:class:`~drm_lightning.sources.HFFolderWriter` takes them as a
:class:`~drm_lightning.sources.RowPieces`). The result is
the whole-tensor merge's: the same operations on the same entries, the same exact cut.

Example:
    >>> import torch
    >>> from drm_lightning.merge import PlannedTensor
    >>> from drm_lightning.methods import get_method
    >>> from drm_lightning.sources import StateDictSource
    >>> base = StateDictSource({"w": torch.zeros(6, 2)})
    >>> branches = [StateDictSource({"w": torch.arange(12.0).reshape(6, 2) * s}) for s in (1, -2)]
    >>> item = PlannedTensor("w", (6, 2), torch.float32, "fallback")
    >>> pieces = merge_in_pieces(get_method("ties", density=0.5), item, base, branches, [1.0, 1.0],
    ...                          piece_rows=4)
    >>> [tuple(p.shape) for p in pieces]
    [(4, 2), (2, 2)]
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from drm_lightning.merge.pieces_pool import ThreadedPieces
from drm_lightning.merge.plan import PlannedTensor, is_lora_source
from drm_lightning.merge.tensor import RESULT_HINT, as_delta, check_finite
from drm_lightning.methods import MergeMethod
from drm_lightning.methods.rowwise import StoredPiece, rows_per_piece

PIECE_ELEMENTS = 1 << 20
"""Entries of the (N, rows, ...) delta stack of one piece: 4 MiB in float32. Measured on
TIES of three 65536×1024 bf16 branches (2-core Xeon, 1 thread): pieces of 2**20 entries
raise peak RSS by 54 MiB in 7.6 s, of 2**22 by 158 MiB in 14.6 s, of 2**24 by 501 MiB in
24.7 s; the whole tensor at once by 3.7 GiB in 20 s (small pieces stay in cache)."""


def fused_route_enabled() -> bool:
    """Whether row pieces may take a method's fused route (``merge_stored_rows``): yes unless
    ``DRM_LIGHTNING_FUSED=0`` (the eager torch route for every method, e.g. to compare)."""
    return os.environ.get("DRM_LIGHTNING_FUSED", "1") != "0"


def merges_in_pieces(
    method: MergeMethod,
    item: PlannedTensor,
    base: Any,
    branches: Sequence[Any],
    piece_elements: int | None,
) -> bool:
    """Whether :func:`merge_in_pieces` pays off for ``item``: a tensor larger than one piece,
    a method that merges it in row pieces, and inputs that read row slices cheaply."""
    if piece_elements is None or item.route == "ignore" or item.row_blocks > 1 or not item.shape:
        return False
    if item.numel * len(branches) <= piece_elements:
        return False
    if method.needs_base or not method.merges_in_rows(item.route, item.shape, len(branches)):
        return False  # a method that needs the base tensor merges whole tensors
    sources = [base, *(b for b in branches if not is_lora_source(b))]
    return all(
        callable(getattr(s, "reads_rows", None)) and s.reads_rows(item.name) for s in sources
    )


def merge_in_pieces(
    method: MergeMethod,
    item: PlannedTensor,
    base: Any,
    branches: Sequence[Any],
    coefficients: Sequence[float],
    *,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    origins: Sequence[str] | None = None,
    piece_rows: int | None = None,
) -> Iterator[Tensor]:
    """``base + merged delta`` of ``item``, in ``out_dtype``, yielded piece by piece.

    Reads ``base.get_rows`` / ``branch.get_rows`` (LoRA branches: rows of ``B`` times ``A``)
    as often as the method's passes need; NaN/Inf in a piece read, or in a merged piece,
    raise ``ValueError`` naming the tensor, the input and the rows.
    """
    name, n = item.name, len(branches)
    out_dtype = out_dtype or item.dtype
    origins = list(origins) if origins else ["base", *(f"branch {i}" for i in range(n))]
    step = piece_rows or rows_per_piece(item.shape, n, PIECE_ELEMENTS)
    factors: dict[int, Any] = {}
    for i, branch in enumerate(branches):
        if is_lora_source(branch):
            factors[i] = branch.lowrank(name)
            for part in factors[i] or ():
                check_finite(name, part, origins[i + 1])
    held: dict[str, Any] = {}

    def base_rows(start: int, stop: int) -> Tensor:
        if held.get("span") != (start, stop):
            rows = base.get_rows(name, start, stop)
            check_finite(name, rows, origins[0], f" (rows {start}:{stop})")
            held["span"], held["rows"] = (start, stop), rows.detach().to(compute_dtype)
        return held["rows"]

    def read(start: int, stop: int) -> Tensor:
        base_c = base_rows(start, stop)
        deltas = base_c.new_empty((n, *base_c.shape))
        for i, branch in enumerate(branches):
            if i in factors:
                pair = factors[i]
                rows = None if pair is None else (pair[0][start:stop], pair[1])
            else:
                rows = branch.get_rows(name, start, stop)
                check_finite(name, rows, origins[i + 1], f" (rows {start}:{stop})")
            as_delta(rows, base_c, compute_dtype, out=deltas[i])
        return deltas

    coef = torch.as_tensor(list(coefficients), dtype=compute_dtype).reshape(-1)
    # The fused CPU route reads the stored rows as they are: not for LoRA branches, nor for
    # sources that move rows to a GPU (the disk job's OnDevice), which stay on the torch route.
    if not factors and base.get_rows(name, 0, 1).device.type == "cpu":
        stored = [base.meta(name).dtype, *(b.meta(name).dtype for b in branches)]

        def read_stored(start: int, stop: int) -> tuple[Tensor, list[Tensor]]:
            return base.get_rows(name, start, stop), [
                b.get_rows(name, start, stop) for b in branches
            ]

        fused = (
            method.merge_stored_rows(
                item.route,
                read_stored,
                item.shape,
                coef,
                piece_rows=step,
                stored=stored,
                out_dtype=out_dtype,
                compute_dtype=compute_dtype,
                runner=ThreadedPieces(torch.get_num_threads()),
            )
            if fused_route_enabled()
            else None
        )
        if fused is not None:
            yield from _checked_stored_pieces(fused, name, base, branches, origins, item.shape[0])
            return
    row = 0
    for delta in method.merge_rows(
        item.route, read, item.shape, coef, piece_rows=step, generator=generator
    ):
        stop = row + delta.shape[0]
        merged = (base_rows(row, stop) + delta).to(out_dtype)
        check_finite(name, merged, "the merged result", f" (rows {row}:{stop}){RESULT_HINT}")
        yield merged
        row = stop
    _check_all_rows(name, row, item.shape[0])


def _checked_stored_pieces(
    pieces: Iterator[StoredPiece],
    name: str,
    base: Any,
    branches: Sequence[Any],
    origins: Sequence[str],
    rows: int,
) -> Iterator[Tensor]:
    """The merged pieces of :meth:`~drm_lightning.methods.MergeMethod.merge_stored_rows`, with
    the checks of the eager route: a non-finite input raises naming the input and the rows,
    a non-finite result the tensor (:data:`~drm_lightning.merge.RESULT_HINT`)."""
    row = 0
    for piece in pieces:
        if not piece.inputs_finite:
            hint = f" (rows {piece.start}:{piece.stop})"
            for source, origin in zip([base, *branches], origins, strict=True):
                check_finite(name, source.get_rows(name, piece.start, piece.stop), origin, hint)
            raise RuntimeError(
                f"{name!r}: the fused merge saw a non-finite input in rows "
                f"{piece.start}:{piece.stop}"
            )
        if not piece.merged_finite:  # raises, naming the tensor and the rows
            check_finite(
                name,
                piece.merged,
                "the merged result",
                f" (rows {piece.start}:{piece.stop}){RESULT_HINT}",
            )
        yield piece.merged
        row = piece.stop
    _check_all_rows(name, row, rows)


def _check_all_rows(name: str, produced: int, rows: int) -> None:
    """Raise when a piecewise merge stopped short of (or past) the tensor's ``rows``."""
    if produced != rows:
        raise RuntimeError(f"{name!r}: the merge produced {produced} rows of {rows}")
