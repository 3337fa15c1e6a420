"""The merge loop: validate every input from metadata, then merge one tensor at a time.

Everything that merges — the CLI, the Lightning callback, the distributed engines — goes
through :func:`plan_merge` (all checks, before any weight is read) and
:func:`merge_tensor` (one tensor, any method, any route).

Example:
    >>> import torch
    >>> from drm_lightning.methods import get_method
    >>> base = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}
    >>> branches = [{"w": torch.randn(4, 3), "b": torch.ones(4)} for _ in range(2)]
    >>> merged = merge_state_dicts(get_method("ties", density=1.0), base, branches)
    >>> merged["b"]
    tensor([1., 1., 1., 1.])
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from drm_lightning.heap import release_free_heap
from drm_lightning.methods.base import LowRankFactors, MergeMethod, Route
from drm_lightning.methods.ops import (  # check_finite: also imported from here by the engines
    SUPPORTED_DTYPES,
    check_finite,
    dtype_problem,
    finite_inputs_checked,
)
from drm_lightning.routing import Routing
from drm_lightning.sources._shard_file import RowPieces
from drm_lightning.sources.memory import StateDictSource
from drm_lightning.sources.read_ahead import ReadAhead

DTYPE_HINT = " (add the name to routing.ignore to keep the base value)"
"""Ends the refusal of a non-float tensor: how to keep such a tensor instead."""


@runtime_checkable
class TensorSourceLike(Protocol):
    """What the merge loop needs from a weight source (see ``drm_lightning.sources``)."""

    def keys(self) -> list[str]: ...

    def meta(self, name: str) -> Any: ...

    def get(self, name: str) -> Tensor: ...


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the merge: its name, base shape and dtype, and its route."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    route: Route
    row_blocks: int = 1

    @property
    def numel(self) -> int:
        out = 1
        for s in self.shape:
            out *= s
        return out


def _origin(source: Any, index: int | None) -> str:
    label = getattr(source, "origin", None) or getattr(source, "describe", lambda: None)()
    who = "base" if index is None else f"branch {index}"
    return f"{who} ({label})" if label else who


def _is_lora(source: Any) -> bool:
    return callable(getattr(source, "lowrank", None))


def _looks_like_vocab(name: str) -> bool:
    return any(k in name for k in ("embed", "lm_head", "wte", "shared", "word_embeddings"))


def validate_coefficients(
    coefficients: Sequence[float] | None, n_branches: int, method: MergeMethod | None = None
) -> list[float]:
    """Per-branch coefficients: default 1.0 each; length, finiteness and sign checked, and,
    with ``method``, that the method can merge with them (:meth:`MergeMethod.coefficient_problem`:
    ``linear`` refuses coefficients that are all 0)."""
    if n_branches < 1:
        raise ValueError("at least one branch is needed to merge")
    if coefficients is None:
        values = [1.0] * n_branches
    else:
        values = [float(c) for c in coefficients]
    if len(values) != n_branches:
        raise ValueError(
            f"coefficients has {len(values)} values but there are {n_branches} branches; "
            "give one coefficient per branch"
        )
    bad = [f"branches[{i}].coefficient={v}" for i, v in enumerate(values) if not v >= 0 or v != v or v == float("inf")]
    if bad:
        raise ValueError(f"coefficients must be finite and >= 0: {', '.join(bad)}")
    if method is not None:
        method.check_coefficients(values)
    return values


def plan_merge(
    base: TensorSourceLike,
    branches: Sequence[Any],
    *,
    routing: Routing | None = None,
    coefficients: Sequence[float] | None = None,
    method: MergeMethod | None = None,
) -> list[PlannedTensor]:
    """Check keys, shapes and dtypes of every input from metadata and route each tensor.

    No tensor data is read. All problems are collected and raised together. ``method``: the
    coefficients are also checked for it (:func:`validate_coefficients`).

    Raises:
        ValueError: missing or extra keys, shape mismatches (every key with all shapes),
            vocabulary-size mismatches, non-float or unsupported dtypes, bad coefficients.
    """
    routing = routing or Routing()
    validate_coefficients(coefficients, len(branches), method)
    base_keys = list(base.keys())
    base_set = set(base_keys)
    problems: list[str] = []
    full_branches = [(i, b) for i, b in enumerate(branches) if not _is_lora(b)]
    for i, branch in full_branches:
        keys = set(branch.keys())
        missing, extra = sorted(base_set - keys), sorted(keys - base_set)
        if missing:
            problems.append(f"{_origin(branch, i)} is missing {len(missing)} key(s) of the base: {_short(missing)}")
        if extra:
            problems.append(f"{_origin(branch, i)} has {len(extra)} key(s) not in the base: {_short(extra)}")
    planned: list[PlannedTensor] = []
    shape_lines: list[str] = []
    for name in base_keys:
        meta = base.meta(name)
        shape, dtype = tuple(int(s) for s in meta.shape), meta.dtype
        route = routing.route(name, shape)
        shapes = {"base": shape}
        dtypes = {"base": dtype}
        for i, branch in full_branches:
            if name in set(branch.keys()):
                bm = branch.meta(name)
                shapes[f"branch {i}"] = tuple(int(s) for s in bm.shape)
                dtypes[f"branch {i}"] = bm.dtype
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
            hint = " (vocabulary size differs: resize the embeddings to the base's tokenizer first)" if _looks_like_vocab(name) else ""
            shape_lines.append(f"  {name}: {listing}{hint}")
        if route != "ignore":
            problems += [
                _dtype_refusal(name, who, dt)
                for who, dt in dtypes.items()
                if dtype_problem(name, who, dt)
            ]
        split_problem = routing.row_split_problem(name, shape)
        if split_problem:
            problems.append(split_problem)
        planned.append(PlannedTensor(name, shape, dtype, route, routing.row_blocks(name, shape)))
    if shape_lines:
        problems.append("shape mismatch in {} tensor(s):\n{}".format(len(shape_lines), "\n".join(shape_lines)))
    if problems:
        raise ValueError("cannot merge:\n- " + "\n- ".join(problems))
    return planned


def _dtype_refusal(name: str, origin: str, dtype: torch.dtype) -> str:
    """The message refusing a tensor of ``dtype``
    (:func:`~drm_lightning.methods.ops.dtype_problem`, with a hint for non-float ones)."""
    problem = dtype_problem(name, origin, dtype) or ""
    return problem + DTYPE_HINT if not dtype.is_floating_point else problem


def _short(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


RESULT_HINT = (
    "; the inputs were finite, so the merge overflowed the output dtype: check the branch "
    "coefficients and the inputs' magnitudes"
)


def check_fits(name: str, value: Tensor, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` if a finite merged ``value`` would overflow to Inf when cast to ``dtype``."""
    if not dtype.is_floating_point or torch.finfo(dtype).max >= torch.finfo(value.dtype).max:
        return
    largest = float(value.detach().abs().max()) if value.numel() else 0.0
    if largest > torch.finfo(dtype).max:
        raise ValueError(
            f"{name!r}: the merged result reaches {largest:.3g}, beyond the largest {dtype} "
            f"({torch.finfo(dtype).max:.3g}){RESULT_HINT}"
        )


