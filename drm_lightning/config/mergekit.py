"""mergekit-format configs: recognised, checked, translated, run with mergekit's semantics.

A config file with ``merge_method:`` (and no ``method:``) is in mergekit's format. It is read
the way ``mergekit-yaml`` (0.1.5) reads it, so a mergekit user gets mergekit's numbers:

* ``models: [{model: PATH, parameters: {weight: W, density: D}}]``, or the same models as
  the ``sources`` of one ``slices:`` entry whose ``layer_range`` covers every layer of each
  model (mergekit turns ``models:`` into exactly that slice: :func:`_slice_sources`), the
  sources listing ``base_model`` as mergekit requires there; ``base_model``, the global
  ``parameters`` (defaults for every model, and the method's own settings:
  ``normalize``, ``rescale``, ``lambda``, ``int8_mask``), ``dtype``, ``out_dtype`` and
  ``tokenizer_source`` (``base`` or a model folder sharing the base's vocabulary);
* TIES / DARE / task arithmetic / breadcrumbs / DELLA with ``convention: mergekit`` (sign
  vote on weighted deltas, divisor = agreeing weights, at least one entry kept, L1 rescale)
  and mergekit's defaults (``density`` 1.0, ``normalize`` on for ties and della, ``rescale``
  on for DARE and DELLA, ``gamma`` 0.01, ``epsilon`` 0.15); a model that is the base model
  takes no part, as in mergekit;
* ``slerp`` of ``base_model`` and the one other model, with ``t`` a number, a gradient
  (``t: [0, 0.5, 1]``: interpolated over the layers, layer ``i`` of ``L`` at ``i/(L-1)``, the
  tensors outside the layers at the first value) or a list of ``{filter, value}`` (the first
  whose ``filter`` is in the tensor's name; one without a filter for the rest), resolved per
  tensor as ``mergekit-yaml`` does (:class:`PerTensorParameters`); ``nuslerp`` of two models
  (their deltas from ``base_model``, or without one their weights); ``model_stock`` of two
  or more models and the base;
* ``linear`` averages every listed model and ``base_model`` (which needs a weight too; in a
  slice, only the sources, as in mergekit);
* ``dtype`` is the compute dtype, as in mergekit: with ``bfloat16``/``float16`` the
  task-vector methods compute in it (mergekit's arithmetic; ``linear`` averages in float32,
  as mergekit's does); drm-merge's own ``compute_dtype: float32`` computes in float32 and
  rounds once; the output is written in ``out_dtype``, default ``dtype``;
* ``merge_method: drm`` runs drm-merge's own DRM (``weight`` is its coefficient).

A sparsification parameter the method does not use (``density`` on ``task_arithmetic`` or
``linear``; ``epsilon``, ``gamma``), and on ``linear`` the task-vector settings, are ignored by
mergekit: here too, each with a one-line warning (:attr:`MergekitConfig.ignored`), as mergekit
users copy configs between methods. The file's text is kept (:attr:`MergekitConfig.text`):
the output gets it as ``mergekit_config.yml``, and the card's ``base_model:`` the Hub ids of
the models (:func:`hub_id`), as ``mergekit-yaml`` writes them.

What cannot be honoured is refused, naming the key, before any weight is read: several
``slices`` or a partial ``layer_range`` (frankenmerges), a slice's own ``parameters`` or
``base_model``, ``modules``, ``tokenizer``, ``chat_template``, ``tokenizer_source: union``,
gradient lists and filtered values of any parameter but slerp's ``t``, negative weights,
unknown keys and every other mergekit method. drm-merge's own ``seed``, ``routing`` and
``compute_dtype`` are accepted; ``trust_pickles`` is not (a file cannot opt in to unpickling:
pass ``--trust-pickles``); ``parameters.convention: peft`` selects drm-merge's TIES/DARE
arithmetic.

Example:
    >>> is_mergekit_format({"merge_method": "ties", "models": []})
    True
    >>> is_mergekit_format({"method": "ties", "base_model": "b"})
    False
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError, field_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from drm_lightning.config.errors import ConfigError, format_loc, format_validation_error
from drm_lightning.config.schema import TORCH_DTYPES, MergeConfig
from drm_lightning.config.values import check_path
from drm_lightning.config.yaml_file import Lines
from drm_lightning.methods import MergeMethod, Route, get_method
from drm_lightning.methods.base import MethodParams, closest_names
from drm_lightning.methods.per_branch import PerBranchDensity
from drm_lightning.sources.input_files import read_regular
from drm_lightning.sources.writer import TOKENIZER_FILES

__all__ = [
    "MergekitConfig",
    "PerBranchDensity",
    "PerTensorParameters",
    "hub_id",
    "is_mergekit_format",
    "mergekit_config",
    "tokenizer_source",
]

# fmt: off
TASK_VECTOR = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
               "breadcrumbs_ties", "della", "della_linear")
SPARSIFYING = ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
               "della_linear")
INTERPOLATING = ("slerp", "nuslerp", "model_stock")
SUPPORTED = ("linear", *TASK_VECTOR, *INTERPOLATING, "drm")
UNWEIGHTED = ("slerp", "model_stock")  # mergekit takes no weight: ignored, with a warning
# each method's own settings beyond the task-vector family's, with their type
OWN_PARAMS: dict[str, dict[str, type]] = {
    "slerp": {"t": float},
    "nuslerp": {"nuslerp_flatten": bool, "nuslerp_row_wise": bool},
    "model_stock": {"filter_wise": bool},
}
OTHER_MERGEKIT = ("arcee_fusion", "karcher", "multislerp", "nearswap", "passthrough", "ram",
                  "ramplus_tl", "sce", "task_adapter")
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype",
            "out_dtype", "tokenizer_source")
# fmt: on
EXTENSIONS = ("seed", "routing", "compute_dtype")  # trust_pickles: refused by parse_config
REFUSED_TOP = {
    "modules": "per-module merges are not supported; list whole models under models",
    "tokenizer": "vocabulary surgery is not supported; use tokenizer_source: base or a model "
    "folder with the base's vocabulary",
    "chat_template": "not supported; edit tokenizer_config.json of the output",
}
OWN_KEYS = ("method", "base", "branches", "coefficients")
# mergekit's shared settings of the task-vector family (and drm-merge's two), with their type
SHARED_PARAMS = {"normalize": bool, "rescale": bool, "lambda": float, "int8_mask": bool,
                 "convention": str, "seed": int}  # fmt: skip
# sparsification parameters of mergekit's methods (ties/dare, della, breadcrumbs): a method
# that does not use one ignores it in mergekit, so drm-merge warns and ignores it too
SPARSIFICATION = ("density", "epsilon", "gamma")
HALF = ("float16", "bfloat16")
HalfOrFull = Literal["float16", "bfloat16", "float32", "float64"]
SPARSIFY_OPTION = {
    "gamma": ("breadcrumbs", "breadcrumbs_ties"),
    "epsilon": ("della", "della_linear"),
}
"""The per-model sparsification settings beyond ``density``, and the methods that use them."""

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
    compute_dtype: HalfOrFull = "float32"  # type: ignore[assignment]  # mergekit's half too
    ignored: list[str] = []
    """One warning per parameter mergekit ignores and drm-merge ignores too (file, line, key)."""
    text: str | None = None
    """The config file's text, as given (written to the output as ``mergekit_config.yml``)."""
    model_names: list[str] = []
    """``base_model`` then each model, as written in the file (the card's ``base_model:``)."""
    varying: dict[str, Any] = {}
    """Parameters set per tensor (slerp's gradient or filtered ``t``), as written in the file
    (checked): :class:`PerTensorParameters` resolves them."""
    num_layers: int | None = None
    """The base's layer count (``config.json``), for the gradients of :attr:`varying`."""

    @field_validator("compute_dtype", "out_dtype", mode="before")
    @classmethod
    def _dtype_names(cls, value: Any) -> Any:
        return value  # checked by translate(): mergekit's dtypes, half precision included

    def build_method(self) -> MergeMethod:
        """The method; per-model densities that differ wrap it in :class:`PerBranchDensity`,
        parameters set per tensor in :class:`PerTensorParameters`."""
        if self.varying:
            return PerTensorParameters(self.method, self.parameters, self.varying, self.num_layers)
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
        dtype, compute = self.mergekit_dtype, self.compute_dtype
        if compute in HALF:
            half = f"; computed in {compute}, as mergekit (compute_dtype: float32 rounds once)"
        elif dtype in HALF:
            half = f"; dtype {dtype}: math in {compute}, written as {self.out_dtype}"
        else:
            half = ""
        return (
            f"mergekit-format config (merge_method: {self.method}): {how}{half}; "
            "see README 'Coming from mergekit'"
        )

    def dtype_note(self, stored: set[torch.dtype]) -> str | None:
        """What the dry-run plan says when mergekit would compute in another dtype: no
        ``dtype`` and half-precision models (``stored``: the dtypes of the planned tensors),
        which mergekit merges in their own dtype and drm-merge in float32."""
        half = sorted(name for name, d in TORCH_DTYPES.items() if d in stored and name in HALF)
        if self.mergekit_dtype is not None or not half or self.method not in TASK_VECTOR:
            return None
        return (
            f"dtype: not set: mergekit computes in the models' {half[0]}, drm-merge in "
            f"{self.compute_dtype} (rounded once), so entries differ (tiny Llama: ties 30 %, "
            "task_arithmetic 49 %); "
            f"add `dtype: {half[0]}` for mergekit's arithmetic"
        )

    def card(self) -> dict[str, Any]:
        """What the model card adds for a mergekit-format file, as ``mergekit-yaml`` writes it:
        ``base_model``, the Hugging Face Hub ids among the models (:func:`hub_id`), and the
        file's text (the writer's ``mergekit_config.yml``)."""
        ids = [hub for hub in map(hub_id, self.model_names) if hub is not None]
        return {
            "base_model": list(dict.fromkeys(ids)),
            **({"mergekit_config": self.text} if self.text is not None else {}),
        }


