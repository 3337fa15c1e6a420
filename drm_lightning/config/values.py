"""Value checks of the ``drm-merge`` config that pydantic's lax mode would let through.

* a path that does not exist: the message says relative paths are resolved against the
  current directory (as in mergekit) and shows the absolute path tried; the Hugging Face Hub
  hint is kept only for strings that look like a Hub id (``org/name``, nothing local);
* ``true``/``false`` where a number is expected (``coefficient: true`` would be read as 1.0).

Example:
    >>> bools_where_numbers({"coefficients": [1.0, True],
    ...                      "branches": [{"path": "a", "weight": False}]})
    [(('coefficients', 1), True), (('branches', 0, 'weight'), False)]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

__all__ = ["BOOL_NOT_NUMBER", "bool_params", "bools_where_numbers", "check_path"]

BOOL_NOT_NUMBER = (
    "must be a number, not a boolean (YAML reads true/false/yes/no/on/off as booleans)"
)


def check_path(value: Path, what: str) -> Path:
    """``value`` if it exists, else ``ValueError`` saying where it was looked for."""
    if value.exists():
        return value
    if value.is_absolute():
        raise ValueError(f"{what} not found: {str(value)!r}")
    looks_like_hub_id = (
        len(value.parts) == 2
        and not value.parts[0].startswith(".")
        and not Path(value.parts[0]).exists()
        and not value.suffix
    )
    hint = (
        "; if it is a Hugging Face Hub id, download it first (e.g. `huggingface-cli download "
        f"{value.as_posix()} --local-dir <folder>`) and give the folder"
        if looks_like_hub_id
        else ""
    )
    raise ValueError(
        f"{what} not found: {str(value)!r} (relative paths are resolved against the current "
        f"directory, not the config file's folder: looked for {str(Path.cwd() / value)!r}){hint}"
    )


def bools_where_numbers(data: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], Any]]:
    """``(field path, value)`` of each boolean given for a coefficient or the seed."""
    found: list[tuple[tuple[str | int, ...], Any]] = []
    if isinstance(data.get("seed"), bool):
        found.append((("seed",), data["seed"]))
    coefficients = data.get("coefficients")
    if isinstance(coefficients, list):
        found += [
            (("coefficients", i), v) for i, v in enumerate(coefficients) if isinstance(v, bool)
        ]
    branches = data.get("branches", data.get("models"))
    key = "branches" if "branches" in data else "models"
    for i, branch in enumerate(branches if isinstance(branches, list) else []):
        if not isinstance(branch, Mapping):
            continue
        nested = branch.get("parameters")
        for name in ("coefficient", "weight"):
            if isinstance(branch.get(name), bool):
                found.append(((key, i, name), branch[name]))
            if isinstance(nested, Mapping) and isinstance(nested.get(name), bool):
                found.append(((key, i, "parameters", name), nested[name]))
    return found


def bool_params(params: Mapping[str, Any], fields: Mapping[str, Any]) -> list[str]:
    """Names of method parameters given a boolean whose declared type is not ``bool``."""
    bad = []
    for name, value in params.items():
        field = fields.get(name)
        if not isinstance(value, bool) or field is None:
            continue
        annotation = field.annotation
        if annotation is not bool and bool not in get_args(annotation):
            bad.append(name)
    return bad
