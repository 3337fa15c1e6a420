"""mergekit-format configs: recognised, checked, translated, run with mergekit's semantics.

A config file with ``merge_method:`` (and no ``method:``) is in mergekit's format. It is read
the way ``mergekit-yaml`` (0.1.5) reads it, so a mergekit user gets mergekit's numbers:

* ``models: [{model: PATH, parameters: {weight: W, density: D}}]``, ``base_model``, the
  global ``parameters`` (defaults for every model, and the method's own settings:
  ``normalize``, ``rescale``, ``lambda``, ``int8_mask``), ``dtype``, ``out_dtype`` and
  ``tokenizer_source`` (``base`` or a model folder sharing the base's vocabulary);
* TIES / DARE / task arithmetic with ``convention: mergekit`` (sign vote on weighted deltas,
  divisor = agreeing weights, at least one entry kept, L1 rescale) and mergekit's defaults
  (``density`` 1.0, ``normalize`` on for ties only, ``rescale`` on for DARE); a model that
  is the base model takes no part, as in mergekit;
* ``linear`` averages every listed model and ``base_model`` (which needs a weight too);
* ``dtype: bfloat16|float16``: the math runs in float32 and the output is written in that
  dtype (mergekit computes in it); ``float32``/``float64`` are the compute dtype;
* ``merge_method: drm`` runs drm-merge's own DRM (``weight`` is its coefficient).

What cannot be honoured is refused, naming the key, before any weight is read: ``slices``,
``modules``, ``tokenizer``, ``chat_template``, ``tokenizer_source: union``, gradient lists
and filtered values, negative weights, unknown keys and every other mergekit method
(``slerp`` included: it needs the base tensor and the tensor name, which the merge loop does
not pass to a method). drm-merge's own ``seed`` and ``routing`` are accepted;
``trust_pickles`` is not (a file cannot opt in to unpickling: pass ``--trust-pickles``);
``parameters.convention: peft`` selects drm-merge's TIES/DARE arithmetic.

Example:
    >>> is_mergekit_format({"merge_method": "ties", "models": []})
    True
    >>> is_mergekit_format({"method": "ties", "base_model": "b"})
    False
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from drm_lightning.config.errors import ConfigError, format_validation_error
from drm_lightning.config.schema import TORCH_DTYPES, MergeConfig
from drm_lightning.config.values import check_path
from drm_lightning.config.yaml_file import Lines
from drm_lightning.methods import MergeMethod
from drm_lightning.methods.base import closest_names
from drm_lightning.methods.per_branch import PerBranchDensity
from drm_lightning.sources.input_files import read_regular
from drm_lightning.sources.writer import TOKENIZER_FILES

__all__ = [
    "MergekitConfig",
    "PerBranchDensity",
    "is_mergekit_format",
    "mergekit_config",
    "tokenizer_source",
]

TASK_VECTOR = ("task_arithmetic", "ties", "dare_ties", "dare_linear")
SUPPORTED = ("linear", *TASK_VECTOR, "drm")
SPARSIFYING = ("ties", "dare_ties", "dare_linear")
# fmt: off
OTHER_MERGEKIT = ("arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                  "karcher", "model_stock", "multislerp", "nearswap", "nuslerp", "passthrough",
                  "ram", "ramplus_tl", "sce", "slerp", "task_adapter")
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
            "tokenizer_source")
# fmt: on
EXTENSIONS = ("seed", "routing")  # trust_pickles: refused by config.parse_config
REFUSED_TOP = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models under models",
    "modules": "per-module merges are not supported; list whole models under models",
    "tokenizer": "vocabulary surgery is not supported; use tokenizer_source: base or a model "
    "folder with the base's vocabulary",
    "chat_template": "not supported; edit tokenizer_config.json of the output",
}
OWN_KEYS = ("method", "base", "branches", "coefficients", "compute_dtype")
# mergekit's shared settings of the task-vector family (and drm-merge's two), with their type
SHARED_PARAMS = {"normalize": bool, "rescale": bool, "lambda": float, "int8_mask": bool,
                 "convention": str, "seed": int}  # fmt: skip
SLERP_WHY = (
    "slerp is not supported yet (it interpolates whole weights and reads t per tensor name; "
    "drm-merge's methods see only the deltas): use linear with weights 1-t and t for the "
    "straight-line mix, or mergekit-yaml for slerp"
)

Loc = tuple[str | int, ...]


def is_mergekit_format(data: Mapping[str, Any]) -> bool:
    """True for a config in mergekit's format: it has ``merge_method`` and no ``method``."""
    return "merge_method" in data and "method" not in data