def hub_id(name: str) -> str | None:
    """The Hugging Face Hub id of a model as written in the config, or None for a local folder.

    A folder inside a Hub cache snapshot (``.../models--org--name/snapshots/REV``) is
    ``org/name``; a name written as a Hub id (``org/name``: one ``/``, not starting with
    ``/``, ``~`` or ``.``) is taken as one, as ``mergekit-yaml`` does (it also asks the Hub;
    nothing is asked here). A model card's ``base_model`` must hold Hub ids only.

    Example:
        >>> hub_id("/hf/hub/models--meta-llama--Llama-3.2-1B/snapshots/4e20de3")
        'meta-llama/Llama-3.2-1B'
        >>> hub_id("mistralai/Mistral-7B-v0.1"), hub_id("./models/base"), hub_id("/m/base")
        ('mistralai/Mistral-7B-v0.1', None, None)
    """
    parts = Path(name).parts
    for folder, child in zip(parts, parts[1:]):
        if folder.startswith("models--") and child == "snapshots":
            return folder.removeprefix("models--").replace("--", "/")
    if name[:1] not in ("/", "~", ".", "") and name.count("/") == 1 and not name.endswith("/"):
        return name
    return None


def tokenizer_source(config: MergeConfig) -> Path | None:
    """The folder the output's tokenizer files come from instead of the base's (mergekit's
    ``tokenizer_source``), or None; the writer copies them
    (:class:`~drm_lightning.sources.writer.HFFolderWriter`'s ``tokenizer_from``)."""
    return config.tokenizer_source if isinstance(config, MergekitConfig) else None


LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
"""The layer index in a tensor name (``model.layers.3.mlp...``, GPT-2's ``transformer.h.3...``)."""


def layer_position(name: str, num_layers: int | None) -> float:
    """Where a tensor sits for mergekit's gradients: layer ``i`` of ``L`` at ``i / (L - 1)``
    (1 when ``L`` is 1), tensors outside the layers (embeddings, final norm, head) at 0.

    Example:
        >>> layer_position("model.layers.3.mlp.up_proj.weight", 7), layer_position("lm_head", 7)
        (0.5, 0.0)
    """
    match = LAYER_INDEX.search(name)
    if match is None or num_layers is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, int(match.group(1)) / (num_layers - 1))


def describe_setting(key: str, setting: Any, num_layers: int | None) -> str:
    """A checked per-tensor setting in words: its range and how it is resolved.

    Example:
        >>> describe_setting("t", [0.2, 0.9], 4)
        'per layer, 0.2 … 0.9 (parameters.t: [0.2, 0.9] over the 4 layers; 0.2 outside them)'
        >>> describe_setting("t", [{"filter": "mlp", "value": [1, 0]}, {"value": 0.5}], 2)
        'per tensor, 0 … 1 (parameters.t: mlp [1, 0], other tensors 0.5; lists over the 2 layers)'
    """

    def text(value: Any) -> str:
        if isinstance(value, list):
            return "[" + ", ".join(f"{v:g}" for v in value) + "]"
        return f"{value:g}"

    def numbers(value: Any) -> list[float]:
        return list(value) if isinstance(value, list) else [value]

    layers = f"the {num_layers} layers" if num_layers is not None else "the layers"
    if isinstance(setting, list) and setting and isinstance(setting[0], Mapping):
        values = [v for cond in setting for v in numbers(cond["value"])]
        parts = [
            f"{cond['filter']} {text(cond['value'])}"
            if cond.get("filter") not in (None, "*")
            else f"other tensors {text(cond['value'])}"
            for cond in setting
        ]
        how = ", ".join(parts) + (f"; lists over {layers}" if _is_gradient(setting) else "")
        kind = "per tensor"
    else:
        values = numbers(setting)
        how = f"{text(setting)} over {layers}; {values[0]:g} outside them"
        kind = "per layer"
    return f"{kind}, {min(values):g} … {max(values):g} (parameters.{key}: {how})"


