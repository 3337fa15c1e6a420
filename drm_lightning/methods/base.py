"""The merge-method interface and the registry of named methods.

A method turns N branch deltas of one tensor into one merged delta. It declares its name,
its paper and its parameters (a pydantic model with defaults and validation); upper layers
(the merge loop, the distributed engine, the CLI, the Lightning callback) only ever call
the four methods of :class:`MergeMethod`.

Example:
    >>> import torch
    >>> from drm_lightning.methods import get_method
    >>> method = get_method("drm", drop_rate=0.5)
    >>> deltas = torch.randn(3, 8, 6, dtype=torch.float64)
    >>> method.merge_matrix(deltas, torch.ones(3, dtype=torch.float64)).shape
    torch.Size([8, 6])
"""

from __future__ import annotations

import difflib
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from drm_lightning.methods.ops import (
    check_finite,
    check_merge_inputs,
    finite_inputs_checked,
    inputs_checked,
)
from drm_lightning.methods.rowwise import SERIAL, DeltaRows, PieceRunner, StoredPiece, StoredRows

Route = Literal["matrix", "fallback", "ignore"]
LowRankFactors = tuple[Tensor, Tensor]
"""``(B, A)`` with ``delta = B @ A``: B is (n, rank), A is (rank, m); scaling folded into B."""


class MethodParams(BaseModel):
    """Base of every method's parameter model: frozen, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def closest_names(name: str, valid: Sequence[str]) -> str:
    """Human-readable hint listing the closest valid names to ``name``."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}valid: {', '.join(sorted(valid))}"


ENTRY_POINTS = ("merge_matrix", "merge_fallback", "merge_lowrank")
"""The whole-tensor merge calls of :class:`MergeMethod` that check their inputs."""