class MergekitConfig(MergeConfig):
    """A :class:`~drm_lightning.config.MergeConfig` read from a mergekit-format file.

    Built by :func:`mergekit_config`; adds what mergekit's format has and ours does not.
    """

    tokenizer_source: Path | None = None
    branch_densities: list[float] | None = None
    mergekit_dtype: str | None = None

    def build_method(self) -> MergeMethod:
        """The method; per-model densities that differ wrap it in :class:`PerBranchDensity`."""
        method = super().build_method()
        densities = self.branch_densities
        if densities and len(set(densities)) > 1:
            return PerBranchDensity(method, densities)
        return method

    def format_note(self) -> str:
        """The one line saying which semantics this file runs with."""
        if self.method == "drm":
            how = "drm is drm-merge's own method (weight = its coefficient)"
        else:
            convention = self.parameters.get("convention", "mergekit")
            how = (
                "mergekit's semantics"
                if convention == "mergekit"
                else "drm-merge's semantics (convention: peft)"
            )
        dtype = self.mergekit_dtype
        half = (
            f"; dtype {dtype}: math in float32, written as {self.out_dtype}"
            if dtype in ("float16", "bfloat16")
            else ""
        )
        return (
            f"mergekit-format config (merge_method: {self.method}): {how}{half}; "
            "see README 'Coming from mergekit'"
        )


def tokenizer_source(config: MergeConfig) -> Path | None:
    """The folder the output's tokenizer files come from instead of the base's (mergekit's
    ``tokenizer_source``), or None; the writer copies them
    (:class:`~drm_lightning.sources.writer.HFFolderWriter`'s ``tokenizer_from``)."""
    return config.tokenizer_source if isinstance(config, MergekitConfig) else None


# ------------------------------------------------------------------------------ translation


class _Problems:
    """Problems found in a mergekit-format file, each at its field path."""

    def __init__(self) -> None:
        self.items: list[InitErrorDetails] = []

    def add(self, loc: Loc, message: str, value: Any = None) -> None:
        self.items.append(
            InitErrorDetails(type=PydanticCustomError("config", message), loc=loc, input=value)
        )

    def raise_if_any(self, source: str, lines: Lines | None) -> None:
        if self.items:
            err = ValidationError.from_exception_data("mergekit", self.items)
            raise ConfigError(format_validation_error(err, source=source, where=lines))


def _number(problems: _Problems, loc: Loc, value: Any, *, density: bool = False) -> float | None:
    """A scalar weight or density, else a problem at ``loc``."""
    if isinstance(value, (list, Mapping)):
        problems.add(loc, "gradient lists and filtered values are not supported; give one number")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.add(loc, "must be a finite number", value)
        return None
    if density and not 0 < value <= 1:
        problems.add(loc, "density is the fraction kept and must be in (0, 1]", value)
        return None
    if not density and value < 0:
        problems.add(loc, "negative weights are not supported by drm-merge", value)
        return None
    return float(value)


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, str) and isinstance(b, str) and Path(a).resolve() == Path(b).resolve()


def _dtype(problems: _Problems, key: str, value: Any) -> str | None:
    name = str(value).removeprefix("torch.") if value is not None else None
    if name is not None and name not in TORCH_DTYPES:
        problems.add((key,), f"unsupported dtype (valid: {', '.join(TORCH_DTYPES)})", value)
        return None
    return name


def _check_top(problems: _Problems, data: Mapping[str, Any]) -> str | None:
    """Top-level keys and the method name; the method if supported."""
    for key in data:
        if key in REFUSED_TOP:
            problems.add((key,), REFUSED_TOP[key])
        elif key in OWN_KEYS:
            problems.add(
                (key,),
                "drm-merge's own key in a mergekit-format file (it has "
                "merge_method); use mergekit's keys, or write the file in drm-merge's "
                "format (method, base, branches)",
            )
        elif key not in TOP_KEYS + EXTENSIONS:
            problems.add((key,), f"unknown key ({closest_names(str(key), TOP_KEYS + EXTENSIONS)})")
    method = data.get("merge_method")
    if method == "slerp":
        problems.add(("merge_method",), SLERP_WHY)
    elif method in OTHER_MERGEKIT:
        problems.add(
            ("merge_method",),
            f"mergekit's {method!r} is not implemented by drm-merge "
            f"(supported: {', '.join(SUPPORTED)})",
        )
    elif method not in SUPPORTED:
        problems.add(
            ("merge_method",),
            f"unknown merge method ({closest_names(str(method), SUPPORTED + OTHER_MERGEKIT)})",
            method,
        )
    else:
        return str(method)
    return None


