"""The ``drm-merge`` configuration: schema, strict YAML loading, errors, and the translators.

- :mod:`~drm_lightning.config.schema`: our format (:class:`MergeConfig`, pydantic).
- :mod:`~drm_lightning.config.mergekit`: mergekit's format (``merge_method:``), its semantics.
- :mod:`~drm_lightning.config.align`: the alignment methods (``mudsc_zip``, ``align:``).
- :mod:`~drm_lightning.config.loading`: :func:`load_config` — the one place that picks the format.
- :mod:`~drm_lightning.config.yaml_file`, :mod:`~drm_lightning.config.errors`,
  :mod:`~drm_lightning.config.values`: strict YAML with lines, located messages, value checks.

Example:
    >>> cfg = parse_config("method: drm\\nbase: .\\nbranches: [., .]\\n")
    >>> cfg.method, len(cfg.branches)
    ('drm', 2)
"""

from drm_lightning.config.errors import ConfigError, format_validation_error
from drm_lightning.config.loading import load_config, parse_config
from drm_lightning.config.schema import BranchConfig, CodeMode, MergeConfig, RoutingConfig

__all__ = [
    "BranchConfig",
    "CodeMode",
    "ConfigError",
    "MergeConfig",
    "RoutingConfig",
    "format_validation_error",
    "load_config",
    "parse_config",
]
