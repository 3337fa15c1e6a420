"""``drm-merge`` configs that align: ``method: mudsc_zip`` and the ``align:`` pre-step (issue 11).

Two shapes, checked before any weight is read, every problem at once with its YAML line:

* an **alignment merge** — ``method:`` names an alignment method
  (:func:`~drm_lightning.alignment.available_alignments`); the branches (≥ 2, any inits) are
  merged into one model of the same width (:class:`AlignmentMergeConfig`)::

      method: mudsc_zip
      branches: [runs/seed0, runs/seed1]       # branch 0 is the anchor (its config.json is copied)
      model: mynets:build_mlp                  # module:function -> nn.Module, or an HF folder
      batches: calib.safetensors               # or module:function -> DataLoader / tensor
      parameters: {fix_rate: 0.5, seed: 0}

* an **align pre-step** before any merge method — ``align:`` permutes every branch into the
  anchor's unit order, then ``method:`` merges them against ``base`` (:class:`AlignedMergeConfig`)::

      method: drm
      base: runs/pretrained
      branches: [runs/a, runs/b]
      align: {method: mudsc_align, anchor: 0, model: mynets:build_mlp, batches: calib.pt}

``model:``, ``batches:`` and ``spec:`` written ``module:function`` name Python code. A config
file cannot ask for it to run: read from a file (:func:`~drm_lightning.config.load_config`),
a reference is refused unless the user passes ``drm-merge --trust-code`` (``code="import"``:
the module is imported with the current directory on ``sys.path``, as ``python -m`` does);
``--dry-run`` imports nothing even then (``code="check"``: the syntax is checked, the
architecture check against the branches is skipped and the plan says so). A config built in
the user's own code (``model_validate`` without a context) imports them. Nothing else is
imported or unpickled (tensor files load weights-only).

Example:
    >>> import pathlib, tempfile
    >>> cfg = AlignmentMergeConfig.model_validate(
    ...     {"method": "weight_matching", "branches": [".", "."], "model": "torch.nn:Identity"})
    >>> # the anchor: what -o must not hold, where config.json comes from
    >>> cfg.base == pathlib.Path(".")
    True
    >>> try:  # doctest: +NORMALIZE_WHITESPACE
    ...     AlignmentMergeConfig.model_validate({"method": "mudsc_zip", "branches": [".", "."],
    ...                                          "model": "torch.nn:Identity"})
    ... except ValidationError as err:
    ...     print(format_validation_error(err))
    batches: method 'mudsc_zip' reads activations: name calibration batches
    (module:function or a .safetensors/.pt file)
"""

from __future__ import annotations

import difflib
import importlib
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from drm_lightning.alignment.core import AlignmentParams, available_alignments, get_alignment
from drm_lightning.config.errors import (
    ConfigError,
    _error,
    _friendly_message,
    _Section,
    format_validation_error,
)
from drm_lightning.config.schema import (
    BranchConfig,
    CodeMode,
    MergeConfig,
    OutDType,
    _normalize_dtype,
)
from drm_lightning.config.values import check_path
from drm_lightning.config.yaml_file import Lines
from drm_lightning.methods import MergeMethod, available_methods
from drm_lightning.methods.base import closest_names, parameter_problems

__all__ = [
    "PERMUTING",
    "AlignSection",
    "AlignedMergeConfig",
    "AlignmentMergeConfig",
    "alignment_config",
    "resolve_callable",
]

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")
#: Alignment methods whose result is a permutation (usable before another merge method).
PERMUTING = ("activation_align", "mudsc_align", "weight_average", "weight_matching")
_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_reference(text: str) -> bool:
    """True for ``module:function`` (and not an existing file or folder).

    Example:
        >>> is_reference("mynets:build"), is_reference("calib.pt")
        (True, False)
    """
    return bool(_REF.match(text)) and not Path(text).exists()