def check_inputs(
    name: str, base: Tensor, branch_tensors: Sequence[Any], origins: Sequence[str] | None = None
) -> None:
    """The dtypes (:func:`plan_merge`'s refusal, from metadata) and then :func:`check_finite`
    of a base tensor and every branch's tensor (or LoRA factors)."""
    inputs = [(origins[0] if origins else "base", base)]
    for i, t in enumerate(branch_tensors):
        origin = origins[i + 1] if origins else f"branch {i}"
        inputs += [(origin, part) for part in ((t,) if isinstance(t, Tensor) else (t or ()))]
    for origin, part in inputs:
        if dtype_problem(name, origin, part.dtype):
            raise ValueError(_dtype_refusal(name, origin, part.dtype))
    for origin, part in inputs:
        check_finite(name, part, origin)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, name)``: the same on every rank and every run."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


BranchTensor = Tensor | LowRankFactors | None


def merge_tensor(
    method: MergeMethod,
    route: Route,
    base: Tensor,
    branch_tensors: Sequence[BranchTensor],
    coefficients: Sequence[float] | Tensor,
    *,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    name: str = "tensor",
    origins: Sequence[str] | None = None,
    row_blocks: int = 1,
) -> Tensor:
    """Merge one tensor: full branch weights, or LoRA factors ``(B, A)`` / ``None`` (= base).

    Returns ``base + merged_delta`` in ``out_dtype`` (default: the base's dtype). Ignored
    tensors come back as an exact copy of the base. Every path that merges calls this, so
    the input checks live here: integer, bool or unsupported dtypes (:func:`plan_merge`'s
    refusal) and NaN/Inf in the base or a branch raise ``ValueError`` naming ``name`` and the
    input (``origins``: labels of base then branches), and so do coefficients the method
    cannot use (:meth:`~drm_lightning.methods.MergeMethod.coefficient_problem`) and a
    non-finite result (an overflow, e.g. from a huge coefficient). ``row_blocks > 1``
    merges a matrix as that many equal row blocks, each on its own (fused QKV, see
    :meth:`~drm_lightning.routing.Routing.row_blocks`).

    Example:
        >>> from drm_lightning.methods import get_method
        >>> base = torch.zeros(3, 2)
        >>> merged = merge_tensor(get_method("drm", drop_rate=0.0), "matrix", base, [torch.ones(3, 2)], [1.0])
        >>> torch.allclose(merged, torch.ones(3, 2))
        True
    """
    out_dtype = out_dtype or base.dtype
    if route == "ignore":
        return base.detach().clone().to(out_dtype)
    if dtype_problem("compute_dtype", "merge_tensor", compute_dtype):
        supported = ", ".join(map(str, SUPPORTED_DTYPES))
        raise ValueError(f"compute_dtype must be one of {supported}, got {compute_dtype}")
    check_inputs(name, base, branch_tensors, origins)
    method.check_coefficients(coefficients)
    if route == "matrix" and row_blocks > 1:
        rows = base.shape[0] // row_blocks
        blocks = [slice(k * rows, (k + 1) * rows) for k in range(row_blocks)]
        merged = torch.cat([
            _merge_checked_inputs(method, route, base[rows_k], [_row_block(t, rows_k) for t in branch_tensors],
                                  coefficients, compute_dtype, generator)
            for rows_k in blocks
        ])
    else:
        merged = _merge_checked_inputs(method, route, base, branch_tensors, coefficients, compute_dtype, generator)
    merged = merged.to(out_dtype)
    check_finite(name, merged, "the merged result", RESULT_HINT)
    if route == "matrix" and base.numel() * len(branch_tensors) >= TRIM_AFTER_ELEMENTS:
        release_free_heap()
    return merged