def _check_parameters(
    problems: _Problems, method: str, params: Mapping[str, Any]
) -> dict[str, Any]:
    """The method parameters in drm-merge's names (weight and density are left out)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        loc = ("parameters", key)
        if key in ("weight", "density"):
            if key == "density" and method not in SPARSIFYING:
                problems.add(loc, f"density has no effect in {method} (use ties or dare_*)")
            continue
        if method == "drm":
            out[key] = value  # validated with DRM's own parameters
        elif method == "linear" and key == "normalize":
            if value is not True:
                problems.add(
                    loc,
                    "linear with normalize: false (a plain sum of whole models) is "
                    "not supported; use task_arithmetic",
                    value,
                )
        elif method == "linear" or key not in SHARED_PARAMS:
            valid = ["normalize", "weight"] if method == "linear" else [*SHARED_PARAMS, "weight"]
            if method in SPARSIFYING:
                valid.append("density")
            problems.add(loc, f"unknown parameter for {method} ({closest_names(str(key), valid)})")
        elif isinstance(value, (list, Mapping)):
            problems.add(
                loc, "gradient lists and filtered values are not supported; give one value"
            )
        elif SHARED_PARAMS[key] is bool and not isinstance(value, bool):
            problems.add(loc, "must be true or false", value)
        elif key == "lambda":
            out["scaling"] = value
        elif key == "rescale":
            if method in SPARSIFYING:
                out["rescale"] = "l1" if value else "none"
        elif key != "int8_mask":  # int8_mask: mask storage only, no effect on the numbers
            out[key] = value
    if method in TASK_VECTOR:
        out.setdefault("convention", "mergekit")
    if method in SPARSIFYING and out.get("convention") == "mergekit":
        out.setdefault("rescale", "l1" if method.startswith("dare") else "none")
    return out


def _check_models(
    problems: _Problems, method: str, data: Mapping[str, Any]
) -> list[tuple[Loc, str, float | None, float]]:
    """``(loc, path, weight, density)`` per model entry (paths checked, values scalar)."""
    models = data.get("models")
    if not isinstance(models, list) or not models:
        problems.add(("models",), "a non-empty list of {model: PATH, parameters: {...}}", models)
        return []
    shared = data.get("parameters") if isinstance(data.get("parameters"), Mapping) else {}
    out = []
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or "model" not in entry:
            problems.add(
                ("models", i), "each model is a mapping {model: PATH, parameters: {...}}", entry
            )
            continue
        for key in entry:
            if key not in ("model", "parameters"):
                problems.add(
                    ("models", i, key),
                    "unknown key (valid: model, parameters); "
                    f"per-model settings go under models[{i}].parameters",
                )
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            problems.add(("models", i, "parameters"), "must be a mapping", params)
            params = {}
        for key in params:
            if key not in ("weight", "density") or (key == "density" and method not in SPARSIFYING):
                valid = ["weight", "density"] if method in SPARSIFYING else ["weight"]
                problems.add(
                    ("models", i, "parameters", key),
                    f"not a per-model parameter of {method} ({closest_names(str(key), valid)})",
                )
        weight: float | None = None
        where: Loc = ("models", i, "parameters", "weight")
        raw = params.get("weight", shared.get("weight"))
        if raw is not None:
            loc = where if "weight" in params else ("parameters", "weight")
            weight = _number(problems, loc, raw) or 0.0  # a bad value is reported once
        raw_density = params.get("density", shared.get("density", 1.0))
        density = (
            _number(problems, ("models", i, "parameters", "density"), raw_density, density=True)
            if method in SPARSIFYING
            else 1.0
        )
        try:
            check_path(Path(str(entry["model"])), "model")
        except ValueError as err:
            problems.add(("models", i, "model"), str(err))
        out.append((("models", i), str(entry["model"]), weight, density or 1.0))
    return out


def translate(data: Mapping[str, Any], problems: _Problems) -> dict[str, Any]:
    """drm-merge's config dict for a mergekit-format ``data``; problems are collected."""
    method = _check_top(problems, data)
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        problems.add(("parameters",), "must be a mapping", params)
        params = {}
    if method is None:
        return {}
    ours = _check_parameters(problems, method, params)
    entries = parsed = _check_models(problems, method, data)
    base = data.get("base_model")
    if base is None and method != "linear":
        problems.add(("base_model",), f"required by {method} (the model the deltas are taken from)")
    elif base is not None:
        try:
            check_path(Path(str(base)), "base_model")
        except ValueError as err:
            problems.add(("base_model",), str(err))
    if (
        method == "linear"
        and base is not None
        and not any(_same(p, base) for _, p, _, _ in entries)
    ):
        weight = params.get("weight")
        if weight is None:
            problems.add(
                ("base_model",),
                "mergekit's linear averages the base model too and "
                "needs its weight: list it under models with a weight, or set parameters.weight",
            )
        else:
            entries.append(
                (
                    ("base_model",),
                    str(base),
                    _number(problems, ("parameters", "weight"), weight) or 0.0,
                    1.0,
                )
            )
    if method != "linear":  # mergekit takes no delta of the base model itself
        entries = [e for e in entries if not _same(e[1], base)]
    for loc, _, weight, _ in entries:
        if weight is None and method != "drm":
            problems.add(
                (*loc, "parameters", "weight") if loc[0] == "models" else loc,
                f"required by mergekit's {method} (no default): give a weight here or "
                "a default in parameters.weight",
            )
    if parsed and not entries:
        problems.add(("models",), "no model to merge besides the base model")
    dtype = _dtype(problems, "dtype", data.get("dtype"))
    out_dtype = _dtype(problems, "out_dtype", data.get("out_dtype"))
    tokenizer = data.get("tokenizer_source")
    result: dict[str, Any] = {
        "method": method,
        "base": str(base if base is not None else (entries[0][1] if entries else ".")),
        "branches": [{"path": p, "coefficient": 1.0 if w is None else w} for _, p, w, _ in entries],
        "parameters": ours,
        "branch_densities": [d for *_, d in entries] if method in SPARSIFYING else None,
        "mergekit_dtype": dtype,
    }
    densities = result["branch_densities"]
    if densities and len(set(densities)) == 1:
        ours["density"] = densities[0]
    elif densities:
        ours["density"] = min(densities)
    if dtype in ("float32", "float64"):
        result["compute_dtype"] = dtype
    if out_dtype or dtype:
        result["out_dtype"] = out_dtype or dtype
    if tokenizer == "union":
        problems.add(
            ("tokenizer_source",),
            "union (a merged vocabulary) is not supported; use "
            "base or a model folder with the base's vocabulary",
            tokenizer,
        )
    elif tokenizer not in (None, "base"):
        _check_tokenizer(problems, Path(str(tokenizer)), result["base"])
        result["tokenizer_source"] = str(tokenizer)
    for key in EXTENSIONS:
        if key in data:
            result[key] = data[key]
    return result


