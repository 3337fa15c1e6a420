r"""The α search of a merge: the grid check shared by every front end, and ``alpha_search:``.

Task arithmetic, TIES, TSV-M and Iso-C scale the merged task vector by a coefficient α that
their papers choose on validation data. Every front end searches it the same way: merge once,
score :math:`\text{base} + \alpha(\text{merged} - \text{base})` for each α of a grid, keep
the best average (``best_alpha`` of :mod:`drm_lightning.inloop.alpha`). This module holds what
the in-loop search (``alpha_grid=``) and ``drm-merge``'s ``alpha_search:`` section check
alike — :func:`check_alpha_grid` and :func:`check_alpha_scaling` — and the section itself::

    alpha_search:
      grid: default                       # 0.1, 0.2, ..., 1.0, or a list of numbers > 0
      command: python eval.py --model {model} --out {scores}
      higher_is_better: true              # false: the scores are losses

The command is the user's own validation: run once per α without a shell (split like a
shell would, :func:`shlex.split`), with ``{model}`` replaced by a folder holding the model at
that α and ``{scores}`` by the JSON file it must write (``{"task": score, ...}``). It runs
code, so a config file cannot ask for it: it is refused unless the user passes
``drm-merge --trust-code`` (``code="import"``); ``--dry-run`` runs nothing (``code="check"``).

Example:
    >>> check_alpha_grid("default")
    (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    >>> section = AlphaSearchSection.model_validate(
    ...     {"grid": [0.5, 1], "command": "python eval.py {model} --out={scores}"})
    >>> section.grid, section.argv("m", "s.json")
    ((0.5, 1.0), ['python', 'eval.py', 'm', '--out=s.json'])
"""

from __future__ import annotations

import math
import numbers
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails
from torch import Tensor

from drm_lightning.config.errors import _error, _Section
from drm_lightning.methods import MergeMethod
from drm_lightning.methods.base import closest_names

__all__ = [
    "DEFAULT_ALPHA_GRID",
    "PLACEHOLDERS",
    "AlphaSearchSection",
    "check_alpha_grid",
    "check_alpha_scaling",
]

DEFAULT_ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
"""``"default"``: 0.1, 0.2, …, 1.0 — task arithmetic's range (Ilharco et al., 2023, choose λ
in [0, 1] on held-out validation data), without 0 (the base itself). A method whose useful α
lies above 1 needs its own grid."""

PLACEHOLDERS: dict[str, str] = {
    "model": "the folder holding the model at one α (an HF folder: weights, config, tokenizer)",
    "scores": "the JSON file the command writes: an object {task: score}",
}
"""What ``alpha_search.command`` may write in braces, and what it is replaced by."""

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def check_alpha_grid(grid: Any, name: str = "alpha_grid") -> tuple[float, ...] | None:
    """The grid as a tuple of floats; ``ValueError`` for an empty grid or a bad value.

    ``name`` is how the messages call the grid (``alpha_grid`` in the in-loop front ends,
    ``grid`` in a config's ``alpha_search:``).

    Example:
        >>> check_alpha_grid([0.5, 1])
        (0.5, 1.0)
        >>> check_alpha_grid([0.5, -1, float("nan")])
        Traceback (most recent call last):
        ...
        ValueError: alpha_grid values must be finite numbers > 0; invalid: -1, nan
    """
    if grid is None:
        return None
    if isinstance(grid, str):
        if grid == "default":
            return DEFAULT_ALPHA_GRID
        raise ValueError(
            f"{name}={grid!r}: give a list of numbers > 0, or 'default' "
            f"({', '.join(map(str, DEFAULT_ALPHA_GRID))})"
        )
    if not isinstance(grid, Sequence):
        raise TypeError(
            f"{name} must be a list of numbers > 0 or 'default', got {type(grid).__name__}"
        )
    if not grid:
        raise ValueError(
            f"{name} is empty: give at least one α > 0, or 'default' "
            f"({', '.join(map(str, DEFAULT_ALPHA_GRID))})"
        )
    bad = [
        v
        for v in grid
        if isinstance(v, bool)
        or not isinstance(v, numbers.Real)
        or not math.isfinite(float(v))
        or float(v) <= 0
    ]
    if bad:
        raise ValueError(
            f"{name} values must be finite numbers > 0; invalid: " + ", ".join(map(str, bad))
        )
    values = tuple(float(v) for v in grid)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{name} repeats {', '.join(map(repr, repeated))}")
    return values


def check_alpha_scaling(
    method: MergeMethod, option: str = "alpha_grid=", name: str | None = None
) -> None:
    """Refuse a search of α for a method whose own global scale (``scaling``) is not 1.0.

    α *is* that scale (the task-vector family, TSV-M, Iso-C apply it last), so the merge
    computed once must be the unscaled delta. ``option`` names the search in the message,
    ``name`` (the front end) starts it.
    """
    scaling = getattr(method.params, "scaling", None)
    if scaling is not None and scaling != 1.0:
        method_name = getattr(method, "registered_name", method.name)
        raise ValueError(
            ("" if name is None else f"{name}: ")
            + f"{option} searches the scale of the merged delta, which for "
            f"{method_name!r} is its scaling parameter; leave scaling at 1.0 (got {scaling:g}) "
            f"or drop {option.rstrip('=')}"
        )