def setting_value(setting: Any, name: str, position: float) -> float | None:
    """A checked mergekit parameter setting's value for the tensor ``name`` at the gradient
    ``position``: a number; a gradient (a list of numbers, linearly interpolated, the
    position spread over its intervals); or a list of ``{filter, value}`` (the first whose
    ``filter`` is absent, ``*`` or in ``name``; ``None`` when none is).

    Example:
        >>> setting_value([0, 0.5, 1], "x", 0.25), setting_value([0.0, 1.0], "x", 0.3)
        (0.25, 0.3)
        >>> t = [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]
        >>> setting_value(t, "model.layers.0.self_attn.q_proj.weight", 0.5)
        0.5
    """
    if isinstance(setting, list) and setting and isinstance(setting[0], Mapping):
        for cond in setting:
            where = cond.get("filter")
            if where is None or where == "*" or where in name:
                return setting_value(cond["value"], name, position)
        return None
    if not isinstance(setting, list):
        return float(setting)
    values = [float(v) for v in setting]
    scaled = position * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


class PerTensorParameters(MergeMethod):
    """A registered method whose parameters vary per tensor, as mergekit's gradients and
    filters make them (slerp's ``t: [0, 0.5, 1]``): :meth:`for_tensor` gives the method with
    the values for that tensor (:func:`setting_value` at :func:`layer_position`), which is
    what :func:`~drm_lightning.merge.merge_tensor` merges with.

    Example:
        >>> m = PerTensorParameters("slerp", {}, {"t": [0.0, 1.0]}, num_layers=3)
        >>> m.for_tensor("model.layers.1.mlp.up_proj.weight").params.t
        0.5
    """

    name = "per_tensor"
    paper = ""
    Params = MethodParams

    def __init__(
        self,
        method: str,
        fixed: Mapping[str, Any],
        varying: Mapping[str, Any],
        num_layers: int | None,
    ) -> None:
        self.method, self.fixed, self.varying = method, dict(fixed), dict(varying)
        self.num_layers = num_layers
        self.inner = get_method(method, **self.fixed)  # the varying ones at their defaults
        self.params = self.inner.params
        self.registered_name = method
        self._made: dict[tuple[tuple[str, float], ...], MergeMethod] = {}

    def __repr__(self) -> str:
        return f"PerTensorParameters({self.inner!r}, varying={self.varying})"

    def values(self, name: str) -> dict[str, float]:
        """The varying parameters' values for the tensor ``name``."""
        position = layer_position(name, self.num_layers)
        out = {}
        for key, setting in self.varying.items():
            value = setting_value(setting, name, position)
            if value is None:
                raise ValueError(f"{name!r}: no value of {self.method} parameter {key!r} applies")
            out[key] = value
        return out

    def describe(self, key: str) -> str:
        """How the varying parameter ``key`` is set, for the dry-run plan
        (:func:`describe_setting`)."""
        return describe_setting(key, self.varying[key], self.num_layers)

    def for_tensor(self, name: str) -> MergeMethod:
        values = self.values(name)
        key = tuple(sorted(values.items()))
        if key not in self._made:
            self._made[key] = get_method(self.method, **self.fixed, **values)
        return self._made[key]

    @property
    def needs_base(self) -> bool:
        return self.inner.needs_base

    @property
    def uses_randomness(self) -> bool:
        return self.inner.uses_randomness

    def coefficient_problem(self, coefficients: Sequence[float]) -> str | None:
        return self.inner.coefficient_problem(coefficients)

    def cost(self, route: Route, shape: Sequence[int], n_branches: int) -> float:
        return self.inner.cost(route, shape, n_branches)

    def workspace_elements(self, route: Route, shape: Sequence[int], n_branches: int) -> int:
        return self.inner.workspace_elements(route, shape, n_branches)

    def _unresolved(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"{self.method}'s parameters vary per tensor: merge with for_tensor(name) "
            "(merge_tensor does)"
        )

    merge_matrix = _unresolved  # type: ignore[assignment]
    merge_fallback = _unresolved  # type: ignore[assignment]


# ------------------------------------------------------------------------------ translation


class _Problems:
    """Problems found in a mergekit-format file, each at its field path."""

    def __init__(self) -> None:
        self.items: list[InitErrorDetails] = []
        self.ignored: list[tuple[Loc, str]] = []

    def add(self, loc: Loc, message: str, value: Any = None) -> None:
        self.items.append(
            InitErrorDetails(type=PydanticCustomError("config", message), loc=loc, input=value)
        )

    def ignore(self, loc: Loc, method: str) -> None:
        """A parameter ``method`` does not use, which mergekit ignores: ignored, with a warning."""
        self.ignored.append((loc, f"ignored: {method} does not use it (mergekit ignores it too)"))

    def warnings(self, source: str, lines: Lines | None) -> list[str]:
        """The ignored parameters, one line each: ``FILE: line N: KEY: ignored: ...``."""
        out = []
        for loc, why in self.ignored:
            line = lines.of(loc) if lines is not None else None
            where = f"{source}: line {line}" if line is not None else source
            out.append(f"{where}: {format_loc(loc)}: {why}")
        return out

    def raise_if_any(self, source: str, lines: Lines | None) -> None:
        if self.items:
            err = ValidationError.from_exception_data("mergekit", self.items)
            raise ConfigError(format_validation_error(err, source=source, where=lines))


