"""Merge methods: pure tensor math, one file a method, one registry.

Example:
    >>> from drm_lightning.methods import available_methods, get_method
    >>> "drm" in available_methods()
    True
"""

from drm_lightning.methods.base import (
    LowRankFactors,
    MergeMethod,
    MethodParams,
    Route,
    available_methods,
    get_method,
    method_parameters,
    register_method,
)
from drm_lightning.methods.drm import DRM, drm_merge, drm_merge_lowrank, shared_basis

register_method("drm", DRM)

__all__ = [
    "DRM",
    "LowRankFactors",
    "MergeMethod",
    "MethodParams",
    "Route",
    "available_methods",
    "drm_merge",
    "drm_merge_lowrank",
    "get_method",
    "method_parameters",
    "register_method",
    "shared_basis",
]
