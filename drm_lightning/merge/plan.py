"""The planner: every input checked against the base from metadata before a weight is read.

Names, shapes, dtypes, finiteness of coefficients and the route of each tensor; one set of
messages for every entry point (CLI, Python API, engines).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
    """What the planner, the merge loop and the engines need of an input: the part of
    :class:`~drm_lightning.sources.WeightSource` every reader has (``meta`` gives ``.shape``
    and ``.dtype``; a distributed ``TensorSet`` is a weight source too)."""

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
        return math.prod(self.shape)


def origin_label(source: Any, index: int | None) -> str:
    """``base (where from)`` or ``branch i (where from)``: an input named in messages."""
    return input_label("base" if index is None else f"branch {index}", source)


def input_label(who: str, source: Any) -> str:
    """``who (where from)``, from the source's ``origin`` or ``describe()``; just ``who`` when
    the source tells nothing more."""
    label = getattr(source, "origin", None) or getattr(source, "describe", lambda: None)()
    return f"{who} ({label})" if label and label != who else who


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
    coefficients are also checked for it (:func:`validate_coefficients`). LoRA branches are
    checked by their own reader (against the base, when opened); the others by
    :func:`plan_tensors`.

    Raises:
        ValueError: missing or extra keys, shape mismatches (every key with all shapes),
            vocabulary-size mismatches, non-float or unsupported dtypes, bad coefficients.
    """
    validate_coefficients(coefficients, len(branches), method)
    full = {i: b for i, b in enumerate(branches) if not is_lora_source(b)}
    return plan_tensors(base, full, routing=routing)


def plan_tensors(
    base: TensorSourceLike,
    branches: Sequence[TensorSourceLike] | Mapping[int, TensorSourceLike],
    *,
    routing: Routing | None = None,
    target: TensorSourceLike | None = None,
    names: Sequence[str] | None = None,
) -> list[PlannedTensor]:
    """The per-tensor checks of every entry point (the disk job, the merge loop, the in-memory
    and distributed engines), from metadata only; each tensor gets its route.

    The tensors planned are ``names``, else the target's, else the base's (in that order).
    Every input (target, base, branches) must hold each of them, all with one shape and, unless
    the tensor is routed to ``ignore``, a dtype the merge reads; a fused-QKV matrix must split
    into its blocks. When the whole base is merged (no target, no ``names``), a branch holding
    a name the base lacks is refused too; otherwise inputs may hold more (a state dict's
    buffers next to a module's parameters). ``branches`` as a mapping keeps each branch's
    number when some are left out (LoRA branches). Shape and dtype of a plan entry are the
    base's.

    Raises:
        ValueError: every problem found, in one message (``cannot merge:`` then one line each).
    """
    routing = routing or Routing()
    numbered = branches if isinstance(branches, Mapping) else dict(enumerate(branches))
    holders: list[tuple[str, TensorSourceLike]] = [("base", base)]
    holders += [(f"branch {i}", b) for i, b in numbered.items()]
    if target is not None:
        holders.insert(0, ("target", target))
    keys = {who: list(reader.keys()) for who, reader in holders}
    held = {who: set(k) for who, k in keys.items()}
    reference = (
        "names to merge" if names is not None else "target" if target is not None else "base"
    )
    wanted = list(names) if names is not None else keys[reference]
    wanted_set = set(wanted)
    problems: list[str] = []
    for who, reader in holders:
        label = input_label(who, reader)
        missing = sorted(wanted_set - held[who])
        if missing:
            problems.append(
                f"{label} is missing {len(missing)} key(s) of the {reference}: {_short(missing)}"
            )
        extra = sorted(held[who] - wanted_set) if reference == "base" else []
        if extra:
            problems.append(f"{label} has {len(extra)} key(s) not in the base: {_short(extra)}")
    planned: list[PlannedTensor] = []
    shape_lines: list[str] = []
    for name in wanted:
        metas = {who: reader.meta(name) for who, reader in holders if name in held[who]}
        shapes = {who: tuple(int(s) for s in m.shape) for who, m in metas.items()}
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
            hint = (
                " (vocabulary size differs: resize the embeddings to the base's tokenizer first)"
                if _looks_like_vocab(name)
                else ""
            )
            shape_lines.append(f"  {name}: {listing}{hint}")
        if "base" not in metas:
            continue
        shape, dtype = shapes["base"], metas["base"].dtype
        route = routing.route(name, shape)
        if route != "ignore":
            problems += [
                dtype_refusal(name, who, m.dtype)
                for who, m in metas.items()
                if dtype_problem(name, who, m.dtype)
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