def resolve_callable(reference: str) -> Callable[..., Any]:
    """Import ``module`` of ``module:function`` and return its (callable) attribute.

    The current directory is put at the end of ``sys.path`` if absent (``python -m`` puts it
    first), so a module beside the config is found when ``drm-merge`` runs from there.

    Raises:
        ValueError: the module cannot be imported, has no such attribute, or it is not callable.

    Example:
        >>> resolve_callable("torch.nn:Linear").__name__
        'Linear'
    """
    module_name, _, attr = reference.partition(":")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - any import failure of the user's module
        raise ValueError(
            f"cannot import module {module_name!r} ({type(err).__name__}: {err}); it is imported "
            "with the current directory on sys.path"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            close = difflib.get_close_matches(
                part, [n for n in dir(obj) if not n.startswith("_")], n=3
            )
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{reference!r} is a {type(obj).__name__}, not a callable")  # noqa: TRY004
    return obj  # type: ignore[no-any-return]


TRUST_CODE_HINT = (
    "pass --trust-code on the command line to import it, if you trust this config and the "
    "module it names (the current directory is searched too)"
)


def _code_mode(info: ValidationInfo) -> CodeMode:
    """The validation's ``code`` (:data:`~drm_lightning.config.CodeMode`); ``import`` for a
    config built in the user's own code (no context)."""
    return (info.context or {}).get("code", "import")  # type: ignore[no-any-return]


def _reference(value: str, info: ValidationInfo) -> str:
    """A ``module:function`` reference imported, only checked, or refused, as ``code`` says."""
    mode = _code_mode(info)
    if mode == "refuse":
        raise ValueError(
            f"{value!r} names Python code (module:function): importing it runs that code, which "
            f"a config file cannot ask for; {TRUST_CODE_HINT}"
        )
    if mode == "import":
        resolve_callable(value)
    return value


def _check_model(value: str, info: ValidationInfo) -> str:
    if is_reference(value):
        return _reference(value, info)
    folder = check_path(Path(value), "model")
    if not (folder.is_dir() and (folder / "config.json").is_file()):
        raise ValueError(
            "must be module:function returning an nn.Module, or a folder holding a transformers "
            "config.json"
        )
    return value


def _check_batches(value: str, info: ValidationInfo) -> str:
    if is_reference(value):
        return _reference(value, info)
    path = check_path(Path(value), "calibration batches")
    if path.suffix not in TENSOR_SUFFIXES or not path.is_file():
        raise ValueError(
            "must be module:function returning a DataLoader or a tensor, or a tensor file "
            f"({', '.join(TENSOR_SUFFIXES)})"
        )
    return value


def _preset(method: Any) -> dict[str, str] | None:
    """The settings fixed by an alignment method's name (``None``: not a registered name)."""
    if not isinstance(method, str) or method not in available_alignments():
        return None
    params = get_alignment(method).params
    return {"similarity": params.similarity, "solver": params.solver}


def _param_errors(method: Any, params: Any, loc: tuple[str | int, ...]) -> list[InitErrorDetails]:
    """Errors of an alignment method's ``parameters``, one per key."""
    preset = _preset(method)
    if preset is None or not isinstance(params, Mapping):
        return []
    errors = [
        _error((*loc, key), problem, params[key] if key in preset else None)
        for key, problem in parameter_problems(method, AlignmentParams, preset, params)
    ]
    if errors:
        return errors
    try:
        AlignmentParams(**preset, **params)
    except ValidationError as err:
        errors += [_error((*loc, *e["loc"]), _friendly_message(e)) for e in err.errors()]
    return errors


class _AlignInputs(_Section):
    """What an alignment reads besides the weights: architecture, calibration data, spec."""

    model: str | None = Field(
        None,
        description="module:function returning the nn.Module, or a folder with a transformers "
        "config.json (default: the anchor branch's folder when it has one)",
    )
    batches: str | None = Field(
        None,
        description="module:function returning a DataLoader or tensor, or a .safetensors/.pt file",
    )
    batch_size: int = Field(64, ge=1, description="rows per batch when the batches are one tensor")
    spec: str | None = Field(
        None,
        description=(
            "module:function returning a PermSpec (called with the model if it takes an argument)"
        ),
    )
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="the alignment method's parameters"
    )
    _code: CodeMode = PrivateAttr("import")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_model(value, info)

    @field_validator("batches")
    @classmethod
    def _batches(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _check_batches(value, info)

    @field_validator("spec")
    @classmethod
    def _spec(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            if not is_reference(value):
                raise ValueError("must be module:function returning a PermSpec")
            _reference(value, info)
        return value

    @model_validator(mode="after")
    def _remember_code(self, info: ValidationInfo) -> _AlignInputs:
        self._code = _code_mode(info)
        return self

    @property
    def code_skipped(self) -> bool:
        """True when the ``module:function`` references were only checked (a dry run with
        ``--trust-code``): what they name is not built, imported or called."""
        return self._code == "check"

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @classmethod
    def _input_errors(
        cls, data: Mapping[str, Any], method: Any, anchor_path: Any, loc: tuple[str | int, ...] = ()
    ) -> list[InitErrorDetails]:
        errors = _param_errors(method, data.get("parameters"), (*loc, "parameters"))
        preset = _preset(method)
        reads = preset is not None and preset["similarity"] in ("activation", "dual")
        if reads and data.get("batches") is None:
            errors.append(
                _error(
                    (*loc, "batches"),
                    f"method {method!r} reads activations: name "
                    "calibration batches (module:function or a .safetensors/.pt file)",
                )
            )
        anchor_hf = (
            isinstance(anchor_path, (str, Path)) and (Path(anchor_path) / "config.json").is_file()
        )
        if data.get("model") is None and isinstance(anchor_path, (str, Path)) and not anchor_hf:
            errors.append(
                _error(
                    (*loc, "model"),
                    "required: name the architecture as "
                    "module:function returning an nn.Module, or a folder with a "
                    "transformers config.json (the anchor branch has none)",
                )
            )
        return errors


def _method_name(value: str, valid: list[str], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r} ({closest_names(value, valid)})")
    return value


def _branch_path(branches: Any, index: Any) -> Any:
    if (
        not isinstance(branches, list)
        or not isinstance(index, int)
        or not 0 <= index < len(branches)
    ):
        return None
    branch = branches[index]
    return branch.get("path", branch.get("model")) if isinstance(branch, Mapping) else branch


class AlignSection(_AlignInputs):
    """The ``align:`` pre-step: permute every branch into ``anchor``'s unit order."""

    method: str = Field(
        "mudsc_align", description=f"a permuting alignment method: {', '.join(PERMUTING)}"
    )
    anchor: int = Field(0, ge=0, description="index of the branch whose unit order is kept")

    @field_validator("method")
    @classmethod
    def _permuting(cls, value: str) -> str:
        _method_name(value, available_alignments(), "alignment method")
        if value not in PERMUTING:
            raise ValueError(
                f"{value!r} merges units within a model (a Zip solver), "
                "which is not a permutation; "
                f"an align: pre-step needs one of {', '.join(PERMUTING)} (or use method: {value} "
                "to merge the branches with it directly)"
            )
        return value


class AlignedMergeConfig(MergeConfig):
    """A :class:`~drm_lightning.config.MergeConfig` with an ``align:`` pre-step."""

    align: AlignSection

    @classmethod
    def _more_errors(cls, data: Mapping[str, Any]) -> list[InitErrorDetails]:
        errors = super()._more_errors(data)
        align = data.get("align")
        if not isinstance(align, Mapping):
            return errors
        branches = data.get("branches", data.get("models"))
        anchor = align.get("anchor", 0)
        if (
            isinstance(branches, list)
            and isinstance(anchor, int)
            and not 0 <= anchor < len(branches)
        ):
            errors.append(
                _error(
                    ("align", "anchor"),
                    f"out of range for {len(branches)} branches (0 to {len(branches) - 1})",
                    anchor,
                )
            )
        for i, branch in enumerate(branches if isinstance(branches, list) else []):
            path = _branch_path(branches, i)
            if isinstance(path, (str, Path)) and (Path(path) / "adapter_config.json").is_file():
                errors.append(
                    _error(
                        ("branches", i),
                        "a LoRA adapter cannot be aligned (alignment "
                        "permutes full weights); give a full model",
                        str(path),
                    )
                )
        method = align.get("method", "mudsc_align")
        errors += AlignSection._input_errors(
            align, method, _branch_path(branches, anchor), ("align",)
        )
        return errors


class AlignmentMergeConfig(_AlignInputs):
    """``method: <alignment method>``: N ≥ 2 branches of any inits merged into one model.

    Branch 0 is the anchor: the merged model has its dtypes and layout, and its folder's
    ``config.json`` and tokenizer files are copied to the output. ``base`` (the anchor's path)
    is what the output guard checks against.
    """

    aliases: ClassVar[dict[str, str]] = {"models": "branches"}
    #: Routes ``drm-merge`` to :func:`~drm_lightning.cli.align_job.run_alignment_merge`.
    alignment_merge: ClassVar[bool] = True
    method: str
    branches: list[BranchConfig] = Field(min_length=2)
    out_dtype: OutDType | None = Field(None, description="default: the anchor's dtypes")
    trust_pickles: bool = Field(False, strict=True)

    @field_validator("method")
    @classmethod
    def _known(cls, value: str) -> str:
        return _method_name(value, available_alignments(), "alignment method")

    @field_validator("out_dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> Any:
        return _normalize_dtype(value)

    @classmethod
    def _unknown_key_message(cls, key: str, data: Any) -> str:
        method = data.get("method") if isinstance(data, Mapping) else None
        if key in (
            "base",
            "base_model",
            "coefficients",
            "routing",
            "compute_dtype",
            "seed",
            "align",
        ):
            return (
                f"not used by alignment method {method!r}: it merges the branches' matched units "
                "as means, branch 0 is the anchor (to merge against a base with a merge method, "
                "write method: drm (or ties, ...) with an align: pre-step)"
            )
        return super()._unknown_key_message(key, data)

    @classmethod
    def _more_errors(cls, data: Mapping[str, Any]) -> list[InitErrorDetails]:
        branches = data.get("branches", data.get("models"))
        errors = []
        for i, branch in enumerate(branches if isinstance(branches, list) else []):
            if isinstance(branch, Mapping) and ("coefficient" in branch or "weight" in branch):
                errors.append(
                    _error(
                        ("branches", i, "coefficient"),
                        "not used: an alignment merge averages matched units with equal weights",
                    )
                )
            path = _branch_path(branches, i)
            if isinstance(path, (str, Path)) and (Path(path) / "adapter_config.json").is_file():
                errors.append(
                    _error(
                        ("branches", i),
                        "a LoRA adapter cannot be aligned; give a full model",
                        str(path),
                    )
                )
        return errors + cls._input_errors(data, data.get("method"), _branch_path(branches, 0))

    @property
    def base(self) -> Path:
        """The anchor's path (branch 0)."""
        return self.branches[0].path

    @property
    def compute_dtype(self) -> str:
        """Alignment math runs in float64 where it matters (similarities, solvers)."""
        return "float64"

    def build_method(self) -> MergeMethod:
        """Not a merge method: refused with where it runs instead."""
        raise ValueError(
            f"method {self.method!r} is an alignment method: drm-merge runs it in one process "
            "(drm_lightning.cli.align_job.run_alignment_merge); launch drm-merge without torchrun"
        )


def alignment_config(
    data: Mapping[str, Any], lines: Lines, *, source: str, code: CodeMode = "refuse"
) -> MergeConfig | AlignmentMergeConfig | None:
    """The config of ``data`` if it aligns (``align:`` or an alignment ``method:``), else ``None``.

    A method name closer to an alignment method than to any merge method is checked as an
    alignment method, so that the error suggests the alignment name. ``code`` says what the
    ``module:function`` references get (:data:`~drm_lightning.config.CodeMode`).

    Raises:
        ConfigError: every problem, each with its field path and YAML line.
    """
    method = data.get("method")
    cls: type[_Section] | None = AlignedMergeConfig if "align" in data else None
    if isinstance(method, str) and method not in available_methods():
        near_align = difflib.get_close_matches(method, available_alignments(), n=1, cutoff=0.6)
        near_merge = difflib.get_close_matches(method, available_methods(), n=1, cutoff=0.6)
        if method in available_alignments() or (near_align and not near_merge):
            cls = AlignmentMergeConfig
    if cls is None:
        return None
    try:
        return cls.model_validate(data, context={"code": code})  # type: ignore[return-value]
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source, where=lines)) from None
