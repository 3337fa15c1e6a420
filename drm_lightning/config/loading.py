"""Reading a config file: YAML loaded strictly, then the format picked and validated.

One place knows every format: ours (:class:`~drm_lightning.config.schema.MergeConfig`),
mergekit's (:mod:`drm_lightning.config.mergekit`) and the alignment methods'
(:mod:`drm_lightning.config.align`).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from drm_lightning.config.align import alignment_config
from drm_lightning.config.errors import ConfigError, format_validation_error
from drm_lightning.config.mergekit import mergekit_config
from drm_lightning.config.schema import CONFIG_OPT_IN, CodeMode, MergeConfig
from drm_lightning.config.yaml_file import StrictYAMLError, load_yaml
from drm_lightning.methods import available_methods
from drm_lightning.sources.input_files import open_regular

#: Largest config file read (configs are a few KB; a larger file is not a config).
MAX_CONFIG_BYTES = 1024**2


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The text of the config file ``path``: a regular file (checked before it is opened, as
    every input file: :func:`~drm_lightning.sources.input_files.open_regular`) of at most
    :data:`MAX_CONFIG_BYTES`.

    Raises:
        ConfigError: not a regular file, or larger than :data:`MAX_CONFIG_BYTES`.
        OSError, UnicodeDecodeError: missing or unreadable (as ``Path.read_text``).
    """
    try:
        fd, _ = open_regular(path)
    except ValueError as err:
        raise ConfigError(f"{err}; give the config as a file") from None
    with open(fd, "rb", closefd=True) as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: is larger than {MAX_CONFIG_BYTES // 1024**2} MiB; a config is a few KB "
            "(this does not look like a config file)"
        )
    return data.decode("utf-8")


def load_config(path: str | Path, *, code: CodeMode = "refuse") -> MergeConfig:
    """Read and validate a YAML config file.

    ``code`` says what the ``module:function`` references of an alignment config and an
    ``alpha_search.command`` get (:data:`CodeMode`); by default they are refused, as a file
    cannot opt in to running code.

    Raises:
        ConfigError: the file is missing or unreadable, is not valid YAML (the message names
            the file, line and column), is not a mapping, sets ``trust_pickles``, or fails
            validation (every problem with its field path).
    """
    path = Path(path)
    try:
        text = read_config_text(path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {str(path)!r}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {str(path)!r}: {err}") from None
    return parse_config(text, source=str(path), code=code)


def parse_config(text: str, *, source: str = "<config>", code: CodeMode = "refuse") -> MergeConfig:
    """Validate YAML ``text``; ``source`` names it in error messages (``code``: see
    :func:`load_config`)."""
    try:
        data, lines = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        if isinstance(err, StrictYAMLError):  # a duplicate key, an alias bomb: not syntax
            raise ConfigError(f"{where}: {detail}") from None
        raise ConfigError(f"{where}: YAML syntax error: {detail}") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            f"{source}: the config must be a mapping with at least 'method', 'base' and "
            f"'branches', but the file is {kind}"
        )
    if "trust_pickles" in data:  # every format: ours, mergekit's, alignment
        line = lines.of(("trust_pickles",))
        raise ConfigError(
            f"invalid configuration {source}: line {line}: trust_pickles: {CONFIG_OPT_IN}"
        )
    if "merge_method" in data and "method" not in data:  # mergekit's format, its semantics
        return mergekit_config(data, lines, source=source, text=text)
    if "align" in data or data.get("method") not in (None, *available_methods()):
        aligned = alignment_config(data, lines, source=source, code=code)
        if aligned is not None:
            return aligned  # type: ignore[return-value]
    try:
        return MergeConfig.model_validate(data, context={"code": code})
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source, where=lines)) from None