def checked_entry(impl: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``impl`` (a merge entry point) behind the checks of the public call.

    Non-float deltas, NaN/Inf in the deltas, factors or coefficients, and coefficients the
    method cannot use (:meth:`MergeMethod.coefficient_problem`) raise ``ValueError`` — unless
    the caller already checked the inputs (:func:`~drm_lightning.methods.ops.finite_inputs_checked`,
    the merge loop), so a stack is never checked twice. ``impl`` and what it calls run
    marked as checked.
    """
    if getattr(impl, "checks_inputs", False):
        return impl

    @functools.wraps(impl)
    def entry(self: MergeMethod, *args: Any, **kwargs: Any) -> Tensor:
        if inputs_checked():
            return impl(self, *args, **kwargs)
        deltas = args[0] if args else kwargs.get("deltas", kwargs.get("factors"))
        coefficients = args[1] if len(args) > 1 else kwargs.get("coefficients")
        check_merge_inputs(deltas, coefficients)
        if isinstance(kwargs.get("base"), Tensor):
            check_finite("base", kwargs["base"], "the merge call")
        if isinstance(coefficients, Tensor):
            self.check_coefficients(coefficients)
        with finite_inputs_checked():
            return impl(self, *args, **kwargs)

    entry.checks_inputs = True  # type: ignore[attr-defined]
    return entry


class MergeMethod(ABC):
    """A merge method: N branch deltas of one tensor in, one merged delta out.

    Subclasses set ``name``, ``paper``, ``Params`` and implement :meth:`merge_matrix` and
    :meth:`merge_fallback`. All inputs are float tensors in the compute dtype, branches
    stacked on dim 0; the output is a merged *delta* in the same dtype (the caller adds it
    to the base and casts). Every class's :data:`ENTRY_POINTS` are wrapped in
    :func:`checked_entry`: a direct call refuses NaN/Inf and non-float inputs by name, as the
    merge loop does, and the implementations need no checks of their own.
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type[MethodParams]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for entry in ENTRY_POINTS:
            if entry in cls.__dict__:
                setattr(cls, entry, checked_entry(cls.__dict__[entry]))

    def __init__(self, **params: Any) -> None:
        self.params = build_params(self.name, self.Params, params)

    def coefficient_problem(self, coefficients: Sequence[float]) -> str | None:
        """Why this method cannot merge with these per-branch coefficients (``None``: it can).

        Checked by every entry point (:func:`drm_lightning.merge.validate_coefficients`, the
        merge loop, the direct calls). Default: any coefficients.
        """
        return None

    def check_coefficients(self, coefficients: Tensor | Sequence[float]) -> None:
        """Raise ``ValueError`` with :meth:`coefficient_problem`'s message, if there is one."""
        problem = self.coefficient_problem(
            [float(c) for c in torch.as_tensor(coefficients).reshape(-1).tolist()]
        )
        if problem:
            raise ValueError(problem)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"

    @property
    def uses_randomness(self) -> bool:
        """True when the result depends on the ``generator`` passed to the merge calls."""
        return False

    @property
    def needs_base(self) -> bool:
        """True when the merge calls need the base tensor itself, not only the deltas (slerp
        interpolates whole weights): :func:`~drm_lightning.merge.merge_tensor` then passes it
        as ``base=`` (in the compute dtype) to :meth:`merge_matrix` / :meth:`merge_fallback`,
        and merges LoRA branches densified. Only whole-tensor merges have the base: the row
        pieces route reads such a method's tensors whole
        (:func:`~drm_lightning.merge.pieces.merges_in_pieces`), and it keeps :meth:`row_local`
        False (the default) so ZeRO-3 gathers its tensors to an owner. Default: False."""
        return False

    def for_tensor(self, name: str) -> MergeMethod:
        """The method that merges the tensor ``name``: this one, unless parameters vary per
        tensor (mergekit's per-layer ``t`` gradients: :mod:`drm_lightning.config.mergekit`).
        :func:`~drm_lightning.merge.merge_tensor` asks it before merging."""
        return self

    @abstractmethod
    def merge_matrix(
        self, deltas: Tensor, coefficients: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Merge the (N, n, m) deltas of one 2-D weight into an (n, m) delta."""

    @abstractmethod
    def merge_fallback(
        self, deltas: Tensor, coefficients: Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Merge the (N, *shape) deltas of a non-matrix tensor (bias, norm, embedding...)."""

    def merge_lowrank(
        self,
        factors: Sequence[LowRankFactors | None],
        coefficients: Tensor,
        shape: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Merge LoRA-style deltas ``B_i @ A_i`` (``None`` = untouched branch).

        The default densifies; methods with an exact factored path override it.
        """
        dtype = coefficients.dtype
        dense = coefficients.new_zeros((len(factors), *shape))
        for i, pair in enumerate(factors):
            if pair is not None:
                dense[i] = pair[0].to(coefficients.device, dtype) @ pair[1].to(
                    coefficients.device, dtype
                )
        return self.merge_matrix(dense, coefficients, generator=generator)

    merge_lowrank = checked_entry(merge_lowrank)

    def merges_in_rows(self, route: Route, shape: Sequence[int], n_branches: int) -> bool:
        """True when :meth:`merge_rows` merges piece by piece (memory bounded by a piece)
        rather than reading the whole tensor. Default: no."""
        return False

    def merge_rows(
        self,
        route: Route,
        read: DeltaRows,
        shape: Sequence[int],
        coefficients: Tensor,
        *,
        piece_rows: int,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """The merged delta of a tensor of ``shape``, yielded in consecutive row pieces.

        ``read(start, stop)`` gives the (N, stop - start, ...) deltas of those rows. The
        pieces together equal :meth:`merge_matrix` / :meth:`merge_fallback` of the whole
        tensor. The default reads the whole tensor and yields it once; entry-wise methods
        override it (with :meth:`merges_in_rows`) to make a few passes over pieces of
        ``piece_rows`` rows instead (:mod:`drm_lightning.methods.rowwise`).
        """
        deltas = read(0, int(shape[0]))
        merge = self.merge_matrix if route == "matrix" else self.merge_fallback
        with finite_inputs_checked():  # `read` checks what it reads
            merged = merge(deltas, coefficients, generator=generator)
        yield merged

    def merge_stored_rows(
        self,
        route: Route,
        read: StoredRows,
        shape: Sequence[int],
        coefficients: Tensor,
        *,
        piece_rows: int,
        stored: Sequence[torch.dtype],
        out_dtype: torch.dtype,
        compute_dtype: torch.dtype,
        runner: PieceRunner = SERIAL,
    ) -> Iterator[StoredPiece] | None:
        """``base + merged delta`` of a tensor read as stored row pieces (``read(start, stop)``
        gives the base's rows and each branch's, in their ``stored`` dtypes), piece by piece, or
        ``None`` when the method has no such route for these inputs (the caller then uses
        :meth:`merge_rows`). The pieces equal the base plus :meth:`merge_rows`' pieces, rounded
        to ``out_dtype``. ``runner`` runs the pieces (the engine's threads; default: serial).
        Default: ``None``; the task-vector recipe fuses its passes here
        (:mod:`drm_lightning.methods.task_vector_fused`)."""
        return None

    def row_local(self, route: Route, shape: Sequence[int], n_branches: int) -> bool:
        """True when a tensor can be merged from row slices held on different ranks, with
        only collective sums and top-k between them (the ZeRO-3 sharded route). Default: no."""
        return False

    def workspace_elements(self, route: Route, shape: Sequence[int], n_branches: int) -> int:
        """Compute-dtype elements the method holds beyond the N stacked deltas (peak estimate)."""
        return 0

    def cost(self, route: Route, shape: Sequence[int], n_branches: int) -> float:
        """Estimated FLOPs of merging one tensor, for balancing work across ranks."""
        if route == "ignore":
            return 0.0
        return float(8 * math.prod(int(s) for s in shape) * n_branches)


def parameter_problems(
    method: str, params_cls: type[MethodParams], preset: dict[str, Any], params: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """``(key, problem)`` for every key of ``params`` that is unknown or fixed by ``preset``.

    The one check behind :func:`get_method`, direct construction (:func:`build_params`) and
    the config's ``parameters:`` section (which prefixes the key itself).

    Example:
        >>> from drm_lightning.methods.drm import DRMParams
        >>> parameter_problems("drm", DRMParams, {}, {"drop_rte": 0.5})
        [('drop_rte', "unknown parameter for method 'drm' (did you mean 'drop_rate'? valid: ...)")]
    """
    settable = sorted(k for k in params_cls.model_fields if k not in preset)
    out = []
    for key in params:
        if key in preset:
            out.append(
                (
                    key,
                    f"fixed to {preset[key]!r} by method {method!r} "
                    f"(settable: {', '.join(settable)})",
                )
            )
        elif key not in params_cls.model_fields:
            out.append(
                (
                    key,
                    f"unknown parameter for method {method!r} "
                    f"({closest_names(str(key), settable)})",
                )
            )
    return out


def _raise_problems(problems: list[tuple[str, str]]) -> None:
    """One ``ValueError`` for every problem, each naming its parameter."""
    if problems:
        raise ValueError(
            "; ".join(
                problem.replace("unknown parameter", f"unknown parameter {key!r}", 1)
                if problem.startswith("unknown")
                else f"parameter {key!r} is {problem}"
                for key, problem in problems
            )
        )


def build_params(method: str, params_cls: type[MethodParams], params: dict[str, Any]) -> Any:
    """Validate ``params`` for ``method``; errors name the parameter and the closest valid ones."""
    _raise_problems(parameter_problems(method, params_cls, {}, params))
    try:
        return params_cls(**params)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "parameters"
            lines.append(f"{method}.{loc}: {e['msg']} (got {e.get('input')!r})")
        raise ValueError("invalid parameters: " + "; ".join(lines)) from None


_REGISTRY: dict[str, tuple[type[MergeMethod], dict[str, Any]]] = {}


def register_method(name: str, cls: type[MergeMethod], **preset: Any) -> None:
    """Register ``cls`` under ``name``; ``preset`` parameters are fixed for this name.

    Families are configurations of one class: ``register_method("ties", TaskVectorMethod,
    sparsify="magnitude", elect_signs=True)``.
    """
    if name in _REGISTRY:
        raise ValueError(f"merge method {name!r} is already registered")
    _REGISTRY[name] = (cls, preset)


def available_methods() -> list[str]:
    """Names accepted by :func:`get_method`."""
    return sorted(_REGISTRY)


def method_class(name: str) -> tuple[type[MergeMethod], dict[str, Any]]:
    """The class and fixed preset behind a registered name (``ValueError`` if unknown)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown merge method {name!r} ({closest_names(name, list(_REGISTRY))})")
    return _REGISTRY[name]


def method_parameters(name: str) -> dict[str, Any]:
    """The user-settable parameters of a registered method with their defaults."""
    cls, preset = method_class(name)
    return {k: f.default for k, f in cls.Params.model_fields.items() if k not in preset}


def get_method(name: str, **params: Any) -> MergeMethod:
    """Instantiate the registered method ``name`` with ``params``.

    Raises:
        ValueError: unknown method or parameter (with the closest valid names), a parameter
            fixed by the method's preset, or an invalid value.
    """
    cls, preset = method_class(name)
    _raise_problems(parameter_problems(name, cls.Params, preset, params))
    method = cls(**preset, **params)
    method.registered_name = name  # type: ignore[attr-defined]
    return method