def _number(
    problems: _Problems, loc: Loc, value: Any, *, density: bool = False, signed: bool = False
) -> float | None:
    """A scalar weight or density (``signed``: any finite number), else a problem at ``loc``."""
    if isinstance(value, (list, Mapping)):
        problems.add(loc, "gradient lists and filtered values are not supported; give one number")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        problems.add(loc, "must be a finite number", value)
        return None
    if density and not 0 < value <= 1:
        problems.add(loc, "density is the fraction kept and must be in (0, 1]", value)
        return None
    if not density and not signed and value < 0:
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
    if method in OTHER_MERGEKIT:
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


def _unused_by(method: str, key: str, *, shared: bool) -> bool:
    """Whether mergekit's ``method`` ignores the parameter ``key`` that it does not use: another
    method's sparsification parameter, ``weight`` on slerp and model_stock, or (``shared``:
    top-level ``parameters``) one of the task-vector family's settings on ``linear`` and the
    interpolations."""
    if method == "drm":
        return False  # drm-merge's own method: DRM's parameters, checked as such
    if key in SPARSIFICATION:
        if key == "density":
            return method not in SPARSIFYING
        return method not in SPARSIFY_OPTION[key]
    if key == "weight":
        return method in UNWEIGHTED
    if method in INTERPOLATING and shared and key == "normalize":
        return True
    return (
        shared
        and method in ("linear", *INTERPOLATING)
        and key in ("lambda", "rescale", "int8_mask")
    )


def _setting(problems: _Problems, loc: Loc, value: Any) -> Any:
    """A per-tensor setting (slerp's ``t``) checked: a number, a gradient (a non-empty list
    of numbers) or a list of ``{filter, value}`` ending with one that applies to every
    tensor; returned as a number, a list of numbers or a list of mappings."""
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(c, Mapping) for c in value):
        out = []
        for i, cond in enumerate(value):
            extra = sorted(str(k) for k in cond if k not in ("filter", "value"))
            if extra or "value" not in cond:
                problems.add((*loc, i), "each entry is {filter: TEXT, value: NUMBER or LIST}")
                return None
            if cond.get("filter") is not None and not isinstance(cond["filter"], str):
                problems.add((*loc, i, "filter"), "must be text", cond["filter"])
                return None
            inner = _setting(problems, (*loc, i, "value"), cond["value"])
            if inner is None or isinstance(inner, list) and inner and isinstance(inner[0], dict):
                return None
            out.append({"filter": cond.get("filter"), "value": inner})
        if not any(c["filter"] in (None, "*") for c in out):
            problems.add(
                loc,
                "add a last entry without filter (the value of every other tensor): "
                "drm-merge checks the file before reading any tensor name",
            )
            return None
        return out
    if isinstance(value, list):
        numbers = [_number(problems, loc, v, signed=True) for v in value]
        if not numbers or None in numbers:
            if not numbers:
                problems.add(loc, "a gradient needs at least one number", value)
            return None
        return numbers
    return _number(problems, loc, value, signed=True)