TRUST_CODE_HINT = (
    "pass --trust-code on the command line to run it, if you trust this config and the "
    "command it names"
)


class AlphaSearchSection(_Section):
    """``alpha_search:``: score the merge at each α of ``grid`` with the user's ``command``."""

    grid: tuple[float, ...] = Field(
        DEFAULT_ALPHA_GRID,
        description="the α values (numbers > 0), or 'default' (0.1, 0.2, ..., 1.0)",
    )
    command: str | list[str] | None = Field(
        None,
        description="the validation command, run once per α without a shell; {model} and "
        "{scores} are replaced by the model folder and the JSON file it writes",
    )
    higher_is_better: bool = Field(
        True, strict=True, description="false when the scores are losses (the lowest is kept)"
    )
    _code: str = PrivateAttr("import")

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, value: Any) -> Any:
        try:
            return check_alpha_grid(DEFAULT_ALPHA_GRID if value is None else value, "grid")
        except TypeError as err:  # pydantic reports ValueErrors only
            raise ValueError(str(err)) from None

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        if isinstance(value, str):
            try:
                words = shlex.split(value)
            except ValueError as err:
                raise ValueError(
                    f"cannot be split into arguments as a shell would: {err}"
                ) from None
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            words = list(value)
        else:
            raise ValueError(  # noqa: TRY004 - pydantic reports ValueErrors only
                "must be a command line (a string) or a list of its arguments (strings)"
            )
        if not words:
            raise ValueError("is empty: give the validation command to run for each α")
        used = {name for word in words for name in _PLACEHOLDER.findall(word)}
        unknown = sorted(used - set(PLACEHOLDERS))
        if unknown:
            raise ValueError(
                f"unknown placeholder {{{unknown[0]}}} "
                f"({closest_names(unknown[0], list(PLACEHOLDERS))})"
            )
        missing = [name for name in PLACEHOLDERS if name not in used]
        if missing:
            raise ValueError(
                f"has no {{{missing[0]}}}: "
                + "; ".join(f"{{{k}}} is {v}" for k, v in PLACEHOLDERS.items())
            )
        mode = (info.context or {}).get("code", "import")  # as the module:function references
        if mode == "refuse":
            raise ValueError(
                f"{value!r} is a validation command: running it runs code, which a "
                f"config file cannot ask for; {TRUST_CODE_HINT}"
            )
        if shutil.which(words[0]) is None:
            where = "no such executable file" if "/" in words[0] else "not found on PATH"
            raise ValueError(f"cannot run {words[0]!r}: {where}")
        return value

    @model_validator(mode="after")
    def _remember_code(self, info: ValidationInfo) -> AlphaSearchSection:
        self._code = (info.context or {}).get("code", "import")
        return self

    @classmethod
    def _more_errors(cls, data: Mapping[str, Any]) -> list[InitErrorDetails]:
        if data.get("command") is not None:
            return []
        return [
            _error(
                ("command",),
                "required: the validation command that scores the model at each α, e.g. "
                "'python eval.py --model {model} --out {scores}' (it writes {task: score} JSON)",
            )
        ]

    @property
    def runs(self) -> bool:
        """False when the command was only checked (a dry run with ``--trust-code``)."""
        return self._code != "check"

    def words(self) -> list[str]:
        """The command's arguments, placeholders not yet replaced."""
        assert self.command is not None  # required (_more_errors)
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command)

    def argv(self, model: str | Path, scores: str | Path) -> list[str]:
        """The arguments to run for one α: ``{model}`` and ``{scores}`` replaced."""
        values = {"model": str(model), "scores": str(scores)}
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], word) for word in self.words()]

    def card(self) -> dict[str, Any]:
        """The section as the model card records it."""
        return {
            "grid": list(self.grid),
            "command": self.command if isinstance(self.command, str) else shlex.join(self.words()),
            "higher_is_better": self.higher_is_better,
        }


def best_alpha(averages: Mapping[float, float], *, higher: bool) -> float:
    """The α with the best average (NaN: worst); on a tie the smaller α.

    Example:
        >>> best_alpha({0.5: 0.9, 0.2: 0.9, 1.0: 0.7}, higher=True)
        0.2
    """

    def key(alpha: float) -> float:
        value = averages[alpha]
        return -math.inf if math.isnan(value) else (value if higher else -value)

    return max(sorted(averages), key=key)  # max keeps the first, i.e. smallest, of equals


def rescaled(delta: Tensor, alpha: float, base: Tensor, dtype: torch.dtype) -> Tensor:
    """``base + α·delta`` rounded to ``dtype``, computed over ``delta`` (overwritten): the one
    arithmetic of the in-loop search (:class:`~drm_lightning.inloop.alpha.ScaledDelta`) and
    ``drm-merge``'s (:func:`~drm_lightning.cli.alpha_job.scaled_tensors`).

    Example:
        >>> rescaled(torch.tensor([1.0, -2.0]), 0.5, torch.tensor([10.0, 10.0]), torch.float32)
        tensor([10.5000,  9.0000])
    """
    return delta.mul_(alpha).add_(base.to(device=delta.device, dtype=delta.dtype)).to(dtype)