TRIM_AFTER_ELEMENTS = 1 << 24
"""Matrix merges of at least this many stacked entries give the heap's free memory back
(:mod:`drm_lightning.heap`): below it the merge's buffers are too small to matter."""


def _row_block(t: BranchTensor, rows: slice) -> BranchTensor:
    """Rows ``rows`` of a branch tensor; for LoRA factors ``(B, A)`` that is ``(B[rows], A)``."""
    if t is None:
        return None
    if isinstance(t, Tensor):
        return t[rows]
    return (t[0][rows], t[1])


def _merge_checked_inputs(
    method: MergeMethod,
    route: Route,
    base: Tensor,
    branch_tensors: Sequence[BranchTensor],
    coefficients: Sequence[float] | Tensor,
    compute_dtype: torch.dtype,
    generator: torch.Generator | None,
) -> Tensor:
    """``base + merged delta`` in ``compute_dtype`` (inputs already checked finite)."""
    coef = torch.as_tensor(coefficients, dtype=compute_dtype, device=base.device).reshape(-1)
    base_c = base.detach().to(compute_dtype)
    dense = [t for t in branch_tensors if isinstance(t, Tensor)]
    if route == "matrix" and len(dense) < len(branch_tensors):
        if not dense:
            factors = [
                None if t is None else (t[0].to(base.device, compute_dtype), t[1].to(base.device, compute_dtype))
                for t in branch_tensors
            ]
            with finite_inputs_checked():
                delta = method.merge_lowrank(factors, coef, tuple(base.shape), generator=generator)
            return base_c + delta
    deltas = base_c.new_empty((len(branch_tensors), *base_c.shape))
    for i, t in enumerate(branch_tensors):
        _as_delta(t, base_c, compute_dtype, out=deltas[i])
    # The base and branches were checked (a difference that overflows half precision is caught
    # by the check of the merged result); the method need not pass over the stack again.
    with finite_inputs_checked():
        if route == "matrix":
            delta = method.merge_matrix(deltas, coef, generator=generator)
        else:
            delta = method.merge_fallback(deltas, coef, generator=generator)
    return base_c + delta