def _check_tokenizer(problems: _Problems, path: Path, base: str) -> None:
    """The tokenizer source exists, holds a tokenizer and has the base's vocabulary size."""
    loc = ("tokenizer_source",)
    try:
        check_path(path, "tokenizer_source")
    except ValueError as err:
        problems.add(loc, str(err))
        return
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        problems.add(
            loc, f"no tokenizer file in {str(path)!r} (looked for {', '.join(TOKENIZER_FILES)})"
        )
    sizes = [_vocab_size(p) for p in (path, Path(base))]
    if None not in sizes and sizes[0] != sizes[1]:
        problems.add(
            loc,
            f"vocabulary of {sizes[0]} tokens, the base has {sizes[1]}: drm-merge "
            "copies tokenizers but does not rebuild embeddings (mergekit does)",
        )


def _vocab_size(folder: Path) -> int | None:
    import json

    try:
        value = json.loads(read_regular(folder / "config.json")[0]).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def mergekit_config(
    data: Mapping[str, Any], lines: Lines | None = None, *, source: str = "<config>"
) -> MergekitConfig:
    """Check a mergekit-format ``data`` and return it as a :class:`MergekitConfig`.

    Raises:
        ConfigError: every problem at once, each with its mergekit field path (and line when
            ``lines`` is given); nothing is read but the paths' existence.

    Example:
        >>> try:
        ...     mergekit_config({"merge_method": "slerp", "slices": []})
        ... except ConfigError as err:
        ...     print(err)
        invalid configuration <config> (2 problems):
          slices: layer slices (frankenmerges) are not supported; list whole models under models
          merge_method: slerp is not supported yet ...
    """
    problems = _Problems()
    translated = translate(data, problems)
    problems.raise_if_any(source, lines)
    try:
        return MergekitConfig.model_validate(translated)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source, where=lines)) from None
