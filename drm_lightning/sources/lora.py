"""PEFT LoRA adapter folders as merge branches, keyed by the BASE model's weight names.

A LoRA adapter stores, per adapted module, ``lora_A`` (rank x in) and ``lora_B``
(out x rank); the module's weight becomes ``W + scaling * B @ A`` with
``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), where ``r`` and
``lora_alpha`` may be overridden per module by ``rank_pattern`` / ``alpha_pattern``.
:class:`LoraBranch` hands the merge the factors ``(scaling * B, A)`` so low-rank-aware
methods (DRM) never build the dense delta; ``delta`` and ``get`` give dense values for
everything else. The result equals PEFT's ``merge_and_unload()``.

Supported: ``nn.Linear`` targets, ``nn.Embedding`` targets, GPT-2 style ``Conv1D``
targets (``fan_in_fan_out=True``), adapter-name segments in keys. Refused with
``NotImplementedError`` (merging them as plain LoRA would give wrong weights): DoRA,
``modules_to_save``, trained biases, trainable tokens, convolution targets, PiSSA/OLoRA/
CorDA/LoftQ adapters not converted back to plain LoRA, and other LoRA variants.

Example:
    >>> import json, tempfile, pathlib, torch
    >>> from safetensors.torch import save_file
    >>> from drm_lightning.sources import StateDictSource
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "adapter_config.json").write_text(json.dumps(
    ...     {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["fc"]}))
    >>> save_file({"base_model.model.fc.lora_A.weight": torch.ones(1, 3),
    ...            "base_model.model.fc.lora_B.weight": torch.ones(2, 1)},
    ...           str(d / "adapter_model.safetensors"))
    >>> base = StateDictSource({"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)})
    >>> branch = LoraBranch(d, base)
    >>> branch.targets()
    ['fc.weight']
    >>> branch.get("fc.weight")
    tensor([[2., 2., 2.],
            [2., 2., 2.]])
    >>> branch.lowrank("fc.bias") is None
    True
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from drm_lightning.sources.base import TensorMeta, WeightSource
from drm_lightning.sources.input_files import check_unchanged, read_regular
from drm_lightning.sources.safetensors_file import SafetensorsFileSource
from drm_lightning.sources.torch_file import TorchFileSource

__all__ = ["LoraBranch", "LoraModule"]

_PEFT_PREFIX = "base_model.model."
_FACTOR_TOKENS = {
    "lora_A": ("linear", "A"),
    "lora_B": ("linear", "B"),
    "lora_embedding_A": ("embedding", "A"),
    "lora_embedding_B": ("embedding", "B"),
}
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")
_UNSUPPORTED_OPTIONS = (
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
    "alora_invocation_tokens",
    "use_qalora",
    "velora_config",
    "monteclora_config",
    "use_bdlora",
    "kasa_config",
    "arrow_config",
    "lora_bias",
)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a LoRA adapter.

    Attributes:
        module: module name in the base model (``model.layers.0.self_attn.q_proj``).
        target: the base weight it changes (``module + ".weight"``).
        kind: ``"linear"`` (``lora_A``/``lora_B``) or ``"embedding"``
            (``lora_embedding_A``/``lora_embedding_B``).
        a_key, b_key: the tensor names in the adapter file.
        rank, alpha: effective ``r`` and ``lora_alpha`` after ``rank_pattern``/``alpha_pattern``.
        scaling: ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).
        transpose: the delta is ``(B @ A).T`` (embeddings, ``fan_in_fan_out`` layers).
    """

    module: str
    target: str
    kind: Literal["linear", "embedding"]
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float
    transpose: bool


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's pattern lookup: the first key matching the end of the module name wins."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), "null" if value is None else f"the number {value!r}")


def _bad_rank(field: str, value: Any) -> str | None:
    """What is wrong with a LoRA rank (``r``, a ``rank_pattern`` value), or None."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"{field} must be a positive integer (the LoRA rank), got {value!r}"
    return None


def _bad_alpha(field: str, value: Any) -> str | None:
    """What is wrong with a ``lora_alpha`` (or an ``alpha_pattern`` value), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{field} must be a finite number (the scaling is lora_alpha / r), got {value!r}"
    return None


