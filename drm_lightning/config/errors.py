"""Config errors located for the user, and the base of every config section.

Every problem of a config is reported at once, one line each, as ``field.path: message``
with the YAML line when known (:func:`format_validation_error`). :class:`_Section` is the
pydantic base of the config sections: unknown keys are refused with the closest valid names.

Example:
    >>> format_loc(("branches", 1, "coefficient"))
    'branches[1].coefficient'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from drm_lightning.config.yaml_file import Lines
from drm_lightning.methods.base import closest_names


class ConfigError(ValueError):
    """A configuration problem, already formatted for the user (file, line or field path)."""


# --------------------------------------------------------------------------- error helpers


def format_loc(loc: Sequence[str | int]) -> str:
    """``("branches", 1, "coefficient")`` -> ``"branches[1].coefficient"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _friendly_message(error: Mapping[str, Any]) -> str:
    """A short message for one pydantic error, with the offending value."""
    kind = error["type"]
    ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in (error.get("ctx") or {}).items()}
    simple = {
        "greater_than_equal": "must be >= {ge}",
        "greater_than": "must be > {gt}",
        "less_than": "must be < {lt}",
        "less_than_equal": "must be <= {le}",
        "finite_number": "must be a finite number",
        "missing": "required field is missing",
        "too_short": "needs at least {min_length} item(s)",
    }
    if kind in simple:
        msg = simple[kind].format(**ctx)
    else:
        msg = str(error["msg"])
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = error.get("input")
    if kind not in ("missing", "extra_forbidden") and not (kind == "config" and value is None):
        shown = repr(str(value)) if isinstance(value, Path) else repr(value)
        if (not isinstance(value, (Mapping, list)) or len(shown) < 60) and shown not in msg:
            msg += f" (got {shown})"
    return msg


def format_validation_error(
    err: ValidationError, *, source: str | None = None, where: Lines | None = None
) -> str:
    """One line per problem, ``field.path: message``, prefixed by the config file if known
    and by the line of the value when ``where`` (from the YAML text) is given."""
    lines = []
    for e in err.errors():
        loc = format_loc(e["loc"])
        msg = _friendly_message(e)
        line = f"{loc}: {msg}" if loc else msg
        number = where.of(e["loc"]) if where is not None else None
        lines.append(f"line {number}: {line}" if number is not None else line)
    head = f"invalid configuration {source}" if source else "invalid configuration"
    if len(lines) == 1:
        return f"{head}: {lines[0]}" if source else lines[0]
    return f"{head} ({len(lines)} problems):\n  " + "\n  ".join(lines)


def _error(loc: tuple[str | int, ...], message: str, value: Any = None) -> InitErrorDetails:
    # ``message`` is a finished sentence; without a context pydantic substitutes nothing in it
    # (it has no ``{{`` escape: escaping would double the braces of a message).
    return InitErrorDetails(type=PydanticCustomError("config", message), loc=loc, input=value)


def _reraise(title: str, errors: list[InitErrorDetails]) -> None:
    if errors:
        raise ValidationError.from_exception_data(title, errors)


def _passthrough(e: Mapping[str, Any]) -> InitErrorDetails:
    return InitErrorDetails(
        type=PydanticCustomError(
            str(e["type"]), str(e["msg"]), e.get("ctx")
        ),  # msg is formatted already (braces kept as they are); ctx is for _friendly_message
        loc=tuple(e["loc"]),
        input=e.get("input"),
    )


class _Section(BaseModel):
    """A config section: unknown keys rejected with the closest valid names, all errors at once.

    Subclasses add checks that need the whole section in :meth:`_more_errors`; their errors are
    reported together with pydantic's own, each at its exact field path.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    aliases: ClassVar[dict[str, str]] = {}
    """Accepted alternative spellings (mergekit's) -> field name."""

    @classmethod
    def _more_errors(cls, data: Mapping[str, Any]) -> list[InitErrorDetails]:
        return []

    @model_validator(mode="wrap")
    @classmethod
    def _collect_errors(cls, data: Any, handler: Any) -> Any:
        errors: list[InitErrorDetails] = []
        model = None
        try:
            model = handler(data)
        except ValidationError as err:
            for e in err.errors():
                loc = tuple(e["loc"])
                if e["type"] == "extra_forbidden" and len(loc) == 1 and isinstance(loc[0], str):
                    errors.append(_error(loc, cls._unknown_key_message(loc[0], data)))
                else:
                    errors.append(_passthrough(e))
        if isinstance(data, Mapping):
            errors.extend(cls._more_errors(data))
        _reraise(cls.__name__, errors)
        return model

    @classmethod
    def _unknown_key_message(cls, key: str, data: Any) -> str:
        target = cls.aliases.get(key)
        if target is not None and isinstance(data, Mapping) and target in data:
            return f"both {key!r} and {target!r} given (the same setting); keep one"
        return f"unknown key ({closest_names(key, list(cls.model_fields))})"