def _as_delta(t: BranchTensor, base: Tensor, dtype: torch.dtype, *, out: Tensor) -> Tensor:
    """Write one branch's delta into ``out`` (a slice of the preallocated stack)."""
    if t is None:
        return out.zero_()
    if isinstance(t, Tensor):
        return torch.sub(t.detach().to(base.device, dtype), base, out=out)
    return torch.matmul(t[0].to(base.device, dtype), t[1].to(base.device, dtype), out=out)


def _branch_tensor(branch: Any, name: str, route: Route) -> BranchTensor:
    if _is_lora(branch):
        return branch.lowrank(name)
    return branch.get(name)


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
    (:func:`drm_lightning.merge_pieces.merges_in_pieces`) comes as a
    :class:`~drm_lightning.sources.RowPieces` instead of a tensor: memory then stays
    bounded by a piece. Without it every value is a tensor. File sources are asked to read
    the next tensor ahead while one merges (:class:`~drm_lightning.sources.read_ahead.ReadAhead`).
    """
    if seed is None:
        seed = int(getattr(method.params, "seed", 0) or 0)
    coefs = validate_coefficients(coefficients, len(branches), method)
    plan = plan if plan is not None else plan_merge(base, branches, routing=routing, coefficients=coefs)
    items: Any = plan
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(plan, desc=f"merging ({getattr(method, 'registered_name', method.name)})", unit="tensor")
    origins = [_origin(base, None), *(_origin(b, i) for i, b in enumerate(branches))]
    with ReadAhead([base, *branches]) as ahead:
        for position, item in enumerate(items):
            if position + 1 < len(plan):  # the disk reads the next tensor while this one merges
                ahead.ask([plan[position + 1].name])
            yield from _merge_item(
                method, item, base, branches, coefs, compute_dtype=compute_dtype, out_dtype=out_dtype,
                seed=seed, piece_elements=piece_elements, origins=origins,
            )


def _merge_item(
    method: MergeMethod, item: PlannedTensor, base: Any, branches: Sequence[Any], coefs: list[float], *,
    compute_dtype: torch.dtype, out_dtype: torch.dtype | None, seed: int, piece_elements: int | None,
    origins: list[str],
) -> Iterator[tuple[str, Any]]:
    """:func:`iter_merge`'s ``(name, merged)`` of one planned tensor."""
    from drm_lightning.merge_pieces import merge_in_pieces, merges_in_pieces  # imports this module
    from drm_lightning.methods.rowwise import rows_per_piece

    if item.route == "ignore":
        yield item.name, merge_tensor(method, "ignore", base.get(item.name), [], coefs, out_dtype=out_dtype)
        return
    generator = tensor_generator(seed, item.name) if method.uses_randomness else None
    if merges_in_pieces(method, item, base, branches, piece_elements):
        pieces = merge_in_pieces(
            method, item, base, branches, coefs, compute_dtype=compute_dtype, out_dtype=out_dtype,
            generator=generator, origins=origins,
            piece_rows=rows_per_piece(item.shape, len(branches), int(piece_elements or 0)),
        )
        yield item.name, RowPieces(item.shape, out_dtype or item.dtype, pieces, fresh=True)  # new tensors
        return
    base_t = base.get(item.name)
    branch_ts = [_branch_tensor(branch, item.name, item.route) for branch in branches]
    yield item.name, merge_tensor(
        method, item.route, base_t, branch_ts, coefs, compute_dtype=compute_dtype,
        out_dtype=out_dtype, generator=generator, name=item.name, origins=origins,
        row_blocks=item.row_blocks,
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
            method, base_src, branch_srcs, coefficients=coefficients, routing=routing,
            compute_dtype=compute_dtype, out_dtype=out_dtype, seed=seed, progress=progress,
        )
    )