def _saved_copy_target(key: str) -> str | None:
    """The base name of a full weight saved next to the LoRA factors (``...base_layer.weight``)."""
    name = key.removeprefix(_PEFT_PREFIX)
    name = name.replace(".base_layer.", ".")
    if any(token in name.split(".") for token in _FACTOR_TOKENS) or "lora_" in name:
        return None
    return name


class LoraBranch(WeightSource):
    """A PEFT LoRA adapter applied to a base model, read lazily.

    ``keys()`` and ``meta()`` are the base's. ``lowrank(name)`` gives ``(B_scaled, A)``
    with ``delta = B_scaled @ A`` for adapted weights and ``None`` for the others;
    ``delta(name, base_tensor)`` the dense delta; ``get(name)`` the adapted weight
    (``merge_and_unload`` semantics). Everything is checked at construction — config
    options, adapter keys, every module's presence and shape in the base — from metadata
    only, so a mismatched adapter fails before any merge work. Full weights PEFT saves
    next to the factors (``save_embedding_layers``: ``embed_tokens.base_layer.weight``)
    must equal the base's; that one comparison reads those tensors at construction.

    Args:
        adapter_dir: folder written by PEFT's ``save_pretrained`` (``adapter_config.json``
            and ``adapter_model.safetensors`` or ``adapter_model.bin``).
        base: the base model's weights (any :class:`WeightSource`). Adapter module names
            (``base_model.model.<module>``) map to base weight names ``<module>.weight``;
            no other renaming is attempted.
        adapter_name: which adapter to use when the keys carry adapter-name segments
            (``lora_A.<name>.weight``) for more than one adapter.
        trust_pickles: allow full unpickling of an ``adapter_model.bin`` that holds more
            than tensors (see :mod:`drm_lightning.sources.trust`); refused by default.

    Raises:
        FileNotFoundError: the folder, its config or its weights file is missing.
        ValueError: the adapter does not fit the base (modules missing from the base, shape
            mismatches — each module with the adapter and base shapes), unpaired factors,
            rank not matching the config, ambiguous adapter names.
        NotImplementedError: a LoRA variant or option that is not plain LoRA (DoRA,
            ``modules_to_save``, trained biases, convolution targets, ...), or not LoRA.

    Example:
        >>> import tempfile
        >>> from drm_lightning.sources import StateDictSource
        >>> LoraBranch(tempfile.mkdtemp(), StateDictSource({}))
        Traceback (most recent call last):
        ...
        FileNotFoundError: not a PEFT adapter folder: .../adapter_config.json is missing...
    """

    def __init__(
        self,
        adapter_dir: str | os.PathLike[str],
        base: WeightSource,
        *,
        adapter_name: str | None = None,
        trust_pickles: bool = False,
    ) -> None:
        self.path = Path(adapter_dir)
        self._trust_pickles = trust_pickles
        self.origin = str(self.path)
        self.base = base
        if not self.path.is_dir():
            what = "is a file" if self.path.exists() else "does not exist"
            raise FileNotFoundError(
                f"LoRA adapter folder {self.path} {what}; "
                "expected a folder with adapter_config.json"
            )
        self.config_path = self.path / "adapter_config.json"
        if not self.config_path.is_file():
            raise FileNotFoundError(
                f"not a PEFT adapter folder: {self.config_path} is missing (save the adapter with "
                "PeftModel.save_pretrained)"
            )
        text, self._config_identity = read_regular(self.config_path)
        try:
            config = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{self.config_path} is not valid JSON: {err}") from err
        if not isinstance(config, dict):
            raise ValueError(  # noqa: TRY004 - bad input data, like every other config error
                f"{self.config_path}: expected a JSON object (the adapter's settings: peft_type, "
                f"r, lora_alpha, target_modules...), got {_json_kind(config)}"
            )
        self.config: dict[str, Any] = config
        self._check_config()
        self.weights_path, self._weights = self._open_weights()
        self._modules = self._parse_keys(adapter_name)
        self._check_against_base()

    # ------------------------------------------------------------------ construction

    def _check_config(self) -> None:
        cfg = self.config
        peft_type = str(cfg.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise NotImplementedError(
                f"{self.config_path}: peft_type is {cfg.get('peft_type')!r}; "
                "only LoRA adapters (peft_type 'LORA') can be merged as low-rank branches"
            )
        problems: list[str] = []
        if cfg.get("use_dora"):
            problems.append(
                "use_dora=true (DoRA rescales the merged weight by a learned magnitude)"
            )
        if cfg.get("modules_to_save"):
            problems.append(
                f"modules_to_save={cfg['modules_to_save']} "
                "(fully trained modules are not low-rank deltas)"
            )
        if cfg.get("bias", "none") not in ("none", None):
            problems.append(f"bias={cfg['bias']!r} (trained biases)")
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
            problems.append(
                f"init_lora_weights={init!r}: this adapter is relative to a modified base; "
                "save it with save_pretrained(..., path_initial_model_for_weight_conversion=...) "
                "to get a plain LoRA adapter"
            )
        if cfg.get("loftq_config"):
            problems.append("loftq_config is set (LoftQ adapters are relative to a quantized base)")
        for option in _UNSUPPORTED_OPTIONS:
            if cfg.get(option):
                problems.append(f"{option}={cfg[option]!r}")
        if problems:
            raise NotImplementedError(
                f"LoRA adapter {self.path} uses options that cannot be merged as plain LoRA:\n- "
                + "\n- ".join(problems)
            )
        bad = _bad_rank("r", cfg.get("r")) or _bad_alpha("lora_alpha", cfg.get("lora_alpha"))
        for field, check in (("rank_pattern", _bad_rank), ("alpha_pattern", _bad_alpha)):
            patterns = cfg.get(field) or {}
            if not isinstance(patterns, dict):
                kind = _json_kind(patterns)
                bad = bad or f"{field} must be an object (pattern: value), got {kind}"
                continue
            for key, value in patterns.items():
                bad = bad or check(f"{field}[{key!r}]", value)
        if bad:
            raise ValueError(f"{self.config_path}: {bad}")

    def _open_weights(self) -> tuple[Path, WeightSource]:
        st, pt = self.path / "adapter_model.safetensors", self.path / "adapter_model.bin"
        if st.is_file():
            return st, SafetensorsFileSource(st)
        if pt.is_file():
            return pt, TorchFileSource(pt, trust_pickles=self._trust_pickles)
        raise FileNotFoundError(
            f"LoRA adapter {self.path} has no adapter_model.safetensors or adapter_model.bin"
        )

    def _parse_keys(self, adapter_name: str | None) -> dict[str, LoraModule]:
        factors: dict[tuple[str, str | None], dict[str, str]] = {}
        kinds: dict[tuple[str, str | None], str] = {}
        unknown: list[str] = []
        conv: list[str] = []
        for key in self._weights.keys():
            parts = key.split(".")
            idx = max((i for i, p in enumerate(parts) if p in _FACTOR_TOKENS), default=-1)
            if idx <= 0:
                unknown.append(key)
                continue
            kind, which = _FACTOR_TOKENS[parts[idx]]
            tail = parts[idx + 1 :]
            if kind == "linear" and tail and tail[-1] == "weight":
                tail = tail[:-1]
            elif kind == "linear":
                unknown.append(key)  # e.g. lora_B.bias
                continue
            if len(tail) > 1:
                unknown.append(key)
                continue
            module = ".".join(parts[:idx])
            module = module.removeprefix(_PEFT_PREFIX)
            slot = (module, tail[0] if tail else None)
            factors.setdefault(slot, {})[which] = key
            kinds[slot] = kind
            if len(self._weights.meta(key).shape) != 2:
                conv.append(f"{module} ({parts[idx]} shape {list(self._weights.meta(key).shape)})")
        self._saved_copies: dict[str, str] = {}
        for key in list(unknown):
            target = _saved_copy_target(key)
            if target is not None and target in self.base:
                self._saved_copies[target] = key  # e.g. PEFT's save_embedding_layers copies
                unknown.remove(key)
        if unknown:
            raise NotImplementedError(
                f"LoRA adapter {self.weights_path} holds {len(unknown)} tensor(s) "
                "that are not plain LoRA factors "
                f"(DoRA magnitudes, saved modules, biases...): {unknown[:10]}"
            )
        if conv:
            raise NotImplementedError(
                f"LoRA on convolution modules is not supported; adapter {self.path}: {conv[:10]}"
            )
        names = sorted({n for _, n in factors if n is not None})
        if adapter_name is not None:
            if adapter_name not in names:
                raise ValueError(
                    f"adapter_name={adapter_name!r} not found in {self.weights_path}; "
                    f"names present: {names or 'none'}"
                )
            factors = {s: f for s, f in factors.items() if s[1] == adapter_name}
        elif len(names) > 1 or (names and any(n is None for _, n in factors)):
            raise ValueError(
                f"{self.weights_path} holds several adapters {names}; choose one with adapter_name="
            )
        cfg = self.config
        unpaired: list[str] = []
        modules: dict[str, LoraModule] = {}
        for (module, _), pair in sorted(factors.items()):
            if set(pair) != {"A", "B"}:
                unpaired.append(f"{module} (only {'lora_A' if 'A' in pair else 'lora_B'})")
                continue
            kind = kinds[(module, _)]
            rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"]))
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"]))
            scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            transpose = kind == "embedding" or bool(cfg.get("fan_in_fan_out"))
            modules[f"{module}.weight"] = LoraModule(
                module,
                f"{module}.weight",
                kind,
                pair["A"],
                pair["B"],
                rank,
                alpha,
                scaling,
                transpose,  # type: ignore[arg-type]
            )
        if unpaired:
            raise ValueError(
                f"LoRA adapter {self.weights_path} has unpaired factors: {unpaired[:10]}"
            )
        if not modules:
            raise ValueError(f"LoRA adapter {self.weights_path} holds no LoRA factors")
        return modules

    def _check_against_base(self) -> None:
        base_keys = set(self.base.keys())
        absent = [m for m in self._modules.values() if m.target not in base_keys]
        if absent:
            lines = []
            for m in absent[:10]:
                close = difflib.get_close_matches(m.target, base_keys, n=1, cutoff=0.6)
                lines.append(f"{m.target}" + (f" (closest base name: {close[0]})" if close else ""))
            raise ValueError(
                f"LoRA adapter {self.path} adapts {len(absent)} module(s) "
                f"whose weight is not in the base {self.base.origin}: {'; '.join(lines)}. "
                "Is the base the model the adapter was trained on "
                f"(adapter config says {self.config.get('base_model_name_or_path')!r})?"
            )
        problems: list[str] = []
        for m in self._modules.values():
            a = tuple(self._weights.meta(m.a_key).shape)
            b = tuple(self._weights.meta(m.b_key).shape)
            base_shape = tuple(self.base.meta(m.target).shape)
            if a[0] != b[1]:
                problems.append(
                    f"module {m.module!r}: lora_A {list(a)} and lora_B {list(b)} "
                    "have different ranks"
                )
                continue
            if a[0] != m.rank:
                problems.append(
                    f"module {m.module!r}: factors have rank {a[0]} "
                    f"but the config gives r={m.rank} "
                    "(check r / rank_pattern in adapter_config.json)"
                )
                continue
            delta_shape = (a[1], b[0]) if m.transpose else (b[0], a[1])
            if delta_shape != base_shape:
                how = " (transposed: fan_in_fan_out/embedding)" if m.transpose else ""
                problems.append(
                    f"module {m.module!r}: adapter delta shape {list(delta_shape)}{how} "
                    f"from lora_B {list(b)} @ lora_A {list(a)} "
                    f"vs base {m.target!r} shape {list(base_shape)}"
                )
        if problems:
            raise ValueError(
                f"LoRA adapter {self.path} does not match the base {self.base.origin}:\n- "
                + "\n- ".join(problems)
            )
        for target, key in self._saved_copies.items():
            saved_meta, base_meta = self._weights.meta(key), self.base.meta(target)
            if tuple(saved_meta.shape) != tuple(base_meta.shape):
                raise ValueError(
                    f"LoRA adapter {self.path} saved its own {target!r} "
                    f"with shape {list(saved_meta.shape)}, "
                    f"the base {self.base.origin} has {list(base_meta.shape)}: "
                    "the vocabulary was resized during fine-tuning. "
                    "Resize the base the same way, or merge from the full fine-tuned model"
                )
            base_t = self.base.get(target)
            if not torch.equal(self._weights.get(key).to(base_t.dtype), base_t):
                raise ValueError(
                    f"LoRA adapter {self.path} saved its own {target!r} "
                    f"and it differs from the base {self.base.origin}: "
                    f"the adapter was trained on other {target} values "
                    "(trained or resized embeddings), so it is not a low-rank delta of this base. "
                    "Use the matching base, or merge from the full fine-tuned model"
                )

    # ------------------------------------------------------------------ public API

    @property
    def modules(self) -> dict[str, LoraModule]:
        """Adapted modules, keyed by the base weight name."""
        return dict(self._modules)

    def targets(self) -> list[str]:
        """Base weight names this adapter changes, sorted."""
        return sorted(self._modules)

    def lowrank(self, name: str) -> tuple[Tensor, Tensor] | None:
        """``(B_scaled, A)`` with ``delta = B_scaled @ A`` for ``name``, or ``None`` if not adapted.

        Factors come in float32 (float64 if the adapter is float64), scaling folded into B,
        already transposed for embeddings and ``fan_in_fan_out`` layers.

        Raises:
            KeyError: ``name`` is not a base weight.
        """
        m = self._modules.get(name)
        if m is None:
            if name not in self.base:
                raise self._missing(name)
            return None
        a, b = self._weights.get(m.a_key), self._weights.get(m.b_key)
        dtype = torch.promote_types(a.dtype, torch.float32)
        a, b = a.to(dtype), b.to(dtype)
        if m.transpose:  # (B @ A).T == A.T @ B.T
            return (a.T * m.scaling).contiguous(), b.T.contiguous()
        return (b * m.scaling).contiguous(), a.contiguous()

    def delta(self, name: str, base_tensor: Tensor | None = None) -> Tensor:
        """Dense delta for ``name`` (zeros if not adapted), float32 or wider.

        Args:
            name: base weight name.
            base_tensor: the base weight; gives the shape, device and dtype of the zeros for
                untouched tensors (read from the base when omitted).
        """
        factors = self.lowrank(name)
        if factors is None:
            ref = base_tensor if base_tensor is not None else self.base.get(name)
            return torch.zeros(
                ref.shape, dtype=torch.promote_types(ref.dtype, torch.float32), device=ref.device
            )
        b, a = factors
        out = b @ a
        if base_tensor is not None and tuple(base_tensor.shape) != tuple(out.shape):
            raise ValueError(
                f"{name!r}: LoRA delta shape {list(out.shape)} "
                f"vs given base tensor {list(base_tensor.shape)}"
            )
        return out if base_tensor is None else out.to(base_tensor.device)

    def keys(self) -> list[str]:
        return self.base.keys()

    def meta(self, name: str) -> TensorMeta:
        return self.base.meta(name)

    def get(self, name: str) -> Tensor:
        """The adapted weight ``base + delta`` in the base dtype (the base tensor itself if not
        adapted)."""
        base_t = self.base.get(name)
        if name not in self._modules:
            return base_t
        return (
            base_t.to(torch.promote_types(base_t.dtype, torch.float32)) + self.delta(name, base_t)
        ).to(base_t.dtype)

    def files(self) -> list[Path]:
        return [self.config_path, self.weights_path]

    def check_unchanged(self) -> None:
        """Raise if the adapter's config or weights file changed since it was opened."""
        check_unchanged(self.config_path, self._config_identity)
        self._weights.check_unchanged()

    def describe(self) -> str:
        return (
            f"LoRA adapter {self.path} (r={self.config.get('r')}, "
            f"lora_alpha={self.config.get('lora_alpha')}, "
            f"{len(self._modules)} modules) on {self.base.origin}"
        )

    def __contains__(self, name: object) -> bool:
        return name in self.base
