"""The ``drm-merge`` YAML configuration: a pydantic schema in the shape mergekit users know.

A configuration names a method, a base model, the branches to merge into it and the method's
parameters::

    method: drm
    base: checkpoints/base
    branches:
      - checkpoints/math                      # a path: coefficient 1.0
      - {path: checkpoints/code, coefficient: 0.7}
      - path: adapters/chat-lora              # a PEFT LoRA adapter folder is detected
        coefficient: 0.5
      - {path: runs/last.ckpt, prefix: model.}  # strip (or add_prefix: add) a name prefix
      - {path: runs/epoch_3.pt, key: state_dict, prefix: module.}  # the entry of the file
    parameters: {drop_rate: 0.8, direction: horizontal}
    compute_dtype: float32                    # precision of the merge math
    out_dtype: bfloat16                       # default: each base tensor's dtype
    routing: {ignore: ["score\\\\."]}             # regexes (include / exclude / ignore)
    seed: 0                                   # randomness of DARE, per tensor

A file with mergekit's ``merge_method`` (and no ``method``) is in mergekit's format: it is
checked and run with mergekit's semantics by :mod:`drm_lightning.config.mergekit`. In this
format, mergekit spellings are accepted as aliases: ``base_model`` for ``base``, ``models``
for ``branches``, ``model`` for ``path``, ``weight`` (also nested under a branch's
``parameters``) for ``coefficient`` and ``dtype`` for ``compute_dtype``.
Relative paths are resolved against the current working directory (not the config file's
folder), as in mergekit. A key given twice in one mapping and ``true``/``false`` where a
number is expected are refused; errors of a config file name the line of the value.

A config file is data: it cannot opt in to running code. ``trust_pickles:`` in a file is
refused (the opt-in is ``drm-merge --trust-pickles``), and the ``module:function`` references
of an alignment config are imported, and the validation command of ``alpha_search:``
(:mod:`drm_lightning.config.alpha_search`) is run, only with ``drm-merge --trust-code``
(``code="import"`` of :func:`load_config`).

Every mistake is reported at once, each with its field path (``branches[1].coefficient:
must be >= 0 (got -0.5)``); unknown keys, method names and method parameters come with the
closest valid names. Validation reads no weights: it checks that the paths exist and the
method parameters are valid; :func:`drm_lightning.merge.plan_merge` then checks the tensors'
metadata.

Example:
    >>> cfg = MergeConfig.model_validate(
    ...     {"method": "drm", "base": ".", "branches": [".", {"path": ".", "coefficient": 0.5}],
    ...      "parameters": {"drop_rate": 0.5}}
    ... )
    >>> cfg.resolved_coefficients()
    [1.0, 0.5]
    >>> cfg.build_method()
    DRM(drop_rate=0.5, direction='horizontal', ...)
    >>> try:
    ...     MergeConfig.model_validate({"method": "drn", "base": ".", "branches": ["."]})
    ... except ValidationError as err:
    ...     print(format_validation_error(err))
    method: unknown merge method 'drn' (did you mean 'drm'? valid: ...)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import (
    AliasChoices,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from drm_lightning.config.alpha_search import AlphaSearchSection, check_alpha_scaling
from drm_lightning.config.errors import (  # noqa: F401 - ConfigError, format_* re-exported
    ConfigError,
    _error,
    _friendly_message,
    _reraise,
    _Section,
    format_loc,
    format_validation_error,
)
from drm_lightning.config.values import (
    BOOL_NOT_NUMBER,
    bool_params,
    bools_where_numbers,
    check_path,
)
from drm_lightning.merge.routing import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, Routing
from drm_lightning.methods import MergeMethod, available_methods, get_method
from drm_lightning.methods.base import method_class, parameter_problems
from drm_lightning.sources.factory import CHECKPOINT_SUFFIXES
from drm_lightning.sources.torch_file import KEY_SEPARATOR

ComputeDType = Literal["float32", "float64"]
OutDType = Literal["float16", "bfloat16", "float32", "float64"]

_DTYPE_ALIASES: dict[str, str] = {
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "fp64": "float64",
    "double": "float64",
    "f64": "float64",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
ADAPTER_CONFIG = "adapter_config.json"


def _normalize_dtype(value: Any) -> Any:
    if isinstance(value, str):
        low = value.strip().lower().removeprefix("torch.")
        return _DTYPE_ALIASES.get(low, low)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


# --------------------------------------------------------------------------------- sections


class BranchConfig(_Section):
    """One branch: a checkpoint (or PEFT LoRA adapter folder) and its coefficient λ.

    A bare string is accepted for ``{path: ...}``; mergekit's ``{model: ..., parameters:
    {weight: ...}}`` is accepted too. ``key`` names the entry of a torch checkpoint file that
    holds the state dict (open_clip's and most trainers' ``state_dict``), nested entries
    written with ``/`` (``model/ema``).
    """

    aliases: ClassVar[dict[str, str]] = {"model": "path", "weight": "coefficient"}

    path: Path = Field(validation_alias=AliasChoices("path", "model"))
    prefix: str | None = Field(
        None,
        min_length=1,
        description="strip this prefix from the branch's tensor names; names without it are "
        "left out (e.g. 'model.' for a LightningModule holding the network in self.model)",
    )
    add_prefix: str | None = Field(
        None, min_length=1, description="put this prefix in front of every tensor name"
    )
    key: str | None = Field(
        None,
        min_length=1,
        description="the entry of a .ckpt/.bin/.pt/.pth file that holds the state dict "
        f"('state_dict'); nested entries written with {KEY_SEPARATOR!r} ('model/ema')",
    )
    coefficient: float | None = Field(
        None,
        ge=0.0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("coefficient", "weight"),
        description="λ_i, the branch's weight (default 1.0)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_path_or_mergekit(cls, data: Any) -> Any:
        if isinstance(data, (str, Path)):
            return {"path": data}
        if isinstance(data, Mapping) and isinstance(data.get("parameters"), Mapping):
            flat = {k: v for k, v in data.items() if k != "parameters"}
            for key, value in data["parameters"].items():
                flat.setdefault(key, value)
            return flat
        return data

    @field_validator("path")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        return check_path(value, "branch")

    @field_validator("key")
    @classmethod
    def _entry_path(cls, value: str | None) -> str | None:
        if value is not None and "" in value.split(KEY_SEPARATOR):
            raise ValueError(
                f"an empty entry name; nested entries are written with {KEY_SEPARATOR!r} "
                "between names, e.g. 'state_dict' or 'model/ema'"
            )
        return value

    @classmethod
    def _more_errors(cls, data: Mapping[str, Any]) -> list[InitErrorDetails]:
        path, key = data.get("path", data.get("model")), data.get("key")
        if key is None or not isinstance(path, (str, Path)) or not Path(path).exists():
            return []
        path = Path(path)
        if path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES:
            return []
        what = "a folder" if path.is_dir() else f"a {path.suffix or 'suffix-less'} file"
        return [
            _error(
                ("key",),
                f"only applies to a torch checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}); "
                f"{str(path)!r} is {what}",
                key,
            )
        ]

    @model_validator(mode="after")
    def _prefix_not_for_lora(self) -> BranchConfig:
        if (self.prefix or self.add_prefix) and self.is_lora:
            raise ValueError(
                "prefix/add_prefix do not apply to a LoRA adapter folder (its names are mapped "
                "to the base's names already)"
            )
        return self

    @property
    def is_lora(self) -> bool:
        """True if the path is a PEFT adapter folder (it holds ``adapter_config.json``)."""
        return self.path.is_dir() and (self.path / ADAPTER_CONFIG).is_file()


class RoutingConfig(_Section):
    """Name patterns (Python regexes, matched at the start of the name) for each route.

    ``include``/``exclude`` decide which 2-D tensors take the method's matrix path (omit
    them for the defaults, which send embeddings and output heads to the fallback path);
    tensors matching ``ignore`` keep the base value bit for bit.
    """

    include: list[str] | None = Field(None, description=f"default: {list(DEFAULT_INCLUDE)}")
    exclude: list[str] | None = Field(None, description=f"default: {list(DEFAULT_EXCLUDE)}")
    ignore: list[str] = Field(default_factory=list)
    fused_qkv: list[str] = Field(
        default_factory=list,
        description=(
            "matrices stacking Q, K, V by rows (e.g. '.*in_proj_weight'): merged as 3 blocks"
        ),
    )

    @classmethod
    def _more_errors(cls, data: Mapping[str, Any]) -> list[InitErrorDetails]:
        errors = []
        for key in ("include", "exclude", "ignore", "fused_qkv"):
            patterns = data.get(key)
            if not isinstance(patterns, list):
                continue
            for i, pattern in enumerate(patterns):
                if isinstance(pattern, str):
                    try:
                        re.compile(pattern)
                    except re.error as err:
                        errors.append(
                            _error((key, i), f"invalid regular expression: {err}", pattern)
                        )
        return errors

    @field_validator("include", "exclude", "ignore", "fused_qkv", mode="before")
    @classmethod
    def _not_a_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(f"must be a list of regexes, e.g. [{value!r}]")
        return value

    def build(self) -> Routing:
        """The :class:`~drm_lightning.merge.routing.Routing` these patterns describe."""
        return Routing(
            include=DEFAULT_INCLUDE if self.include is None else self.include,
            exclude=DEFAULT_EXCLUDE if self.exclude is None else self.exclude,
            ignore=self.ignore,
            fused_qkv=self.fused_qkv,
        )


class MergeConfig(_Section):
    """A ``drm-merge`` configuration (see the module docstring for the YAML shape)."""

    aliases: ClassVar[dict[str, str]] = {
        "merge_method": "method",
        "base_model": "base",
        "models": "branches",
        "dtype": "compute_dtype",
    }

    method: str = Field(
        validation_alias=AliasChoices("method", "merge_method"),
        description="a registered method: drm, ties, task_arithmetic, dare_ties, dare_linear, "
        "linear",
    )
    base: Path = Field(validation_alias=AliasChoices("base", "base_model"))
    branches: list[BranchConfig] = Field(
        min_length=1, validation_alias=AliasChoices("branches", "models")
    )
    coefficients: list[float] | None = Field(
        None, description="λ per branch, as a list (alternative to branches[i].coefficient)"
    )
    parameters: dict[str, Any] = Field(default_factory=dict, description="the method's parameters")
    compute_dtype: ComputeDType = Field(
        "float32", validation_alias=AliasChoices("compute_dtype", "dtype")
    )
    out_dtype: OutDType | None = Field(None, description="default: each base tensor's dtype")
    routing: RoutingConfig = Field(default_factory=lambda: RoutingConfig.model_validate({}))
    seed: int | None = Field(
        None, ge=0, description="seed of the per-tensor generators (DARE); default 0"
    )
    trust_pickles: bool = Field(
        False,
        strict=True,
        description="allow full unpickling of .ckpt/.bin/.pt inputs that hold more than "
        "tensors (it can run code from the file); default: refused. Set by drm-merge "
        "--trust-pickles or in the user's own code, never read from a config file",
    )
    alpha_search: AlphaSearchSection | None = Field(
        None,
        description="search the scale α of the merged delta: base + α·(merged − base) scored "
        "by a validation command for each α of a grid, the best kept (drm-merge only)",
    )

    @field_validator("compute_dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype_names(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        name = _normalize_dtype(value)
        valid = (
            ("float32", "float64") if info.field_name == "compute_dtype" else tuple(TORCH_DTYPES)
        )
        if name not in valid:
            why = (
                "; the merge math runs in float32 or float64 (half-precision inputs are upcast, "
                "set out_dtype to write them back in half precision)"
                if info.field_name == "compute_dtype" and name in TORCH_DTYPES
                else ""
            )
            raise ValueError(f"unsupported dtype {value!r} (valid: {', '.join(valid)}){why}")
        return name

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        method_class(value)  # ValueError with the closest names
        return value

    @field_validator("base")
    @classmethod
    def _base_exists(cls, value: Path) -> Path:
        check_path(value, "base")
        if value.is_dir() and (value / ADAPTER_CONFIG).is_file():
            raise ValueError(
                f"{str(value)!r} is a LoRA adapter; the base must be a full model "
                "(list adapters under branches)"
            )
        return value

    @classmethod
    def _more_errors(cls, data: Mapping[str, Any]) -> list[InitErrorDetails]:
        errors = _parameter_errors(data)
        errors += [_error(loc, BOOL_NOT_NUMBER, value) for loc, value in bools_where_numbers(data)]
        params = data.get("parameters")
        if isinstance(params, Mapping) and "seed" in params and "seed" in data:
            if params["seed"] != data["seed"]:
                errors.append(
                    _error(
                        ("parameters", "seed"),
                        f"differs from the top-level seed {data['seed']!r}; keep one",
                    )
                )
        if not errors and isinstance(data.get("alpha_search"), Mapping):
            errors += _alpha_scaling_errors(data)
        branches = data.get("branches", data.get("models"))
        coefficients = data.get("coefficients")
        if isinstance(branches, list) and isinstance(coefficients, list):
            if len(coefficients) != len(branches):
                errors.append(
                    _error(
                        ("coefficients",),
                        f"has {len(coefficients)} value(s) but there are {len(branches)} branches; "
                        "give one coefficient per branch",
                    )
                )
            for i, value in enumerate(coefficients):
                number = (
                    value
                    if isinstance(value, (int, float)) and not isinstance(value, bool)
                    else None
                )
                if number is not None and not (math.isfinite(number) and number >= 0):
                    errors.append(
                        _error(("coefficients", i), "must be a finite number >= 0", value)
                    )
            per_branch = [
                i
                for i, b in enumerate(branches)
                if isinstance(b, Mapping)
                and any(
                    k in b or k in (b.get("parameters") or {}) for k in ("coefficient", "weight")
                )
            ]
            if per_branch:
                errors.append(
                    _error(
                        ("coefficients",),
                        "given both as a list and per branch (branches "
                        + ", ".join(f"[{i}]" for i in per_branch)
                        + "); use one of the two",
                    )
                )
        return errors

    def resolved_coefficients(self) -> list[float]:
        """λ per branch: the ``coefficients`` list, else each branch's value, default 1.0."""
        if self.coefficients is not None:
            return [float(c) for c in self.coefficients]
        return [1.0 if b.coefficient is None else float(b.coefficient) for b in self.branches]

    def resolved_seed(self) -> int:
        """The merge seed: ``seed``, else the method's ``parameters.seed``, else 0."""
        if self.seed is not None:
            return self.seed
        value = self.parameters.get("seed")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0

    def build_method(self) -> MergeMethod:
        """The configured method instance (parameters already validated)."""
        return get_method(self.method, **self.parameters)

    def build_routing(self) -> Routing:
        """The tensor routing described by ``routing``."""
        return self.routing.build()

    @property
    def compute_torch_dtype(self) -> torch.dtype:
        """``compute_dtype`` as a torch dtype."""
        return TORCH_DTYPES[self.compute_dtype]

    @property
    def out_torch_dtype(self) -> torch.dtype | None:
        """``out_dtype`` as a torch dtype (``None``: keep each base tensor's dtype)."""
        return None if self.out_dtype is None else TORCH_DTYPES[self.out_dtype]


