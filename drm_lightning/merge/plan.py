"""The planner: every input checked against the base from metadata before a weight is read.

Names, shapes, dtypes, finiteness of coefficients and the route of each tensor; one set of
messages for every entry point (CLI, Python API, engines).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from drm_lightning.merge.routing import Routing
from drm_lightning.methods.base import MergeMethod, Route
from drm_lightning.methods.ops import (  # check_finite: also imported from here by the engines
    dtype_problem,
)

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


def origin_label(source: Any, index: int | None) -> str:
    label = getattr(source, "origin", None) or getattr(source, "describe", lambda: None)()
    who = "base" if index is None else f"branch {index}"
    return f"{who} ({label})" if label else who


def is_lora_source(source: Any) -> bool:
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
    bad = [
        f"branches[{i}].coefficient={v}"
        for i, v in enumerate(values)
        if not v >= 0 or v != v or v == float("inf")
    ]
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
    full_branches = [(i, b) for i, b in enumerate(branches) if not is_lora_source(b)]
    for i, branch in full_branches:
        keys = set(branch.keys())
        missing, extra = sorted(base_set - keys), sorted(keys - base_set)
        if missing:
            problems.append(
                f"{origin_label(branch, i)} is missing {len(missing)} key(s) of the base: {_short(missing)}"
            )
        if extra:
            problems.append(
                f"{origin_label(branch, i)} has {len(extra)} key(s) not in the base: {_short(extra)}"
            )
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
            hint = (
                " (vocabulary size differs: resize the embeddings to the base's tokenizer first)"
                if _looks_like_vocab(name)
                else ""
            )
            shape_lines.append(f"  {name}: {listing}{hint}")
        if route != "ignore":
            problems += [
                dtype_refusal(name, who, dt)
                for who, dt in dtypes.items()
                if dtype_problem(name, who, dt)
            ]
        split_problem = routing.row_split_problem(name, shape)
        if split_problem:
            problems.append(split_problem)
        planned.append(PlannedTensor(name, shape, dtype, route, routing.row_blocks(name, shape)))
    if shape_lines:
        problems.append(
            "shape mismatch in {} tensor(s):\n{}".format(len(shape_lines), "\n".join(shape_lines))
        )
    if problems:
        raise ValueError("cannot merge:\n- " + "\n- ".join(problems))
    return planned


def dtype_refusal(name: str, origin: str, dtype: torch.dtype) -> str:
    """The message refusing a tensor of ``dtype``
    (:func:`~drm_lightning.methods.ops.dtype_problem`, with a hint for non-float ones)."""
    problem = dtype_problem(name, origin, dtype) or ""
    return problem + DTYPE_HINT if not dtype.is_floating_point else problem


def _short(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")
