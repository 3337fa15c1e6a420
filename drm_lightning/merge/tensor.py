"""One tensor merged: base and branch tensors in, the merged tensor out, inputs and result checked.

Every whole-tensor merge of the package goes through :func:`merge_tensor`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from drm_lightning.merge.heap import release_free_heap
from drm_lightning.merge.plan import dtype_refusal, is_lora_source
from drm_lightning.methods.base import LowRankFactors, MergeMethod, Route
from drm_lightning.methods.ops import (  # check_finite: also imported from here by the engines
    SUPPORTED_DTYPES,
    check_finite,
    dtype_problem,
    finite_inputs_checked,
)

RESULT_HINT = (
    "; the inputs were finite, so the merge overflowed the output dtype: check the branch "
    "coefficients and the inputs' magnitudes"
)


def check_fits(name: str, value: Tensor, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` if a finite merged ``value`` would overflow to Inf when cast to
    ``dtype``."""
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
            raise ValueError(dtype_refusal(name, origin, part.dtype))
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
    :meth:`~drm_lightning.merge.routing.Routing.row_blocks`). The method merging ``name`` is
    ``method.for_tensor(name)``; one that :attr:`~drm_lightning.methods.MergeMethod.needs_base`
    gets the base (in ``compute_dtype``) as ``base=``.

    Example:
        >>> from drm_lightning.methods import get_method
        >>> base = torch.zeros(3, 2)
        >>> merged = merge_tensor(get_method("drm", drop_rate=0.0), "matrix", base,
        ...                       [torch.ones(3, 2)], [1.0])
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
    method = method.for_tensor(name)
    method.check_coefficients(coefficients)
    if route == "matrix" and row_blocks > 1:
        rows = base.shape[0] // row_blocks
        blocks = [slice(k * rows, (k + 1) * rows) for k in range(row_blocks)]
        merged = torch.cat(
            [
                _merge_checked_inputs(
                    method,
                    route,
                    base[rows_k],
                    [_row_block(t, rows_k) for t in branch_tensors],
                    coefficients,
                    compute_dtype,
                    generator,
                )
                for rows_k in blocks
            ]
        )
    else:
        merged = _merge_checked_inputs(
            method, route, base, branch_tensors, coefficients, compute_dtype, generator
        )
    merged = merged.to(out_dtype)
    check_finite(name, merged, "the merged result", RESULT_HINT)
    if route == "matrix" and base.numel() * len(branch_tensors) >= TRIM_AFTER_ELEMENTS:
        release_free_heap()
    return merged


TRIM_AFTER_ELEMENTS = 1 << 24
"""Matrix merges of at least this many stacked entries give the heap's free memory back
(:mod:`drm_lightning.merge.heap`): below it the merge's buffers are too small to matter."""


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
    if route == "matrix" and len(dense) < len(branch_tensors) and not method.needs_base:
        if not dense:
            factors = [
                None
                if t is None
                else (t[0].to(base.device, compute_dtype), t[1].to(base.device, compute_dtype))
                for t in branch_tensors
            ]
            with finite_inputs_checked():
                delta = method.merge_lowrank(factors, coef, tuple(base.shape), generator=generator)
            return base_c + delta
    deltas = base_c.new_empty((len(branch_tensors), *base_c.shape))
    for i, t in enumerate(branch_tensors):
        as_delta(t, base_c, compute_dtype, out=deltas[i])
    # The base and branches were checked (a difference that overflows half precision is caught
    # by the check of the merged result); the method need not pass over the stack again.
    merge = method.merge_matrix if route == "matrix" else method.merge_fallback
    with finite_inputs_checked():
        if method.needs_base:
            delta = merge(deltas, coef, generator=generator, base=base_c)  # type: ignore[call-arg]
        else:
            delta = merge(deltas, coef, generator=generator)
    return base_c + delta


def as_delta(t: BranchTensor, base: Tensor, dtype: torch.dtype, *, out: Tensor) -> Tensor:
    """Write one branch's delta into ``out`` (a slice of the preallocated stack)."""
    if t is None:
        return out.zero_()
    if isinstance(t, Tensor):
        return torch.sub(t.detach().to(base.device, dtype), base, out=out)
    return torch.matmul(t[0].to(base.device, dtype), t[1].to(base.device, dtype), out=out)


def branch_tensor(branch: Any, name: str, route: Route) -> BranchTensor:
    if is_lora_source(branch):
        return branch.lowrank(name)
    return branch.get(name)