def _parameter_errors(data: Mapping[str, Any]) -> list[InitErrorDetails]:
    """Errors of ``parameters`` against the method's declared parameters, one per key."""
    name = data.get("method", data.get("merge_method"))
    params = data.get("parameters")
    if (
        not isinstance(name, str)
        or name not in available_methods()
        or not isinstance(params, Mapping)
    ):
        return []
    cls, preset = method_class(name)
    fields = cls.Params.model_fields
    errors: list[InitErrorDetails] = [
        _error(("parameters", key), problem, params[key] if key in preset else None)
        for key, problem in parameter_problems(name, cls.Params, preset, params)
    ]
    errors += [
        _error(("parameters", key), BOOL_NOT_NUMBER, params[key])
        for key in bool_params(params, fields)
    ]
    if errors:
        return errors
    try:
        cls.Params(**preset, **params)
    except ValidationError as err:
        for e in err.errors():
            loc = ("parameters", *e["loc"])
            errors.append(_error(loc, _friendly_message(e)))  # the value is in the message
    return errors


def _alpha_scaling_errors(data: Mapping[str, Any]) -> list[InitErrorDetails]:
    """``parameters.scaling`` ≠ 1 with ``alpha_search``: refused (α is that scaling)."""
    name, params = data.get("method"), data.get("parameters") or {}
    if not isinstance(name, str) or name not in available_methods():
        return []
    try:
        method = get_method(name, **params)
    except (TypeError, ValueError):  # reported by _parameter_errors
        return []
    try:
        check_alpha_scaling(method, "alpha_search")
    except ValueError as err:
        return [_error(("parameters", "scaling"), str(err), params.get("scaling"))]
    return []


# ---------------------------------------------------------------------------------- loading


CodeMode = Literal["refuse", "check", "import"]
"""What a config file's ``module:function`` references (``model:``, ``batches:``, ``spec:``)
and validation command (``alpha_search.command``) get: ``refuse`` (an error: no opt-in),
``check`` (syntax only, nothing imported or run: a dry run with ``--trust-code``) or
``import`` (imported or run, which runs their code: ``--trust-code``)."""

CONFIG_OPT_IN = (
    "is not read from a config file: opting in to full unpickling (which runs code from the "
    "inputs) is the user's act, not the file's; pass --trust-pickles on the command line "
    "(trust_pickles=True in your own code)"
)