def _is_gradient(setting: Any) -> bool:
    """Whether a checked setting interpolates over the layers (needs their count)."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        return any(_is_gradient(c["value"]) for c in setting)
    return isinstance(setting, list) and len(setting) > 1


def _check_parameters(
    problems: _Problems, method: str, params: Mapping[str, Any], varying: dict[str, Any]
) -> dict[str, Any]:
    """The method parameters in drm-merge's names (the per-model ones are left out); those
    set per tensor (slerp's gradient or filtered ``t``) go to ``varying``."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        loc = ("parameters", key)
        if _unused_by(method, str(key), shared=True):
            problems.ignore(loc, method)
            continue
        if key in ("weight", "density", *SPARSIFY_OPTION):
            if key == "density" and method not in SPARSIFYING:  # drm
                problems.add(loc, f"density has no effect in {method} (use ties or dare_*)")
            continue
        if method == "drm":
            out[key] = value  # validated with DRM's own parameters
        elif method in INTERPOLATING:
            own = OWN_PARAMS[method]
            if key not in own:
                valid = [*own, "weight"] if method == "nuslerp" else list(own)
                problems.add(
                    loc, f"unknown parameter for {method} ({closest_names(str(key), valid)})"
                )
            elif key == "t":
                setting = _setting(problems, loc, value)
                if isinstance(setting, list):
                    varying["t"] = setting
                elif setting is not None:
                    out["t"] = setting
            elif not isinstance(value, bool):
                problems.add(loc, "must be true or false", value)
            else:
                out[key] = value
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
        out.setdefault("rescale", "l1" if method.startswith(("dare", "della")) else "none")
    return out


def _check_models(
    problems: _Problems,
    method: str,
    data: Mapping[str, Any],
    options: dict[str, dict[str, tuple[Loc, float]]] | None = None,
    where: Loc = ("models",),
) -> list[tuple[Loc, str, float | None, float]]:
    """``(loc, path, weight, density)`` per model entry (paths checked, values scalar); the
    method's other per-model settings (``gamma``, ``epsilon``) go to ``options[path]``.

    ``where`` is the list's field path: ``models``, or the sources of a whole-model slice
    (``slices[0].sources``, checked by :func:`_slice_sources`), whose entries also have a
    ``layer_range``."""
    models = data.get("models") if where == ("models",) else data["slices"][0]["sources"]
    keys = (
        ("model", "parameters") if where == ("models",) else ("model", "layer_range", "parameters")
    )
    if not isinstance(models, list) or not models:
        problems.add(where, "a non-empty list of {model: PATH, parameters: {...}}", models)
        return []
    shared = data.get("parameters") if isinstance(data.get("parameters"), Mapping) else {}
    out = []
    for i, entry in enumerate(models):
        if not isinstance(entry, Mapping) or "model" not in entry:
            problems.add(
                (*where, i), "each model is a mapping {model: PATH, parameters: {...}}", entry
            )
            continue
        for key in entry:
            if key not in keys:
                problems.add(
                    (*where, i, key),
                    f"unknown key (valid: {', '.join(keys)}); "
                    f"per-model settings go under {format_loc((*where, i, 'parameters'))}",
                )
        params = entry.get("parameters") or {}
        if not isinstance(params, Mapping):
            problems.add((*where, i, "parameters"), "must be a mapping", params)
            params = {}
        own = [k for k, users in SPARSIFY_OPTION.items() if method in users]
        for key in params:
            if _unused_by(method, str(key), shared=False):
                problems.ignore((*where, i, "parameters", key), method)
            elif key not in ("weight", "density", *own) or (
                key == "density" and method not in SPARSIFYING
            ):
                valid = ["weight", "density", *own] if method in SPARSIFYING else ["weight"]
                problems.add(
                    (*where, i, "parameters", key),
                    f"not a per-model parameter of {method} ({closest_names(str(key), valid)})",
                )
        weight: float | None = None
        raw = params.get("weight", shared.get("weight"))
        if raw is not None and method not in UNWEIGHTED:  # else ignored, with a warning
            loc = (
                (*where, i, "parameters", "weight")
                if "weight" in params
                else ("parameters", "weight")
            )
            weight = _number(problems, loc, raw) or 0.0  # a bad value is reported once
        raw_density = params.get("density", shared.get("density", 1.0))
        density = (
            _number(problems, (*where, i, "parameters", "density"), raw_density, density=True)
            if method in SPARSIFYING
            else 1.0
        )
        for key in own:
            raw_option = params.get(key, shared.get(key))
            at = (*where, i, "parameters", key) if key in params else ("parameters", key)
            if raw_option is not None and options is not None:
                value = _number(problems, at, raw_option)
                if value is not None:
                    options.setdefault(str(entry["model"]), {})[key] = (at, value)
        try:
            check_path(Path(str(entry["model"])), "model")
        except ValueError as err:
            problems.add((*where, i, "model"), str(err))
        out.append(((*where, i), str(entry["model"]), weight, density or 1.0))
    return out


SLICE_KEYS = ("sources", "parameters", "base_model", "residual_weight")


def _slice_sources(problems: _Problems, data: Mapping[str, Any]) -> bool:
    """Whether ``slices`` is one slice of whole models, which mergekit merges exactly as the
    same models under ``models:`` (its planner turns ``models:`` into that slice: the same
    tensors, parameters and gradient positions); its sources are then checked as models.

    Every source's ``layer_range`` must be ``[0, L]``, ``L`` the layer count in the model's
    ``config.json``. Several slices, partial ranges (frankenmerges) and a slice's own
    ``parameters`` / ``base_model`` are problems, each at its field."""
    slices = data["slices"]
    if data.get("models"):
        problems.add(
            ("slices",), "layer slices and models both given: give one (mergekit takes one)"
        )
        return False
    if not isinstance(slices, list) or not slices:
        problems.add(
            ("slices",),
            "layer slices: one slice {sources: [{model: PATH, layer_range: [0, L]}, ...]}",
            slices,
        )
        return False
    if len(slices) > 1:
        problems.add(
            ("slices",),
            f"{len(slices)} layer slices (a frankenmerge: layer ranges stacked into a new "
            "model) are not supported; drm-merge merges whole models: one slice whose sources "
            "cover every layer, or the models under models",
        )
        return False
    (one,) = slices
    if not isinstance(one, Mapping):
        problems.add(
            ("slices", 0),
            "a slice is a mapping {sources: [{model: PATH, layer_range: [0, L]}, ...]}",
            one,
        )
        return False
    for key in one:
        if key in ("parameters", "base_model"):
            problems.add(
                ("slices", 0, key),
                f"a slice's own {key} is not supported; give it at the top level "
                "(for one slice, mergekit's result is the same)",
            )
        elif key == "residual_weight":
            problems.add(("slices", 0, key), "not supported (mergekit 0.1.5 does not use it)")
        elif key != "sources":
            problems.add(("slices", 0, key), f"unknown key ({closest_names(str(key), SLICE_KEYS)})")
    if not isinstance(one.get("sources"), list) or not one["sources"]:
        problems.add(
            ("slices", 0, "sources") if "sources" in one else ("slices", 0),
            "sources: a non-empty list of {model: PATH, layer_range: [0, L]} is required",
            one.get("sources"),
        )
        return False
    counts: dict[int, str] = {}
    for i, source in enumerate(one["sources"]):
        if isinstance(source, Mapping) and "model" in source:
            count = _full_range(problems, ("slices", 0, "sources", i), source)
            if count is not None:
                counts.setdefault(count, str(source["model"]))
    if len(counts) > 1:
        problems.add(
            ("slices", 0, "sources"),
            "the models have different layer counts ("
            + ", ".join(f"{model}: {n}" for n, model in counts.items())
            + "); whole-model merges need the same architecture",
        )
    return True


def _full_range(problems: _Problems, loc: Loc, source: Mapping[str, Any]) -> int | None:
    """The layer count ``L`` of a slice source whose ``layer_range`` is ``[0, L]``, every
    layer of its model (``config.json``); else None and a problem at its ``layer_range``."""
    model, value = str(source["model"]), source.get("layer_range")
    loc = (*loc, "layer_range")
    try:
        check_path(Path(model), "model")
    except ValueError:
        return None  # reported with the model
    count = _layer_count(model)
    whole = f"[0, {count}]" if count is not None else "[0, L]"
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        problems.add(
            loc, f"two whole numbers [START, END] required; drm-merge takes {whole}", value
        )
        return None
    if count is None:
        problems.add(
            loc,
            f"{model}/config.json gives no num_hidden_layers, so the range cannot be checked "
            "to cover every layer; list the models under models",
        )
        return None
    if value != [0, count]:
        problems.add(
            loc,
            f"layers {value[0]} to {value[1]} of {model}'s {count}: a partial range (a "
            f"frankenmerge) is not supported; drm-merge merges whole models: give {whole}",
            value,
        )
        return None
    return count


def translate(data: Mapping[str, Any], problems: _Problems) -> dict[str, Any]:
    """drm-merge's config dict for a mergekit-format ``data``; problems are collected."""
    method = _check_top(problems, data)
    params = data.get("parameters") or {}
    if not isinstance(params, Mapping):
        problems.add(("parameters",), "must be a mapping", params)
        params = {}
    if method is None:
        return {}
    varying: dict[str, Any] = {}
    ours = _check_parameters(problems, method, params, varying)
    options: dict[str, dict[str, tuple[Loc, float]]] = {}
    sliced = "slices" in data
    where: Loc = ("slices", 0, "sources") if sliced else ("models",)
    usable = _slice_sources(problems, data) if sliced else True
    entries = parsed = _check_models(problems, method, data, options, where) if usable else []
    base = data.get("base_model")
    if base is None and method not in ("linear", "nuslerp"):
        problems.add(("base_model",), f"required by {method} (the model the deltas are taken from)")
    elif base is not None:
        try:
            check_path(Path(str(base)), "base_model")
        except ValueError as err:
            problems.add(("base_model",), str(err))
    base_listed = any(_same(p, base) for _, p, _, _ in entries)
    if sliced and parsed and base is not None and not base_listed and method != "linear":
        problems.add(
            where,
            f"base_model {base} is not among the sources: mergekit merges a slice's sources "
            "only (it stops: base input not present); add it with its full layer_range",
        )
    if method == "linear" and base is not None and not base_listed and not sliced:
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
        if weight is None and method not in ("drm", *UNWEIGHTED):
            problems.add(
                (*loc, "parameters", "weight") if loc != ("base_model",) else loc,
                f"required by mergekit's {method} (no default): give a weight here or "
                "a default in parameters.weight",
            )
    if parsed and not entries:
        problems.add(where, "no model to merge besides the base model")
    elif parsed:
        _check_count(problems, method, len(entries), base is not None, where)
    if method == "slerp" and "t" not in params:
        problems.add(("parameters", "t"), "required by mergekit's slerp (no default)")
    if method == "nuslerp" and base is None:
        ours["interpolate"] = "weights"  # mergekit without base_model: the models themselves
    _check_options(problems, method, entries, options, ours)
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
    result["compute_dtype"] = _compute_dtype(problems, method, dtype, data)
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
    for key in ("seed", "routing"):
        if key in data:
            result[key] = data[key]
    names = [str(base)] if base is not None else []
    for _, path, _, _ in parsed:
        if path not in names:
            names.append(path)
    result["model_names"] = names
    if varying:
        result["varying"] = varying
        if any(_is_gradient(v) for v in varying.values()):
            result["num_layers"] = _num_layers(problems, result["base"])
    return result


def _check_count(
    problems: _Problems, method: str, n: int, has_base: bool, where: Loc = ("models",)
) -> None:
    """The number of models besides the base that slerp, nuslerp and model_stock take."""
    besides = " besides base_model" if has_base else ""
    if method == "slerp" and n != 1:
        problems.add(
            where,
            f"slerp interpolates base_model and one other model; got {n} besides the base",
        )
    elif method == "nuslerp" and n != 2:
        problems.add(where, f"nuslerp interpolates two models{besides}; got {n}")
    elif method == "model_stock" and n < 2:
        problems.add(where, f"model_stock needs at least two models besides the base; got {n}")


def _check_options(
    problems: _Problems,
    method: str,
    entries: Sequence[tuple[Loc, str, float | None, float]],
    options: Mapping[str, Mapping[str, tuple[Loc, float]]],
    ours: dict[str, Any],
) -> None:
    """``gamma`` / ``epsilon`` of the merged models (one value for all, which drm-merge takes
    as the method's) and, for DELLA, every model's ``density ± epsilon`` inside (0, 1)."""
    for key, users in SPARSIFY_OPTION.items():
        if method not in users:
            continue
        given = [options[path][key] for _, path, _, _ in entries if key in options.get(path, {})]
        values = sorted({v for _, v in given})
        if len(values) > 1:
            problems.add(
                given[0][0],
                f"differs between models ({', '.join(f'{v:g}' for v in values)}); drm-merge "
                f"takes one {key} for all: give it once under parameters",
            )
        elif values:
            ours[key] = values[0]
    if method in ("della", "della_linear"):
        epsilon = float(ours.get("epsilon", 0.15))
        for loc, _, _, density in entries:
            if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
                problems.add(
                    (*loc, "parameters", "density") if loc != ("base_model",) else loc,
                    f"density ± epsilon must be in (0, 1) (keep probabilities); got density "
                    f"{density:g}, epsilon {epsilon:g}",
                )


def _layer_count(model: str) -> int | None:
    """A model's layer count from its ``config.json`` (regular file only), or None."""
    try:
        config = json.loads(read_regular(Path(model) / "config.json")[0])
    except (OSError, ValueError):
        config = {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _num_layers(problems: _Problems, base: str) -> int | None:
    """The base's layer count (``config.json``), which mergekit's gradients spread over."""
    count = _layer_count(base)
    if count is not None:
        return count
    problems.add(
        ("parameters", "t"),
        f"a gradient spreads over the layers, but {base}/config.json gives no "
        "num_hidden_layers: give one number, or values per filter",
    )
    return None


def _compute_dtype(problems: _Problems, method: str, dtype: str | None, data: Any) -> str:
    """The compute dtype: mergekit's ``dtype`` (half precision included: the task-vector
    methods compute in it, ``linear`` averages in float32, as in mergekit), drm-merge's
    ``compute_dtype`` when given; float32 by default (DRM: float32 or float64)."""
    if "compute_dtype" in data:
        own = _dtype(problems, "compute_dtype", data["compute_dtype"])
        if own in HALF and method == "drm":
            problems.add(
                ("compute_dtype",), "drm computes in float32 or float64", data["compute_dtype"]
            )
        return own or "float32"
    if dtype in HALF:
        return dtype if method in TASK_VECTOR else "float32"
    return dtype or "float32"


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
    try:
        value = json.loads(read_regular(folder / "config.json")[0]).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def mergekit_config(
    data: Mapping[str, Any],
    lines: Lines | None = None,
    *,
    source: str = "<config>",
    text: str | None = None,
) -> MergekitConfig:
    """Check a mergekit-format ``data`` and return it as a :class:`MergekitConfig`.

    ``text`` is the file's text (kept for the output's ``mergekit_config.yml``). Parameters
    mergekit ignores are ignored, one warning each in :attr:`MergekitConfig.ignored`.

    Raises:
        ConfigError: every problem at once, each with its mergekit field path (and line when
            ``lines`` is given); nothing is read but the paths' existence.

    Example:
        >>> try:
        ...     mergekit_config({"merge_method": "karcher", "modules": {}})
        ... except ConfigError as err:
        ...     print(err)
        invalid configuration <config> (2 problems):
          modules: per-module merges are not supported; list whole models under models
          merge_method: mergekit's 'karcher' is not implemented by drm-merge ...
    """
    problems = _Problems()
    translated = translate(data, problems)
    problems.raise_if_any(source, lines)
    translated.update(ignored=problems.warnings(source, lines), text=text)
    try:
        return MergekitConfig.model_validate(translated)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source, where=lines)) from None
